"""CPU forward throughput of the hybrid student vs its teacher (SmolLM2-135M-Instruct), same run.

    .venv/bin/python -m xmerge.benchmarks.student_vs_teacher_cpu [--batch 2 --seq 512 --repeats 5]

Both models run fp32 under torch.inference_mode on the same random token batch; the best of
``repeats`` timed runs (after one warm-up) is reported for each, interleaved so machine noise
hits both alike. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import time

import torch

from xmerge.modeling.convert import convert_teacher
from xmerge.modeling.teacher import load_teacher


def best_time(model, ids, repeats: int) -> list[float]:
    times = []
    with torch.inference_mode():
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(ids)
            times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--window", type=int, default=512)
    args = parser.parse_args()

    teacher, _ = load_teacher("smollm2-135m-instruct")
    student = convert_teacher(teacher, window=args.window)
    ids = torch.randint(0, teacher.config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    models = {"teacher (HF Llama, SDPA)": teacher, f"student (hybrid, W={args.window})": student}
    for model in models.values():
        best_time(model, ids, 1)  # warm-up
    timings = {name: [] for name in models}
    for _ in range(args.repeats):
        for name, model in models.items():
            timings[name] += best_time(model, ids, 1)
    tokens = args.batch * args.seq
    base = min(timings["teacher (HF Llama, SDPA)"])
    print(f"threads={torch.get_num_threads()} batch={args.batch} seq={args.seq} torch={torch.__version__}\n")
    print("| model | best forward (s) | tokens/s | ratio vs teacher |")
    print("|---|---|---|---|")
    for name, ts in timings.items():
        best = min(ts)
        print(f"| {name} | {best:.3f} | {tokens / best:,.0f} | {base / best:.2f}x |")


if __name__ == "__main__":
    main()
