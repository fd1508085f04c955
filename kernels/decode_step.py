"""Fused decode step of the hybrid student's attention block in Triton: one kernel per layer per token.

For one new token per row, program (b, h) computes, in fp32::

    q_rot, k_rot = RoPE(q, k)                              (the row's angles max(pos − start, 0) · inv_freq)
    φ(u) = softmax(u W_h + b_h)                            (on rotated or unrotated q/k)
    m' = max(log σ(f̃) + m, ĩ);  f' = exp(log σ(f̃) + m − m');  i' = exp(ĩ − m')
    C' = f' C + i' φ(k) vᵀ;  n' = f' n + i' φ(k)            (state updated in place, fp32)
    mLSTM = φ(q)ᵀ C' / (max(|φ(q)ᵀ n'|, exp(−m')) + eps)
    SWA = softmax attention of q_rot over the sinks outside the window, the ring keys inside it
          and the token itself (one softmax, scale 1/√D, GQA)
    o = σ(õ);  h = o · mLSTM + (1 − o) · SWA      (õ = W_o [q_raw; k_raw; v_raw] + b_o, a projection)

and writes h (B, H, D) plus the token's k_rot, v and position into ring slot ``pos % W``.
The same math as the PyTorch reference (modeling/mlstm.mlstm_recurrent_step,
modeling/swa.window_sink_attention), including m = −inf (no mass yet) and the sink/window rule.

With few rows a program per (row, head) leaves most SMs idle and its chain of dependent loads and
reductions sets the step's time, so the window is split (``split`` = P): P programs per (row, head) each
attend over a 1/P share of the ring (program 0 also over the token itself and the sinks) and store their
online-softmax state (max, sum, weighted values), one more runs the mLSTM step and stores its output; the
last of them to arrive (a per-(row, head) counter, acquire/release at GPU scope) combines the shares,
mixes in the mLSTM output through the gate and resets the counter.

Race-free ring update: window keys count only where 1 <= pos − ring_pos < W, and the token itself
is added explicitly, so the slot being overwritten is masked whether a program reads it before or
after the write; one program per (row, kv head) writes k/v, program (0, 0, 0) writes ring_pos. The
mLSTM state of a head is read and written by its one mLSTM program.

Precondition (as for the graph decoder): the token is no sink and no left padding (pos >= start).
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

MIXERS = ("hybrid", "swa", "mlstm")
_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _rope(ptr, d, D: tl.constexpr, cos, sin):
    """x·cos + rotate_half(x)·sin of the head vector at ``ptr`` (fp32), and x itself."""
    x = tl.load(ptr + d).to(tl.float32)
    partner = tl.load(ptr + (d + D // 2) % D).to(tl.float32)
    return x * cos + tl.where(d < D // 2, -partner, partner) * sin, x


@triton.jit
def _feature_map(u, w, bias):
    """softmax(u W + b) over the feature axis; u (D,), W (D, D), b (D,), all fp32."""
    z = tl.sum(u[:, None] * w, 0) + bias
    z = tl.exp(z - tl.max(z, 0))
    return z / tl.sum(z, 0)


@triton.jit
def _attend(scores, vals, m_i, l_i, acc):
    """Online-softmax update with a block of scores (N,) (−inf = masked) and values (N, D)."""
    m_new = tl.maximum(m_i, tl.max(scores, 0))
    alpha = tl.exp(m_i - m_new)
    p = tl.exp(scores - m_new)
    return m_new, l_i * alpha + tl.sum(p, 0), acc * alpha + tl.sum(p[:, None] * vals, 0)


@triton.jit
def _ring_block(ring_k, ring_v, ring_pos, kv, w0, hi, d, W: tl.constexpr, D: tl.constexpr, BLOCK_W: tl.constexpr):
    """Ring slots w0 .. w0 + BLOCK_W of kv row ``kv``: their positions (-1 from hi) and keys, values (fp32)."""
    j = w0 + tl.arange(0, BLOCK_W)
    rp = tl.load(ring_pos + j, mask=j < hi, other=-1)
    kv_off = (kv * W + j[:, None]) * D + d[None, :]
    kw = tl.load(ring_k + kv_off, mask=(j < hi)[:, None], other=0.0).to(tl.float32)
    vw = tl.load(ring_v + kv_off, mask=(j < hi)[:, None], other=0.0).to(tl.float32)
    return rp, kw, vw


@triton.jit
def _attend_ring(qs, rp, kw, vw, pos, first, m_i, l_i, acc, W: tl.constexpr):
    """_attend over one ring block: slots count inside the window (1 <= pos − ring_pos < W) and from ``first``."""
    rel = pos - rp
    ok = (rp >= 0) & (rel >= 1) & (rel < W) & (rp >= first)
    return _attend(tl.where(ok, tl.sum(qs[None, :] * kw, 1), float("-inf")), vw, m_i, l_i, acc)


@triton.jit
def _wait_for_product(PDL: tl.constexpr):
    if PDL:  # launched early by the product before: wait for it, and let the next product load its weights
        gdc_wait()
        gdc_launch_dependents()


@triton.jit
def _token(proj, q_in, k_in, b, h, hkv, stride_proj, stride_q, stride_k, d, c, s,
           H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr):
    """The token's q, k (rotated and not) and v, fp32 (D,): read after the product before has written them."""
    q_rot, q = _rope(q_in + b * stride_q + h * D, d, D, c, s)
    k_rot, k = _rope(k_in + b * stride_k + hkv * D, d, D, c, s)
    v = tl.load(proj + b * stride_proj + (H + HKV) * D + hkv * D + d).to(tl.float32)
    return q_rot, q, k_rot, k, v


@triton.jit
def _mlstm_inputs(C, n, m, fq_w, fq_b, fk_w, fk_b, h, hkv, bh, d, D: tl.constexpr):
    """What the mLSTM step reads besides the token: feature-map weights (fp32) and the state."""
    wq = tl.load(fq_w + h * D * D + d[:, None] * D + d[None, :]).to(tl.float32)
    wk = tl.load(fk_w + hkv * D * D + d[:, None] * D + d[None, :]).to(tl.float32)
    bq, bk = tl.load(fq_b + h * D + d).to(tl.float32), tl.load(fk_b + hkv * D + d).to(tl.float32)
    state = tl.load(C + bh * D * D + d[:, None] * D + d[None, :])
    return wq, wk, bq, bk, state, tl.load(n + bh * D + d), tl.load(m + bh)


@triton.jit
def _mlstm(
    proj, stride_proj, b, h, bh, d, q, k, q_rot, k_rot, v, wq, wk, bq, bk, state, norm, m_old, C, n, m, eps,
    H: tl.constexpr, NQKV: tl.constexpr, D: tl.constexpr, FMAP_AFTER_ROPE: tl.constexpr,
):
    """The mLSTM step: updates (C, n, m) in place and returns the head's mLSTM output (D,)."""
    if FMAP_AFTER_ROPE:
        phi_q, phi_k = _feature_map(q_rot, wq, bq), _feature_map(k_rot, wk, bk)
    else:
        phi_q, phi_k = _feature_map(q, wq, bq), _feature_map(k, wk, bk)
    i_pre = tl.load(proj + b * stride_proj + NQKV + h).to(tl.float32)
    f_pre = tl.load(proj + b * stride_proj + NQKV + H + h).to(tl.float32)
    log_f = tl.minimum(f_pre, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(f_pre)))  # log σ(f̃), as torch does it
    m_new = tl.maximum(log_f + m_old, i_pre)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no mass yet: any finite value gives 0
    f_act = tl.exp(log_f + m_old - m_safe)
    i_act = tl.exp(i_pre - m_safe)
    state = f_act * state + i_act * (phi_k[:, None] * v[None, :])
    norm = f_act * norm + i_act * phi_k
    tl.store(C + bh * D * D + d[:, None] * D + d[None, :], state)
    tl.store(n + bh * D + d, norm)
    tl.store(m + bh, m_new)
    den = tl.maximum(tl.abs(tl.sum(phi_q * norm, 0)), tl.exp(-m_safe)) + eps
    return tl.sum(phi_q[:, None] * state, 0) / den


@triton.jit
def _window_inputs(ring_k, ring_v, ring_pos, sink_k, sink_v, sink_pos, b, kv, lo, hi, own, d,
                   W: tl.constexpr, D: tl.constexpr, S: tl.constexpr, S_PAD: tl.constexpr, BLOCK_W: tl.constexpr,
                   ONE_BLOCK: tl.constexpr):
    """What the window attention reads besides the token: the sinks (where ``own``; else masked off) and,
    when its slots lo .. hi fit ONE_BLOCK, the ring block (slots from hi masked off)."""
    js = tl.arange(0, S_PAD)
    sink_in = (js < S) & own
    sp = tl.load(sink_pos + b * S + js, mask=sink_in, other=-1)
    sink_off = (kv * S + js[:, None]) * D + d[None, :]
    ks = tl.load(sink_k + sink_off, mask=sink_in[:, None], other=0.0).to(tl.float32)
    vs = tl.load(sink_v + sink_off, mask=sink_in[:, None], other=0.0).to(tl.float32)
    if ONE_BLOCK:
        rp, kw, vw = _ring_block(ring_k, ring_v, ring_pos, kv, lo, hi, d, W, D, BLOCK_W)
    else:  # the window loop loads its blocks itself
        rp, kw, vw = sp, ks, vs
    return sp, ks, vs, rp, kw, vw


@triton.jit
def _window(
    q_rot, k_rot, v, pos, first, own, kv, lo, hi, d, ring_k, ring_v, ring_pos, sp, ks, vs, rp0, kw0, vw0, scale,
    W: tl.constexpr, D: tl.constexpr, S: tl.constexpr, BLOCK_W: tl.constexpr, ONE_BLOCK: tl.constexpr,
):
    """Online-softmax state (max, sum, weighted values) of q_rot over ring slots lo .. hi (the block
    rp0/kw0/vw0 when ONE_BLOCK) and, where ``own``, the token itself and the sinks outside the window."""
    qs = q_rot * scale
    # the token itself opens the softmax (own); other shares open at a finite floor, so that a share whose
    # slots are all masked keeps exp(m_i − m_new) = 1 and contributes exp(floor − max) = 0 when combined
    m_i = tl.where(own, tl.sum(qs * k_rot, 0), -1.0e30)
    l_i = tl.where(own, 1.0, 0.0)
    acc = tl.where(own, v, 0.0)
    if S > 0:
        sink_ok = (sp >= 0) & (pos - sp >= W)  # a sink inside the window is counted there, once
        m_i, l_i, acc = _attend(tl.where(sink_ok, tl.sum(qs[None, :] * ks, 1), float("-inf")), vs, m_i, l_i, acc)
    if ONE_BLOCK:
        m_i, l_i, acc = _attend_ring(qs, rp0, kw0, vw0, pos, first, m_i, l_i, acc, W)
    else:
        for w0 in range(lo, hi, BLOCK_W):
            rp, kw, vw = _ring_block(ring_k, ring_v, ring_pos, kv, w0, hi, d, W, D, BLOCK_W)
            m_i, l_i, acc = _attend_ring(qs, rp, kw, vw, pos, first, m_i, l_i, acc, W)
    return m_i, l_i, acc


@triton.jit
def _write_ring(ring_k, ring_v, ring_pos, k_rot, v, pos, kv, b, h, d, W: tl.constexpr, D: tl.constexpr):
    ring_slot = (kv * W + pos % W) * D + d
    tl.store(ring_k + ring_slot, k_rot.to(ring_k.dtype.element_ty))
    tl.store(ring_v + ring_slot, v.to(ring_v.dtype.element_ty))
    if (b == 0) & (h == 0):
        tl.store(ring_pos + pos % W, pos)


@triton.jit
def _finish(proj, stride_proj, b, bh, h, d, h_mlstm, h_swa, out,
            H: tl.constexpr, NQKV: tl.constexpr, D: tl.constexpr, MLSTM: tl.constexpr, SWA: tl.constexpr):
    """h = σ(õ) · mLSTM + (1 − σ(õ)) · SWA (or the one branch), stored in out's dtype."""
    if MLSTM and SWA:
        o = tl.sigmoid(tl.load(proj + b * stride_proj + NQKV + 2 * H + h).to(tl.float32))
        result = o * h_mlstm + (1.0 - o) * h_swa
    elif MLSTM:
        result = h_mlstm
    else:
        result = h_swa
    tl.store(out + bh * D + d, result.to(out.dtype.element_ty))


@triton.jit
def _decode_step(
    proj, q_in, k_in, stride_proj, stride_q, stride_k,
    inv_freq, rope_scale, slot, start,
    C, n, m, fq_w, fq_b, fk_w, fk_b,
    ring_k, ring_v, ring_pos, sink_k, sink_v, sink_pos,
    out, part_acc, part_ml, part_h, arrivals, scale, eps,
    H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, W: tl.constexpr, S: tl.constexpr,
    S_PAD: tl.constexpr, BLOCK_W: tl.constexpr, SPLIT: tl.constexpr,
    MLSTM: tl.constexpr, SWA: tl.constexpr, FMAP_AFTER_ROPE: tl.constexpr, PDL: tl.constexpr,
    ROPE_DTYPE: tl.constexpr,
):
    b, h, part = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    hkv = h // (H // HKV)
    kv = b * HKV + hkv
    bh = b * H + h
    d = tl.arange(0, D)
    NQKV: tl.constexpr = (H + 2 * HKV) * D
    # SPLIT = 0: one program per (row, head) does it all. SPLIT = P > 0: window program p < P of (row, head)
    # takes ring slots p·SPAN .. (p+1)·SPAN (program 0 also the token itself and the sinks), for the hybrid
    # program P the mLSTM step; each leaves its part in part_*, and the last one in combines them.
    SPAN: tl.constexpr = W if SPLIT == 0 else (W + SPLIT - 1) // SPLIT
    ONE_BLOCK: tl.constexpr = SPAN <= BLOCK_W
    lo = 0 if SPLIT == 0 else part * SPAN
    hi = W if SPLIT == 0 else tl.minimum(lo + SPAN, W)  # unsplit: the constant W, no runtime ring mask
    own = part == 0
    leader = h % (H // HKV) == 0  # one program per (row, kv head) writes the ring

    # Everything but the token's projections first: no kernel of this step writes the position, the weights,
    # or this layer's state, ring and sinks (last written a step ago). Under PDL these loads, and the RoPE row,
    # overlap the product before, and only the projections wait for it.
    pos = tl.load(slot)
    first = tl.load(start + b)
    # the RoPE row as the rotary module makes it: fp32 angles, cos/sin, scaled, rounded to the hidden dtype
    angle = tl.maximum(pos - first, 0).to(tl.float32) * tl.load(inv_freq + d % (D // 2)).to(tl.float32)
    c = (tl.cos(angle) * rope_scale).to(ROPE_DTYPE).to(tl.float32)  # libdevice's cosf/sinf in fp32 on CUDA,
    s = (tl.sin(angle) * rope_scale).to(ROPE_DTYPE).to(tl.float32)  # not the approximations
    if SPLIT == 0:
        if MLSTM:
            wq, wk, bq, bk, state, norm, m_old = _mlstm_inputs(C, n, m, fq_w, fq_b, fk_w, fk_b, h, hkv, bh, d, D)
        if SWA:
            sp, ks, vs, rp0, kw0, vw0 = _window_inputs(ring_k, ring_v, ring_pos, sink_k, sink_v, sink_pos, b, kv,
                                                       lo, hi, True, d, W, D, S, S_PAD, BLOCK_W, ONE_BLOCK)
        _wait_for_product(PDL)
        q_rot, q, k_rot, k, v = _token(proj, q_in, k_in, b, h, hkv, stride_proj, stride_q, stride_k, d, c, s,
                                       H, HKV, D)
        h_mlstm = v  # placeholders for the branch the mixer leaves out
        h_swa = v
        if MLSTM:
            h_mlstm = _mlstm(proj, stride_proj, b, h, bh, d, q, k, q_rot, k_rot, v, wq, wk, bq, bk, state, norm,
                             m_old, C, n, m, eps, H, NQKV, D, FMAP_AFTER_ROPE)
        if SWA:
            m_i, l_i, acc = _window(q_rot, k_rot, v, pos, first, True, kv, lo, hi, d, ring_k, ring_v, ring_pos,
                                    sp, ks, vs, rp0, kw0, vw0, scale, W, D, S, BLOCK_W, ONE_BLOCK)
            h_swa = acc / l_i
            if h % (H // HKV) == 0:  # spelled out, not `leader`: the unsplit kernel then compiles as before the split
                _write_ring(ring_k, ring_v, ring_pos, k_rot, v, pos, kv, b, h, d, W, D)
        _finish(proj, stride_proj, b, bh, h, d, h_mlstm, h_swa, out, H, NQKV, D, MLSTM, SWA)
    else:
        if part == SPLIT:  # the mLSTM program (launched for the hybrid only)
            if MLSTM:
                wq, wk, bq, bk, state, norm, m_old = _mlstm_inputs(C, n, m, fq_w, fq_b, fk_w, fk_b, h, hkv, bh, d, D)
                _wait_for_product(PDL)
                q_rot, q, k_rot, k, v = _token(proj, q_in, k_in, b, h, hkv, stride_proj, stride_q, stride_k, d,
                                               c, s, H, HKV, D)
                h_mlstm = _mlstm(proj, stride_proj, b, h, bh, d, q, k, q_rot, k_rot, v, wq, wk, bq, bk, state,
                                 norm, m_old, C, n, m, eps, H, NQKV, D, FMAP_AFTER_ROPE)
                tl.store(part_h + bh * D + d, h_mlstm)
        else:
            sp, ks, vs, rp0, kw0, vw0 = _window_inputs(ring_k, ring_v, ring_pos, sink_k, sink_v, sink_pos, b, kv,
                                                       lo, hi, own, d, W, D, S, S_PAD, BLOCK_W, ONE_BLOCK)
            _wait_for_product(PDL)
            q_rot, q, k_rot, k, v = _token(proj, q_in, k_in, b, h, hkv, stride_proj, stride_q, stride_k, d, c, s,
                                           H, HKV, D)
            m_i, l_i, acc = _window(q_rot, k_rot, v, pos, first, own, kv, lo, hi, d, ring_k, ring_v, ring_pos,
                                    sp, ks, vs, rp0, kw0, vw0, scale, W, D, S, BLOCK_W, ONE_BLOCK)
            tl.store(part_acc + (bh * SPLIT + part) * D + d, acc)
            tl.store(part_ml + (bh * SPLIT + part) * 2, m_i)
            tl.store(part_ml + (bh * SPLIT + part) * 2 + 1, l_i)
            if own & leader:
                _write_ring(ring_k, ring_v, ring_pos, k_rot, v, pos, kv, b, h, d, W, D)
        # Every thread's part is stored before the program counts itself in (CTA barrier, then a release at
        # GPU scope); the last one in (acquire) reads the parts from L2, combines them and resets the count.
        tl.debug_barrier()
        parts: tl.constexpr = SPLIT + (1 if MLSTM else 0)
        if tl.atomic_add(arrivals + bh, 1, sem="acq_rel", scope="gpu") == parts - 1:
            h_mlstm = tl.zeros([D], tl.float32)
            h_swa = tl.zeros([D], tl.float32)
            if MLSTM:
                h_mlstm = tl.load(part_h + bh * D + d, cache_modifier=".cg")
            if SWA:
                js = tl.arange(0, SPLIT)
                m_p = tl.load(part_ml + (bh * SPLIT + js) * 2, cache_modifier=".cg")
                l_p = tl.load(part_ml + (bh * SPLIT + js) * 2 + 1, cache_modifier=".cg")
                acc_p = tl.load(part_acc + (bh * SPLIT + js[:, None]) * D + d[None, :], cache_modifier=".cg")
                w_p = tl.exp(m_p - tl.max(m_p, 0))
                h_swa = tl.sum(w_p[:, None] * acc_p, 0) / tl.sum(w_p * l_p, 0)
            _finish(proj, stride_proj, b, bh, h, d, h_mlstm, h_swa, out, H, NQKV, D, MLSTM, SWA)
            tl.store(arrivals + bh, 0)


WIDE_PROGRAMS_MAX = 132  # an H200's SMs: up to about one program per SM, each takes the whole window

# (most B·H pairs, window programs per head) from few to many pairs; past the last, one program per pair.
# The step is a chain of dependent loads and reductions, shorter over fewer ring slots: split, the window
# programs run beside the mLSTM one. H200, SmolLM2's heads, W = 512 (benchmarks/decode_step_launch.py):
# B = 1, 2: 4 programs 1.41× one; B = 4: 2 programs 1.34×; B = 8: 2 programs 1.16×.
WINDOW_SPLITS = ((18, 4), (72, 2))


def default_split(heads: int, W: int, mixer: str) -> int:
    """Window programs per (row, head) for ``heads`` = B·H pairs (WINDOW_SPLITS): 0 (one program does the
    whole step) for many pairs, for the mLSTM alone, or for windows shorter than 16 slots a program."""
    split = next((p for most, p in WINDOW_SPLITS if heads <= most), 0)
    return 0 if mixer == "mlstm" or W < 16 * split else split


def default_launch(D: int, W: int, programs: int, split: int = 0) -> tuple[int, int]:
    """(block_w, num_warps) for ``programs`` = B·H pairs: ring slots per step of the window loop
    and warps per program. Measured at D = 64, W = 512 on the H200 (benchmarks/decode_step_launch.py):
    the step is latency-bound, so few programs (9, 72) go fastest with the whole window in one block
    over 8 warps (2.0× the 64-slot, 4-warp launch), many (288) with 256-slot blocks over 2 warps
    (1.7×). Split over ``split`` window programs, each takes its share in one block over 4 warps.
    Wider heads keep the launch used before that sweep (not measured)."""
    if split:
        return triton.next_power_of_2(triton.cdiv(W, split)), 4
    ring = triton.next_power_of_2(W)
    if D > 64:
        return min(64, ring), 8
    if programs <= WIDE_PROGRAMS_MAX:
        return min(512, ring), 8
    return min(256, ring), 2


def fused_decode_step(
    proj, q, k, rope, slot, start, state, fmap_q, fmap_k, ring, sinks, *,
    mixer: str, fmap_after_rope: bool, eps: float, launch: tuple[int, int] | None = None,
    split: int | None = None, arrivals: torch.Tensor | None = None, pdl: bool = False,
) -> torch.Tensor:
    """Attention output h (B, H, D) of one decode token per row, in ``proj``'s dtype; updates in place
    the mLSTM state (hybrid, mlstm) and the ring buffer (hybrid, swa).

    proj: (B, N) raw [q; k; v; ĩ; f̃; õ] projections, N = (H + 2 Hkv) D + 3H (v, the gates and the output
    gate's pre-activation õ are read here); q: (B, H·D), k: (B, Hkv·D) before RoPE (after QK-norm), may be
    strided views of proj; rope: (inv_freq (D/2,), scaling, dtype) of the rotary embedding, whose row for
    position p is cos/sin(p · inv_freq) · scaling in fp32 rounded to dtype, p = max(slot − start, 0) (as
    transformers' static RoPE: ``LlamaRotaryEmbedding`` and the like); slot: (1,) the token's absolute
    position; start: (B,) each row's first real slot; state: C (B, H, D, D), n (B, H, D), m (B, H), fp32,
    contiguous; fmap_q: weight (H, D, D), bias (H, D); fmap_k: (Hkv, D, D), (Hkv, D); ring: k, v
    (B, Hkv, W, D), positions (W,) int64, -1 = empty; sinks: k, v (B, Hkv, S, D), positions (B, S) int64,
    -1 = not seen. D a power of two >= 16.
    launch: (block_w, num_warps), powers of two; ``default_launch`` when None.
    split: window programs per (row, head), a power of two, or 0 for one program per (row, head) doing the
    whole step (the mLSTM alone always is); ``default_split`` when None. Split, the parts meet through
    arrivals, a (B·H,) int32 counter that must be zero and is left zero (allocated here when None; a CUDA
    graph passes one allocated before capture, and one counter serves steps and layers launched in order).
    pdl: launch as a programmatic dependent launch (Hopper; kernels/decode_rowwise.pdl_capable), between
    products that are such launches too.
    """
    if mixer not in MIXERS:
        raise ValueError(f"mixer must be one of {MIXERS}, got {mixer!r}")
    ring_k, ring_v, ring_pos = ring
    sink_k, sink_v, sink_pos = sinks
    C, n, m = state
    B = proj.shape[0]
    H, D = fmap_q[0].shape[0], fmap_q[0].shape[-1]
    Hkv, W, S = fmap_k[0].shape[0], ring_pos.shape[0], sink_pos.shape[1]
    if D < 16 or D & (D - 1):
        raise ValueError(f"head_dim={D}: the fused decode step needs a power of two >= 16")
    split = (default_split(B * H, W, mixer) if split is None else split) if mixer != "mlstm" else 0
    if split < 0 or split & (split - 1):
        raise ValueError(f"split={split}: window programs per head must be 0 or a power of two")
    if split and arrivals is not None and (
        arrivals.shape != (B * H,) or arrivals.dtype != torch.int32 or arrivals.device != proj.device
    ):
        raise ValueError(f"fused decode step: arrivals must be ({B * H},) int32 on {proj.device}, "
                         f"got {tuple(arrivals.shape)} {arrivals.dtype} on {arrivals.device}")
    block_w, num_warps = launch or default_launch(D, W, B * H, split)
    if block_w < 1 or block_w & (block_w - 1) or num_warps < 1 or num_warps & (num_warps - 1):
        raise ValueError(f"launch={launch}: block_w and num_warps must be powers of two")
    if proj.shape[1] != (H + 2 * Hkv) * D + 3 * H or q.shape != (B, H * D) or k.shape != (B, Hkv * D):
        raise ValueError(
            f"fused decode step: proj {tuple(proj.shape)}, q {tuple(q.shape)}, k {tuple(k.shape)} do not fit "
            f"H={H}, Hkv={Hkv}, D={D}; expected proj (B, {(H + 2 * Hkv) * D + 3 * H})"
        )
    for name, t in (("proj", proj), ("q", q), ("k", k)):
        if t.stride(-1) != 1:
            raise ValueError(f"fused decode step: {name} must have unit stride in its last dim")
    inv_freq, rope_scale, rope_dtype = rope
    if inv_freq.shape != (D // 2,) or rope_dtype not in _TL_DTYPES:
        raise ValueError(f"fused decode step: RoPE inv_freq {tuple(inv_freq.shape)} ({D // 2},) expected, "
                         f"dtype {rope_dtype} of {tuple(_TL_DTYPES)}")
    buffers = (C, n, m, ring_k, ring_v, ring_pos, sink_k, sink_v, sink_pos, inv_freq, *fmap_q, *fmap_k)
    if not all(t.is_contiguous() for t in buffers):
        raise ValueError("fused decode step: state, ring, sink, inv_freq and weight tensors must be contiguous")
    if C.dtype != torch.float32:
        raise ValueError(f"fused decode step: the mLSTM state must be fp32, got {C.dtype}")
    if not proj.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("fused_decode_step needs CUDA tensors; use modeling/decode_graph.decode_step's reference path")
    out = proj.new_empty(B, H, D)
    parts = split + (mixer == "hybrid") if split else 1
    if split:  # one buffer for the parts: window accumulators (B·H·split, D), their (max, sum), mLSTM outputs
        scratch = torch.empty(B * H * (split * (D + 2) + D), device=proj.device, dtype=torch.float32)
        part_acc = scratch[: B * H * split * D]
        part_ml = scratch[B * H * split * D : B * H * split * (D + 2)]
        part_h = scratch[B * H * split * (D + 2) :]
        if arrivals is None:
            arrivals = torch.zeros(B * H, device=proj.device, dtype=torch.int32)
    else:
        part_acc = part_ml = part_h = arrivals = out  # not read
    _decode_step[(B, H, parts)](
        proj, q, k, proj.stride(0), q.stride(0), k.stride(0),
        inv_freq, float(rope_scale), slot, start,
        C, n, m, *fmap_q, *fmap_k,
        ring_k, ring_v, ring_pos, sink_k, sink_v, sink_pos,
        out, part_acc, part_ml, part_h, arrivals, 1.0 / math.sqrt(D), eps,
        H=H, HKV=Hkv, D=D, W=W, S=S, S_PAD=triton.next_power_of_2(max(S, 1)), BLOCK_W=block_w, SPLIT=split,
        MLSTM=mixer != "swa", SWA=mixer != "mlstm", FMAP_AFTER_ROPE=fmap_after_rope, PDL=pdl,
        ROPE_DTYPE=_TL_DTYPES[rope_dtype], num_warps=num_warps, launch_pdl=pdl,
    )
    return out
