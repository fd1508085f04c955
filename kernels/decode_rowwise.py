"""Row-wise Triton kernels around the fused decode step: residual add + RMSNorm, and SiLU(gate) · up.

One token per row (B, N), one launch each, with the teacher's order of operations and roundings:
RMSNorm(u) = weight · (u_fp32 · rsqrt(mean(u_fp32²) + eps)).to(u's dtype), the product rounded to
promote(weight, u) (as modeling/student.RMSNorm); a residual add rounds to promote(hidden, delta);
SiLU(gate) is rounded to the gate's dtype before the product with up (as ``act(gate) * up``).
Arithmetic is fp32 in between.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
_promote = functools.cache(torch.promote_types)  # a dispatcher call otherwise, on every launch


@triton.jit
def _rms_norm(u, w, eps, N: tl.constexpr, IN_DTYPE: tl.constexpr, OUT_DTYPE: tl.constexpr):
    """RMSNorm of one row u (BLOCK,) fp32 (zeros past N) with weight w (BLOCK,) fp32, rounded as torch does."""
    mean_sq = tl.sum(u * u, 0) / N
    scaled = (u * tl.math.rsqrt(mean_sq + eps)).to(IN_DTYPE).to(tl.float32)
    return (w * scaled).to(OUT_DTYPE)


@triton.jit
def _norm_rows(
    x, delta, weight, residual, normed, stride_x, stride_delta, eps,
    N: tl.constexpr, BLOCK: tl.constexpr, ADD: tl.constexpr, NORM_DELTA: tl.constexpr,
    IN_DTYPE: tl.constexpr, NORM_DTYPE: tl.constexpr,
):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    u = tl.load(x + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(weight + cols, mask=mask, other=0.0).to(tl.float32)
    if ADD:
        d = tl.load(delta + row * stride_delta + cols, mask=mask, other=0.0).to(tl.float32)
        if NORM_DELTA:  # hidden + RMSNorm(delta): Olmo2's post-norm
            d = _rms_norm(d, w, eps, N, IN_DTYPE, NORM_DTYPE).to(tl.float32)
            tl.store(residual + row * N + cols, (u + d).to(residual.dtype.element_ty), mask=mask)
        else:  # RMSNorm(hidden + delta), the new residual kept
            r = (u + d).to(residual.dtype.element_ty)
            tl.store(residual + row * N + cols, r, mask=mask)
            tl.store(normed + row * N + cols, _rms_norm(r.to(tl.float32), w, eps, N, IN_DTYPE, NORM_DTYPE),
                     mask=mask)
    else:
        tl.store(normed + row * N + cols, _rms_norm(u, w, eps, N, IN_DTYPE, NORM_DTYPE), mask=mask)


@triton.jit
def _silu_mul(gate_up, out, stride, I: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    gate = tl.load(gate_up + row * stride + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_up + row * stride + I + cols, mask=mask, other=0.0).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(out.dtype.element_ty).to(tl.float32)
    tl.store(out + row * I + cols, (act * up).to(out.dtype.element_ty), mask=mask)


def _check_rows(*rows: torch.Tensor) -> None:
    for t in rows:
        if t.dim() != 2 or t.stride(-1) != 1:
            raise ValueError(f"decode row kernels take (B, N) rows with unit stride in N, got {tuple(t.shape)} "
                             f"strides {t.stride()}")
        if not t.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("decode row kernels need CUDA tensors; use the modules' own forward on CPU")


def _launch_norm(x, delta, weight, eps, *, norm_delta: bool):
    """(residual or None, normed or None) of the three modes; dtypes as torch's promotion gives them."""
    _check_rows(x, *(() if delta is None else (delta,)))
    B, N = x.shape
    if delta is None:
        norm_in = x.dtype
    else:
        norm_in = delta.dtype if norm_delta else _promote(x.dtype, delta.dtype)
    norm_dtype = _promote(weight.dtype, norm_in)
    residual = normed = None
    if delta is not None:
        residual = x.new_empty(B, N, dtype=_promote(x.dtype, norm_dtype) if norm_delta else norm_in)
    if not norm_delta:
        normed = x.new_empty(B, N, dtype=norm_dtype)
    unused = x  # a pointer the mode never reads or writes
    _norm_rows[(B,)](
        x, unused if delta is None else delta, weight, unused if residual is None else residual,
        unused if normed is None else normed, x.stride(0), 0 if delta is None else delta.stride(0), eps,
        N=N, BLOCK=triton.next_power_of_2(N), ADD=delta is not None, NORM_DELTA=norm_delta,
        IN_DTYPE=_TL_DTYPES[norm_in], NORM_DTYPE=_TL_DTYPES[norm_dtype], num_warps=4,
    )
    return residual, normed


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm (B, N) of rows x (B, N) (any row stride); weight (N,)."""
    return _launch_norm(x, None, weight, eps, norm_delta=False)[1]


def add_rms_norm(hidden: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float):
    """(residual, normed), both (B, N): residual = hidden + delta, normed = RMSNorm(residual) (pre-norm
    blocks: the residual stream and the next block's input). hidden, delta: (B, N); weight: (N,)."""
    return _launch_norm(hidden, delta, weight, eps, norm_delta=False)


def add_normed(hidden: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """hidden + RMSNorm(delta), (B, N) (post-norm blocks, Olmo2). hidden, delta: (B, N); weight: (N,)."""
    return _launch_norm(hidden, delta, weight, eps, norm_delta=True)[0]


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) · up (B, I) of gate_up (B, 2I) = [gate; up] (any row stride), in gate_up's dtype."""
    _check_rows(gate_up)
    B, I = gate_up.shape[0], gate_up.shape[1] // 2
    out = gate_up.new_empty(B, I)
    block = min(1024, triton.next_power_of_2(I))
    _silu_mul[(B, triton.cdiv(I, block))](gate_up, out, gate_up.stride(0), I=I, BLOCK=block, num_warps=4)
    return out
