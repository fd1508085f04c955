"""Chunkwise mLSTM in Triton: forward and backward, with initial and final state.

Same semantics as the pure-PyTorch oracle (per head, scalar gates, feature-mapped q/k)::

    m_t = max(log σ(f̃_t) + m_{t-1}, ĩ_t)
    C_t = exp(log σ(f̃_t) + m_{t-1} - m_t) C_{t-1} + exp(ĩ_t - m_t) k_t v_tᵀ   (n_t likewise with k_t)
    h_t = qᵀ_t C_t / (max(|qᵀ_t n_t|, exp(-m_t)) + eps)

Three launches each way, FLA-style, and no PyTorch arithmetic between them. Forward: the gates
per chunk (log σ, in-chunk cumsum, key weights; parallel), a sequential pass over chunks that
carries the stabiliser and materialises the state at every chunk start, then one program per
few consecutive chunks for their outputs. Backward: ∂L/∂(qᵀn) and ∂L/∂m per position (parallel),
a reverse pass for the state gradients, then one program per chunk for dq, dk, dv, dĩ and df̃.
With few heads (B·NH <= TWO_LEVEL_MAX_HEADS) and long sequences (from TWO_LEVEL_MIN_TOKENS), both
sequential passes become a chunk-parallel scan over segments of SUPER_CHUNK tokens: each segment builds its
own state (or state gradient) from zero, one program per segment; a scan over segments composes them, which
is elementwise once the stabiliser is known, U segments a step; then each segment fills in its chunks from
its start.

Gradients are exact, including the path through the stabiliser: all stabilisers cancel from
h except in ``eps · exp(m_t)``, so the kernels hold m fixed for everything else and route
∂L/∂m_t = -eps (dh_t·h_t) / den_t as autograd does through the chunkwise oracle's max():
a position's m_t is either an in-chunk ``b_t - b_s + ĩ_s`` (to that s) or ``b_t + m_c`` (to
the chunk-start stabiliser m_c, which the reverse pass carries back through
``m_{c+1} = max(b_last + m_c, max_s(b_last - b_s + ĩ_s))``, routed by comparing the two arguments).
The final state carries no gradient.

Grouped heads: k and v may have fewer heads than q (NH a multiple of NKV); query head h reads
kv head h // (NH / NKV), with no copy. Gates may be any float dtype and any strides.

fp32 and bf16/fp16 inputs; all accumulation in fp32. fp32 matmuls run in IEEE precision.
States between chunks are stored in the input dtype (like FLA), the final state in fp32.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch
import triton
import triton.language as tl

MLSTMState = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@triton.jit
def _safe(m):
    # a stabiliser of -inf means "no mass yet"; any finite value gives the same zero output
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def _log_sigmoid(x):
    # min(x, 0) - log1p(exp(-|x|)), log1p done exactly for small arguments without libdevice
    y = tl.exp(-tl.abs(x))
    u = 1.0 + y
    tiny = u == 1.0
    return tl.minimum(x, 0.0) - tl.where(tiny, y, tl.log(u) * (y / tl.where(tiny, 1.0, u - 1.0)))


@triton.jit
def _state_row(C, n, m, row, o_k, o_v, DK: tl.constexpr, DV: tl.constexpr):
    """Row ``row`` of flat (C, n, m) rows, or of their gradients: fp32 tiles (BK, BV), (BK,) and a scalar."""
    C_tile = tl.load(C + row * DK * DV + o_k[:, None] * DV + o_v[None, :]).to(tl.float32)
    return C_tile, tl.load(n + row * DK + o_k).to(tl.float32), tl.load(m + row).to(tl.float32)


@triton.jit
def _flat_row_store(rows, pid, o_k, o_v, C, n, i_v, DK: tl.constexpr, DV: tl.constexpr):
    """A segment's own state or gradient for the scans: C's (BK, BV) block and, from the first DV block,
    n's (BK,) to flat row pid [C | n] (DK·DV, then DK values) of rows."""
    row = rows + pid * (DK * DV + DK)
    tl.store(row + o_k[:, None] * DV + o_v[None, :], C)
    if i_v == 0:
        tl.store(row + DK * DV + o_k, n)


def _fit_blocks(configs, named_args, **kwargs):
    """The candidates with blocks no wider than the head dims (DK, DV), duplicates dropped; other
    meta-parameters (CHUNKS) as they are."""
    dims = {**named_args, **kwargs}
    dims = {"BK": dims["DK"], "BV": dims["DV"]}
    fitted = {}
    for cfg in configs:
        meta = {name: min(size, dims[name]) if name in dims else size for name, size in cfg.kwargs.items()}
        fitted.setdefault(triton.Config(meta, num_warps=cfg.num_warps, num_stages=cfg.num_stages), None)
    return list(fitted)


# Launch candidates, timed by triton.autotune on the first call per key and cached on disk. The key is
# DK, DV, L, the dtypes and the power-of-two buckets of B·NH and of the chunk count (BH_LOG2, NC_LOG2):
# with DK, DV, L (and a few-programs flag, equal for both), one pick served (8, 9, 8K, 64) and
# (1, 9, 64K, 64) on an H200 and ran fw+bw 24 % slower than the first candidates at 8K, 29 % faster at
# 64K. The first entries are the launches used before tuning; every entry is tested (tests/test_kernels.py).
# The state passes are sequential over chunks: num_stages pipelines the next chunks' k/v (q/dh) loads,
# small blocks add programs when B·NH alone leaves SMs idle. _fwd_out walks CHUNKS consecutive chunks per
# program: num_stages pipelines the next chunk's q/k/v/state loads behind this chunk's products; CHUNKS = 1
# has no loop (the one-chunk kernel as before, the same PTX). It tunes forward-only calls (no stats) apart.
STATE_CONFIGS = [
    triton.Config({"BK": bk, "BV": bv}, num_warps=w, num_stages=s)
    for bk, bv, w, s in (
        (64, 64, 4, 3), (32, 32, 4, 3), (64, 64, 4, 4), (32, 32, 4, 4),
        (32, 32, 2, 3), (16, 32, 2, 3), (32, 64, 4, 3), (64, 64, 8, 3),
    )
]
OUT_CONFIGS = [
    triton.Config({"BV": bv, "CHUNKS": n}, num_warps=w, num_stages=s)
    for bv, n, w, s in (
        (64, 1, 4, 3), (64, 1, 8, 3), (32, 1, 4, 3), (128, 1, 8, 3),
        (64, 2, 4, 2), (64, 2, 8, 2), (64, 4, 4, 3), (64, 4, 8, 2),
    )
]
CHUNK_BWD_CONFIGS = [
    triton.Config({"BV": bv}, num_warps=w, num_stages=s)
    for bv, w, s in ((64, 4, 2), (64, 4, 1), (64, 8, 1), (64, 8, 2), (32, 4, 1), (32, 4, 2), (32, 8, 1))
]
_PRUNE = {"early_config_prune": _fit_blocks}
TUNING_KEY = ["DK", "DV", "L", "BH_LOG2", "NC_LOG2"]
# With at most TWO_LEVEL_MAX_HEADS sequences (B·NH), the state passes run as a scan over segments of
# SUPER_CHUNK tokens (0: one level, sequential over chunks). Measured on an H200 (bf16, D = 64,
# benchmarks/RESULTS-kernels.md run 8): at B·NH = 9 × 64K, fw+bw kernel time 896 µs with segments of 512
# tokens (947 with 256; 1,024 within 1 %) against 1,983 for the sequential pass over 256-token chunks before;
# at B·NH = 72 × 8K, where the heads alone keep the GPU busy, one level ran fw+bw 1.36 ms against 1.81.
# Below TWO_LEVEL_MIN_TOKENS one level runs whatever B·NH: there a call is bound by the host's launches (two
# levels launch 5 kernels forward and 6 backward, one level 3 and 3). At (1, 9, S, 64), bf16 (run 9,
# `kernels_mlstm.py --parts levels`): one level's forward took 0.17 / 0.35 ms wall at 4K / 16K against 0.51 /
# 0.72, fw+bw 1.46 / 1.72 against 2.07 / 3.07, although its kernels run longer (forward 43 against 33 µs at
# 4K, 161 against 73 at 16K). From 32K the student's prefill is GPU-bound (its compiled regions start there
# too), so there the shorter kernels count.
SUPER_CHUNK = 512
TWO_LEVEL_MAX_HEADS = 16
TWO_LEVEL_MIN_TOKENS = 32768
# The scan over segments: SCAN_GROUP segments a step (one (U, U) product), SCAN_BLOCK state values a program.
SCAN_GROUP = 16
SCAN_BLOCK = 64


@triton.jit
def _fwd_gates(
    i_pre, f_pre, ig, b, wk, M,
    S, S_pad, NC, NH, s_ib, s_ih, s_it, s_fb, s_fh, s_ft,
    L: tl.constexpr,
):
    """Per chunk: ĩ (-inf past S), b = in-chunk cumsum of log σ(f̃), and with log_w = b_last - b + ĩ
    (each key's log weight into the chunk-end state) M = max(log_w) and wk = exp(log_w - M).
    Grid (NC, B*NH).
    """
    c, i_bh = tl.program_id(0), tl.program_id(1)
    o_t = tl.arange(0, L)
    t = c * L + o_t
    in_seq = t < S
    i_b, i_h = i_bh // NH, i_bh % NH
    ic = tl.load(i_pre + i_b * s_ib + i_h * s_ih + t * s_it, mask=in_seq, other=float("-inf")).to(tl.float32)
    fc = tl.load(f_pre + i_b * s_fb + i_h * s_fh + t * s_ft, mask=in_seq, other=float("inf")).to(tl.float32)
    bc = tl.cumsum(_log_sigmoid(fc), 0)
    b_last = tl.sum(tl.where(o_t == L - 1, bc, 0.0), 0)
    log_w = b_last - bc + ic
    M_c = tl.max(log_w, 0)
    tl.store(ig + i_bh * S_pad + t, ic)
    tl.store(b + i_bh * S_pad + t, bc)
    tl.store(wk + i_bh * S_pad + t, tl.exp(log_w - _safe(M_c)))
    tl.store(M + i_bh * NC + c, M_c)


@triton.autotune(STATE_CONFIGS, key=[*TUNING_KEY, "STORE_CHUNKS"], prune_configs_by=_PRUNE, cache_results=True)
@triton.jit
def _fwd_states(
    k, v, b, wk, M, C0, n0, m0, Cs, ns, ms, C_last, n_last, m_last,
    S, S_pad, NC, REP, NSEG, SEG, INIT_STRIDE, BH_LOG2, NC_LOG2,
    HAS_INIT: tl.constexpr, STORE_CHUNKS: tl.constexpr, STORE_FINAL: tl.constexpr, DK: tl.constexpr,
    DV: tl.constexpr, L: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
):
    """State (C, n, m) at every chunk start. Grid (DK/BK, DV/BV, B*NH*NSEG).

    m_{c+1} = max(b_last + m_c, M_c), and C <- g C + s (wk k)ᵀ v with g = exp(b_last + m_c - m_{c+1})
    and s = exp(M_c - m_{c+1}): the product does not wait for the stabiliser, and the only
    dependency carried from chunk to chunk besides C and n is one scalar max.

    Segment ``seg`` of a head runs chunks seg·SEG .. min(NC, (seg+1)·SEG) from row i_bh·INIT_STRIDE + seg
    of (C0, n0, m0): one segment is the whole sequence from its initial state; several fill in the chunk
    states between the segment starts _fwd_scan stored. STORE_FINAL: the state after chunk NC. Without
    STORE_CHUNKS (a segment's own state, built from the empty one for _fwd_scan) only the state after the
    segment, to flat row pid [C | n] of C_last and m_last.
    """
    i_k, i_v, pid = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_bh, seg = pid // NSEG, pid % NSEG
    i_kv = i_bh // REP
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    o_t = tl.arange(0, L)
    if HAS_INIT:
        C, n, m = _state_row(C0, n0, m0, i_bh * INIT_STRIDE + seg, o_k, o_v, DK, DV)
    else:
        C = tl.zeros([BK, BV], dtype=tl.float32)
        n = tl.zeros([BK], dtype=tl.float32)
        m = tl.full([], float("-inf"), tl.float32)
    # n rides on the tensor cores as 16 equal columns (n16 = n·1ᵀ): a row sum per chunk would be a
    # cross-warp reduction on the sequential path; the columns agree exactly, max() reads one. Like C,
    # n now sums the key weights rounded to the input dtype (rel. 5e-4 in bf16 vs the fp32 row sum)
    ones = tl.full([L, 16], 1.0, k.dtype.element_ty)
    n16 = tl.zeros([BK, 16], dtype=tl.float32) + n[:, None]
    first = seg * SEG
    last = tl.minimum(seg * SEG + SEG, NC)
    # the gates of chunk c + 1 load during chunk c: their latency is off the sequential path
    wc_n = tl.load(wk + i_bh * S_pad + first * L + o_t)
    M_n = tl.load(M + i_bh * NC + first)
    b_n = tl.load(b + i_bh * S_pad + first * L + L - 1)
    for c in range(first, last):
        if STORE_CHUNKS:
            st = i_bh * (NC + 1) + c
            tl.store(Cs + (st * DK + o_k[:, None]) * DV + o_v[None, :], C.to(Cs.dtype.element_ty))
            if i_v == 0:
                tl.store(ns + st * DK + o_k, tl.max(n16, 1))
                if i_k == 0:
                    tl.store(ms + st, m)
        t = c * L + o_t
        in_seq = t < S
        wc, M_c, b_last = wc_n, M_n, b_n
        nxt = tl.minimum(c + 1, NC - 1)
        wc_n = tl.load(wk + i_bh * S_pad + nxt * L + o_t)
        M_n = tl.load(M + i_bh * NC + nxt)
        b_n = tl.load(b + i_bh * S_pad + nxt * L + L - 1)
        kc = tl.load(k + (i_kv * S + t[:, None]) * DK + o_k[None, :], mask=in_seq[:, None], other=0.0)
        vc = tl.load(v + (i_kv * S + t[:, None]) * DV + o_v[None, :], mask=in_seq[:, None], other=0.0)
        m_next = tl.maximum(b_last + m, M_c)
        m_ref = _safe(m_next)
        g = tl.exp(b_last + m - m_ref)
        s = tl.exp(M_c - m_ref)
        kwt = tl.trans((kc.to(tl.float32) * wc[:, None]).to(vc.dtype))
        C = C * g + s * tl.dot(kwt, vc, input_precision=PREC)
        n16 = n16 * g + s * tl.dot(kwt, ones, input_precision=PREC)
        m = m_next
    n = tl.max(n16, 1)
    if not STORE_CHUNKS:
        _flat_row_store(C_last, pid, o_k, o_v, C, n, i_v, DK, DV)
        if (i_v == 0) & (i_k == 0):
            tl.store(m_last + pid, m)
    elif STORE_FINAL:
        tl.store(C_last + i_bh * DK * DV + o_k[:, None] * DV + o_v[None, :], C)
        if i_v == 0:
            tl.store(n_last + i_bh * DK + o_k, n)
            tl.store(ns + (i_bh * (NC + 1) + NC) * DK + o_k, n)
            if i_k == 0:
                tl.store(ms + i_bh * (NC + 1) + NC, m)
                tl.store(m_last + i_bh, m)


@triton.jit
def _segment_decay(b, i_bh, j, live, NC, S_pad, R, L: tl.constexpr, RP: tl.constexpr):
    """(U,) summed log forget gates of segments j (R chunks each: the sum of their b_last), 0 where not live."""
    c = j[:, None] * R + tl.arange(0, RP)[None, :]
    mask = live[:, None] & (tl.arange(0, RP)[None, :] < R) & (c < NC)
    return tl.sum(tl.load(b + i_bh * S_pad + c * L + L - 1, mask=mask, other=0.0), 1)


@triton.jit
def _split_load(C, n, row, o, mask, DK: tl.constexpr, DV: tl.constexpr):
    """Flat state values o of [C | n] (DK·DV, then DK) at row ``row`` of C and n kept apart, as fp32."""
    c_part = tl.load(C + row * DK * DV + o, mask=mask & (o < DK * DV), other=0.0).to(tl.float32)
    return c_part + tl.load(n + row * DK + o - DK * DV, mask=mask & (o >= DK * DV), other=0.0).to(tl.float32)


@triton.jit
def _split_store(C, n, row, o, x, mask, DK: tl.constexpr, DV: tl.constexpr):
    """_split_load's inverse: x (flat values o of [C | n]) to row ``row`` of C and n, in their dtypes."""
    tl.store(C + row * DK * DV + o, x.to(C.dtype.element_ty), mask=mask & (o < DK * DV))
    tl.store(n + row * DK + o - DK * DV, x.to(n.dtype.element_ty), mask=mask & (o >= DK * DV))


@triton.jit
def _fwd_scan(
    loc, m_loc, C0, n0, m0, b, Cs, ns, ms, C_last, n_last, m_last, NC, NC2, S_pad, R,
    HAS_INIT: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, L: tl.constexpr, RP: tl.constexpr,
    U: tl.constexpr, BLOCK: tl.constexpr,
):
    """The state at every segment start (rows i_bh·NC2 + j of Cs, ns, ms) and after the last (C_last,
    n_last, m_last) from each segment's own state (flat rows [C | n] of loc and m_loc: what its chunks
    build from the empty state). Per segment j, B_j its summed log forget gates:
    m' = max(B_j + m, m_loc_j), x' = exp(B_j + m - m') x + exp(m_loc_j - m') loc_j for x = C, n.
    Linear in x once m is known, so U segments make one (U, U) product: after segment j of a group, with P
    the group's cumsum of B, x = Σ_{i<=j} exp(P_j - P_i + m_loc_i - m'_j) loc_i + exp(P_j + m - m'_j) x
    and m'_j the max of those exponents. Grid (cdiv(DK·DV + DK, BLOCK), B·NH).
    """
    blk, i_bh = tl.program_id(0), tl.program_id(1)
    o = blk * BLOCK + tl.arange(0, BLOCK)
    in_row = o < DK * DV + DK
    o_u = tl.arange(0, U)
    upto = o_u[None, :] <= o_u[:, None]  # [j, i]: i <= j
    if HAS_INIT:
        x = _split_load(C0, n0, i_bh, o, in_row, DK, DV)
        m = tl.load(m0 + i_bh)
    else:
        x = tl.zeros([BLOCK], dtype=tl.float32)
        m = tl.full([], float("-inf"), tl.float32)
    for g0 in range(0, NC2, U):
        j = g0 + o_u
        live = j < NC2  # past NC2: B = 0 and no own state, the state passes through unchanged
        P = tl.cumsum(_segment_decay(b, i_bh, j, live, NC, S_pad, R, L, RP), 0)
        lw = tl.where(upto, P[:, None] - P[None, :] + tl.load(m_loc + i_bh * NC2 + j, mask=live,
                                                               other=float("-inf"))[None, :], float("-inf"))
        lw0 = P + m
        m_next = tl.maximum(tl.max(lw, 1), lw0)
        m_ref = _safe(m_next)
        own = tl.load(loc + (i_bh * NC2 + j[:, None]) * (DK * DV + DK) + o[None, :],
                      mask=live[:, None] & in_row[None, :], other=0.0)
        y = tl.dot(tl.exp(lw - m_ref[:, None]), own, input_precision="ieee")
        y += tl.exp(lw0 - m_ref)[:, None] * x[None, :]
        # rows g0 (the carried state) and j + 1 for all but the group's last (the next group's row g0)
        _split_store(Cs, ns, i_bh * NC2 + g0, o, x, in_row, DK, DV)
        after = (o_u < U - 1) & (j + 1 < NC2)
        _split_store(Cs, ns, i_bh * NC2 + j[:, None] + 1, o[None, :], y, after[:, None] & in_row[None, :], DK, DV)
        if blk == 0:
            tl.store(ms + i_bh * NC2 + g0, m)
            tl.store(ms + i_bh * NC2 + j + 1, m_next, mask=after)
        x = tl.sum(tl.where((o_u == U - 1)[:, None], y, 0.0), 0)
        m = tl.max(tl.where(o_u == U - 1, m_next, float("-inf")), 0)
    _split_store(C_last, n_last, i_bh, o, x, in_row, DK, DV)
    if blk == 0:
        tl.store(m_last + i_bh, m)


@triton.jit
def _out_chunk(
    q, k, v, b, ig, Cs, ns, ms, h, m_out, qn_out, c, i_v, i_bh, i_kv, S, S_pad, NC, eps,
    STATS: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, L: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
):
    """h of chunk c for one block of DV; with STATS also m_t and qᵀn (for backward)."""
    o_t = tl.arange(0, L)
    o_k = tl.arange(0, DK)
    o_v = i_v * BV + tl.arange(0, BV)
    t = c * L + o_t
    in_seq = t < S
    qc = tl.load(q + (i_bh * S + t[:, None]) * DK + o_k[None, :], mask=in_seq[:, None], other=0.0)
    kc = tl.load(k + (i_kv * S + t[:, None]) * DK + o_k[None, :], mask=in_seq[:, None], other=0.0)
    vc = tl.load(v + (i_kv * S + t[:, None]) * DV + o_v[None, :], mask=in_seq[:, None], other=0.0)
    bc = tl.load(b + i_bh * S_pad + t)
    ic = tl.load(ig + i_bh * S_pad + t)
    st = i_bh * (NC + 1) + c
    m_c = tl.load(ms + st)
    Cc = tl.load(Cs + (st * DK + o_k[:, None]) * DV + o_v[None, :])
    nc = tl.load(ns + st * DK + o_k)

    causal = o_t[:, None] >= o_t[None, :]
    log_d = tl.where(causal, bc[:, None] - bc[None, :] + ic[None, :], float("-inf"))
    log_inter = bc + m_c
    m_t = _safe(tl.maximum(tl.max(log_d, 1), log_inter))
    A = tl.dot(qc, tl.trans(kc), input_precision=PREC) * tl.exp(log_d - m_t[:, None])
    a = tl.exp(log_inter - m_t)
    num = tl.dot(A.to(vc.dtype), vc, input_precision=PREC)
    num += a[:, None] * tl.dot(qc, Cc.to(qc.dtype), input_precision=PREC)
    qn = tl.sum(A, 1) + a * tl.sum(qc.to(tl.float32) * nc[None, :], 1)
    den = tl.maximum(tl.abs(qn), tl.exp(-m_t)) + eps
    hc = num / den[:, None]
    tl.store(h + (i_bh * S + t[:, None]) * DV + o_v[None, :], hc.to(h.dtype.element_ty), mask=in_seq[:, None])
    if STATS and i_v == 0:
        tl.store(m_out + i_bh * S_pad + t, m_t)
        tl.store(qn_out + i_bh * S_pad + t, qn)


@triton.autotune(OUT_CONFIGS, key=[*TUNING_KEY, "STATS"], prune_configs_by=_PRUNE, cache_results=True)
@triton.jit
def _fwd_out(
    q, k, v, b, ig, Cs, ns, ms, h, m_out, qn_out,
    S, S_pad, NC, REP, eps, BH_LOG2, NC_LOG2,
    STATS: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, L: tl.constexpr, BV: tl.constexpr,
    CHUNKS: tl.constexpr, PREC: tl.constexpr,
):
    """h for CHUNKS consecutive chunks (those before NC) and one block of DV; with STATS also m_t and
    qᵀn (for backward). Grid (DV/BV, cdiv(NC, CHUNKS), B*NH)."""
    i_v, i_c, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    args = (q, k, v, b, ig, Cs, ns, ms, h, m_out, qn_out)
    if CHUNKS == 1:  # no loop: all of the chunk's loads in flight at once, as many programs per SM as fit
        _out_chunk(*args, i_c, i_v, i_bh, i_bh // REP, S, S_pad, NC, eps, STATS, DK, DV, L, BV, PREC)
    else:  # num_stages pipelines the next chunk's loads behind this chunk's products
        for c in range(i_c * CHUNKS, tl.minimum(i_c * CHUNKS + CHUNKS, NC)):
            _out_chunk(*args, c, i_v, i_bh, i_bh // REP, S, S_pad, NC, eps, STATS, DK, DV, L, BV, PREC)


@triton.jit
def _bwd_prep(
    h, dh, b, ig, M, ms, m_t, qn, den, dqn, dm, dm_key, D, A,
    S, S_pad, NC, eps,
    DV: tl.constexpr, L: tl.constexpr, BV: tl.constexpr,
):
    """Per position: den, ∂L/∂(qᵀn) and ∂L/∂m_t from dh·h. m_t is either an in-chunk
    ``b_t - b_s + ĩ_s`` (at the row's argmax s) or the carried ``b_t + m_c``: dm_key sums the former
    per key s; D per chunk sums the latter (their share of ∂L/∂m_c). Per chunk, A = 1 where
    m_{c+1} = max(b_last + m_c, M_c) takes its first argument (∂L/∂m_{c+1} flows on to m_c), else 0:
    compared with M rather than with the stored m_{c+1}, which the two-level forward rounds differently
    where its segments meet. Grid (NC, B*NH)."""
    c, i_bh = tl.program_id(0), tl.program_id(1)
    o_t = tl.arange(0, L)
    t = c * L + o_t
    in_seq = t < S
    hdh = tl.zeros([L], dtype=tl.float32)
    for i_v in range(0, DV // BV):
        o_v = i_v * BV + tl.arange(0, BV)
        hc = tl.load(h + (i_bh * S + t[:, None]) * DV + o_v[None, :], mask=in_seq[:, None], other=0.0)
        dhc = tl.load(dh + (i_bh * S + t[:, None]) * DV + o_v[None, :], mask=in_seq[:, None], other=0.0)
        hdh += tl.sum(hc.to(tl.float32) * dhc.to(tl.float32), 1)
    qnc = tl.load(qn + i_bh * S_pad + t)
    mt = tl.load(m_t + i_bh * S_pad + t)
    bc = tl.load(b + i_bh * S_pad + t)
    m_c = tl.load(ms + i_bh * (NC + 1) + c)
    floor = tl.exp(-mt)
    denc = tl.maximum(tl.abs(qnc), floor) + eps
    dqnc = tl.where(tl.abs(qnc) > floor, tl.where(qnc > 0, -hdh, hdh) / denc, 0.0)
    dmc = -eps * hdh / denc
    carried = bc + m_c == mt
    ic = tl.load(ig + i_bh * S_pad + t)
    log_d = tl.where(o_t[:, None] >= o_t[None, :], bc[:, None] - bc[None, :] + ic[None, :], float("-inf"))
    own = (o_t[None, :] == tl.argmax(log_d, 1)[:, None]) & (~carried)[:, None]
    tl.store(den + i_bh * S_pad + t, denc)
    tl.store(dqn + i_bh * S_pad + t, dqnc)
    tl.store(dm + i_bh * S_pad + t, dmc)
    tl.store(dm_key + i_bh * S_pad + t, tl.sum(tl.where(own, dmc[:, None], 0.0), 0))
    tl.store(D + i_bh * NC + c, tl.sum(tl.where(carried, dmc, 0.0), 0))
    b_last = tl.sum(tl.where(o_t == L - 1, bc, 0.0), 0)
    tl.store(A + i_bh * NC + c, tl.where(b_last + m_c >= tl.load(M + i_bh * NC + c), 1.0, 0.0))


@triton.jit
def _segment_dm(D, A, D2, A2, NC, NC2, R: tl.constexpr):
    """The chain dm_c = D_c + A_c · dm_{c+1} over the R chunks of one segment, composed into one step
    dm_start = D2 + A2 · dm_end (A is 0 or 1, so dm_start = Σ_j D_j Π_{i<j} A_i + Π A · dm_end).
    Grid (NC2, B*NH)."""
    c2, i_bh = tl.program_id(0), tl.program_id(1)
    j = c2 * R + tl.arange(0, R)
    valid = j < NC
    d = tl.load(D + i_bh * NC + j, mask=valid, other=0.0)
    breaks = 1.0 - tl.load(A + i_bh * NC + j, mask=valid, other=1.0)  # chunks past NC pass dm on unchanged
    before = tl.cumsum(breaks, 0) - breaks  # chunks before j that stop the chain
    tl.store(D2 + i_bh * NC2 + c2, tl.sum(tl.where(before == 0, d, 0.0), 0))
    tl.store(A2 + i_bh * NC2 + c2, tl.where(tl.sum(breaks, 0) == 0, 1.0, 0.0))


@triton.jit
def _rev_gates(b, ms, m_t, den, dqn, D, A, c, i_bh, o_t, S, S_pad, NC, L: tl.constexpr):
    """What the reverse pass reads of chunk c besides q and dh: b, m_t, den, ∂L/∂(qᵀn) per position; the
    stabilisers at its start and end, b_last, and D_c, A_c of the ∂L/∂m chain (see _bwd_states)."""
    t = c * L + o_t
    in_seq = t < S
    m_row = ms + i_bh * (NC + 1)
    return (
        tl.load(b + i_bh * S_pad + t),
        tl.load(m_t + i_bh * S_pad + t, mask=in_seq, other=0.0),
        tl.load(den + i_bh * S_pad + t, mask=in_seq, other=1.0),
        tl.load(dqn + i_bh * S_pad + t, mask=in_seq, other=0.0),
        tl.load(m_row + c),
        _safe(tl.load(m_row + c + 1)),
        tl.load(b + i_bh * S_pad + c * L + L - 1),
        tl.load(D + i_bh * NC + c),
        tl.load(A + i_bh * NC + c),
    )


@triton.autotune(STATE_CONFIGS, key=[*TUNING_KEY, "STORE_CHUNKS"], prune_configs_by=_PRUNE, cache_results=True)
@triton.jit
def _bwd_states(
    q, dh, b, ms, m_t, den, dqn, D, A, dC_end, dn_end, dm_end, dCs, dns, dms,
    S, S_pad, NC, NSEG, SEG, END_STRIDE, BH_LOG2, NC_LOG2,
    HAS_END: tl.constexpr, STORE_CHUNKS: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, L: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
):
    """Gradient w.r.t. the state (C, n, m) at every chunk start (reverse pass). Grid (DK/BK, DV/BV, B*NH*NSEG).

    dms[c] = ∂L/∂m_c through the stabiliser alone: D_c + A_c · dms[c+1].

    Segments as in _fwd_states: segment ``seg`` of a head runs chunks min(NC, (seg+1)·SEG) - 1 down to
    seg·SEG from row i_bh·END_STRIDE + seg + 1 of (dC_end, dn_end, dm_end) (HAS_END; else zero: the final
    state carries no gradient) and stores the gradient at each chunk's end, the first segment also at
    chunk 0. Without STORE_CHUNKS (a segment's own share, from a zero gradient at its end, for _bwd_scan)
    only the gradient at the segment's start, to flat row pid [dC | dn] of dCs.

    As _fwd_states does, chunk c-1's gates (_rev_gates) load during chunk c, and ∂L/∂n is carried as 16
    equal columns updated by a tensor-core product instead of a cross-warp row sum: together 1.74× faster at
    (8, 9, 8K, 64) on an H200, and fw+bw 2.60 -> 2.01 ms at (1, 9, 64K, 64) (RESULTS-kernels.md, runs 4-5).
    """
    i_k, i_v, pid = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_bh, seg = pid // NSEG, pid % NSEG
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    o_t = tl.arange(0, L)
    if HAS_END:
        dC, dn, dmc = _state_row(dC_end, dn_end, dm_end, i_bh * END_STRIDE + seg + 1, o_k, o_v, DK, DV)
    else:
        dC = tl.zeros([BK, BV], dtype=tl.float32)
        dn = tl.zeros([BK], dtype=tl.float32)
        dmc = tl.zeros([], dtype=tl.float32)
    dn16 = tl.zeros([BK, 16], dtype=tl.float32) + dn[:, None]
    first = seg * SEG
    last = tl.minimum(first + SEG, NC)
    bc_n, mt_n, den_n, dqn_n, mc_n, mnext_n, blast_n, D_n, A_n = _rev_gates(
        b, ms, m_t, den, dqn, D, A, last - 1, i_bh, o_t, S, S_pad, NC, L,
    )
    for cc in range(first, last):
        c = first + last - 1 - cc
        if STORE_CHUNKS:
            st = i_bh * (NC + 1) + c
            tl.store(dCs + ((st + 1) * DK + o_k[:, None]) * DV + o_v[None, :], dC.to(dCs.dtype.element_ty))
            if i_v == 0:
                tl.store(dns + (st + 1) * DK + o_k, tl.max(dn16, 1))
                if i_k == 0:
                    tl.store(dms + st + 1, dmc)
        t = c * L + o_t
        in_seq = t < S
        qc = tl.load(q + (i_bh * S + t[:, None]) * DK + o_k[None, :], mask=in_seq[:, None], other=0.0)
        dhc = tl.load(dh + (i_bh * S + t[:, None]) * DV + o_v[None, :], mask=in_seq[:, None], other=0.0)
        bc, mt, denc, dqnc, m_c, m_next, b_last, Dc, Ac = bc_n, mt_n, den_n, dqn_n, mc_n, mnext_n, blast_n, D_n, A_n
        bc_n, mt_n, den_n, dqn_n, mc_n, mnext_n, blast_n, D_n, A_n = _rev_gates(
            b, ms, m_t, den, dqn, D, A, tl.maximum(c - 1, first), i_bh, o_t, S, S_pad, NC, L,
        )
        a = tl.exp(bc + m_c - mt)
        qat = tl.trans((qc.to(tl.float32) * a[:, None]).to(qc.dtype))
        dnum = dhc.to(tl.float32) / denc[:, None]
        g = tl.exp(b_last + m_c - m_next)
        dC = dC * g + tl.dot(qat, dnum.to(qc.dtype), input_precision=PREC)
        dq16 = (tl.zeros([L, 16], dtype=tl.float32) + dqnc[:, None]).to(qc.dtype)
        dn16 = dn16 * g + tl.dot(qat, dq16, input_precision=PREC)
        dmc = Dc + Ac * dmc
    dn = tl.max(dn16, 1)
    if not STORE_CHUNKS:
        _flat_row_store(dCs, pid, o_k, o_v, dC, dn, i_v, DK, DV)
    elif seg == 0:
        tl.store(dCs + ((i_bh * (NC + 1)) * DK + o_k[:, None]) * DV + o_v[None, :], dC.to(dCs.dtype.element_ty))
        if i_v == 0:
            tl.store(dns + (i_bh * (NC + 1)) * DK + o_k, dn)
            if i_k == 0:
                tl.store(dms + i_bh * (NC + 1), dmc)


@triton.jit
def _bwd_scan(
    loc, b, ms, D2, A2, dCs, dns, dms, NC, NC2, S_pad, R,
    DK: tl.constexpr, DV: tl.constexpr, L: tl.constexpr, RP: tl.constexpr, U: tl.constexpr, BLOCK: tl.constexpr,
):
    """The gradient w.r.t. the state at every segment start (rows i_bh·(NC2 + 1) + j of dCs, dns, dms; row
    NC2, the end, zero) from each segment's own share (flat rows [dC | dn] of loc: what its chunks' queries
    give with a zero gradient at its end). Going back, x_j = G_j x_{j+1} + loc_j with
    G_j = exp(B_j + m_j - m_{j+1}), B_j the segment's summed log forget gates and m_j the forward's
    stabiliser at its start (ms[j·R]): over a group, x_j = Σ_{i>=j} exp(Q_j - Q_i) loc_i + exp(Q_j - Q_end)
    x_end with Q_j = m_j - (B summed over the group's segments before j); a segment starting with no mass
    (m_j = -inf) passes nothing back. ∂L/∂m: dms_j = D2_j + A2_j · dms_{j+1} with A2 in {0, 1}, i.e. the
    sum of D2_i over i >= j up to the first A2_i = 0 (Z, the zeros of A2 from j on, is unchanged to there),
    plus dms_end if there is none. Grid (cdiv(DK·DV + DK, BLOCK), B·NH).
    """
    blk, i_bh = tl.program_id(0), tl.program_id(1)
    o = blk * BLOCK + tl.arange(0, BLOCK)
    in_row = o < DK * DV + DK
    o_u = tl.arange(0, U)
    diag = o_u[None, :] == o_u[:, None]
    later = o_u[None, :] > o_u[:, None]  # [j, i]: i > j
    m_row = ms + i_bh * (NC + 1)
    top = i_bh * (NC2 + 1)
    x = tl.zeros([BLOCK], dtype=tl.float32)
    dm = tl.zeros([], dtype=tl.float32)
    _split_store(dCs, dns, top + NC2, o, x, in_row, DK, DV)
    if blk == 0:
        tl.store(dms + top + NC2, dm)
    for gi in range(0, tl.cdiv(NC2, U)):
        g0 = NC2 - (gi + 1) * U
        j = g0 + o_u
        live = j >= 0  # before segment 0: no own share, and rows never stored
        B = _segment_decay(b, i_bh, j, live, NC, S_pad, R, L, RP)
        Q = tl.load(m_row + j * R, mask=live, other=float("-inf")) - (tl.cumsum(B, 0) - B)
        Q_end = tl.load(m_row + tl.minimum((g0 + U) * R, NC)) - tl.sum(B, 0)
        has_mass = (Q > float("-inf"))[:, None]
        W = tl.where(diag, 1.0, tl.where(later & has_mass, tl.exp(Q[:, None] - Q[None, :]), 0.0))
        own = tl.load(loc + (i_bh * NC2 + j[:, None]) * (DK * DV + DK) + o[None, :],
                      mask=live[:, None] & in_row[None, :], other=0.0)
        y = tl.dot(W, own, input_precision="ieee")
        y += tl.where(Q > float("-inf"), tl.exp(Q - Q_end), 0.0)[:, None] * x[None, :]
        _split_store(dCs, dns, top + j[:, None], o[None, :], y, live[:, None] & in_row[None, :], DK, DV)
        Z = tl.cumsum(1.0 - tl.load(A2 + i_bh * NC2 + j, mask=live, other=1.0), 0, reverse=True)
        chain = (later | diag) & (Z[None, :] == Z[:, None])
        D2j = tl.load(D2 + i_bh * NC2 + j, mask=live, other=0.0)
        dmj = tl.sum(tl.where(chain, D2j[None, :], 0.0), 1) + tl.where(Z == 0.0, dm, 0.0)
        if blk == 0:
            tl.store(dms + top + j, dmj, mask=live)
        x = tl.sum(tl.where((o_u == 0)[:, None], y, 0.0), 0)
        dm = tl.sum(tl.where(o_u == 0, dmj, 0.0), 0)


@triton.autotune(CHUNK_BWD_CONFIGS, key=TUNING_KEY, prune_configs_by=_PRUNE, cache_results=True)
@triton.jit
def _bwd_chunk(
    q, k, v, dh, b, ig, f_pre, A, Cs, ns, ms, dCs, dns, dms, m_t, den, dqn, dm, dm_key,
    dq, dk, dv, di, df,
    S, S_pad, NC, REP, NH, s_fb, s_fh, s_ft, BH_LOG2, NC_LOG2,
    DK: tl.constexpr, DV: tl.constexpr, L: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
):
    """dq, dk, dv (per query head) and the gate gradients dĩ, df̃ of one chunk.

    Grid (NC, B*NH); DV is walked in blocks of BV inside the program.
    """
    c, i_bh = tl.program_id(0), tl.program_id(1)
    i_kv = i_bh // REP
    o_t = tl.arange(0, L)
    o_k = tl.arange(0, DK)
    t = c * L + o_t
    in_seq = t < S
    qc = tl.load(q + (i_bh * S + t[:, None]) * DK + o_k[None, :], mask=in_seq[:, None], other=0.0)
    kc = tl.load(k + (i_kv * S + t[:, None]) * DK + o_k[None, :], mask=in_seq[:, None], other=0.0)
    bc = tl.load(b + i_bh * S_pad + t)
    ic = tl.load(ig + i_bh * S_pad + t)
    mt = tl.load(m_t + i_bh * S_pad + t)
    denc = tl.load(den + i_bh * S_pad + t)
    dqnc = tl.load(dqn + i_bh * S_pad + t)
    st = i_bh * (NC + 1) + c
    m_c = tl.load(ms + st)
    m_next = _safe(tl.load(ms + st + 1))
    b_last = tl.load(b + i_bh * S_pad + c * L + L - 1)
    nc = tl.load(ns + st * DK + o_k)
    dn1 = tl.load(dns + (st + 1) * DK + o_k)

    causal = o_t[:, None] >= o_t[None, :]
    log_d = tl.where(causal, bc[:, None] - bc[None, :] + ic[None, :], float("-inf"))
    E = tl.exp(log_d - mt[:, None])
    log_w = b_last - bc + ic
    w = tl.exp(log_w - m_next)
    g = tl.exp(b_last + m_c - m_next)

    # the stabiliser: m_t = b_t + (-b_s + ĩ_s, counted in dm_key, or m_c), and m_{c+1} = b_last + (m_c,
    # or -b_s + ĩ_s at the argmax of log_w): ∂L/∂m goes to b_t, b_last and those keys s (to_key)
    dm_next = tl.load(dms + st + 1)
    from_next = tl.where(tl.load(A + i_bh * NC + c) == 0.0, dm_next, 0.0)
    to_key = tl.load(dm_key + i_bh * S_pad + t) + tl.where(o_t == tl.argmax(log_w, 0), from_next, 0.0)
    db_stab = tl.load(dm + i_bh * S_pad + t) - to_key + tl.where(o_t == L - 1, dm_next, 0.0)

    QK = tl.dot(qc, tl.trans(kc), input_precision=PREC)
    A = QK * E
    a = tl.exp(bc + m_c - mt)

    dA = tl.zeros([L, L], dtype=tl.float32) + dqnc[:, None]
    dq_inter = tl.zeros([L, DK], dtype=tl.float32)
    dk_inter = tl.zeros([L, DK], dtype=tl.float32)
    state_dot = tl.sum(nc * dn1, 0)
    for i_v in range(0, DV // BV):
        o_v = i_v * BV + tl.arange(0, BV)
        vc = tl.load(v + (i_kv * S + t[:, None]) * DV + o_v[None, :], mask=in_seq[:, None], other=0.0)
        dhc = tl.load(dh + (i_bh * S + t[:, None]) * DV + o_v[None, :], mask=in_seq[:, None], other=0.0)
        Cc = tl.load(Cs + (st * DK + o_k[:, None]) * DV + o_v[None, :])
        dC1 = tl.load(dCs + ((st + 1) * DK + o_k[:, None]) * DV + o_v[None, :])
        dnum = (dhc.to(tl.float32) / denc[:, None]).to(qc.dtype)
        dA += tl.dot(dnum, tl.trans(vc), input_precision=PREC)
        dq_inter += tl.dot(dnum, tl.trans(Cc.to(qc.dtype)), input_precision=PREC)
        dk_inter += tl.dot(vc, tl.trans(dC1.to(qc.dtype)), input_precision=PREC)
        dvc = tl.dot(tl.trans(A.to(qc.dtype)), dnum, input_precision=PREC)
        dvc += w[:, None] * tl.dot(kc, dC1.to(qc.dtype), input_precision=PREC)
        tl.store(dv + (i_bh * S + t[:, None]) * DV + o_v[None, :], dvc.to(dv.dtype.element_ty), mask=in_seq[:, None])
        state_dot += tl.sum(tl.sum(Cc.to(tl.float32) * dC1.to(tl.float32), 1), 0)

    dq_acc = a[:, None] * (dq_inter + dqnc[:, None] * nc[None, :])
    dk_acc = w[:, None] * (dk_inter + dn1[None, :])
    # b_last also scales every key's weight into the next state and the carried state itself
    d_last = g * state_dot + tl.sum(tl.sum(kc.to(tl.float32) * dk_acc, 1), 0)
    dS = (dA * E).to(qc.dtype)
    dq_acc += tl.dot(dS, kc, input_precision=PREC)
    dk_acc += tl.dot(tl.trans(dS), qc, input_precision=PREC)
    tl.store(dq + (i_bh * S + t[:, None]) * DK + o_k[None, :], dq_acc.to(dq.dtype.element_ty), mask=in_seq[:, None])
    tl.store(dk + (i_bh * S + t[:, None]) * DK + o_k[None, :], dk_acc.to(dk.dtype.element_ty), mask=in_seq[:, None])
    # every exponent is linear in b and ĩ: q·dq is the "+b_t" share, k·dk the "ĩ_s - b_s" share
    k_dk = tl.sum(kc.to(tl.float32) * dk_acc, 1)
    dbc = tl.sum(qc.to(tl.float32) * dq_acc, 1) - k_dk + tl.where(o_t == L - 1, d_last, 0.0) + db_stab


    i_b, i_h = i_bh // NH, i_bh % NH
    fc = tl.load(f_pre + i_b * s_fb + i_h * s_fh + t * s_ft, mask=in_seq, other=0.0).to(tl.float32)
    dfc = tl.cumsum(dbc, 0, reverse=True) * tl.sigmoid(-fc)
    tl.store(di + i_bh * S + t, (k_dk + to_key).to(di.dtype.element_ty), mask=in_seq)
    tl.store(df + i_bh * S + t, dfc.to(df.dtype.element_ty), mask=in_seq)


TUNED = {_fwd_states: STATE_CONFIGS, _fwd_out: OUT_CONFIGS, _bwd_states: STATE_CONFIGS, _bwd_chunk: CHUNK_BWD_CONFIGS}


@contextmanager
def pinned_launches(index: int, DK: int, DV: int):
    """Every autotuned kernel launches with its candidate ``index`` (fitted to DK, DV; shorter lists wrap
    around), untimed: to test each candidate, or to time one fixed launch against the tuned pick."""
    saved = {kernel: kernel.configs for kernel in TUNED}
    try:
        for kernel, candidates in TUNED.items():
            fitted = _fit_blocks(candidates, {}, DK=DK, DV=DV)
            kernel.configs = [fitted[index % len(fitted)]]
        yield {kernel.base_fn.__name__: kernel.configs[0] for kernel in TUNED}
    finally:
        for kernel, kept in saved.items():
            kernel.configs = kept


def _gates(i_pre, f_pre, NH: int, S: int, L: int):
    """ĩ, b, wk (B*NH, S_pad) and M (B*NH, NC) for chunks of L (see _fwd_gates)."""
    BH, NC = i_pre.shape[0] * NH, triton.cdiv(S, L)
    ig = torch.empty(BH, NC * L, device=i_pre.device, dtype=torch.float32)
    b, wk = torch.empty_like(ig), torch.empty_like(ig)
    M = torch.empty(BH, NC, device=i_pre.device, dtype=torch.float32)
    _fwd_gates[(NC, BH)](i_pre, f_pre, ig, b, wk, M, S, NC * L, NC, NH, *i_pre.stride(), *f_pre.stride(), L=L)
    return ig, b, wk, M


def _segment_ratio(batch_heads: int, tokens: int, L: int) -> int:
    """Chunks per segment of the two-level state passes; 1: one level."""
    if batch_heads > TWO_LEVEL_MAX_HEADS or tokens < TWO_LEVEL_MIN_TOKENS:
        return 1
    return max(1, SUPER_CHUNK // L)


def _scan_launch(dk: int, dv: int, L: int, R: int, batch_heads: int):
    """Grid and meta-parameters of _fwd_scan / _bwd_scan: SCAN_BLOCK flat state values a program."""
    grid = (triton.cdiv(dk * dv + dk, SCAN_BLOCK), batch_heads)
    return grid, dict(DK=dk, DV=dv, L=L, RP=triton.next_power_of_2(R), U=SCAN_GROUP, BLOCK=SCAN_BLOCK)


def _size_buckets(batch_heads: int, chunks: int) -> tuple[int, int]:
    # the tuning key's BH_LOG2, NC_LOG2: the kernels never read them
    return batch_heads.bit_length(), chunks.bit_length()


def _state_grid(dk: int, dv: int, batch_heads: int):
    return lambda meta: (dk // meta["BK"], dv // meta["BV"], batch_heads)


def _check(q, k, v, i_pre, f_pre, chunk_size):
    B, NH, S, DK = q.shape
    NKV, DV = k.shape[1], v.shape[-1]
    if (
        k.shape != (B, NKV, S, DK) or v.shape[:3] != (B, NKV, S) or NKV < 1 or NH % NKV
        or i_pre.shape != (B, NH, S) or f_pre.shape != (B, NH, S)
    ):
        raise ValueError(
            f"mlstm shapes disagree: q {tuple(q.shape)} k {tuple(k.shape)} v {tuple(v.shape)} "
            f"i_pre {tuple(i_pre.shape)} f_pre {tuple(f_pre.shape)}; expected q (B,NH,S,DK), k (B,NKV,S,DK), "
            "v (B,NKV,S,DV) with NH a multiple of NKV, gates (B,NH,S)"
        )
    for name, d in (("DK", DK), ("DV", DV), ("chunk_size", chunk_size)):
        if d < 16 or d & (d - 1):
            raise ValueError(f"{name}={d}: the Triton mLSTM needs a power of two >= 16")
    if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("mlstm_chunkwise_triton needs CUDA tensors; use xmerge.modeling.mlstm on CPU")


class _MLSTMChunkwise(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, i_pre, f_pre, C0, n0, m0, L, eps, forward_only):
        B, NH, S, DK = q.shape
        NKV, DV = k.shape[1], v.shape[-1]
        BH, NC, REP = B * NH, triton.cdiv(S, L), NH // NKV
        S_pad = NC * L
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        dev, f32 = q.device, torch.float32
        prec = "ieee" if q.dtype == torch.float32 else "tf32"
        ig, b, wk, M = _gates(i_pre, f_pre, NH, S, L)

        has_init = C0 is not None
        if has_init:  # the kernel reads them as flat fp32 rows
            C0c, n0c, m0c = C0.float().contiguous(), n0.float().contiguous(), m0.float().contiguous()
        else:
            C0c = n0c = m0c = ig  # unused
        Cs = torch.empty(BH, NC + 1, DK, DV, device=dev, dtype=q.dtype)
        ns = torch.empty(BH, NC + 1, DK, device=dev, dtype=f32)
        ms = torch.empty(BH, NC + 1, device=dev, dtype=f32)
        C_last = torch.empty(B, NH, DK, DV, device=dev, dtype=f32)
        n_last = torch.empty(B, NH, DK, device=dev, dtype=f32)
        m_last = torch.empty(B, NH, device=dev, dtype=f32)
        final = (C_last, n_last, m_last)
        consts = dict(DK=DK, DV=DV, PREC=prec)
        R = _segment_ratio(BH, S, L)
        if NC > R > 1:
            # each segment of R chunks builds its own state from the empty one, a scan over segments composes
            # them, then each fills in its chunk states from its start state. Max-plus composition is
            # associative, so the m sequence equals the one-level one up to rounding where segments meet (the
            # backward's stabiliser routing compares with M, not with the stored m, for that reason)
            NC2 = triton.cdiv(NC, R)
            loc = torch.empty(BH * NC2, DK * DV + DK, device=dev, dtype=f32)
            m_loc = torch.empty(BH * NC2, device=dev, dtype=f32)
            _fwd_states[_state_grid(DK, DV, BH * NC2)](
                k, v, b, wk, M, C0c, n0c, m0c, Cs, ns, ms, loc, loc, m_loc, S, S_pad, NC, REP, NC2, R, 0,
                *_size_buckets(BH * NC2, R), HAS_INIT=False, STORE_CHUNKS=False, STORE_FINAL=False, L=L, **consts,
            )
            Cs2 = torch.empty(BH, NC2, DK, DV, device=dev, dtype=q.dtype)
            ns2 = torch.empty(BH, NC2, DK, device=dev, dtype=f32)
            ms2 = torch.empty(BH, NC2, device=dev, dtype=f32)
            grid, meta = _scan_launch(DK, DV, L, R, BH)
            _fwd_scan[grid](
                loc, m_loc, C0c, n0c, m0c, b, Cs2, ns2, ms2, *final, NC, NC2, S_pad, R, HAS_INIT=has_init, **meta,
            )
            _fwd_states[_state_grid(DK, DV, BH * NC2)](
                k, v, b, wk, M, Cs2, ns2, ms2, Cs, ns, ms, *final, S, S_pad, NC, REP, NC2, R, NC2,
                *_size_buckets(BH * NC2, R), HAS_INIT=True, STORE_CHUNKS=True, STORE_FINAL=False, L=L, **consts,
            )
            if not forward_only:
                ms[:, NC] = m_last.view(BH)  # the backward reads m after the last chunk
        else:
            _fwd_states[_state_grid(DK, DV, BH)](
                k, v, b, wk, M, C0c, n0c, m0c, Cs, ns, ms, *final, S, S_pad, NC, REP, 1, NC, 1,
                *_size_buckets(BH, NC), HAS_INIT=has_init, STORE_CHUNKS=True, STORE_FINAL=True, L=L, **consts,
            )
        buckets = _size_buckets(BH, NC)
        h = torch.empty(B, NH, S, DV, device=dev, dtype=v.dtype)
        if forward_only:
            m_t = qn = ig  # not written: only the backward reads them
        else:
            m_t, qn = torch.empty(BH, S_pad, device=dev, dtype=f32), torch.empty(BH, S_pad, device=dev, dtype=f32)
        _fwd_out[lambda meta: (DV // meta["BV"], triton.cdiv(NC, meta["CHUNKS"]), BH)](
            q, k, v, b, ig, Cs, ns, ms, h, m_t, qn, S, S_pad, NC, REP, eps, *buckets,
            STATS=not forward_only, DK=DK, DV=DV, L=L, PREC=prec,
        )
        ctx.save_for_backward(q, k, v, i_pre, f_pre, ig, b, M, Cs, ns, ms, m_t, qn, h, C0, n0, m0)
        ctx.L, ctx.eps, ctx.prec, ctx.has_init = L, eps, prec, has_init
        ctx.mark_non_differentiable(C_last, n_last, m_last)
        ctx.set_materialize_grads(False)  # no zero gradients for the final state, which backward ignores
        return h, C_last, n_last, m_last

    @staticmethod
    def backward(ctx, dh, _dC, _dn, _dm):
        q, k, v, i_pre, f_pre, ig, b, M, Cs, ns, ms, m_t, qn, h, C0, n0, m0 = ctx.saved_tensors
        L, eps, prec = ctx.L, ctx.eps, ctx.prec
        B, NH, S, DK = q.shape
        NKV, DV = k.shape[1], v.shape[-1]
        BH, NC, REP = B * NH, triton.cdiv(S, L), NH // NKV
        S_pad = NC * L
        dh = dh.contiguous()
        den, dqn, dm, dm_key = (torch.empty_like(m_t) for _ in range(4))
        D = torch.empty(BH, NC, device=q.device, dtype=torch.float32)
        A = torch.empty_like(D)
        _bwd_prep[(NC, BH)](
            h, dh, b, ig, M, ms, m_t, qn, den, dqn, dm, dm_key, D, A, S, S_pad, NC, eps, DV=DV, L=L, BV=min(32, DV)
        )

        dCs, dns, dms = torch.empty_like(Cs), torch.empty_like(ns), torch.empty_like(ms)
        consts = dict(DK=DK, DV=DV, PREC=prec)
        R = _segment_ratio(BH, S, L)
        if NC > R > 1:
            # as the forward: each segment's own share of the gradient at its start, a scan back over segments
            # (the stabilisers are known: linear throughout), then each segment fills in its chunks
            NC2 = triton.cdiv(NC, R)
            D2 = torch.empty(BH, NC2, device=q.device, dtype=torch.float32)
            A2 = torch.empty_like(D2)
            _segment_dm[(NC2, BH)](D, A, D2, A2, NC, NC2, R=R)
            loc = torch.empty(BH * NC2, DK * DV + DK, device=q.device, dtype=torch.float32)
            _bwd_states[_state_grid(DK, DV, BH * NC2)](
                q, dh, b, ms, m_t, den, dqn, D, A, loc, loc, loc, loc, loc, loc,
                S, S_pad, NC, NC2, R, 0, *_size_buckets(BH * NC2, R), HAS_END=False, STORE_CHUNKS=False, L=L,
                **consts,
            )
            dCs2 = torch.empty(BH, NC2 + 1, DK, DV, device=q.device, dtype=torch.float32)
            dns2, dms2 = torch.empty(BH, NC2 + 1, DK, device=q.device), torch.empty(BH, NC2 + 1, device=q.device)
            grid, meta = _scan_launch(DK, DV, L, R, BH)
            _bwd_scan[grid](loc, b, ms, D2, A2, dCs2, dns2, dms2, NC, NC2, S_pad, R, **meta)
            _bwd_states[_state_grid(DK, DV, BH * NC2)](
                q, dh, b, ms, m_t, den, dqn, D, A, dCs2, dns2, dms2, dCs, dns, dms,
                S, S_pad, NC, NC2, R, NC2 + 1, *_size_buckets(BH * NC2, R), HAS_END=True, STORE_CHUNKS=True, L=L,
                **consts,
            )
        else:
            _bwd_states[_state_grid(DK, DV, BH)](
                q, dh, b, ms, m_t, den, dqn, D, A, dCs, dns, dms, dCs, dns, dms,
                S, S_pad, NC, 1, NC, 1, *_size_buckets(BH, NC), HAS_END=False, STORE_CHUNKS=True, L=L, **consts,
            )
        buckets = _size_buckets(BH, NC)
        dq = torch.empty_like(q)
        dk = torch.empty(B, NH, S, DK, device=q.device, dtype=k.dtype)  # per query head
        dv = torch.empty(B, NH, S, DV, device=q.device, dtype=v.dtype)
        d_i = torch.empty(B, NH, S, device=q.device, dtype=i_pre.dtype)
        d_f = torch.empty(B, NH, S, device=q.device, dtype=f_pre.dtype)
        _bwd_chunk[(NC, BH)](
            q, k, v, dh, b, ig, f_pre, A, Cs, ns, ms, dCs, dns, dms, m_t, den, dqn, dm, dm_key, dq, dk, dv, d_i, d_f,
            S, S_pad, NC, REP, NH, *f_pre.stride(), *buckets,
            DK=DK, DV=DV, L=L, PREC=prec,
        )
        if REP > 1:  # query heads of one group share k and v
            dk = dk.view(B, NKV, REP, S, DK).sum(2)
            dv = dv.view(B, NKV, REP, S, DV).sum(2)

        dC0 = dn0 = dm0 = None
        if ctx.has_init:
            dC0 = dCs[:, 0].float().reshape(B, NH, DK, DV)
            dn0 = dns[:, 0].reshape(B, NH, DK)
            # (C0, n0) are stabilised by m0: raising m0 scales the true state
            dm0 = (C0.float() * dC0).sum((-2, -1)) + (n0.float() * dn0).sum(-1) + dms[:, 0].reshape(B, NH)
            dC0, dn0, dm0 = dC0.to(C0.dtype), dn0.to(n0.dtype), dm0.to(m0.dtype)
        return dq, dk, dv, d_i, d_f, dC0, dn0, dm0, None, None, None


def mlstm_chunkwise_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    i_pre: torch.Tensor,
    f_pre: torch.Tensor,
    state: MLSTMState | None = None,
    chunk_size: int = 64,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, MLSTMState]:
    """Chunkwise mLSTM on CUDA: h (B, NH, S, DV) in v's dtype and the final state (C, n, m), fp32.

    q: (B, NH, S, DK); k: (B, NKV, S, DK), v: (B, NKV, S, DV) with NH a multiple of NKV (grouped
    heads, read in place); i_pre, f_pre: (B, NH, S), any float dtype and strides;
    state: (C (B, NH, DK, DV), n (B, NH, DK), m (B, NH)) or None for the empty state.
    DK, DV and chunk_size must be powers of two >= 16. ĩ = -inf marks padded positions.
    """
    _check(q, k, v, i_pre, f_pre, chunk_size)
    C0, n0, m0 = state if state is not None else (None, None, None)
    inputs = (q, k, v, i_pre, f_pre, C0, n0, m0)
    forward_only = not (torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in inputs))
    h, C, n, m = _MLSTMChunkwise.apply(*inputs, chunk_size, eps, forward_only)
    return h, (C, n, m)
