"""Benchmark the kernels against their anchors, on one GPU, in one run (bf16, median of do_bench).

mLSTM: our Triton chunkwise (kernels/mlstm_chunkwise.py; autotuned, and pinned to its first launch
candidates; "one_level" / "two_level" rows force either state pass, the plain rows take the shipped
choice) vs FLA
``chunk_simple_gla`` (fla-core)
and mlstm_kernels ``xl_chunk`` when importable. SWA: FlexAttention window + sinks
(kernels/swa.py) vs our Triton window + sinks (kernels/swa_triton.py, autotuned; its forward's relative
error vs Flex) vs SDPA causal. Anchors that fail are recorded with their error. "profile": each
kernel's time inside ours and FLA, forward and fw+bw; "launches": ours fw+bw launch by launch, in order;
"headline": ours and FLA's forward and fw+bw alone, and their ratios; "levels": one level of state passes
against two, wall and kernel time (none of these four in the default parts).

    python benchmarks/kernels_mlstm.py --out results.json [--shape 1,32,65536,128 ...] [--parts ours,fla]
"""

from __future__ import annotations

import argparse
import json
from contextlib import contextmanager

import torch
import torch.nn.functional as F
import triton

from xmerge.kernels import mlstm_chunkwise as mk
from xmerge.kernels.mlstm_chunkwise import mlstm_chunkwise_triton, pinned_launches
from xmerge.kernels.swa import swa_attention
from xmerge.kernels.swa_triton import swa_attention_triton
from xmerge.modeling.mlstm import mlstm_chunkwise

SHAPES = [(8, 9, 8192, 64), (1, 9, 65536, 64), (1, 32, 65536, 128)]
WINDOW, SINKS = 512, 4


def ms(fn, grads=None) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grads, return_mode="median")


def outcome(fn):
    """fn(), or its error in one line: a kernel or anchor that fails is a result, not a crash."""
    try:
        return fn()
    except Exception as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"


def attempt(fn, grads=None) -> float | str:
    return outcome(lambda: ms(fn, grads))


def mlstm_inputs(B, H, S, D, requires_grad=False):
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, H, S, D, device="cuda", generator=g).softmax(-1).bfloat16()
    k = torch.randn(B, H, S, D, device="cuda", generator=g).softmax(-1).bfloat16()
    v = torch.randn(B, H, S, D, device="cuda", generator=g).bfloat16()
    i_pre = torch.randn(B, H, S, device="cuda", generator=g)
    f_pre = torch.randn(B, H, S, device="cuda", generator=g) + 3.0
    return [x.requires_grad_(requires_grad) for x in (q, k, v, i_pre, f_pre)]


@contextmanager
def levels(two: bool):
    """Force one or two levels of state passes (the shipped choice depends on B·NH and the length)."""
    saved = mk.TWO_LEVEL_MAX_HEADS, mk.TWO_LEVEL_MIN_TOKENS
    mk.TWO_LEVEL_MAX_HEADS, mk.TWO_LEVEL_MIN_TOKENS = (2**31, 0) if two else (0, 2**62)
    try:
        yield
    finally:
        mk.TWO_LEVEL_MAX_HEADS, mk.TWO_LEVEL_MIN_TOKENS = saved


def fw_bw(fn, xs):
    def step():
        out = fn(*xs)
        out.backward(torch.ones_like(out))

    return step


def bench_ours(B, H, S, D) -> dict:
    xs = mlstm_inputs(B, H, S, D, requires_grad=True)
    row = {}
    with torch.no_grad():
        row["ours_fw"] = ms(lambda: mlstm_chunkwise_triton(*xs))
        h, _ = mlstm_chunkwise_triton(*xs)
        h_ref, _ = mlstm_chunkwise(*[x.float() for x in xs], chunk_size=64)
        row["ours_fw_relerr_vs_fp32_oracle"] = ((h.float() - h_ref).norm() / h_ref.norm()).item()
    row["ours_fwbw"] = ms(fw_bw(lambda *a: mlstm_chunkwise_triton(*a)[0], xs), xs)
    row |= bench_levels(B, H, S, D)
    with torch.no_grad():
        row["ours_fw_c128"] = attempt(lambda: mlstm_chunkwise_triton(*xs, chunk_size=128))
    row["ours_fwbw_c128"] = attempt(fw_bw(lambda *a: mlstm_chunkwise_triton(*a, chunk_size=128)[0], xs), xs)
    with pinned_launches(0, D, D):  # the first candidates, untimed: what autotuning gains over them
        with torch.no_grad():
            row["ours_fw_first_config"] = ms(lambda: mlstm_chunkwise_triton(*xs))
        row["ours_fwbw_first_config"] = ms(fw_bw(lambda *a: mlstm_chunkwise_triton(*a)[0], xs), xs)
    return row


def fla_layout(q, k, v, f_pre) -> list[torch.Tensor]:
    """FLA's inputs (B, T, H, D) and its log forget gate, as fresh leaves that take gradients."""
    qf, kf, vf = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
    return [qf, kf, vf, F.logsigmoid(f_pre.detach()).transpose(1, 2).contiguous().requires_grad_()]


@contextmanager
def fla_guard_lifted():
    """FLA refuses its gated backward on Hopper + Triton < 3.7.1 (wrong results, FLA #640); lifted, its
    fw+bw runs as a speed anchor only, its gradients unused."""
    import fla.ops.common.chunk_o as fla_chunk_o

    hopper, fla_chunk_o.IS_NVIDIA_HOPPER = fla_chunk_o.IS_NVIDIA_HOPPER, False
    try:
        yield
    finally:
        fla_chunk_o.IS_NVIDIA_HOPPER = hopper


def bench_fla(B, H, S, D) -> dict:
    try:
        import fla.ops.common.chunk_o as fla_chunk_o
        from fla.ops.simple_gla import chunk_simple_gla
    except Exception as e:
        return {"fla": f"import failed: {type(e).__name__}: {e}"}
    q, k, v, _, f_pre = mlstm_inputs(B, H, S, D)
    xs = fla_layout(q, k, v, f_pre)
    row = {}
    with torch.no_grad():
        row["fla_fw"] = attempt(lambda: chunk_simple_gla(*xs))
    row["fla_fwbw"] = attempt(fw_bw(lambda *a: chunk_simple_gla(*a)[0], xs), xs)
    if isinstance(row["fla_fwbw"], str) and fla_chunk_o.IS_NVIDIA_HOPPER:
        with fla_guard_lifted():
            row["fla_fwbw_guard_lifted"] = attempt(fw_bw(lambda *a: chunk_simple_gla(*a)[0], xs), xs)
    return row


def bench_xl_chunk(B, H, S, D) -> dict:
    try:
        from mlstm_kernels.torch.chunkwise.triton_xl_chunk import mlstm_chunkwise__xl_chunk
    except Exception as e:
        return {"xl_fw": f"import failed: {type(e).__name__}: {e}"}
    xs = mlstm_inputs(B, H, S, D, requires_grad=True)

    def xl(*a):
        return mlstm_chunkwise__xl_chunk(*a, autocast_kernel_dtype=torch.bfloat16)

    row = {}
    with torch.no_grad():
        row["xl_fw"] = attempt(lambda: xl(*xs))
    row["xl_fwbw"] = attempt(fw_bw(xl, xs), xs)
    return row


def bench_attention(B, H, S, D) -> dict:
    g = torch.Generator(device="cuda").manual_seed(1)
    xs = [torch.randn(B, H, S, D, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_() for _ in range(3)]
    row = {}
    with torch.no_grad():
        row["swa_fw"] = ms(lambda: swa_attention(*xs, WINDOW, SINKS))
        row["sdpa_fw"] = ms(lambda: F.scaled_dot_product_attention(*xs, is_causal=True))
    row["swa_fwbw"] = ms(fw_bw(lambda *a: swa_attention(*a, WINDOW, SINKS), xs), xs)
    row["sdpa_fwbw"] = ms(fw_bw(lambda *a: F.scaled_dot_product_attention(*a, is_causal=True), xs), xs)
    with torch.no_grad():
        row["swa_triton_fw"] = attempt(lambda: swa_attention_triton(*xs, WINDOW, SINKS))

        def relerr_vs_flex():
            o, o_flex = swa_attention_triton(*xs, WINDOW, SINKS).float(), swa_attention(*xs, WINDOW, SINKS).float()
            return ((o - o_flex).norm() / o_flex.norm()).item()

        row["swa_triton_relerr_vs_flex"] = outcome(relerr_vs_flex)
    row["swa_triton_fwbw"] = attempt(fw_bw(lambda *a: swa_attention_triton(*a, WINDOW, SINKS), xs), xs)
    return row


def _profiled(fn, grads, steps: int) -> torch.profiler.profile:
    """steps calls of fn under the CUDA profiler (fn warmed up first: no autotuning in the trace). The
    tensors in grads get their .grad cleared before each call, as do_bench's grad_to_none does, so that no
    gradient accumulation shows in the trace."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            for x in grads:
                x.grad = None
            fn()
        torch.cuda.synchronize()
    return prof


def kernel_times(fn, grads=(), steps: int = 5) -> dict[str, float]:
    """Mean µs per call of each CUDA kernel fn launches, summed per kernel name."""
    prof = _profiled(fn, grads, steps)
    return {e.key[:60]: round(e.device_time_total / steps, 1) for e in prof.key_averages() if e.device_time_total > 0}


def launch_times(fn, grads=(), steps: int = 5) -> list[tuple[str, float]]:
    """Each CUDA kernel one call of fn launches, in launch order, with its mean µs over steps calls: what
    kernel_times sums per name (a kernel launched twice, e.g. a state pass per level, shows twice)."""
    events = [e for e in _profiled(fn, grads, steps).events() if e.device_type == torch.autograd.DeviceType.CUDA]
    per_call = len(events) // steps
    return [
        (events[i].name[:60], round(sum(e.device_time for e in events[i::per_call]) / steps, 1))
        for i in range(per_call)
    ]


def _ours_and_fla(B, H, S, D, measure, prefix: str) -> dict:
    """measure(fn, grads) of ours (shipped choice) and FLA (guard lifted), forward and fw+bw."""
    xs = mlstm_inputs(B, H, S, D, requires_grad=True)
    row = {}
    with torch.no_grad():
        row[f"{prefix}ours_fw"] = outcome(lambda: measure(lambda: mlstm_chunkwise_triton(*xs), ()))
    row[f"{prefix}ours_fwbw"] = outcome(lambda: measure(fw_bw(lambda *a: mlstm_chunkwise_triton(*a)[0], xs), xs))
    try:
        from fla.ops.simple_gla import chunk_simple_gla
    except Exception as e:
        return row | {f"{prefix}fla": f"import failed: {type(e).__name__}: {e}"}
    fla_xs = fla_layout(*xs[:3], xs[4])
    with torch.no_grad():
        row[f"{prefix}fla_fw"] = outcome(lambda: measure(lambda: chunk_simple_gla(*fla_xs), ()))
    with fla_guard_lifted():
        row[f"{prefix}fla_fwbw"] = outcome(
            lambda: measure(fw_bw(lambda *a: chunk_simple_gla(*a)[0], fla_xs), fla_xs))
    return row


def bench_profile(B, H, S, D) -> dict:
    """Where the time goes, kernel by kernel (µs per kernel)."""
    return _ours_and_fla(B, H, S, D, kernel_times, "profile_")


def bench_launches(B, H, S, D) -> dict:
    """Our fw+bw launch by launch (µs each, in order)."""
    xs = mlstm_inputs(B, H, S, D, requires_grad=True)
    return {"launches_ours_fwbw": launch_times(fw_bw(lambda *a: mlstm_chunkwise_triton(*a)[0], xs), xs)}


def bench_headline(B, H, S, D) -> dict:
    """The goal's ratio alone (ms, and FLA / ours)."""
    row = _ours_and_fla(B, H, S, D, ms, "")
    for name in ("fw", "fwbw"):
        ours, fla = row[f"ours_{name}"], row.get(f"fla_{name}")
        row[f"fla/ours_{name}"] = fla / ours if isinstance(ours, float) and isinstance(fla, float) else None
    return row


def bench_levels(B, H, S, D) -> dict:
    """One level of state passes against two, forward and fw+bw: wall ms (where the host's launches bound a
    call, they show here) and the kernels' µs."""
    xs = mlstm_inputs(B, H, S, D, requires_grad=True)
    row = {}
    for two, name in ((False, "one_level"), (True, "two_level")):
        with levels(two):
            with torch.no_grad():
                fw = lambda: mlstm_chunkwise_triton(*xs)  # noqa: E731
                row[f"{name}_fw_ms"] = ms(fw)
                row[f"{name}_fw_kernel_us"] = round(sum(kernel_times(fw).values()), 1)
            step = fw_bw(lambda *a: mlstm_chunkwise_triton(*a)[0], xs)
            row[f"{name}_fwbw_ms"] = ms(step, xs)
            row[f"{name}_fwbw_kernel_us"] = round(sum(kernel_times(step, xs).values()), 1)
    return row


PARTS = {"ours": bench_ours, "fla": bench_fla, "xl": bench_xl_chunk, "attention": bench_attention,
         "profile": bench_profile, "launches": bench_launches, "headline": bench_headline, "levels": bench_levels}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="write all rows as JSON here")
    parser.add_argument("--shape", action="append", help="B,H,S,D (repeatable); default: the three issue shapes")
    parser.add_argument("--parts", default="ours,fla,xl,attention",
                        help=f"comma-separated subset of {', '.join(PARTS)}")
    args = parser.parse_args()
    unknown = set(args.parts.split(",")) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts: {', '.join(sorted(unknown))}; choose from {', '.join(PARTS)}")
    shapes = [tuple(int(x) for x in s.split(",")) for s in args.shape] if args.shape else SHAPES
    rows = []
    for B, H, S, D in shapes:
        row = {"shape": [B, H, S, D]}
        for part in (PARTS[name] for name in args.parts.split(",")):
            row |= part(B, H, S, D)
            torch.cuda.empty_cache()
            print(part.__name__, json.dumps(row), flush=True)  # progress: a cut-short run keeps its parts
        rows.append(row)
        print(json.dumps(row), flush=True)
    meta = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "window": WINDOW,
        "sinks": SINKS,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
