"""Wall time of the quick suite through `evaluate_ref` (the registry path `xmerge eval` and the gate take).

    .venv/bin/python -m xmerge.benchmarks.eval_ref [--threads 2 --domains math,code --repeats 2]

A seed of --teacher is registered in a scratch registry; a first `evaluate_ref` of the seed builds
the eval sets (held-out blocks, the teacher's top-64 targets) and the teacher's metrics (reported,
cold). Then, per round: a fresh expert (the seed with one weight changed, so a new hash: a cache miss
for the model, the teacher's metrics cached) evaluated against the teacher — the gate's case; the same
call repeated (a cache hit); and the baseline, one student forward over the same blocks with the
suite's batch size (the least the token metrics can cost). Best of --repeats. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from xmerge.benchmarks.quick_eval import forward_only, timed
from xmerge.benchmarks.tables import print_ratio_table
from xmerge.evals.quick import SUITES
from xmerge.evals.run import evaluate_ref
from xmerge.evals.sets import domain_eval_sets
from xmerge.experts.seed import checkout_cached, create_seed
from xmerge.registry import Registry

NEW = "evaluate_ref, new student vs cached teacher (gate case)"
AGAIN = "evaluate_ref, same again (cache hit)"
BASELINE = "baseline: student forward over the blocks"


def fresh_expert(reg: Registry, seed, round_index: int):
    """The seed's weights with one element changed: a model the registry has never evaluated."""
    tensors = load_file(reg.blob_path(seed.weights_sha))
    tensors["model.norm.weight"][0] += 1e-3 * (round_index + 1)
    path = reg.home / f"expert-{round_index}.safetensors"
    save_file(tensors, path)
    expert = reg.add_expert(seed.name, "math", path)
    path.unlink()
    return expert


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="smollm2-135m-instruct", help="alias, GGUF file or HF directory")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--domains", default="math,code")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--home", type=Path, default=Path(tempfile.gettempdir()) / "xmerge-bench-evalref")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    domains = args.domains.split(",")

    shutil.rmtree(args.home, ignore_errors=True)
    reg = Registry(args.home)
    reg.init()
    create_seed(reg, "bench", args.teacher)
    seed = reg.resolve("seed:bench")
    cold = timed(lambda: evaluate_ref(reg, "seed:bench", domains=domains))

    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(checkout_cached(reg, seed), dtype=torch.float32).eval()
    sets = domain_eval_sets(reg, seed, domains)
    rows: dict[str, list[float]] = {NEW: [], AGAIN: [], BASELINE: []}
    for round_index in range(args.repeats):
        expert = fresh_expert(reg, seed, round_index)
        reports = []
        rows[NEW].append(timed(lambda: reports.append(evaluate_ref(reg, expert.ref, domains=domains))))
        rows[AGAIN].append(timed(lambda: reports.append(evaluate_ref(reg, expert.ref, domains=domains))))
        rows[BASELINE].append(timed(lambda: forward_only(student, sets, SUITES["quick"].batch_size)))
        assert not reports[0].cached and reports[1].cached and reports[1].evaluated == ()
    n_blocks = sum(s.blocks.shape[0] for s in sets.values())
    seq = next(iter(sets.values())).blocks.shape[1]
    n_problems = sum(min(len(s.problems), SUITES["quick"].max_problems) for s in sets.values())
    print(f"threads={torch.get_num_threads()} torch={torch.__version__} cpus={os.cpu_count()} "
          f"load={os.getloadavg()[0]:.1f} domains={args.domains} blocks={n_blocks}x{seq} math problems={n_problems}\n")
    print(f"first evaluate_ref of the seed (cold: eval sets, teacher targets, teacher + seed metrics): {cold:.1f} s\n")
    best = {name: min(ts) for name, ts in rows.items()}
    print_ratio_table(best, BASELINE, row="timed", value="best wall (s)")


if __name__ == "__main__":
    main()
