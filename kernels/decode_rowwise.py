"""Row-wise Triton kernels around the fused decode step: residual add + RMSNorm, SiLU(gate) · up, and the
few-row products with either folded into their input.

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
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

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
def _silu_times(gate, up, DTYPE: tl.constexpr):
    """SiLU(gate) · up of fp32 rows, rounded as ``act(gate) * up`` in DTYPE."""
    act = (gate / (1.0 + tl.exp(-gate))).to(DTYPE).to(tl.float32)
    return (act * up).to(DTYPE)


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
    w, bias, x, delta, norm_w, residual, y, best_val, best_idx, stride_x, stride_delta, N, eps,
    B: tl.constexpr, K: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr, PRE: tl.constexpr,
    HAS_BIAS: tl.constexpr, IN_DTYPE: tl.constexpr, X_DTYPE: tl.constexpr, PDL: tl.constexpr,
    ARGMAX: tl.constexpr,
):
    """y[b, rows] = W[rows] · pre(x[b]) (+ bias) for BN rows of W (N, K) and all B rows, K in one tile.

    pre: 0 x; 1 RMSNorm(x); 2 RMSNorm(x + delta), program 0 storing x + delta to residual; 3 SiLU(gate)·up
    of x = [gate; up] (2K wide). X_DTYPE is the dtype pre's output is rounded to (the torch module's
    output), IN_DTYPE the norm's input dtype. With PDL (programmatic dependent launch, Hopper) the weight
    tile and bias, which no kernel writes, load before waiting for the kernel before, and the next one
    may launch as soon as every program got here: consecutive products stream their weights back to back
    (benchmarks/decode_floor.py: 120 such products in 234 µs against cuBLAS's 475 µs in a graph).
    ARGMAX: also the program's greedy candidate per row, the first of its largest rounded outputs (NaN ranks
    as +inf, as torch.argmax ranks it above all), to best_val / best_idx (B, programs).
    """
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    cols = tl.arange(0, BK)
    in_rows, in_cols = rows < N, cols < K
    tile = tl.load(w + rows[:, None] * K + cols[None, :], mask=in_rows[:, None] & in_cols[None, :], other=0.0)
    if HAS_BIAS:
        b_rows = tl.load(bias + rows, mask=in_rows, other=0.0).to(tl.float32)
    if PRE == 1 or PRE == 2:
        nw = tl.load(norm_w + cols, mask=in_cols, other=0.0).to(tl.float32)
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    for r in tl.static_range(B):
        u = tl.load(x + r * stride_x + cols, mask=in_cols, other=0.0).to(tl.float32)
        if PRE == 1:
            u = _rms_norm(u, nw, eps, K, IN_DTYPE, X_DTYPE).to(tl.float32)
        elif PRE == 2:
            d = tl.load(delta + r * stride_delta + cols, mask=in_cols, other=0.0).to(tl.float32)
            res = (u + d).to(residual.dtype.element_ty)
            if tl.program_id(0) == 0:
                tl.store(residual + r * K + cols, res, mask=in_cols)
            u = _rms_norm(res.to(tl.float32), nw, eps, K, IN_DTYPE, X_DTYPE).to(tl.float32)
        elif PRE == 3:
            up = tl.load(x + r * stride_x + K + cols, mask=in_cols, other=0.0).to(tl.float32)
            u = _silu_times(u, up, X_DTYPE).to(tl.float32)
        u = u.to(tile.dtype).to(tl.float32)  # F.linear's operand: the weight's dtype (autocast's cast)
        acc = tl.sum(tile.to(tl.float32) * u[None, :], 1)
        if HAS_BIAS:
            acc += b_rows
        out = acc.to(y.dtype.element_ty)
        tl.store(y + r * N + rows, out, mask=in_rows)
        if ARGMAX:
            val = out.to(tl.float32)
            val = tl.where(in_rows, tl.where(val != val, float("inf"), val), float("-inf"))
            tl.store(best_val + r * tl.num_programs(0) + tl.program_id(0), tl.max(val, 0))
            tl.store(best_idx + r * tl.num_programs(0) + tl.program_id(0), tl.program_id(0) * BN + tl.argmax(val, 0))


@triton.jit
def _argmax_rows(best_val, best_idx, ids, stride_ids, P, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """ids[row] = the index of the first largest of the P programs' candidates (they cover rows in order)."""
    if PDL:
        gdc_wait()
    row = tl.program_id(0)
    i = tl.arange(0, BLOCK)
    vals = tl.load(best_val + row * P + i, mask=i < P, other=float("-inf"))
    tl.store(ids + row * stride_ids, tl.load(best_idx + row * P + tl.argmax(vals, 0)))


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


# Rows per program of the few-row products, and the widest K they take in one tile: 8 rows ran the chain
# of SmolLM2's 120 products fastest on an H200 (4: 253 µs, 8: 234, 16: 301; benchmarks/decode_floor.py).
LINEAR_BLOCK_ROWS = 8
LINEAR_MAX_K = 2048


@functools.cache
def _hopper(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device)[0] >= 9  # griddepcontrol, which PDL needs, is sm_90+


def pdl_capable(t: torch.Tensor) -> bool:
    """Whether kernels on t's device can be programmatic dependent launches."""
    return t.is_cuda and _hopper(t.device)


def _launch_linear(
    x, weight, bias, pre: int, *, delta=None, norm=(None, 0.0), K=None, x_dtype=None, in_dtype=None, ids=None,
):
    _check_rows(x, *(() if delta is None else (delta,)))
    B, N, K = x.shape[0], weight.shape[0], K or x.shape[1]
    if weight.dim() != 2 or not weight.is_contiguous() or weight.shape[1] != K or K > LINEAR_MAX_K:
        raise ValueError(f"linear rows: weight {tuple(weight.shape)} (contiguous) for inputs of width {K} "
                         f"(at most {LINEAR_MAX_K} wide)")
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"linear rows: bias {tuple(bias.shape)} for weight {tuple(weight.shape)}")
    y = x.new_empty(B, N, dtype=weight.dtype)
    residual = None if delta is None else x.new_empty(B, K, dtype=in_dtype)
    pdl = pdl_capable(x)
    programs = triton.cdiv(N, LINEAR_BLOCK_ROWS)
    best_val = best_idx = y  # pointers the launch never touches without ids
    if ids is not None:
        if ids.shape != (B, 1) or ids.dtype != torch.int64:
            raise ValueError(f"linear rows: ids must be ({B}, 1) int64, got {tuple(ids.shape)} {ids.dtype}")
        best_val = x.new_empty(B, programs, dtype=torch.float32)
        best_idx = x.new_empty(B, programs, dtype=torch.int64)
    _linear_rows[(programs,)](
        weight, y if bias is None else bias, x, x if delta is None else delta, x if norm[0] is None else norm[0],
        y if residual is None else residual, y, best_val, best_idx, x.stride(0),
        0 if delta is None else delta.stride(0), N, norm[1],
        B=B, K=K, BK=triton.next_power_of_2(K), BN=LINEAR_BLOCK_ROWS, PRE=pre, HAS_BIAS=bias is not None,
        IN_DTYPE=_TL_DTYPES[in_dtype or x.dtype], X_DTYPE=_TL_DTYPES[x_dtype or x.dtype], PDL=pdl,
        ARGMAX=ids is not None, num_warps=4, launch_pdl=pdl,
    )
    if ids is not None:
        _argmax_rows[(B,)](best_val, best_idx, ids, ids.stride(0), programs, BLOCK=triton.next_power_of_2(programs),
                           PDL=pdl, num_warps=8, launch_pdl=pdl)
    return residual, y


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) (B, N) of rows x (B, K), in weight's dtype; K <= LINEAR_MAX_K."""
    return _launch_linear(x, weight, bias, 0)[1]


def norm_linear(x, weight, bias, norm_weight, eps: float, delta=None, ids=None):
    """(residual, y): with delta, residual = x + delta and y = F.linear(RMSNorm(residual), weight, bias);
    without, residual None and y = F.linear(RMSNorm(x), ...). x, delta (B, K); norm_weight (K,).

    ids: a (B, 1) int64 tensor to receive y.argmax(-1) (greedy decoding's next tokens from the LM head), in
    one more launch that reduces the products' per-program candidates.
    """
    in_dtype = x.dtype if delta is None else _promote(x.dtype, delta.dtype)
    return _launch_linear(x, weight, bias, 1 if delta is None else 2, delta=delta, norm=(norm_weight, eps),
                          x_dtype=_promote(norm_weight.dtype, in_dtype), in_dtype=in_dtype, ids=ids)


def silu_linear(gate_up: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(SiLU(gate) · up, weight, bias) (B, N) of gate_up (B, 2I) = [gate; up]; weight (N, I)."""
    return _launch_linear(gate_up, weight, bias, 3, K=gate_up.shape[1] // 2)[1]
