"""Routes the student's two branches to the GPU kernels on CUDA and to the PyTorch reference elsewhere.

* mLSTM chunkwise (training, prefill): ``xmerge.kernels.mlstm_chunkwise.mlstm_chunkwise_triton``
  when the tensors are on CUDA, triton imports and head dims and chunk size are powers of two >= 16.
* SWA over new tokens that start the sequence (no cache yet or an empty one, no left padding):
  ``xmerge.kernels.swa.swa_attention`` (FlexAttention). Decode steps, later prefill chunks and
  left-padded batches keep the reference, which reads the cache's ring and sink buffers.

Under ``torch.autocast`` the kernels run in the autocast dtype (the reference's matmuls do too);
otherwise in their inputs' dtype. CPU always runs the reference, unchanged.

Switch: ``XMERGE_KERNELS=0`` forces the reference everywhere (read at every call, so a test or a
benchmark can compare both paths in one process).
"""

from __future__ import annotations

import functools
import os

import torch

from xmerge.modeling.mlstm import MLSTMState, mlstm_chunkwise
from xmerge.modeling.swa import blocked_window_sink_attention, window_sink_attention


@functools.cache
def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def kernels_enabled(x: torch.Tensor) -> bool:
    """Whether the kernels may run on ``x``'s device: CUDA, triton importable, not switched off."""
    return x.is_cuda and os.environ.get("XMERGE_KERNELS", "1") != "0" and _triton_available()


def _pow2_at_least_16(n: int) -> bool:
    return n >= 16 and n & (n - 1) == 0


def _kernel_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else x.dtype


def mlstm_forward(
    q, k, v, i_pre, f_pre, *, chunk_size: int, state: MLSTMState | None, eps: float
) -> tuple[torch.Tensor, MLSTMState]:
    """Chunkwise mLSTM: h (B, NH, S, DV) in fp32 and the final state.

    q, k: (B, NH, S, DK) feature-mapped; v: (B, NH, S, DV); i_pre, f_pre: (B, NH, S), ĩ = -inf on
    padding; state: (C (B, NH, DK, DV), n (B, NH, DK), m (B, NH)) or None.
    """
    qualifies = _pow2_at_least_16(q.shape[-1]) and _pow2_at_least_16(v.shape[-1]) and _pow2_at_least_16(chunk_size)
    if not (qualifies and kernels_enabled(q)):
        return mlstm_chunkwise(q, k, v, i_pre, f_pre, chunk_size=chunk_size, state=state, eps=eps)
    from xmerge.kernels.mlstm_chunkwise import mlstm_chunkwise_triton

    dtype = _kernel_dtype(q)
    with torch.autocast("cuda", enabled=False):
        h, state = mlstm_chunkwise_triton(
            q.to(dtype), k.to(dtype), v.to(dtype), i_pre.float(), f_pre.float(),
            state=state, chunk_size=chunk_size, eps=eps,
        )
    return h.float(), state


def swa_forward(
    q, k, v, positions, start, sink_k, sink_v, sink_pos, *, window: int, sinks: int, ring=None
) -> torch.Tensor:
    """Window + sink attention of the new tokens: (B, H, T, D).

    q: (B, H, T, D) and k, v: (B, Hkv, T, D) rotated, of the new tokens at ``positions`` (T,);
    start: (B,) each row's first real slot; sink_k/v (B, Hkv, S, D), sink_pos (B, S): the sinks
    known so far; ring: the cache's (ring_k, ring_v, ring_pos) before these tokens, or None.
    """
    if kernels_enabled(q) and int(positions[0]) == 0 and not bool(start.any()):
        from xmerge.kernels.swa import swa_attention

        dtype = _kernel_dtype(q)
        with torch.autocast("cuda", enabled=False):
            return swa_attention(q.to(dtype), k.to(dtype), v.to(dtype), window, sinks)
    if ring is None:
        return blocked_window_sink_attention(q, k, v, positions, sink_k, sink_v, sink_pos, start=start, window=window)
    ring_k, ring_v, ring_pos = ring
    return window_sink_attention(
        q,
        torch.cat([ring_k, k.to(ring_k.dtype)], dim=2),
        torch.cat([ring_v, v.to(ring_v.dtype)], dim=2),
        torch.cat([ring_pos, positions]),
        sink_k,
        sink_v,
        sink_pos,
        q_pos=positions,
        start=start,
        window=window,
    )
