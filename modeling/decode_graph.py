"""Greedy decode of the student with one captured CUDA graph per token step.

The eager decode step launches a few thousand small kernels from Python (≈80 per layer), so it is
Python-bound. Every decode buffer already has its final shape (HybridCache: mLSTM state, ring and
sink buffers), so the step can be captured once
and replayed: ``decode_step`` is the student's layer forward for one token with the position held
in a device tensor and no host syncs; it reuses the student's own modules and branch functions.

Precondition: the prefill saw every sink of every row (at least ``sinks`` real prompt tokens),
so a decode step never writes a sink.
"""

from __future__ import annotations

import torch

from xmerge.errors import XmergeError
from xmerge.modeling.cache import HybridCache
from xmerge.modeling.dispatch import cached_window_attention


def decode_step(model, ids: torch.Tensor, slot: torch.Tensor, cache: HybridCache) -> torch.Tensor:
    """Logits (B, 1, V) for ids (B, 1) at absolute slot (1,); updates the cache in place, not ``seen``."""
    inner, config = model.model, model.config
    start = cache.start
    position_ids = (slot[None, :] - start[:, None]).clamp(min=0)  # (B, 1)
    hidden = inner.embed_tokens(ids)
    cos, sin = inner.rotary_emb(hidden, position_ids)
    for layer, lc in zip(inner.layers, cache.layers):
        attn = layer.self_attn
        x = layer.attention_input(hidden)
        (q_raw, k_raw, v_raw), (q, k), (q_rot, k_rot), v = attn.project(x, cos, sin)
        if config.mixer != "mlstm":
            swa = cached_window_attention(q_rot, k_rot, v, slot, lc, start=start, window=config.window)
            HybridCache.write_window(lc, k_rot, v, slot)
        if config.mixer != "swa":
            fq, fk = (q_rot, k_rot) if config.fmap_after_rope else (q, k)
            state = lc.mlstm
            mlstm = attn._mlstm(x, fq, fk, v, slot, start, lc).to(x.dtype)
            for buffer, new in zip(state, lc.mlstm):  # keep the state in its own (captured) buffers
                buffer.copy_(new)
            lc.mlstm = state
        if config.mixer == "hybrid":
            o = torch.sigmoid(attn.ogate(torch.cat([q_raw, k_raw, v_raw], dim=-1))).transpose(1, 2).unsqueeze(-1)
            h = o * mlstm + (1 - o) * swa
        else:
            h = swa if config.mixer == "swa" else mlstm
        hidden = layer.finish(hidden, attn.o_proj(h.transpose(1, 2).reshape(ids.shape[0], 1, -1)))
    return model.lm_head(inner.norm(hidden))


class GraphedGreedyDecoder:
    """Greedy tokens after a prefill, one CUDA-graph replay per token.

    ``next_ids`` (B, 1) is the token chosen from the prefill's last logits. The first ``warmup``
    steps run eagerly (they are real steps: the cache advances), then one step is captured.
    """

    def __init__(self, model, cache: HybridCache, next_ids: torch.Tensor, *, warmup: int = 2):
        if not next_ids.is_cuda:
            raise XmergeError("GraphedGreedyDecoder needs the model and cache on CUDA; use model.generate on CPU")
        if model.config.mixer != "mlstm" and model.config.sinks and bool((cache.layers[0].sink_pos < 0).any()):
            raise XmergeError(f"the prompt must hold at least {model.config.sinks} real tokens per row (the sinks)")
        self.model, self.cache = model, cache
        autocast = torch.is_autocast_enabled("cuda")
        dtype = torch.get_autocast_dtype("cuda")
        with torch.inference_mode():
            self.ids = next_ids.clone()  # (B, 1) static input: the token to feed
            self.slot = torch.tensor([cache.seen], device=next_ids.device)  # (1,) its absolute position
            self.warmup_tokens = []
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(warmup):
                    self.warmup_tokens.append(self.ids.clone())
                    self._advance()
                    cache.seen += 1
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.autocast("cuda", dtype=dtype, enabled=autocast, cache_enabled=False):
                with torch.cuda.graph(self.graph):
                    self._advance()

    def _advance(self):
        logits = decode_step(self.model, self.ids, self.slot, self.cache)
        self.ids.copy_(logits[:, -1].argmax(-1, keepdim=True))
        self.slot.add_(1)

    @torch.inference_mode()
    def generate(self, steps: int) -> torch.Tensor:
        """The next ``steps`` tokens (B, steps), warmup tokens first."""
        out = torch.empty(self.ids.shape[0], steps, dtype=self.ids.dtype, device=self.ids.device)
        done = 0
        while self.warmup_tokens and done < steps:
            out[:, done] = self.warmup_tokens.pop(0)[:, 0]
            done += 1
        for i in range(done, steps):
            out[:, i] = self.ids[:, 0]
            self.graph.replay()
            self.cache.seen += 1
        return out
