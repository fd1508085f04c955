"""Time the fused decode-step kernel (kernels/decode_step.py) over its launch shapes, on one GPU.

One layer of the hybrid student, SmolLM2 dims by default (9 heads, 3 kv heads, D 64, window 512,
4 sinks), bf16 projections/ring/weights and fp32 state as in the graph decoder, ring full. Each launch
(split: window programs per head, 0 = one program; block_w ring slots per loop step; num_warps) is
timed inside a CUDA graph (as the decoder replays it) and compared with a baseline launch of the same
run (by default one program, 64 slots over 4 warps, the launch before the first sweep): ratio =
baseline time / its time (> 1: faster), and the relative error of its output against the baseline's
(same inputs). "shipped" marks the launch ``default_split`` and ``default_launch`` pick.

    python benchmarks/decode_step_launch.py --batch 1,8,32 --out decode_step_launch.json
    python benchmarks/decode_step_launch.py --batch 1,2,4,8 --block-w 512 --warps 2,4,8 --splits 1,2,4,8
"""

from __future__ import annotations

import argparse
import itertools
import json
import math

import torch
import triton

from xmerge.kernels.decode_step import default_launch, default_split, fused_decode_step


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
    """A call of the kernel with launch (split, block_w, num_warps) on fresh copies of the mutable inputs,
    and the call itself (for timing; the split step's counters allocated once, as the decoder's cache does)."""
    proj, rope, slot, start, state, fmaps, ring, sinks = args
    state, ring = tuple(t.clone() for t in state), tuple(t.clone() for t in ring)
    arrivals = torch.zeros(proj.shape[0] * H, dtype=torch.int32, device=proj.device)

    def run():
        return fused_decode_step(
            proj, proj[:, : H * D], proj[:, H * D : (H + Hkv) * D], rope, slot, start, state, *fmaps, ring, sinks,
            mixer=mixer, fmap_after_rope=False, eps=1e-6, split=launch[0], launch=launch[1:], arrivals=arrivals,
        )

    return run(), run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", default="1,8,32", help="batch sizes")
    parser.add_argument("--dims", default="9,3,64,512,4", help="H,Hkv,D,W,S")
    parser.add_argument("--block-w", default="32,64,128,256,512", help="ring slots per loop step to try")
    parser.add_argument("--warps", default="2,4,8,16", help="num_warps to try")
    parser.add_argument("--splits", default="0",
                        help="window programs per (row, head) to try: 0 = one program for the whole step; "
                             "a split launch takes its share in one block, over each --warps count")
    parser.add_argument("--baseline", default="64,4", help="block_w,num_warps of the baseline launch (unsplit)")
    parser.add_argument("--mixers", default="hybrid",
                        help="mixers to time (hybrid, swa, mlstm: what each branch of the step costs alone); "
                             "each is compared with the baseline launch of the same mixer")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    H, Hkv, D, W, S = map(int, args.dims.split(","))
    baseline = (0, *map(int, args.baseline.split(",")))
    warps = list(map(int, args.warps.split(",")))
    rows = []
    for B, mixer in itertools.product(map(int, args.batch.split(",")), args.mixers.split(",")):
        data = inputs(B, H, Hkv, D, W, S, pos=4 * W + 3)
        split = default_split(B * H, W, mixer)
        shipped = (split, *default_launch(D, W, B * H, split))
        launches = [(0, block_w, w) for block_w, w in itertools.product(map(int, args.block_w.split(",")), warps)]
        launches += [(p, default_launch(D, W, B * H, p)[0], w)
                     for p, w in itertools.product(map(int, args.splits.split(",")), warps) if p]
        want, run = step(data, H, Hkv, D, baseline, mixer)
        base = triton.testing.do_bench_cudagraph(run, rep=200, return_mode="median")
        for launch in launches:
            row = {"batch": B, "mixer": mixer, "dims": [H, Hkv, D, W, S], "split": launch[0], "block_w": launch[1],
                   "num_warps": launch[2], "baseline": list(baseline), "shipped": launch == shipped}
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
    name = lambda r: f"({r['split']}, {r['block_w']}, {r['num_warps']})"  # noqa: E731
    for B, mixer in sorted({(r["batch"], r["mixer"]) for r in rows}):
        timed = [r for r in rows if (r["batch"], r["mixer"]) == (B, mixer) and "us" in r]
        best = min(timed, key=lambda r: r["us"])
        shipped = next((r for r in timed if r["shipped"]), None)
        print(f"B={B} {mixer}: best {name(best)} {best['us']:.2f} us ({best['vs_baseline']:.2f}x baseline "
              f"{best['baseline']})" + (f"; shipped {name(shipped)} {shipped['us']:.2f} us" if shipped else ""))


if __name__ == "__main__":
    main()
