"""Linear merge of 4 SmolLM2-135M-size student experts: xmerge's streaming merge vs mergekit's run_merge.

Both run on the same files in the same invocation, each merge in its own child process (so peak
RSS is that merge's own ru_maxrss; the parent imports no torch and generates nothing itself,
because Linux carries a parent's peak RSS over into a forked child), alternating ours/mergekit
for --repeats rounds after one warm-up read that puts the inputs in the page cache.
Throughput = input bytes / seconds of the merge call (interpreter start and imports excluded;
their RSS is reported as the baseline).

    .venv/bin/python benchmarks/merge_vs_mergekit.py --dtype bf16 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SMOLLM2 = dict(layers=30, hidden=576, heads=9, kv_heads=3, head_dim=64, intermediate=1536, vocab=49152, tied=True)
WEIGHTS = [0.35, 0.35, 0.2, 0.1]
DTYPES = ("bf16", "fp32")


def max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child(engine: str, experts: list[Path], out: Path, threads: int | None) -> None:
    """Run one merge and print {seconds, rss_before_mb, rss_peak_mb} as JSON."""
    import torch

    if threads:
        torch.set_num_threads(threads)
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


def make_experts(root: Path, dtype: str) -> None:
    """Write expert0..3 under root: random tensors with the SmolLM2 student's names and shapes."""
    import torch

    from xmerge.tests.merge_fixtures import random_tensors, student_shapes, write_student

    shapes = student_shapes("llama", **SMOLLM2)
    torch_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    for i in range(len(WEIGHTS)):
        write_student(root / f"expert{i}", random_tensors(shapes, i, torch_dtype), "llama")


def outputs_equal(a: Path, b: Path) -> None:
    """Print whether two model dirs hold the same tensor names and bit-identical values."""
    import torch
    from safetensors import safe_open

    with safe_open(a / "model.safetensors", "pt") as fa, safe_open(b / "model.safetensors", "pt") as fb:
        same = set(fa.keys()) == set(fb.keys()) and all(
            torch.equal(fa.get_tensor(n).view(torch.uint8), fb.get_tensor(n).view(torch.uint8)) for n in fa.keys()
        )
    print(json.dumps(same))


def run_child(*args: str) -> object:
    result = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=DTYPES, default="bf16")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads of both merges (default: torch's)")
    parser.add_argument("--workdir", type=Path, default=None, help="where to write the experts (default: a temp dir)")
    parser.add_argument("--child", choices=["xmerge", "mergekit", "make", "compare"], help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("paths", nargs="*", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child in ("xmerge", "mergekit"):
        child(args.child, args.paths, args.out, args.threads)
        return
    if args.child == "make":
        make_experts(args.out, args.dtype)
        print("null")
        return
    if args.child == "compare":
        outputs_equal(*args.paths)
        return

    root = Path(tempfile.mkdtemp(prefix="merge-bench-", dir=args.workdir))
    try:
        run_child("--child", "make", "--dtype", args.dtype, "--out", str(root))
        experts = [root / f"expert{i}" for i in range(len(WEIGHTS))]
        input_bytes = sum((e / "model.safetensors").stat().st_size for e in experts)
        for e in experts:  # warm the page cache so both engines read from memory
            (e / "model.safetensors").read_bytes()
        runs: dict[str, list[dict]] = {"xmerge": [], "mergekit": []}
        for _ in range(args.repeats):
            for engine in runs:
                out = root / f"out-{engine}"
                shutil.rmtree(out, ignore_errors=True)
                threads = ["--threads", str(args.threads)] if args.threads else []
                runs[engine].append(run_child("--child", engine, *threads, "--out", str(out), *map(str, experts)))
        equal = run_child("--child", "compare", str(root / "out-xmerge"), str(root / "out-mergekit"))
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
          f"median of {args.repeats}, {os.cpu_count()} CPUs, "
          f"torch threads {args.threads or 'default'}\n")
    print("| engine | seconds | input GB/s | peak RSS MB | RSS after imports MB | peak - imports MB |")
    print("|---|---|---|---|---|---|")
    for name, (seconds, peak, before) in (("xmerge merge_linear", ours), ("mergekit run_merge (linear)", theirs)):
        print(f"| {name} | {seconds:.2f} | {gb / seconds:.2f} | {peak:.0f} | {before:.0f} | {peak - before:.0f} |")
    print(f"\nthroughput ratio xmerge / mergekit: {theirs[0] / ours[0]:.2f}x; "
          f"peak RSS ratio: {ours[1] / theirs[1]:.2f}; outputs bit-identical: {equal}")


if __name__ == "__main__":
    main()
