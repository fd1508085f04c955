"""Time the fused decode-step kernel (kernels/decode_step.py) over its launch shapes, on one GPU.

One layer of the hybrid student, SmolLM2 dims by default (9 heads, 3 kv heads, D 64, window 512,
4 sinks), bf16 projections/ring/weights and fp32 state as in the graph decoder, ring full. Each launch
(block_w ring slots per loop step, num_warps) is timed inside a CUDA graph (as the decoder replays it)
and compared with a baseline launch of the same run (by default 64 slots over 4 warps, the launch
before this sweep): ratio = baseline time / its time (> 1: faster), and the relative error of its
output against the baseline's (same inputs). "shipped" marks the launch ``default_launch`` picks.

    python benchmarks/decode_step_launch.py --batch 1,8,32 --out decode_step_launch.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import math

import torch
import triton

from xmerge.kernels.decode_step import default_launch, fused_decode_step


def inputs(B, H, Hkv, D, W, S, pos):
    g = torch.Generator(device="cuda").manual_seed(0)
    rnd = lambda *shape: torch.randn(*shape, device="cuda", generator=g)  # noqa: E731
    bf16 = torch.bfloat16
    proj = rnd(B, (H + 2 * Hkv) * D + 3 * H).to(bf16)  # [q; k; v; ĩ; f̃; õ]
    rope = (1.0 / 100000 ** (torch.arange(0, D, 2, device="cuda") / D), 1.0, bf16)  # SmolLM2's RoPE
    state = (rnd(B, H, D, D).abs() * 0.01, rnd(B, H, D).abs(), rnd(B, H))
    fmaps = ((rnd(H, D, D).to(bf16) / math.sqrt(D), rnd(H, D).to(bf16)),
             (rnd(Hkv, D, D).to(bf16) / math.sqrt(D), rnd(Hkv, D).to(bf16)))
    ring_pos = torch.arange(pos - W, pos, device="cuda")
    ring = (rnd(B, Hkv, W, D).to(bf16), rnd(B, Hkv, W, D).to(bf16), ring_pos[torch.argsort(ring_pos % W)])
    sink_pos = torch.arange(S, device="cuda").expand(B, S).contiguous()
    sinks = (rnd(B, Hkv, S, D).to(bf16), rnd(B, Hkv, S, D).to(bf16), sink_pos)
    slot, start = torch.tensor([pos], device="cuda"), torch.zeros(B, dtype=torch.long, device="cuda")
    return proj, rope, slot, start, state, fmaps, ring, sinks


def step(args, H, Hkv, D, launch, mixer="hybrid"):
    """A call of the kernel on fresh copies of the mutable inputs, and the call itself (for timing)."""
    proj, rope, slot, start, state, fmaps, ring, sinks = args
    state, ring = tuple(t.clone() for t in state), tuple(t.clone() for t in ring)

    def run():
        return fused_decode_step(
            proj, proj[:, : H * D], proj[:, H * D : (H + Hkv) * D], rope, slot, start,
            state, *fmaps, ring, sinks, mixer=mixer, fmap_after_rope=False, eps=1e-6, launch=launch,
        )

    return run(), run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", default="1,8,32", help="batch sizes")
    parser.add_argument("--dims", default="9,3,64,512,4", help="H,Hkv,D,W,S")
    parser.add_argument("--block-w", default="32,64,128,256,512", help="ring slots per loop step to try")
    parser.add_argument("--warps", default="2,4,8,16", help="num_warps to try")
    parser.add_argument("--baseline", default="64,4", help="block_w,num_warps of the baseline launch")
    parser.add_argument("--mixers", default="hybrid",
                        help="mixers to time (hybrid, swa, mlstm: what each branch of the step costs alone); "
                             "each is compared with the baseline launch of the same mixer")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    H, Hkv, D, W, S = map(int, args.dims.split(","))
    baseline = tuple(map(int, args.baseline.split(",")))
    launches = list(itertools.product(map(int, args.block_w.split(",")), map(int, args.warps.split(","))))
    rows = []
    for B, mixer in itertools.product(map(int, args.batch.split(",")), args.mixers.split(",")):
        data = inputs(B, H, Hkv, D, W, S, pos=4 * W + 3)
        shipped = default_launch(D, W, B * H)
        want, run = step(data, H, Hkv, D, baseline, mixer)
        base = triton.testing.do_bench_cudagraph(run, rep=200, return_mode="median")
        for launch in launches:
            row = {"batch": B, "mixer": mixer, "dims": [H, Hkv, D, W, S], "block_w": launch[0],
                   "num_warps": launch[1], "baseline": list(baseline), "shipped": launch == shipped}
            try:
                got, run = step(data, H, Hkv, D, launch, mixer)
                row["us"] = 1e3 * triton.testing.do_bench_cudagraph(run, rep=200, return_mode="median")
                row["vs_baseline"] = 1e3 * base / row["us"]
                row["rel_err_vs_baseline"] = ((got.float() - want.float()).norm() / want.float().norm()).item()
            except Exception as error:  # noqa: BLE001 - a launch that does not compile or fit is a result
                row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
            rows.append(row)
            print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(rows, f, indent=1)
    for B, mixer in sorted({(r["batch"], r["mixer"]) for r in rows}):
        timed = [r for r in rows if (r["batch"], r["mixer"]) == (B, mixer) and "us" in r]
        best = min(timed, key=lambda r: r["us"])
        shipped = next((r for r in timed if r["shipped"]), None)
        print(f"B={B} {mixer}: best ({best['block_w']}, {best['num_warps']}) {best['us']:.2f} us "
              f"({best['vs_baseline']:.2f}x baseline {best['baseline']})"
              + (f"; shipped ({shipped['block_w']}, {shipped['num_warps']}) {shipped['us']:.2f} us"
                 if shipped else ""))

if __name__ == "__main__":
    main()
