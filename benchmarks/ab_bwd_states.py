"""A/B of the reverse state pass's variants (kernels/mlstm_chunkwise._bwd_states, BWD_STATES_AB).

PREFETCH 1: load chunk c-1's gates (b, m_t, den, ∂L/∂(qᵀn), stabilisers, D, A) during chunk c;
N_DOT 1: carry ∂L/∂n as 16 equal columns updated by a tensor-core product instead of a row sum.
The forward pass took both in 06f2b5c (its A/B: benchmarks/RESULTS-kernels.md). Per shape and variant:
fw+bw (do_bench, ms), each kernel's µs (profiler), FLA's fw+bw (guard lifted, a speed anchor), and
the gradients against the (0, 0) variant's (relative). One call on an H200 (~4 min with compiling):

    python benchmarks/ab_bwd_states.py --out ab_bwd_states.json
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch

from xmerge.benchmarks.kernels_mlstm import (
    SHAPES, fla_guard_lifted, fla_layout, fw_bw, kernel_times, mlstm_inputs, ms, outcome,
)
from xmerge.kernels import mlstm_chunkwise as mk


def fla_fwbw(xs) -> float:
    from fla.ops.simple_gla import chunk_simple_gla

    fla_xs = fla_layout(*xs[:3], xs[4])
    with fla_guard_lifted():
        return ms(fw_bw(lambda *a: chunk_simple_gla(*a)[0], fla_xs), fla_xs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    rows = []
    for B, H, S, D in SHAPES:
        xs = mlstm_inputs(B, H, S, D, requires_grad=True)
        fla = outcome(lambda: fla_fwbw(xs))  # its time, or its error
        step = fw_bw(lambda *a: mk.mlstm_chunkwise_triton(*a)[0], xs)
        base = None
        for prefetch, n_dot in itertools.product((0, 1), (0, 1)):
            mk.BWD_STATES_AB.update(PREFETCH=prefetch, N_DOT=n_dot)
            for x in xs:
                x.grad = None
            step()
            grads = [x.grad.float() for x in xs]
            base = base or grads
            fwbw = ms(step, xs)
            row = {"shape": [B, H, S, D], "prefetch": prefetch, "n_dot": n_dot, "fwbw": fwbw, "fla_fwbw": fla,
                   "fla/ours": fla / fwbw if isinstance(fla, float) else None, "kernels": kernel_times(step, xs),
                   "grad_err_vs_base": [((g - b).norm() / b.norm()).item() for g, b in zip(grads, base)]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    mk.BWD_STATES_AB.update(PREFETCH=0, N_DOT=0)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
