"""The mLSTM cell in three mathematically equal pure-PyTorch forms.

All forms take feature-mapped queries/keys (``φ(q)``, ``φ(k)``, already non-negative),
values and the *pre-activation* gates, and compute, with ``m_0 = -inf`` and empty state::

    m_t = max(log σ(f̃_t) + m_{t-1}, ĩ_t)
    C_t = exp(log σ(f̃_t) + m_{t-1} - m_t) C_{t-1} + exp(ĩ_t - m_t) k_t v_tᵀ
    n_t = exp(log σ(f̃_t) + m_{t-1} - m_t) n_{t-1} + exp(ĩ_t - m_t) k_t
    h_t = qᵀ_t C_t / (max(|qᵀ_t n_t|, exp(-m_t)) + eps)

``parallel`` is the quadratic reference, ``chunkwise`` is for training and prefill and
passes state, ``recurrent_step`` is for decode. ``ĩ = -inf`` marks a position that must
not enter the state (left padding); such rows produce 0 and no NaN, in value or gradient.

Shapes: q, k (B, NH, S, DK); v (B, NH, S, DV); i_pre, f_pre (B, NH, S);
state = (C (B, NH, DK, DV), n (B, NH, DK), m (B, NH)).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MLSTMState = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _finite(m: torch.Tensor) -> torch.Tensor:
    # A stabiliser of -inf means "no mass yet"; any finite value gives the same (zero) output
    # and avoids -inf - -inf = NaN.
    return torch.where(torch.isinf(m), torch.zeros_like(m), m)


def _normalise(num: torch.Tensor, qn: torch.Tensor, m: torch.Tensor, eps: float) -> torch.Tensor:
    den = torch.maximum(qn.abs(), torch.exp(-m)) + eps
    return num / den.unsqueeze(-1)


def empty_state(batch: int, heads: int, dk: int, dv: int, *, device=None, dtype=torch.float32) -> MLSTMState:
    return (
        torch.zeros(batch, heads, dk, dv, device=device, dtype=dtype),
        torch.zeros(batch, heads, dk, device=device, dtype=dtype),
        torch.full((batch, heads), float("-inf"), device=device, dtype=dtype),
    )


def mlstm_parallel(q, k, v, i_pre, f_pre, eps: float = 1e-6) -> torch.Tensor:
    """Quadratic reference: h (B, NH, S, DV)."""
    seq = q.shape[-2]
    cum = torch.cumsum(F.logsigmoid(f_pre), dim=-1)
    # log weight of key s for query t: sum_{s<r<=t} log σ(f̃_r) + ĩ_s
    log_d = cum.unsqueeze(-1) - cum.unsqueeze(-2) + i_pre.unsqueeze(-2)
    causal = torch.ones(seq, seq, dtype=torch.bool, device=q.device).tril()
    log_d = log_d.masked_fill(~causal, float("-inf"))
    m = _finite(log_d.amax(dim=-1))
    scores = (q @ k.transpose(-1, -2)) * torch.exp(log_d - m.unsqueeze(-1))
    return _normalise(scores @ v, scores.sum(-1), m, eps)


def mlstm_chunkwise(
    q, k, v, i_pre, f_pre, *, chunk_size: int = 64, state: MLSTMState | None = None, eps: float = 1e-6
) -> tuple[torch.Tensor, MLSTMState]:
    """Chunkwise form: quadratic inside chunks of ``chunk_size``, recurrent across them.

    Returns h (B, NH, S, DV) and the state after the last position.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    B, NH, S, DK = q.shape
    if state is None:
        state = empty_state(B, NH, DK, v.shape[-1], device=q.device, dtype=q.dtype)
    C, n, m = state
    log_f = F.logsigmoid(f_pre)
    outs = []
    for start in range(0, S, chunk_size):
        sl = slice(start, min(start + chunk_size, S))
        qc, kc, vc, ic = q[..., sl, :], k[..., sl, :], v[..., sl, :], i_pre[..., sl]
        L = qc.shape[-2]
        b = torch.cumsum(log_f[..., sl], dim=-1)  # (B, NH, L)
        causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
        log_d = (b.unsqueeze(-1) - b.unsqueeze(-2) + ic.unsqueeze(-2)).masked_fill(~causal, float("-inf"))
        log_inter = b + m.unsqueeze(-1)  # weight of the carried state at each t
        m_t = _finite(torch.maximum(log_d.amax(dim=-1), log_inter))
        scores = (qc @ kc.transpose(-1, -2)) * torch.exp(log_d - m_t.unsqueeze(-1))
        w_inter = torch.exp(log_inter - m_t)
        num = scores @ vc + w_inter.unsqueeze(-1) * (qc @ C)
        qn = scores.sum(-1) + w_inter * (qc @ n.unsqueeze(-1)).squeeze(-1)
        outs.append(_normalise(num, qn, m_t, eps))

        # carry the state to the end of the chunk
        b_last = b[..., -1]
        log_g = b_last.unsqueeze(-1) - b + ic  # weight of each key at the chunk end
        m_new = torch.maximum(b_last + m, log_g.amax(dim=-1))
        m_safe = _finite(m_new)
        decay = torch.exp(b_last + m - m_safe)
        kw = kc * torch.exp(log_g - m_safe.unsqueeze(-1)).unsqueeze(-1)
        C = decay[..., None, None] * C + kw.transpose(-1, -2) @ vc
        n = decay.unsqueeze(-1) * n + kw.sum(dim=-2)
        m = m_new
    return torch.cat(outs, dim=-2), (C, n, m)


def mlstm_recurrent_step(q, k, v, i_pre, f_pre, state: MLSTMState, eps: float = 1e-6) -> tuple[torch.Tensor, MLSTMState]:
    """One decode step. q, k (B, NH, DK); v (B, NH, DV); i_pre, f_pre (B, NH)."""
    C, n, m = state
    log_f = F.logsigmoid(f_pre)
    m_new = torch.maximum(log_f + m, i_pre)
    m_safe = _finite(m_new)
    f_act = torch.exp(log_f + m - m_safe)
    i_act = torch.exp(i_pre - m_safe)
    C = f_act[..., None, None] * C + i_act[..., None, None] * (k.unsqueeze(-1) * v.unsqueeze(-2))
    n = f_act.unsqueeze(-1) * n + i_act.unsqueeze(-1) * k
    num = (q.unsqueeze(-2) @ C).squeeze(-2)
    qn = (q * n).sum(-1)
    return _normalise(num, qn, m_safe, eps), (C, n, m_new)


def mlstm_recurrent(q, k, v, i_pre, f_pre, *, state: MLSTMState | None = None, eps: float = 1e-6):
    """The step applied position by position (test oracle for the decode path)."""
    B, NH, S, DK = q.shape
    if state is None:
        state = empty_state(B, NH, DK, v.shape[-1], device=q.device, dtype=q.dtype)
    outs = []
    for t in range(S):
        h, state = mlstm_recurrent_step(q[..., t, :], k[..., t, :], v[..., t, :], i_pre[..., t], f_pre[..., t], state, eps)
        outs.append(h)
    return torch.stack(outs, dim=-2), state
