"""Decode cache of the hybrid student: memory independent of the generated length.

Per layer: the mLSTM state (C, n, m), a ring buffer of the last W rotated keys/values, and the
S sink keys/values. All buffers are allocated once at their final size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from xmerge.modeling.mlstm import MLSTMState, empty_state


@dataclass
class LayerCache:
    mlstm: MLSTMState  # C (B, H, D, D), n (B, H, D), m (B, H)
    ring_k: torch.Tensor  # (B, Hkv, W, D), slot = position % W
    ring_v: torch.Tensor
    ring_pos: torch.Tensor  # (W,) absolute position held by each slot, -1 = empty
    sink_k: torch.Tensor  # (B, Hkv, S, D)
    sink_v: torch.Tensor
    sink_pos: torch.Tensor  # (B, S) absolute position of each sink, -1 = not seen yet


class HybridCache:
    """State of every layer plus the number of positions seen and each row's first real index.

    ``seen`` and ``last_start`` (an upper bound on ``start``, kept through beam reordering) live on the
    host, so that a decode step reads nothing back from the device.
    """

    is_compileable = False

    def __init__(self, config, batch_size: int, start: torch.Tensor, last_start: int, *, device, dtype):
        H, Hkv, D = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        W, S = config.window, config.sinks
        self.seen = 0
        self.start = start  # (B,)
        self.last_start = last_start
        L = config.num_hidden_layers

        def per_layer(shape, fill, dtype):  # one allocation for every layer: a prefill is dispatch-bound
            return torch.full((L, *shape), fill, device=device, dtype=dtype).unbind(0)

        C, n, m = (t.unflatten(0, (L, batch_size)).unbind(0)
                   for t in empty_state(L * batch_size, H, D, D, device=device))
        ring_k, ring_v = (per_layer((batch_size, Hkv, W, D), 0, dtype) for _ in range(2))
        sink_k, sink_v = (per_layer((batch_size, Hkv, S, D), 0, dtype) for _ in range(2))
        ring_pos, sink_pos = per_layer((W,), -1, torch.long), per_layer((batch_size, S), -1, torch.long)
        # the fused decode step's per-(row, head) arrival counters (kernels/decode_step.py, split window):
        # zero between steps, one buffer for every layer since the layers' steps run one after another
        self.arrivals = torch.zeros(batch_size * H, device=device, dtype=torch.int32)
        self.layers = [
            LayerCache(mlstm=(C[i], n[i], m[i]), ring_k=ring_k[i], ring_v=ring_v[i], ring_pos=ring_pos[i],
                       sink_k=sink_k[i], sink_v=sink_v[i], sink_pos=sink_pos[i])
            for i in range(L)
        ]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def nbytes(self) -> int:
        """Bytes held by every tensor of the cache."""
        total = sum(t.numel() * t.element_size() for t in (self.start, self.arrivals))
        for layer in self.layers:
            for t in (*layer.mlstm, layer.ring_k, layer.ring_v, layer.ring_pos, layer.sink_k, layer.sink_v, layer.sink_pos):
                total += t.numel() * t.element_size()
        return total

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        """Beam search: keep the rows ``beam_idx`` (B,) of every per-row buffer."""
        self.start = self.start.index_select(0, beam_idx)
        for layer in self.layers:
            layer.mlstm = tuple(t.index_select(0, beam_idx) for t in layer.mlstm)
            for name in ("ring_k", "ring_v", "sink_k", "sink_v", "sink_pos"):
                setattr(layer, name, getattr(layer, name).index_select(0, beam_idx))

    @staticmethod
    def write_window(layer: LayerCache, k, v, positions: torch.Tensor) -> None:
        """Keep the last W of the new rotated keys/values (k, v: (B, Hkv, T, D)) in the ring."""
        W = layer.ring_pos.shape[0]
        k, v, positions = k[:, :, -W:], v[:, :, -W:], positions[-W:]
        slots = positions % W
        layer.ring_k.index_copy_(2, slots, k.to(layer.ring_k.dtype))
        layer.ring_v.index_copy_(2, slots, v.to(layer.ring_v.dtype))
        layer.ring_pos.index_copy_(0, slots, positions)

    @staticmethod
    def write_first_sinks(layer: LayerCache, k, v) -> None:
        """A fresh sequence (slot 0 in every row, no left padding, empty sinks): its first new rotated
        keys/values (k, v: (B, Hkv, T, D)) are the sinks. What ``write_sinks(gather_sinks(...))`` gives
        there, in a handful of operators instead of ~20 (a prefill is dispatch-bound)."""
        n = min(layer.sink_pos.shape[1], k.shape[2])
        layer.sink_k[:, :, :n] = k[:, :, :n]
        layer.sink_v[:, :, :n] = v[:, :, :n]
        layer.sink_pos[:, :n] = torch.arange(n, device=k.device)

    @staticmethod
    def write_sinks(layer: LayerCache, sink_k, sink_v, sink_pos) -> None:
        """Fill the sink slots that the new tokens provide (sink_pos >= 0)."""
        new = sink_pos >= 0
        layer.sink_k.copy_(torch.where(new[:, None, :, None], sink_k.to(layer.sink_k.dtype), layer.sink_k))
        layer.sink_v.copy_(torch.where(new[:, None, :, None], sink_v.to(layer.sink_v.dtype), layer.sink_v))
        layer.sink_pos.copy_(torch.where(new, sink_pos, layer.sink_pos))
