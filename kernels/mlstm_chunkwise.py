"""Chunkwise mLSTM in Triton: forward and backward, with initial and final state.

Same semantics as the pure-PyTorch oracle (per head, scalar gates, feature-mapped q/k)::

    m_t = max(log σ(f̃_t) + m_{t-1}, ĩ_t)
    C_t = exp(log σ(f̃_t) + m_{t-1} - m_t) C_{t-1} + exp(ĩ_t - m_t) k_t v_tᵀ   (n_t likewise with k_t)
    h_t = qᵀ_t C_t / (max(|qᵀ_t n_t|, exp(-m_t)) + eps)

Four kernels, FLA-style: a sequential pass over chunks materialises the state at every chunk
start, then one program per chunk computes its outputs; backward mirrors this (a reverse pass
for the state gradients, then one program per chunk for dq, dk, dv and the gate gradients).

Gradients are exact, including the path through the stabiliser: all stabilisers cancel from
h except in ``eps · exp(m_t)``, so the kernels hold m fixed and the small remaining term
∂L/∂m_t = -eps (dh_t·h_t) / den_t is routed to the position that attains the running max
``m_t = F_t + max(m_0, max_{s≤t} ĩ_s - F_s)`` (F = cumulative log σ(f̃)), as autograd does
through the oracle's max(). The returned final state carries no gradient.

fp32 and bf16/fp16 inputs; all accumulation in fp32. fp32 matmuls run in IEEE precision.
States between chunks are stored in the input dtype (like FLA), the final state in fp32.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

MLSTMState = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@triton.jit
def _safe(m):
    # a stabiliser of -inf means "no mass yet"; any finite value gives the same zero output
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def _fwd_states(
    k, v, w, g, C0, n0, Cs, ns, C_last, n_last,
    S, S_pad, NC,
    HAS_INIT: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, L: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
):
    """State (C, n) at every chunk start: C <- g_c C + (w k)ᵀ v. Grid (DK/BK, DV/BV, B*NH).

    The stabilisers are precomputed (see ``_chunk_stabilisers``), so nothing on the sequential
    path waits for a reduction.
    """
    i_k, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    o_t = tl.arange(0, L)
    if HAS_INIT:
        C = tl.load(C0 + i_bh * DK * DV + o_k[:, None] * DV + o_v[None, :]).to(tl.float32)
        n = tl.load(n0 + i_bh * DK + o_k).to(tl.float32)
    else:
        C = tl.zeros([BK, BV], dtype=tl.float32)
        n = tl.zeros([BK], dtype=tl.float32)
    for c in range(NC):
        st = i_bh * (NC + 1) + c
        tl.store(Cs + (st * DK + o_k[:, None]) * DV + o_v[None, :], C.to(Cs.dtype.element_ty))
        if i_v == 0:
            tl.store(ns + st * DK + o_k, n)
        t = c * L + o_t
        in_seq = t < S
        kc = tl.load(k + (i_bh * S + t[:, None]) * DK + o_k[None, :], mask=in_seq[:, None], other=0.0)
        vc = tl.load(v + (i_bh * S + t[:, None]) * DV + o_v[None, :], mask=in_seq[:, None], other=0.0)
        wc = tl.load(w + i_bh * S_pad + t)
        decay = tl.load(g + i_bh * NC + c)
        kw = kc.to(tl.float32) * wc[:, None]
        C = C * decay + tl.dot(tl.trans(kw.to(vc.dtype)), vc, input_precision=PREC)
        n = n * decay + tl.sum(kw, 0)
    tl.store(C_last + i_bh * DK * DV + o_k[:, None] * DV + o_v[None, :], C)
    if i_v == 0:
        tl.store(n_last + i_bh * DK + o_k, n)
        tl.store(ns + (i_bh * (NC + 1) + NC) * DK + o_k, n)


@triton.jit
def _fwd_out(
    q, k, v, b, ig, Cs, ns, ms, h, m_out, qn_out,
    S, S_pad, NC, eps,
    DK: tl.constexpr, DV: tl.constexpr, L: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
):
    """h for one chunk and one block of DV; also m_t and qᵀn (for backward). Grid (DV/BV, NC, B*NH)."""
    i_v, c, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_t = tl.arange(0, L)
    o_k = tl.arange(0, DK)
    o_v = i_v * BV + tl.arange(0, BV)
    t = c * L + o_t
    in_seq = t < S
    qc = tl.load(q + (i_bh * S + t[:, None]) * DK + o_k[None, :], mask=in_seq[:, None], other=0.0)
    kc = tl.load(k + (i_bh * S + t[:, None]) * DK + o_k[None, :], mask=in_seq[:, None], other=0.0)
    vc = tl.load(v + (i_bh * S + t[:, None]) * DV + o_v[None, :], mask=in_seq[:, None], other=0.0)
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
    if i_v == 0:
        tl.store(m_out + i_bh * S_pad + t, m_t)
        tl.store(qn_out + i_bh * S_pad + t, qn)


@triton.jit
def _bwd_states(
    q, dh, b, ms, m_t, den, dqn, dCs, dns,
    S, S_pad, NC,
    DK: tl.constexpr, DV: tl.constexpr, L: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
):
    """Gradient w.r.t. the state at every chunk start (reverse pass). Grid (DK/BK, DV/BV, B*NH)."""
    i_k, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    o_t = tl.arange(0, L)
    dC = tl.zeros([BK, BV], dtype=tl.float32)
    dn = tl.zeros([BK], dtype=tl.float32)
    for cc in range(NC):
        c = NC - 1 - cc
        st = i_bh * (NC + 1) + c
        tl.store(dCs + ((st + 1) * DK + o_k[:, None]) * DV + o_v[None, :], dC.to(dCs.dtype.element_ty))
        if i_v == 0:
            tl.store(dns + (st + 1) * DK + o_k, dn)
        t = c * L + o_t
        in_seq = t < S
        qc = tl.load(q + (i_bh * S + t[:, None]) * DK + o_k[None, :], mask=in_seq[:, None], other=0.0)
        dhc = tl.load(dh + (i_bh * S + t[:, None]) * DV + o_v[None, :], mask=in_seq[:, None], other=0.0)
        bc = tl.load(b + i_bh * S_pad + t)
        mt = tl.load(m_t + i_bh * S_pad + t)
        denc = tl.load(den + i_bh * S_pad + t)
        dqnc = tl.load(dqn + i_bh * S_pad + t)
        m_c = tl.load(ms + st)
        m_next = _safe(tl.load(ms + st + 1))
        b_last = tl.load(b + i_bh * S_pad + c * L + L - 1)
        a = tl.exp(bc + m_c - mt)
        qa = qc.to(tl.float32) * a[:, None]
        dnum = dhc.to(tl.float32) / denc[:, None]
        g = tl.exp(b_last + m_c - m_next)
        dC = dC * g + tl.dot(tl.trans(qa.to(qc.dtype)), dnum.to(qc.dtype), input_precision=PREC)
        dn = dn * g + tl.sum(qa * dqnc[:, None], 0)
    tl.store(dCs + ((i_bh * (NC + 1)) * DK + o_k[:, None]) * DV + o_v[None, :], dC.to(dCs.dtype.element_ty))
    if i_v == 0:
        tl.store(dns + (i_bh * (NC + 1)) * DK + o_k, dn)


@triton.jit
def _bwd_chunk(
    q, k, v, dh, b, ig, Cs, ns, ms, dCs, dns, m_t, den, dqn,
    dq, dk, dv, di, db,
    S, S_pad, NC,
    DK: tl.constexpr, DV: tl.constexpr, L: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
):
    """dq, dk, dv and the gate gradients (w.r.t. ĩ and the in-chunk cumsum b) of one chunk.

    Grid (NC, B*NH); DV is walked in blocks of BV inside the program.
    """
    c, i_bh = tl.program_id(0), tl.program_id(1)
    o_t = tl.arange(0, L)
    o_k = tl.arange(0, DK)
    t = c * L + o_t
    in_seq = t < S
    qc = tl.load(q + (i_bh * S + t[:, None]) * DK + o_k[None, :], mask=in_seq[:, None], other=0.0)
    kc = tl.load(k + (i_bh * S + t[:, None]) * DK + o_k[None, :], mask=in_seq[:, None], other=0.0)
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
    E = tl.exp(tl.where(causal, bc[:, None] - bc[None, :] + ic[None, :], float("-inf")) - mt[:, None])
    QK = tl.dot(qc, tl.trans(kc), input_precision=PREC)
    A = QK * E
    a = tl.exp(bc + m_c - mt)
    w = tl.exp(b_last - bc + ic - m_next)
    g = tl.exp(b_last + m_c - m_next)

    dA = tl.zeros([L, L], dtype=tl.float32) + dqnc[:, None]
    dq_inter = tl.zeros([L, DK], dtype=tl.float32)
    dk_inter = tl.zeros([L, DK], dtype=tl.float32)
    state_dot = tl.sum(nc * dn1, 0)
    for i_v in range(0, DV // BV):
        o_v = i_v * BV + tl.arange(0, BV)
        vc = tl.load(v + (i_bh * S + t[:, None]) * DV + o_v[None, :], mask=in_seq[:, None], other=0.0)
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
    dbc = tl.sum(qc.to(tl.float32) * dq_acc, 1) - k_dk + tl.where(o_t == L - 1, d_last, 0.0)
    tl.store(di + i_bh * S_pad + t, k_dk)
    tl.store(db + i_bh * S_pad + t, dbc)


def _state_blocks(batch_heads: int, dk: int, dv: int) -> tuple[int, int]:
    # the state pass is sequential over chunks: split DK/DV finer when B*NH alone cannot fill the GPU
    bk, bv = min(64, dk), min(64, dv)
    if batch_heads * (dk // bk) * (dv // bv) < 256:
        bk, bv = min(32, dk), min(32, dv)
    return bk, bv


def _check(q, k, v, i_pre, f_pre, chunk_size):
    B, NH, S, DK = q.shape
    DV = v.shape[-1]
    if k.shape != q.shape or v.shape[:3] != (B, NH, S) or i_pre.shape != (B, NH, S) or f_pre.shape != (B, NH, S):
        raise ValueError(
            f"mlstm shapes disagree: q {tuple(q.shape)} k {tuple(k.shape)} v {tuple(v.shape)} "
            f"i_pre {tuple(i_pre.shape)} f_pre {tuple(f_pre.shape)}; expected q,k (B,NH,S,DK), v (B,NH,S,DV), gates (B,NH,S)"
        )
    for name, d in (("DK", DK), ("DV", DV), ("chunk_size", chunk_size)):
        if d < 16 or d & (d - 1):
            raise ValueError(f"{name}={d}: the Triton mLSTM needs a power of two >= 16")
    if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("mlstm_chunkwise_triton needs CUDA tensors; use xmerge.modeling.mlstm on CPU")


def _gates(i_pre, f_pre, L):
    """ĩ and the in-chunk cumsum b of log σ(f̃), fp32, padded to whole chunks: (B*NH, S_pad)."""
    B, NH, S = i_pre.shape
    pad = -S % L
    ig = F.pad(i_pre.float().reshape(B * NH, S), (0, pad), value=float("-inf"))
    log_f = F.pad(F.logsigmoid(f_pre.float()).reshape(B * NH, S), (0, pad), value=0.0)
    b = log_f.view(B * NH, -1, L).cumsum(-1).view(B * NH, -1)
    return ig.contiguous(), b.contiguous()


def _chunk_stabilisers(ig, b, m0, L):
    """Stabiliser m at every chunk start (BH, NC+1), exact via a max-plus scan over chunks.

    m_{c+1} = max(b_last,c + m_c, M_c) with M_c = max_s(b_last,c - b_s + ĩ_s) unrolls to
    m_c = P_c + max(m_0, max_{j<c} M_j - P_{j+1}) with P the prefix sum of b_last (in fp64,
    since P grows with the sequence). Also returns each key's weight into the next chunk-start
    state, w (BH, S_pad), and the carried state's decay per chunk, g (BH, NC).
    """
    BH = b.shape[0]
    b_last = b[:, L - 1 :: L]  # (BH, NC)
    log_w = (b_last.unsqueeze(-1) - b.view(BH, -1, L) + ig.view(BH, -1, L))  # (BH, NC, L)
    M = log_w.amax(-1).double()
    P = F.pad(b_last.double().cumsum(-1), (1, 0))  # (BH, NC+1)
    cand = torch.cat([m0.double().reshape(BH, 1), M - P[:, 1:]], dim=-1)
    ms = (P + torch.cummax(cand, dim=-1).values).float()
    m_next = torch.where(torch.isinf(ms[:, 1:]), 0.0, ms[:, 1:])
    w = torch.exp(log_w - m_next.unsqueeze(-1)).view(BH, -1)
    g = torch.exp(b_last + ms[:, :-1] - m_next)
    return ms.contiguous(), w.contiguous(), g.contiguous()


class _MLSTMChunkwise(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, i_pre, f_pre, C0, n0, m0, L, eps):
        B, NH, S, DK = q.shape
        DV = v.shape[-1]
        BH, NC = B * NH, triton.cdiv(S, L)
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        ig, b = _gates(i_pre, f_pre, L)
        S_pad = NC * L
        dev, f32 = q.device, torch.float32
        prec = "ieee" if q.dtype == torch.float32 else "tf32"
        has_init = C0 is not None
        if has_init:
            C0c, n0c, m0c = C0.float().contiguous(), n0.float().contiguous(), m0.float()
        else:
            C0c = n0c = ig  # unused
            m0c = torch.full((BH,), float("-inf"), device=dev)
        ms, w, g = _chunk_stabilisers(ig, b, m0c, L)
        Cs = torch.empty(BH, NC + 1, DK, DV, device=dev, dtype=q.dtype)
        ns = torch.empty(BH, NC + 1, DK, device=dev, dtype=f32)
        C_last = torch.empty(B, NH, DK, DV, device=dev, dtype=f32)
        n_last = torch.empty(B, NH, DK, device=dev, dtype=f32)
        m_last = ms[:, NC].reshape(B, NH).clone()
        BK, BVs = _state_blocks(BH, DK, DV)
        _fwd_states[(DK // BK, DV // BVs, BH)](
            k, v, w, g, C0c, n0c, Cs, ns, C_last, n_last, S, S_pad, NC,
            HAS_INIT=has_init, DK=DK, DV=DV, L=L, BK=BK, BV=BVs, PREC=prec,
        )
        h = torch.empty_like(v)
        m_t = torch.empty(BH, S_pad, device=dev, dtype=f32)
        qn = torch.empty(BH, S_pad, device=dev, dtype=f32)
        BV = min(64, DV)
        _fwd_out[(DV // BV, NC, BH)](
            q, k, v, b, ig, Cs, ns, ms, h, m_t, qn, S, S_pad, NC, eps,
            DK=DK, DV=DV, L=L, BV=BV, PREC=prec, num_warps=4 if DK <= 64 else 8,
        )
        ctx.save_for_backward(q, k, v, i_pre, f_pre, ig, b, Cs, ns, ms, m_t, qn, h, C0, n0, m0)
        ctx.L, ctx.eps, ctx.prec, ctx.has_init = L, eps, prec, has_init
        ctx.mark_non_differentiable(C_last, n_last, m_last)
        return h, C_last, n_last, m_last

    @staticmethod
    def backward(ctx, dh, _dC, _dn, _dm):
        q, k, v, i_pre, f_pre, ig, b, Cs, ns, ms, m_t, qn, h, C0, n0, m0 = ctx.saved_tensors
        L, eps, prec = ctx.L, ctx.eps, ctx.prec
        B, NH, S, DK = q.shape
        DV = v.shape[-1]
        BH, NC = B * NH, triton.cdiv(S, L)
        S_pad = NC * L
        dh = dh.contiguous()
        # ∂L/∂qn and ∂L/∂m_t (the eps·exp(m) path) from h·dh, per position: (BH, S_pad)
        hdh = F.pad((h.float() * dh.float()).sum(-1).reshape(BH, S), (0, S_pad - S))
        floor = torch.exp(-m_t)
        den = torch.maximum(qn.abs(), floor) + eps
        dqn = torch.where(qn.abs() > floor, -torch.sign(qn) * hdh / den, 0.0)
        dm_t = -eps * hdh / den

        dCs = torch.empty_like(Cs)
        dns = torch.empty_like(ns)
        BK, BVs = _state_blocks(BH, DK, DV)
        _bwd_states[(DK // BK, DV // BVs, BH)](
            q, dh, b, ms, m_t, den, dqn, dCs, dns, S, S_pad, NC,
            DK=DK, DV=DV, L=L, BK=BK, BV=BVs, PREC=prec,
        )
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        di = torch.empty(BH, S_pad, device=q.device, dtype=torch.float32)
        db = torch.empty_like(di)
        _bwd_chunk[(NC, BH)](
            q, k, v, dh, b, ig, Cs, ns, ms, dCs, dns, m_t, den, dqn, dq, dk, dv, di, db,
            S, S_pad, NC, DK=DK, DV=DV, L=L, BV=min(64, DV), PREC=prec, num_warps=4 if DK <= 64 else 8,
            num_stages=2 if DK <= 64 and q.dtype != torch.float32 else 1,  # shared memory: 228 KB per SM
        )
        d_log_f = db.view(BH, NC, L).flip(-1).cumsum(-1).flip(-1).reshape(BH, S_pad)[:, :S]
        di = di[:, :S]

        # route ∂L/∂m_t to the argmax of m_t = F_t + max(m_0, max_{s<=t} ĩ_s - F_s)
        log_f = F.logsigmoid(f_pre.float()).reshape(BH, S)
        F_cum = log_f.cumsum(-1)
        m0_col = m0.float().reshape(BH, 1) if ctx.has_init else torch.full((BH, 1), float("-inf"), device=q.device)
        cand = torch.cat([m0_col, i_pre.float().reshape(BH, S) - F_cum], dim=-1)
        arg = torch.cummax(cand, dim=-1).indices[:, 1:]
        dm = dm_t[:, :S]
        d_cand = torch.zeros_like(cand).scatter_add_(-1, arg, dm)
        di = di + d_cand[:, 1:]
        d_log_f = d_log_f + (dm - d_cand[:, 1:]).flip(-1).cumsum(-1).flip(-1)
        d_f = (d_log_f * torch.sigmoid(-f_pre.float().reshape(BH, S))).reshape(B, NH, S)
        d_i = di.reshape(B, NH, S)

        dC0 = dn0 = dm0 = None
        if ctx.has_init:
            dC0 = dCs[:, 0].float().reshape(B, NH, DK, DV)
            dn0 = dns[:, 0].reshape(B, NH, DK)
            # (C0, n0) are stabilised by m0: raising m0 scales the true state
            dm0 = (C0.float() * dC0).sum((-2, -1)) + (n0.float() * dn0).sum(-1) + d_cand[:, 0].reshape(B, NH)
            dC0, dn0, dm0 = dC0.to(C0.dtype), dn0.to(n0.dtype), dm0.to(m0.dtype)
        return dq, dk, dv, d_i.to(i_pre.dtype), d_f.to(f_pre.dtype), dC0, dn0, dm0, None, None


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
    """Chunkwise mLSTM on CUDA: h (B, NH, S, DV) and the final state (C, n, m), fp32.

    q, k: (B, NH, S, DK); v: (B, NH, S, DV); i_pre, f_pre: (B, NH, S);
    state: (C (B, NH, DK, DV), n (B, NH, DK), m (B, NH)) or None for the empty state.
    DK, DV and chunk_size must be powers of two >= 16. ĩ = -inf marks padded positions.
    """
    _check(q, k, v, i_pre, f_pre, chunk_size)
    C0, n0, m0 = state if state is not None else (None, None, None)
    h, C, n, m = _MLSTMChunkwise.apply(q, k, v, i_pre, f_pre, C0, n0, m0, chunk_size, eps)
    return h, (C, n, m)
