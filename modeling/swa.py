"""Sliding-window softmax attention with sink tokens (pure PyTorch reference).

Query at absolute position t sees key s when ``start <= s <= t`` and either ``t - s < W`` (the
window) or ``s - start < S`` (the first S tokens of the sequence, the sinks). ``start`` is the
index of a row's first real token (left padding). One softmax over the union: a sink inside the
window counts once.

Keys arrive in two groups so that prefill, chunked prefill and decode share one code path:
* a sink buffer (one slot per sink, per row) — counted only where it lies *outside* the window;
* window keys (cached ring buffer + the new tokens) — counted only *inside* the window.
Every allowed key is therefore counted exactly once.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def gather_sinks(k, v, start, sinks: int, offset: int | torch.Tensor):
    """Sink keys/values among new tokens at positions offset..offset+T-1.

    k, v: (B, Hkv, T, D); start: (B,) first real index; offset: an int or a 0-d tensor (then nothing
    is read back to the host). Returns sink_k, sink_v (B, Hkv, S, D) and sink_pos (B, S), -1 where
    that sink is not among the new tokens.
    """
    B, Hkv, T, D = k.shape
    pos = start.unsqueeze(1) + torch.arange(sinks, device=k.device)  # (B, S)
    idx = pos - offset
    present = (idx >= 0) & (idx < T)
    gather_idx = idx.clamp(0, max(T - 1, 0))[:, None, :, None].expand(B, Hkv, sinks, D)
    sink_k = torch.gather(k, 2, gather_idx) if T else k.new_zeros(B, Hkv, sinks, D)
    sink_v = torch.gather(v, 2, gather_idx) if T else v.new_zeros(B, Hkv, sinks, D)
    sink_pos = torch.where(present, pos, torch.full_like(pos, -1))
    return sink_k, sink_v, sink_pos


def window_sink_attention(
    q, window_k, window_v, window_pos, sink_k, sink_v, sink_pos, *, q_pos, start, window: int
):
    """One softmax over sink keys (outside the window) and window keys (inside it).

    q: (B, H, T, D); window_k/v: (B, Hkv, K, D) with window_pos (K,) absolute positions, -1 = empty;
    sink_k/v: (B, Hkv, S, D) with sink_pos (B, S), -1 = empty; q_pos: (T,); start: (B,).
    Returns (B, H, T, D).
    """
    rel_w = q_pos[:, None] - window_pos[None, :]  # (T, K)
    ok_w = (rel_w >= 0) & (rel_w < window) & (window_pos >= 0)
    ok_w = ok_w[None] & (window_pos[None, None, :] >= start[:, None, None])  # (B, T, K)
    rel_s = q_pos[None, :, None] - sink_pos[:, None, :]  # (B, T, S)
    ok_s = (sink_pos[:, None, :] >= 0) & (rel_s >= window)
    mask = torch.cat([ok_s, ok_w], dim=-1)
    # rows with no key at all are padding queries; let them see everything to stay finite
    mask = mask | ~mask.any(dim=-1, keepdim=True)
    k = torch.cat([sink_k, window_k], dim=2)
    v = torch.cat([sink_v, window_v], dim=2)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask[:, None], scale=1.0 / math.sqrt(q.shape[-1]), enable_gqa=True
    )


def blocked_window_sink_attention(q, k, v, positions, sink_k, sink_v, sink_pos, *, start, window: int,
                                  block: int = 256):
    """window_sink_attention over a sequence's own keys, one query block at a time.

    A block of queries needs only the W - 1 keys before it (plus the sink buffer), so the work is
    O(T · (W + block)) instead of O(T²). q: (B, H, T, D); k, v: (B, Hkv, T, D) at ``positions`` (T,).
    """
    T = q.shape[2]
    if T <= 2 * block:
        return window_sink_attention(q, k, v, positions, sink_k, sink_v, sink_pos, q_pos=positions, start=start,
                                     window=window)
    outs = []
    for first in range(0, T, block):
        last = min(first + block, T)
        lo = max(0, first - window + 1)
        outs.append(window_sink_attention(
            q[:, :, first:last], k[:, :, lo:last], v[:, :, lo:last], positions[lo:last], sink_k, sink_v, sink_pos,
            q_pos=positions[first:last], start=start, window=window))
    return torch.cat(outs, dim=2)


def swa_reference(q, k, v, *, window: int, sinks: int, start=None):
    """Dense-mask oracle for full sequences: q (B, H, T, D), k/v (B, Hkv, T, D)."""
    B, H, T, D = q.shape
    start = torch.zeros(B, dtype=torch.long, device=q.device) if start is None else start
    pos = torch.arange(T, device=q.device)
    rel = pos[:, None] - pos[None, :]
    real = pos[None, :] >= start[:, None]  # (B, K)
    sink = (pos[None, :] - start[:, None]) < sinks
    mask = (rel >= 0)[None] & real[:, None, :] & ((rel < window)[None] | sink[:, None, :])
    mask = mask | ~mask.any(dim=-1, keepdim=True)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask[:, None], scale=1.0 / math.sqrt(D), enable_gqa=True
    )
