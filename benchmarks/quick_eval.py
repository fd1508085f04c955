"""Wall time of the quick eval suite for the SmolLM2-135M student, vs plain forward passes, same run.

    .venv/bin/python -m xmerge.benchmarks.quick_eval [--threads 2 --seq 512 --domains math,code,chat]

Eval sets are built first (held-out blocks of the presets, the teacher's top-256 targets) and
are not timed. Timed, interleaved over --repeats rounds (best kept): `evaluate(.., "quick")` of
the student and of the teacher, and the baseline: one student forward over the same blocks
with the same batch size (the least the token metrics can cost). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from xmerge.benchmarks.tables import print_ratio_table
from xmerge.evals.quick import SUITES, EvalSet, evaluate
from xmerge.experts.data import load_domain
from xmerge.experts.targets import topk_logprobs
from xmerge.modeling.convert import convert_teacher
from xmerge.modeling.teacher import load_teacher


@torch.inference_mode()
def eval_set(domain: str, teacher, tokenizer, seq: int, tokens: int, k: int, cache: Path) -> EvalSet:
    data = load_domain(domain, tokenizer, seq_len=seq, cache_dir=cache, teacher=teacher,
                       max_train_tokens=seq, max_heldout_tokens=max(tokens, seq))
    indices, logprobs = topk_logprobs(teacher(data.heldout).logits, k)
    return EvalSet(data.heldout, indices, logprobs, data.math_problems_heldout or ())


@torch.inference_mode()
def forward_only(model, sets: dict[str, EvalSet], batch_size: int) -> None:
    for data in sets.values():
        for start in range(0, data.blocks.shape[0], batch_size):
            model(input_ids=data.blocks[start : start + batch_size])


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="smollm2-135m-instruct", help="alias, GGUF file or HF directory")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--k", type=int, default=256)
    parser.add_argument("--domains", default="math,code,chat")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "xmerge-bench-cache")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    suite = SUITES["quick"]
    teacher, tokenizer = load_teacher(args.teacher)
    student = convert_teacher(teacher)
    sets = {d: eval_set(d, teacher, tokenizer, args.seq, suite.max_tokens, args.k, args.cache)
            for d in args.domains.split(",")}
    baseline = "baseline: student forward over the blocks"
    jobs = {"quick suite, student": lambda: evaluate(student, tokenizer, "quick", sets),
            "quick suite, teacher": lambda: evaluate(teacher, tokenizer, "quick", sets),
            baseline: lambda: forward_only(student, sets, suite.batch_size)}
    rows = {name: [] for name in jobs}
    for _ in range(args.repeats):
        for name, job in jobs.items():
            rows[name].append(timed(job))
    n_blocks = sum(s.blocks.shape[0] for s in sets.values())
    n_problems = sum(min(len(s.problems), suite.max_problems) for s in sets.values())
    print(f"threads={torch.get_num_threads()} torch={torch.__version__} domains={args.domains} "
          f"blocks={n_blocks}x{args.seq} math problems={n_problems} (answer ≤ {suite.answer_tokens} tokens)\n")
    best = {name: min(ts) for name, ts in rows.items()}
    print_ratio_table(best, baseline, row="timed", value="best wall (s)")


if __name__ == "__main__":
    main()
