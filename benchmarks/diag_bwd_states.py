"""Diagnosis: each reverse-state-pass variant's gradients against an fp64 reference, and run to run.

    python benchmarks/diag_bwd_states.py            # every shape, dtype and variant, one subprocess each
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import torch

SHAPES = ((8, 9, 8192, 64), (1, 9, 16384, 64))
NAMES = ("dq", "dk", "dv", "di", "df")


def inputs(B, H, S, D, dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, H, S, D, device="cuda", generator=g).softmax(-1).to(dtype)
    k = torch.randn(B, H, S, D, device="cuda", generator=g).softmax(-1).to(dtype)
    v = torch.randn(B, H, S, D, device="cuda", generator=g).to(dtype)
    i_pre = torch.randn(B, H, S, device="cuda", generator=g)
    f_pre = torch.randn(B, H, S, device="cuda", generator=g) + 3.0
    return [q, k, v, i_pre, f_pre]


def grads(fn, xs):
    xs = [x.detach().clone().requires_grad_(True) for x in xs]
    out = fn(*xs)
    out.backward(torch.ones_like(out))
    return [x.grad.double() for x in xs]


def one(B, H, S, D, dtype, prefetch, n_dot):
    from xmerge.kernels import mlstm_chunkwise as mk
    from xmerge.modeling.mlstm import mlstm_chunkwise

    xs = inputs(B, H, S, D, getattr(torch, dtype))
    ref = grads(lambda *a: mlstm_chunkwise(*a, chunk_size=64)[0], [x.double() for x in xs])
    mk.BWD_STATES_AB.update(PREFETCH=prefetch, N_DOT=n_dot)
    runs = [grads(lambda *a: mk.mlstm_chunkwise_triton(*a)[0], xs) for _ in range(2)]
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    return {
        "shape": [B, H, S, D], "dtype": dtype, "prefetch": prefetch, "n_dot": n_dot,
        "vs_fp64": {n: rel(g, r) for n, g, r in zip(NAMES, runs[0], ref)},
        "run_to_run": {n: rel(a, b) for n, a, b in zip(NAMES, runs[1], runs[0])},
    }


def main():
    if len(sys.argv) > 1:
        B, H, S, D, prefetch, n_dot = map(int, sys.argv[1:7])
        print(json.dumps(one(B, H, S, D, sys.argv[7], prefetch, n_dot)), flush=True)
        return
    for shape, dtype, (prefetch, n_dot) in itertools.product(
        SHAPES, ("float32", "bfloat16"), itertools.product((0, 1), (0, 1))
    ):
        args = [*map(str, shape), str(prefetch), str(n_dot), dtype]
        try:
            res = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, timeout=150)
            line = res.stdout.strip().splitlines()[-1:] or [f"rc {res.returncode}: {res.stderr.strip()[-300:]}"]
            print(" ".join(args), line[0], flush=True)
        except subprocess.TimeoutExpired:
            print(" ".join(args), "timeout", flush=True)


if __name__ == "__main__":
    main()
