"""Linear merge of 4 SmolLM2-135M-size student experts: xmerge's streaming merge vs mergekit's run_merge.

Both run on the same files in the same invocation, each merge in its own child process (so peak
RSS is that merge's own ru_maxrss), alternating ours/mergekit for --repeats rounds after one
warm-up read that puts the inputs in the page cache. Throughput = input bytes / seconds of the
merge call (interpreter start and imports excluded; their RSS is reported as the baseline).

    .venv/bin/python benchmarks/merge_vs_mergekit.py --dtype bf16 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SMOLLM2 = dict(layers=30, hidden=576, heads=9, kv_heads=3, head_dim=64, intermediate=1536, vocab=49152, tied=True)
WEIGHTS = [0.35, 0.35, 0.2, 0.1]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child(engine: str, experts: list[Path], out: Path) -> None:
    """Run one merge and print {seconds, rss_before_mb, rss_peak_mb} as JSON."""
    if engine == "xmerge":
        from xmerge.merge.linear import merge_linear

        def run():
            merge_linear(experts, WEIGHTS, out)
    else:
        from mergekit.config import InputModelDefinition, MergeConfiguration
        from mergekit.merge import run_merge
        from mergekit.options import MergeOptions

        from xmerge.merge.checkpoint import model_file
        from xmerge.merge.safetensors_io import read_layout
        from xmerge.merge.mergekit_methods import MERGEKIT_DTYPES, _reference, register_student_architecture

        register_student_architecture()
        dtype = MERGEKIT_DTYPES[next(iter(read_layout(model_file(experts[0]))[0].values())).dtype]
        config = MergeConfiguration(
            merge_method="linear",
            models=[InputModelDefinition(model=_reference(e), parameters={"weight": w}) for e, w in zip(experts, WEIGHTS)],
            parameters={"normalize": False},
            dtype="float32",
            out_dtype=dtype,
        )
        options = MergeOptions(quiet=True, copy_tokenizer=False, write_model_card=False)

        def run():
            run_merge(config, str(out), options)

    rss_before = max_rss_mb()
    start = time.perf_counter()
    run()
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "rss_before_mb": rss_before, "rss_peak_mb": max_rss_mb()}))


def make_experts(root: Path, dtype: torch.dtype) -> list[Path]:
    from xmerge.tests.merge_fixtures import random_tensors, student_shapes, write_student

    shapes = student_shapes("llama", **SMOLLM2)
    return [write_student(root / f"expert{i}", random_tensors(shapes, i, dtype), "llama") for i in range(len(WEIGHTS))]


def run_child(engine: str, experts: list[Path], out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, __file__, "--child", engine, "--out", str(out), *map(str, experts)]
    result = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def outputs_equal(a: Path, b: Path) -> bool:
    from safetensors import safe_open

    with safe_open(a / "model.safetensors", "pt") as fa, safe_open(b / "model.safetensors", "pt") as fb:
        if set(fa.keys()) != set(fb.keys()):
            return False
        return all(torch.equal(fa.get_tensor(n), fb.get_tensor(n)) for n in fa.keys())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=DTYPES, default="bf16")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None, help="where to write the experts (default: a temp dir)")
    parser.add_argument("--child", choices=["xmerge", "mergekit"], help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("experts", nargs="*", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.experts, args.out)
        return

    root = Path(tempfile.mkdtemp(prefix="merge-bench-", dir=args.workdir))
    try:
        experts = make_experts(root, DTYPES[args.dtype])
        input_bytes = sum((e / "model.safetensors").stat().st_size for e in experts)
        for e in experts:  # warm the page cache so both engines read from memory
            (e / "model.safetensors").read_bytes()
        runs: dict[str, list[dict]] = {"xmerge": [], "mergekit": []}
        for _ in range(args.repeats):
            for engine in runs:
                runs[engine].append(run_child(engine, experts, root / f"out-{engine}"))
        equal = outputs_equal(root / "out-xmerge", root / "out-mergekit")
    finally:
        shutil.rmtree(root, ignore_errors=True)

    def summary(engine: str) -> tuple[float, float, float]:
        seconds = statistics.median(r["seconds"] for r in runs[engine])
        peak = max(r["rss_peak_mb"] for r in runs[engine])
        before = statistics.median(r["rss_before_mb"] for r in runs[engine])
        return seconds, peak, before

    ours, theirs = summary("xmerge"), summary("mergekit")
    gb = input_bytes / 1e9
    print(f"4 experts x {input_bytes / 4 / 1e6:.0f} MB ({args.dtype}), {gb:.2f} GB read per merge, "
          f"median of {args.repeats}, torch threads {torch.get_num_threads()}\n")
    print("| engine | seconds | input GB/s | peak RSS MB | RSS after imports MB | peak - imports MB |")
    print("|---|---|---|---|---|---|")
    for name, (seconds, peak, before) in (("xmerge merge_linear", ours), ("mergekit run_merge (linear)", theirs)):
        print(f"| {name} | {seconds:.2f} | {gb / seconds:.2f} | {peak:.0f} | {before:.0f} | {peak - before:.0f} |")
    print(f"\nthroughput ratio xmerge / mergekit: {theirs[0] / ours[0]:.2f}x; "
          f"peak RSS ratio: {ours[1] / theirs[1]:.2f}; outputs bit-identical: {equal}")


if __name__ == "__main__":
    main()
