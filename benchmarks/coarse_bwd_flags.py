"""The coarse reverse pass of the two-level mLSTM backward (kernels/mlstm_chunkwise.COARSE_BWD) under each
setting of its PREFETCH / N_DOT flags (issue 7): fw+bw ms (autotuned afresh per setting) and the gradients'
relative error against the shipped setting, same run. A setting that faults kills the CUDA context, so rows
print as they finish; ``--pin I`` runs launch candidate I alone, to find a candidate that faults.

    python benchmarks/coarse_bwd_flags.py --shape 1,9,65536,64 --flags 1,0 0,0
"""

from __future__ import annotations

import argparse
import contextlib

import torch

from xmerge.benchmarks.kernels_mlstm import fw_bw, mlstm_inputs, ms
from xmerge.kernels import mlstm_chunkwise as mk


def gradients(step, xs) -> list[torch.Tensor]:
    for x in xs:
        x.grad = None
    step()
    return [x.grad.detach().clone() for x in xs]


def retune() -> None:
    """Forget the coarse pass's tuned launches (memory and disk): its tuning key holds no flags."""
    mk._bwd_states_coarse.cache.clear()
    mk._bwd_states_coarse.cache_results = False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="1,9,65536,64", help="B,H,S,D (two levels need B·H <= 16)")
    parser.add_argument("--flags", nargs="+", default=["1,0", "0,0"], help="PREFETCH,N_DOT settings")
    parser.add_argument("--pin", type=int, default=-1, help="launch candidate index to run alone (-1: autotune)")
    args = parser.parse_args()
    B, H, S, D = map(int, args.shape.split(","))
    xs = mlstm_inputs(B, H, S, D, requires_grad=True)
    step = fw_bw(lambda *a: mk.mlstm_chunkwise_triton(*a)[0], xs)
    pinned = mk.pinned_launches(args.pin, D, D) if args.pin >= 0 else contextlib.nullcontext()
    shipped = dict(mk.COARSE_BWD)
    with pinned as launch:
        if launch:
            print("pinned:", {name: str(config) for name, config in launch.items()}, flush=True)
        want = gradients(step, xs)
        print(f"shipped {shipped}: fw+bw {ms(step, xs):.3f} ms", flush=True)
        for setting in args.flags:
            prefetch, n_dot = map(int, setting.split(","))
            mk.COARSE_BWD.update(PREFETCH=prefetch, N_DOT=n_dot)
            retune()
            print(f"PREFETCH={prefetch} N_DOT={n_dot} ...", flush=True)
            got = gradients(step, xs)
            torch.cuda.synchronize()
            err = max(((g.double() - w.double()).norm() / w.double().norm()).item() for g, w in zip(got, want))
            print(f"PREFETCH={prefetch} N_DOT={n_dot}: fw+bw {ms(step, xs):.3f} ms, max grad rel. err {err:.2e}",
                  flush=True)


if __name__ == "__main__":
    main()
