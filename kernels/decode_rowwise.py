"""Row-wise Triton kernels around the fused decode step: RMSNorm, hidden + RMSNorm(delta), SiLU(gate) · up,
and a linear layer for few rows with a norm or SiLU(gate) · up before its product and a residual add after.

One token per row (B, N), one launch each, with the teacher's order of operations and roundings:
RMSNorm(u) = weight · (u_fp32 · rsqrt(mean(u_fp32²) + eps)).to(u's dtype), the product rounded to
promote(weight, u) (as modeling/student.RMSNorm); a residual add rounds to promote(hidden, delta);
SiLU(gate) is rounded to the gate's dtype before the product with up (as ``act(gate) * up``); a linear
layer computes in its weight's dtype (as F.linear does, or autocast with the weight cast) and rounds to
it. Arithmetic is fp32 in between.

``fused_linear`` exists for the launch count: a decode step of one token per row is bound by its
launches, not its bytes (benchmarks/RESULTS-gpu.md). With a norm before and a residual add after the
product, a pre-norm layer takes 5 launches (q/k/v/gates, attention, o_proj, gate/up, down) instead of 8.
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
def _norm_scale(u, w, r, IN_DTYPE: tl.constexpr, OUT_DTYPE: tl.constexpr):
    """weight · (u · r), u fp32 and r = rsqrt(mean(u²) + eps), rounded as torch's RMSNorm does."""
    return (w * (u * r).to(IN_DTYPE).to(tl.float32)).to(OUT_DTYPE)


@triton.jit
def _rms_norm(u, w, eps, N: tl.constexpr, IN_DTYPE: tl.constexpr, OUT_DTYPE: tl.constexpr):
    """RMSNorm of one row u (BLOCK,) fp32 (zeros past N) with weight w (BLOCK,) fp32, rounded as torch does."""
    return _norm_scale(u, w, tl.math.rsqrt(tl.sum(u * u, 0) / N + eps), IN_DTYPE, OUT_DTYPE)


@triton.jit
def _silu_times(gate, up, DTYPE: tl.constexpr):
    """SiLU(gate) · up (fp32 in), each rounded to DTYPE as ``act(gate) * up`` in DTYPE."""
    return ((gate / (1.0 + tl.exp(-gate))).to(DTYPE).to(tl.float32) * up).to(DTYPE)


@triton.jit
def _norm_rows(
    x, delta, weight, out, stride_x, stride_delta, eps,
    N: tl.constexpr, BLOCK: tl.constexpr, ADD: tl.constexpr, IN_DTYPE: tl.constexpr, NORM_DTYPE: tl.constexpr,
):
    """RMSNorm(x), or with ADD x + RMSNorm(delta) (Olmo2's post-norm). Grid (B,)."""
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    u = tl.load(x + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(weight + cols, mask=mask, other=0.0).to(tl.float32)
    if ADD:
        d = tl.load(delta + row * stride_delta + cols, mask=mask, other=0.0).to(tl.float32)
        u += _rms_norm(d, w, eps, N, IN_DTYPE, NORM_DTYPE).to(tl.float32)
    else:
        u = _rms_norm(u, w, eps, N, IN_DTYPE, NORM_DTYPE)
    tl.store(out + row * N + cols, u.to(out.dtype.element_ty), mask=mask)


@triton.jit
def _silu_mul(gate_up, out, stride, I: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    gate = tl.load(gate_up + row * stride + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_up + row * stride + I + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out + row * I + cols, _silu_times(gate, up, out.dtype.element_ty), mask=mask)


@triton.jit
def _linear_rows(
    x, weight, bias, norm_w, residual, out, B, N, K, stride_x, stride_res, eps,
    PROLOGUE: tl.constexpr, HAS_BIAS: tl.constexpr, ADD: tl.constexpr,
    X_DTYPE: tl.constexpr, NORM_DTYPE: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out = [residual +] prologue(x) Wᵀ [+ b] for a block of rows and of outputs. Grid (N/BLOCK_N, B/BLOCK_M).

    PROLOGUE 0: x; 1: RMSNorm(x) with norm_w (a first pass over K finds each row's scale); 2: x holds
    [gate; up] (2K wide) and the input is SiLU(gate) · up.
    """
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = rows < B, cols < N
    x_rows = x + rows[:, None] * stride_x
    if PROLOGUE == 1:
        sq = tl.zeros([BLOCK_M], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            u = tl.load(x_rows + ks[None, :], mask=row_ok[:, None] & (ks[None, :] < K), other=0.0).to(tl.float32)
            sq += tl.sum(u * u, 1)
        scale = tl.math.rsqrt(sq / K + eps)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        in_mask = row_ok[:, None] & k_ok[None, :]
        u = tl.load(x_rows + ks[None, :], mask=in_mask, other=0.0).to(tl.float32)
        if PROLOGUE == 1:
            w_norm = tl.load(norm_w + ks, mask=k_ok, other=0.0).to(tl.float32)
            u = _norm_scale(u, w_norm[None, :], scale[:, None], X_DTYPE, NORM_DTYPE)
        elif PROLOGUE == 2:
            up = tl.load(x_rows + K + ks[None, :], mask=in_mask, other=0.0).to(tl.float32)
            u = _silu_times(u, up, X_DTYPE)
        w = tl.load(weight + cols[:, None] * K + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        acc += tl.dot(u.to(w.dtype), tl.trans(w), input_precision=PREC)
    if HAS_BIAS:
        acc += tl.load(bias + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    y = acc.to(weight.dtype.element_ty)  # F.linear's output, in the weight's dtype
    out_mask = row_ok[:, None] & col_ok[None, :]
    if ADD:
        y = tl.load(residual + rows[:, None] * stride_res + cols[None, :], mask=out_mask, other=0.0).to(tl.float32) \
            + y.to(tl.float32)
    tl.store(out + rows[:, None] * N + cols[None, :], y.to(out.dtype.element_ty), mask=out_mask)


def _check_rows(*rows: torch.Tensor) -> None:
    for t in rows:
        if t.dim() != 2 or t.stride(-1) != 1:
            raise ValueError(f"decode row kernels take (B, N) rows with unit stride in N, got {tuple(t.shape)} "
                             f"strides {t.stride()}")
        if not t.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("decode row kernels need CUDA tensors; use the modules' own forward on CPU")


def _launch_norm(x, delta, weight, eps):
    """RMSNorm(x) (delta None) or x + RMSNorm(delta); dtypes as torch's promotion gives them."""
    _check_rows(x, *(() if delta is None else (delta,)))
    B, N = x.shape
    norm_in = x.dtype if delta is None else delta.dtype
    norm_dtype = _promote(weight.dtype, norm_in)
    out = x.new_empty(B, N, dtype=norm_dtype if delta is None else _promote(x.dtype, norm_dtype))
    _norm_rows[(B,)](
        x, x if delta is None else delta, weight, out, x.stride(0), 0 if delta is None else delta.stride(0), eps,
        N=N, BLOCK=triton.next_power_of_2(N), ADD=delta is not None,
        IN_DTYPE=_TL_DTYPES[norm_in], NORM_DTYPE=_TL_DTYPES[norm_dtype], num_warps=4,
    )
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm (B, N) of rows x (B, N) (any row stride); weight (N,)."""
    return _launch_norm(x, None, weight, eps)


def add_normed(hidden: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """hidden + RMSNorm(delta), (B, N) (post-norm blocks, Olmo2). hidden, delta: (B, N); weight: (N,)."""
    return _launch_norm(hidden, delta, weight, eps)


def fused_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
    norm: tuple[torch.Tensor, float] | None = None, silu_gate_up: bool = False, residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """F.linear(prologue(x), weight, bias) for rows x (B, K), in one launch, computed in weight's dtype.

    norm=(norm_weight, eps): the input is rms_norm(x, norm_weight, eps); silu_gate_up: x is [gate; up]
    (B, 2K) and the input is silu_mul(x); residual (B, N): returns residual + the product, rounded to
    promote(residual, weight) as the add in torch. weight (N, K) contiguous, bias (N,) or None; any row stride.
    """
    if norm is not None and silu_gate_up:
        raise ValueError("fused_linear takes one prologue: norm or silu_gate_up")
    _check_rows(x, *(() if residual is None else (residual,)))
    B, N, K = x.shape[0], weight.shape[0], weight.shape[1]
    if x.shape[1] != (2 * K if silu_gate_up else K) or not weight.is_contiguous():
        raise ValueError(f"fused_linear: x {tuple(x.shape)} does not fit a contiguous weight {tuple(weight.shape)}"
                         f"{' (x holds [gate; up])' if silu_gate_up else ''}")
    out_dtype = weight.dtype if residual is None else _promote(residual.dtype, weight.dtype)
    out = x.new_empty(B, N, dtype=out_dtype)
    norm_w, eps = norm if norm is not None else (weight, 0.0)
    block_m = max(16, min(64, triton.next_power_of_2(B)))  # tl.dot's least M; rows past B are masked
    block_n = 32 if triton.cdiv(N, 32) >= 64 else 16  # narrow outputs (o_proj, down_proj): more programs
    _linear_rows[(triton.cdiv(N, block_n), triton.cdiv(B, block_m))](
        x, weight, weight if bias is None else bias, norm_w, x if residual is None else residual, out,
        B, N, K, x.stride(0), 0 if residual is None else residual.stride(0), eps,
        PROLOGUE=1 if norm is not None else 2 if silu_gate_up else 0, HAS_BIAS=bias is not None,
        ADD=residual is not None, X_DTYPE=_TL_DTYPES[x.dtype],
        NORM_DTYPE=_TL_DTYPES[_promote(norm_w.dtype, x.dtype)],
        PREC="ieee" if weight.dtype == torch.float32 else "tf32", BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=64,
        num_warps=4,
    )
    return out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) · up (B, I) of gate_up (B, 2I) = [gate; up] (any row stride), in gate_up's dtype."""
    _check_rows(gate_up)
    B, I = gate_up.shape[0], gate_up.shape[1] // 2
    out = gate_up.new_empty(B, I)
    block = min(1024, triton.next_power_of_2(I))
    _silu_mul[(B, triton.cdiv(I, block))](gate_up, out, gate_up.stride(0), I=I, BLOCK=block, num_warps=4)
    return out
