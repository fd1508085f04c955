"""Sliding-window + sink causal softmax attention in Triton: forward and backward.

Same semantics, shapes and errors as kernels/swa.py (FlexAttention): query t sees key s when
``s <= t and (t - s < window or s < sinks)``, one softmax over that union (a sink inside the window
counts once), scale 1/sqrt(D), grouped-query attention when H > Hkv (query head h reads kv head
h // (H / Hkv), with no copy). fp32, fp16 and bf16 inputs; scores, softmax and accumulators in fp32;
bf16/fp16 products on tensor cores, fp32 products in IEEE precision.

Flash-attention 2, block sparse: no program walks the causal prefix, so the work is
O(S · (window + sinks)).

* Forward, one program per (query block, query head): the diagonal key blocks, the key blocks
  holding sinks that end before the window's first block, the window's lower-edge blocks (all
  masked), and the fully visible blocks between (unmasked). The spans are disjoint and block
  aligned, so a sink inside the window is visited once. Online softmax in base 2; saves the row
  logsumexp.
* Backward: delta = rowsum(dO·O); dQ like the forward, one program per (query block, query head);
  dK/dV one program per (key block, kv head), looping over the GQA group's query heads and the query
  blocks in reach of its window, summing in registers (no atomics, deterministic).
* Sinks in the backward: a sink key is seen by every later query, so the program of the sink key
  block would take REP·S/BLOCK_M steps while all others take REP·(window + BLOCK_N)/BLOCK_M; at 64K
  with grouped heads that one program could outlast the rest of the grid (estimate, not measured).
  So the dK/dV pass counts only the window part of the mask (s <= t, t - s < window), and _dkv_sinks
  the disjoint rest (s < sinks, t - s >= window) in parallel query chunks; their fp32 partial sums,
  reduced over chunks and the group's heads, seed the sink keys' dK/dV accumulators.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
MAX_ROWS = 65535  # B·H: the second grid dimension (queries, keys or sink chunks run along the first)
SINK_BLOCK_M = 64  # query block of _dkv_sinks
SINK_CHUNK = 1024  # queries per _dkv_sinks program: about the query span of a dK/dV program at window 512


def _configs(blocks):
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in blocks
    ]


# Launch candidates, timed by triton.autotune once per (D, window, dtypes); few, because first calls pay
# one compile each. The first of each list is sized to fit fp32 at D=128 in 75-110 KB of shared memory, and
# tests pin it. The others take up to 230 KB there (compiled for sm_90): they fit an H100/H200, and
# autotuning skips them on GPUs with less shared memory.
# Forward and dQ need BLOCK_N | BLOCK_M, dK/dV BLOCK_M | BLOCK_N.
FWD_CONFIGS = _configs([(64, 32, 4, 2), (128, 64, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3)])
DQ_CONFIGS = _configs([(64, 32, 4, 2), (128, 32, 8, 3), (64, 64, 4, 3)])
DKV_CONFIGS = _configs([(32, 64, 4, 2), (32, 128, 8, 3), (64, 64, 4, 3)])


@triton.jit
def _visible(t, s, window, sinks):
    return (s <= t) & ((t - s < window) | (s < sinks))


@triton.jit
def _key_spans(m0, window, sinks, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key spans of the query block at m0 besides its diagonal [m0, m0 + BLOCK_M), all BLOCK_N aligned:
    masked window edge [lo, mid), fully visible [mid, m0), sink blocks before the window [0, sink_hi)."""
    lo = tl.maximum(m0 - window + 1, 0) // BLOCK_N * BLOCK_N
    full = tl.cdiv(tl.maximum(m0 + BLOCK_M - window, 0), BLOCK_N) * BLOCK_N  # last row reaches this far
    mid = tl.maximum(lo, tl.minimum(full, m0))
    sink_hi = tl.minimum(tl.cdiv(sinks, BLOCK_N) * BLOCK_N, lo)
    return lo, mid, sink_hi


@triton.jit
def _kv_block(k_ptr, v_ptr, n, S, D: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key positions n..n+BLOCK_N and their key and value rows (zeros past S)."""
    s, offs_d = n + tl.arange(0, BLOCK_N), tl.arange(0, D)
    kb = tl.load(k_ptr + s[:, None] * D + offs_d[None, :], mask=s[:, None] < S, other=0.0)
    vb = tl.load(v_ptr + s[:, None] * D + offs_d[None, :], mask=s[:, None] < S, other=0.0)
    return s, kb, vb


@triton.jit
def _fwd_span(acc, l_i, m_i, q, k_ptr, v_ptr, lo, hi, t, S, window, sinks, qk_scale,
              D: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, PREC: tl.constexpr):
    for n in range(lo, hi, BLOCK_N):
        s, kb, vb = _kv_block(k_ptr, v_ptr, n, S, D, BLOCK_N)
        qk = tl.dot(q, tl.trans(kb), input_precision=PREC) * qk_scale
        if MASKED:
            qk = tl.where(_visible(t[:, None], s[None, :], window, sinks), qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_ref = m_new
        if MASKED:  # a row that has seen no key yet keeps max -inf: exponents relative to 0, not -inf - -inf
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_ref)
        p = tl.exp2(qk - m_ref[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(vb.dtype), vb, input_precision=PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.autotune(configs=FWD_CONFIGS, key=["D", "window"])
@triton.jit
def _fwd(Q, K, V, O, LSE, S, window, sinks, REP, qk_scale,
         D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr):
    tl.static_assert(BLOCK_M % BLOCK_N == 0)
    m0, bh = tl.program_id(0) * BLOCK_M, tl.program_id(1)
    q_off, kv_off = bh.to(tl.int64) * S * D, (bh // REP).to(tl.int64) * S * D
    t, offs_d = m0 + tl.arange(0, BLOCK_M), tl.arange(0, D)
    q = tl.load(Q + q_off + t[:, None] * D + offs_d[None, :], mask=t[:, None] < S, other=0.0)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    lo, mid, sink_hi = _key_spans(m0, window, sinks, BLOCK_M, BLOCK_N)
    k_ptr, v_ptr = K + kv_off, V + kv_off
    # the diagonal runs past S in the last block (zero keys): padded rows see their own key too, l_i > 0
    acc, l_i, m_i = _fwd_span(acc, l_i, m_i, q, k_ptr, v_ptr, m0, m0 + BLOCK_M, t, S, window, sinks, qk_scale,
                              D, BLOCK_N, True, PREC)
    acc, l_i, m_i = _fwd_span(acc, l_i, m_i, q, k_ptr, v_ptr, 0, sink_hi, t, S, window, sinks, qk_scale,
                              D, BLOCK_N, True, PREC)
    acc, l_i, m_i = _fwd_span(acc, l_i, m_i, q, k_ptr, v_ptr, lo, mid, t, S, window, sinks, qk_scale,
                              D, BLOCK_N, True, PREC)
    acc, l_i, m_i = _fwd_span(acc, l_i, m_i, q, k_ptr, v_ptr, mid, m0, t, S, window, sinks, qk_scale,
                              D, BLOCK_N, False, PREC)
    o = acc / l_i[:, None]
    tl.store(O + q_off + t[:, None] * D + offs_d[None, :], o.to(O.dtype.element_ty), mask=t[:, None] < S)
    tl.store(LSE + bh.to(tl.int64) * S + t, m_i + tl.log2(l_i), mask=t < S)


@triton.jit
def _delta(O, DO, DELTA, rows, D: tl.constexpr, BLOCK: tl.constexpr):
    r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ptrs = r.to(tl.int64)[:, None] * D + tl.arange(0, D)[None, :]
    o = tl.load(O + ptrs, mask=r[:, None] < rows, other=0.0).to(tl.float32)
    do = tl.load(DO + ptrs, mask=r[:, None] < rows, other=0.0).to(tl.float32)
    tl.store(DELTA + r, tl.sum(o * do, 1), mask=r < rows)


@triton.jit
def _dq_span(dq, q, do, lse, delta, k_ptr, v_ptr, lo, hi, t, S, window, sinks, qk_scale,
             D: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, PREC: tl.constexpr):
    for n in range(lo, hi, BLOCK_N):
        s, kb, vb = _kv_block(k_ptr, v_ptr, n, S, D, BLOCK_N)
        p = tl.exp2(tl.dot(q, tl.trans(kb), input_precision=PREC) * qk_scale - lse[:, None])
        if MASKED:
            p = tl.where(_visible(t[:, None], s[None, :], window, sinks), p, 0.0)
        dp = tl.dot(do, tl.trans(vb), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kb.dtype), kb, input_precision=PREC)
    return dq


@triton.autotune(configs=DQ_CONFIGS, key=["D", "window"])
@triton.jit
def _dq(Q, K, V, DO, LSE, DELTA, DQ, S, window, sinks, REP, qk_scale, sm_scale,
        D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr):
    tl.static_assert(BLOCK_M % BLOCK_N == 0)
    m0, bh = tl.program_id(0) * BLOCK_M, tl.program_id(1)
    q_off, kv_off = bh.to(tl.int64) * S * D, (bh // REP).to(tl.int64) * S * D
    t, offs_d = m0 + tl.arange(0, BLOCK_M), tl.arange(0, D)
    ptrs = q_off + t[:, None] * D + offs_d[None, :]
    q = tl.load(Q + ptrs, mask=t[:, None] < S, other=0.0)
    do = tl.load(DO + ptrs, mask=t[:, None] < S, other=0.0)
    lse = tl.load(LSE + bh.to(tl.int64) * S + t, mask=t < S, other=float("inf"))  # padded rows: p = 0
    delta = tl.load(DELTA + bh.to(tl.int64) * S + t, mask=t < S, other=0.0)
    dq = tl.zeros([BLOCK_M, D], tl.float32)
    lo, mid, sink_hi = _key_spans(m0, window, sinks, BLOCK_M, BLOCK_N)
    k_ptr, v_ptr = K + kv_off, V + kv_off
    dq = _dq_span(dq, q, do, lse, delta, k_ptr, v_ptr, m0, m0 + BLOCK_M, t, S, window, sinks, qk_scale,
                  D, BLOCK_N, True, PREC)
    dq = _dq_span(dq, q, do, lse, delta, k_ptr, v_ptr, 0, sink_hi, t, S, window, sinks, qk_scale,
                  D, BLOCK_N, True, PREC)
    dq = _dq_span(dq, q, do, lse, delta, k_ptr, v_ptr, lo, mid, t, S, window, sinks, qk_scale,
                  D, BLOCK_N, True, PREC)
    dq = _dq_span(dq, q, do, lse, delta, k_ptr, v_ptr, mid, m0, t, S, window, sinks, qk_scale,
                  D, BLOCK_N, False, PREC)
    tl.store(DQ + ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=t[:, None] < S)


@triton.jit
def _dkv_span(dk, dv, kb, vb, q_ptr, do_ptr, lse_ptr, delta_ptr, lo, hi, s, S, window, sinks, qk_scale,
              D: tl.constexpr, BLOCK_M: tl.constexpr, PART: tl.constexpr, PREC: tl.constexpr):
    """dK, dV of keys s from queries lo..hi. PART 0: all visible; 1: the window part of the mask
    (s <= t, t - s < window); 2: the sink part (s < sinks, t - s >= window)."""
    offs_m, offs_d = tl.arange(0, BLOCK_M), tl.arange(0, D)
    for m in range(lo, hi, BLOCK_M):
        t = m + offs_m
        ptrs = t[:, None] * D + offs_d[None, :]
        qb = tl.load(q_ptr + ptrs, mask=t[:, None] < S, other=0.0)
        dob = tl.load(do_ptr + ptrs, mask=t[:, None] < S, other=0.0)
        lse = tl.load(lse_ptr + t, mask=t < S, other=float("inf"))  # padded rows: p = 0, they add nothing
        delta = tl.load(delta_ptr + t, mask=t < S, other=0.0)
        pT = tl.exp2(tl.dot(kb, tl.trans(qb), input_precision=PREC) * qk_scale - lse[None, :])  # (BLOCK_N, BLOCK_M)
        if PART == 1:
            pT = tl.where((s[:, None] <= t[None, :]) & (t[None, :] - s[:, None] < window), pT, 0.0)
        if PART == 2:
            pT = tl.where((s[:, None] < sinks) & (t[None, :] - s[:, None] >= window), pT, 0.0)
        dv += tl.dot(pT.to(dob.dtype), dob, input_precision=PREC)
        dpT = tl.dot(vb, tl.trans(dob), input_precision=PREC)
        dk += tl.dot((pT * (dpT - delta[None, :])).to(qb.dtype), qb, input_precision=PREC)
    return dk, dv


@triton.jit
def _dkv_sinks(Q, K, V, DO, LSE, DELTA, PART_K, PART_V, S, window, sinks, REP, qk_scale, q_first, SP,
               D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr, CHUNK: tl.constexpr,
               PREC: tl.constexpr):
    """Sink keys' dK, dV from the queries past their window, one query chunk and query head each."""
    c, j, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    s, offs_d = j * BLOCK_S + tl.arange(0, BLOCK_S), tl.arange(0, D)
    kv_off = (bh // REP).to(tl.int64) * S * D
    kb = tl.load(K + kv_off + s[:, None] * D + offs_d[None, :], mask=s[:, None] < sinks, other=0.0)
    vb = tl.load(V + kv_off + s[:, None] * D + offs_d[None, :], mask=s[:, None] < sinks, other=0.0)
    q_off, row_off = bh.to(tl.int64) * S * D, bh.to(tl.int64) * S
    lo = q_first + c * CHUNK
    dk, dv = _dkv_span(tl.zeros([BLOCK_S, D], tl.float32), tl.zeros([BLOCK_S, D], tl.float32), kb, vb,
                       Q + q_off, DO + q_off, LSE + row_off, DELTA + row_off, lo, tl.minimum(lo + CHUNK, S), s, S,
                       window, sinks, qk_scale, D, BLOCK_M, 2, PREC)
    out = ((c * tl.num_programs(2) + bh).to(tl.int64) * SP + s[:, None]) * D + offs_d[None, :]
    tl.store(PART_K + out, dk)
    tl.store(PART_V + out, dv)


@triton.autotune(configs=DKV_CONFIGS, key=["D", "window"])
@triton.jit
def _dkv(Q, K, V, DO, LSE, DELTA, DK, DV, SINK_DK, SINK_DV, S, window, sinks, REP, qk_scale, sm_scale, SP,
         D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_SINK_GRAD: tl.constexpr,
         PREC: tl.constexpr):
    tl.static_assert(BLOCK_N % BLOCK_M == 0)
    n0, bh_kv = tl.program_id(0) * BLOCK_N, tl.program_id(1)
    s, offs_d = n0 + tl.arange(0, BLOCK_N), tl.arange(0, D)
    ptrs = bh_kv.to(tl.int64) * S * D + s[:, None] * D + offs_d[None, :]
    kb = tl.load(K + ptrs, mask=s[:, None] < S, other=0.0)
    vb = tl.load(V + ptrs, mask=s[:, None] < S, other=0.0)
    dk = tl.zeros([BLOCK_N, D], tl.float32)
    dv = tl.zeros([BLOCK_N, D], tl.float32)
    if HAS_SINK_GRAD:
        if n0 < sinks:  # the sink part of the mask, from _dkv_sinks
            sink_ptrs = bh_kv.to(tl.int64) * SP * D + s[:, None] * D + offs_d[None, :]
            dk += tl.load(SINK_DK + sink_ptrs, mask=s[:, None] < sinks, other=0.0)
            dv += tl.load(SINK_DV + sink_ptrs, mask=s[:, None] < sinks, other=0.0)
    # queries whose window reaches the block: [n0, q_end); fully visible ones in [diag_end, mid_end)
    q_end = tl.cdiv(tl.minimum(S, n0 + BLOCK_N + window - 1), BLOCK_M) * BLOCK_M
    diag_end = tl.minimum(n0 + BLOCK_N, q_end)
    mid_end = tl.minimum(tl.maximum((n0 + window) // BLOCK_M * BLOCK_M, diag_end), q_end)
    for r in range(REP):  # the GQA group's query heads
        bh = bh_kv * REP + r
        q_ptr, do_ptr = Q + bh.to(tl.int64) * S * D, DO + bh.to(tl.int64) * S * D
        lse_ptr, delta_ptr = LSE + bh.to(tl.int64) * S, DELTA + bh.to(tl.int64) * S
        dk, dv = _dkv_span(dk, dv, kb, vb, q_ptr, do_ptr, lse_ptr, delta_ptr, n0, diag_end, s, S, window, sinks,
                           qk_scale, D, BLOCK_M, 1, PREC)
        dk, dv = _dkv_span(dk, dv, kb, vb, q_ptr, do_ptr, lse_ptr, delta_ptr, diag_end, mid_end, s, S, window,
                           sinks, qk_scale, D, BLOCK_M, 0, PREC)
        dk, dv = _dkv_span(dk, dv, kb, vb, q_ptr, do_ptr, lse_ptr, delta_ptr, mid_end, q_end, s, S, window, sinks,
                           qk_scale, D, BLOCK_M, 1, PREC)
    tl.store(DK + ptrs, (dk * sm_scale).to(DK.dtype.element_ty), mask=s[:, None] < S)
    tl.store(DV + ptrs, dv.to(DV.dtype.element_ty), mask=s[:, None] < S)


TUNED = {_fwd: FWD_CONFIGS, _dq: DQ_CONFIGS, _dkv: DKV_CONFIGS}


@contextmanager
def pinned_launches(index: int):
    """Every autotuned kernel launches with its candidate ``index`` (shorter lists wrap around), untimed:
    to test each candidate, or to time one fixed launch against the tuned pick."""
    saved = {kernel: kernel.configs for kernel in TUNED}
    try:
        for kernel, candidates in TUNED.items():
            kernel.configs = [candidates[index % len(candidates)]]
        yield {kernel.base_fn.__name__: kernel.configs[0] for kernel in TUNED}
    finally:
        for kernel, kept in saved.items():
            kernel.configs = kept


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # tf32 is ignored for 16-bit inputs


class _SWAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, window: int, sinks: int):
        B, H, S, D = q.shape
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        o = torch.empty_like(q)
        lse = torch.empty(B * H, S, device=q.device, dtype=torch.float32)  # base 2, of the scaled scores
        qk_scale = LOG2E / math.sqrt(D)
        _fwd[lambda meta: (triton.cdiv(S, meta["BLOCK_M"]), B * H)](
            q, k, v, o, lse, S, window, sinks, H // k.shape[1], qk_scale, D=D, PREC=_precision(q.dtype)
        )
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.window, ctx.sinks = window, sinks
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        window, sinks = ctx.window, ctx.sinks
        B, H, S, D = q.shape
        Hkv = k.shape[1]
        REP, prec = H // Hkv, _precision(q.dtype)
        sm_scale = 1.0 / math.sqrt(D)
        qk_scale = sm_scale * LOG2E
        do = do.contiguous()
        delta = torch.empty_like(lse)
        _delta[(triton.cdiv(B * H * S, 64),)](o, do, delta, B * H * S, D=D, BLOCK=64)

        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        _dq[lambda meta: (triton.cdiv(S, meta["BLOCK_M"]), B * H)](
            q, k, v, do, lse, delta, dq, S, window, sinks, REP, qk_scale, sm_scale, D=D, PREC=prec
        )
        has_sink_grad = sinks > 0 and S > window  # else no query sees a sink past its window
        if has_sink_grad:
            block_s = max(16, triton.next_power_of_2(min(sinks, 64)))
            SP = triton.cdiv(sinks, block_s) * block_s
            q_first = window // SINK_BLOCK_M * SINK_BLOCK_M
            chunks = triton.cdiv(S - q_first, SINK_CHUNK)
            part_k = torch.empty(chunks, B * H, SP, D, device=q.device, dtype=torch.float32)
            part_v = torch.empty_like(part_k)
            _dkv_sinks[(chunks, SP // block_s, B * H)](
                q, k, v, do, lse, delta, part_k, part_v, S, window, sinks, REP, qk_scale, q_first, SP,
                D=D, BLOCK_M=SINK_BLOCK_M, BLOCK_S=block_s, CHUNK=SINK_CHUNK, PREC=prec,
            )
            sink_dk, sink_dv = (p.view(chunks, B, Hkv, REP, SP, D).sum((0, 3)) for p in (part_k, part_v))
        else:
            SP, sink_dk, sink_dv = 0, lse, lse  # unused
        _dkv[lambda meta: (triton.cdiv(S, meta["BLOCK_N"]), B * Hkv)](
            q, k, v, do, lse, delta, dk, dv, sink_dk, sink_dv, S, window, sinks, REP, qk_scale, sm_scale, SP,
            D=D, HAS_SINK_GRAD=has_sink_grad, PREC=prec,
        )
        return dq, dk, dv, None, None


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, sinks: int) -> None:
    B, H, S, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[2:] != (S, D) or k.shape[1] < 1 or H % k.shape[1]:
        raise ValueError(
            f"swa_attention shapes disagree: q {tuple(q.shape)} k {tuple(k.shape)} v {tuple(v.shape)}; "
            "expected q (B,H,S,D), k and v (B,Hkv,S,D) with H a multiple of Hkv"
        )
    if window < 1 or sinks < 0:
        raise ValueError(f"window must be >= 1 and sinks >= 0, got window={window} sinks={sinks}")
    if not takes(q):
        raise ValueError(f"B·H={B * H}, D={D}: the Triton SWA needs B·H <= {MAX_ROWS} (its grid) and a power-of-two "
                         "head dim in 16..128")
    if not q.dtype == k.dtype == v.dtype or q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"q, k, v must share one of fp32, fp16, bf16; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("swa_attention_triton needs CUDA tensors; use kernels.swa.swa_attention on CPU")


def takes(q: torch.Tensor) -> bool:
    """Whether the kernel takes queries q (B, H, S, D): B·H within its grid, a power-of-two D in 16..128."""
    B, H, _, D = q.shape
    return B * H <= MAX_ROWS and 16 <= D <= 128 and D & (D - 1) == 0


def swa_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, sinks: int) -> torch.Tensor:
    """Softmax attention over the last ``window`` positions and the first ``sinks``: (B, H, S, D).

    q: (B, H, S, D); k, v: (B, Hkv, S, D) with H a multiple of Hkv. Differentiable in q, k, v.
    """
    _check(q, k, v, window, sinks)
    S = q.shape[2]
    # t - s < S always: a longer window or more sinks change nothing, and the clamp keeps index sums in int32
    return _SWAttention.apply(q, k, v, min(window, S), min(sinks, S))
