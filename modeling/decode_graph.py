"""Greedy decode of the student with one captured CUDA graph per token step.

The eager decode step launches a few thousand small kernels from Python (≈120 ops per layer), so it
is Python-bound. Every decode buffer already has its final shape (HybridCache: mLSTM state, ring and
sink buffers), so the step can be captured once
and replayed: ``decode_step`` is the student's layer forward for one token with the position held
in a device tensor and no host syncs; it reuses the student's own modules and branch functions.

Fast path (CUDA, triton, power-of-two head dim, ``XMERGE_KERNELS`` not 0): per layer one GEMM for
the concatenated q/k/v/igate/fgate projections (packed once by ``pack_projections``) and one fused
Triton kernel (kernels/decode_step.py: RoPE, feature maps, mLSTM step, window+sink attention, output
gate, ring write). Elsewhere the pure-PyTorch step below, which the fast path is tested against.

Precondition: the prefill saw every sink of every row (at least ``sinks`` real prompt tokens),
so a decode step never writes a sink.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from xmerge.errors import XmergeError
from xmerge.modeling.cache import HybridCache, LayerCache
from xmerge.modeling.dispatch import cached_window_attention, kernels_enabled

Packed = tuple[torch.Tensor, torch.Tensor]  # weight (N, d), bias (N,) of [q; k; v; ĩ; f̃]


def fused_step_takes(model, x: torch.Tensor) -> bool:
    """Whether the fused kernel step can run for ``model`` with inputs on ``x``'s device."""
    D = model.config.head_dim
    return D >= 16 and D & (D - 1) == 0 and kernels_enabled(x)


def pack_projections(model, dtype: torch.dtype) -> list[Packed]:
    """Per layer, the q, k, v, igate and fgate weights stacked into one (N, d) matrix and bias (N,) in
    ``dtype``, N = (H + 2·Hkv)·D + 2H; a projection without bias contributes zeros."""
    packed = []
    for layer in model.model.layers:
        attn = layer.self_attn
        parts = (attn.q_proj, attn.k_proj, attn.v_proj, attn.igate, attn.fgate)
        weight = torch.cat([p.weight.detach() for p in parts]).to(dtype)
        bias = torch.cat([
            p.bias.detach() if p.bias is not None else p.weight.new_zeros(p.out_features) for p in parts
        ]).to(dtype)
        packed.append((weight, bias))
    return packed


def fused_inputs(attn, x: torch.Tensor, packed: Packed):
    """proj (B, N) raw [q; k; v; ĩ; f̃] of one token x (B, 1, d), and q (B, H·D), k (B, Hkv·D) before
    RoPE (after QK-norm; otherwise views of proj)."""
    proj = F.linear(x[:, 0], *packed)
    qd, kd = attn.heads * attn.head_dim, attn.kv_heads * attn.head_dim
    q, k = proj[:, :qd], proj[:, qd : qd + kd]
    if attn.config.qk_norm:
        q, k = attn.q_norm(q), attn.k_norm(k)
    return proj, q, k


def _fused_attention(attn, x, cos, sin, slot, start, lc: LayerCache, packed: Packed) -> torch.Tensor:
    """h (B, H, D) of one token through the fused kernel; updates lc's state and ring in place."""
    from xmerge.kernels.decode_step import fused_decode_step

    if not all(t.is_contiguous() for t in lc.mlstm):  # the kernel updates the state in place
        lc.mlstm = tuple(t.contiguous() for t in lc.mlstm)
    proj, q, k = fused_inputs(attn, x, packed)
    config = attn.config
    return fused_decode_step(
        proj, q, k, cos[:, 0].contiguous(), sin[:, 0].contiguous(), slot, start, lc.mlstm,
        (attn.fmap_q.weight, attn.fmap_q.bias), (attn.fmap_k.weight, attn.fmap_k.bias),
        (attn.ogate.weight, attn.ogate.bias), (lc.ring_k, lc.ring_v, lc.ring_pos),
        (lc.sink_k, lc.sink_v, lc.sink_pos),
        mixer=config.mixer, fmap_after_rope=config.fmap_after_rope, eps=config.mlstm_eps,
    )


def _reference_attention(attn, x, cos, sin, slot, start, lc: LayerCache) -> torch.Tensor:
    """h (B, H, 1, D) of one token with the student's own PyTorch branches; updates lc in place."""
    config = attn.config
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
        return o * mlstm + (1 - o) * swa
    return swa if config.mixer == "swa" else mlstm


def decode_step(
    model, ids: torch.Tensor, slot: torch.Tensor, cache: HybridCache, packed: list[Packed] | None = None
) -> torch.Tensor:
    """Logits (B, 1, V) for ids (B, 1) at absolute slot (1,); updates the cache in place, not ``seen``.

    packed: ``pack_projections(model, ...)`` to run the fused kernel per layer (the caller checked
    ``fused_step_takes``); None runs the pure-PyTorch step.
    """
    inner = model.model
    start = cache.start
    position_ids = (slot[None, :] - start[:, None]).clamp(min=0)  # (B, 1)
    hidden = inner.embed_tokens(ids)
    cos, sin = inner.rotary_emb(hidden, position_ids)
    for i, (layer, lc) in enumerate(zip(inner.layers, cache.layers)):
        attn = layer.self_attn
        x = layer.attention_input(hidden)
        if packed is not None:
            h = _fused_attention(attn, x, cos, sin, slot, start, lc, packed[i])
        else:
            h = _reference_attention(attn, x, cos, sin, slot, start, lc).transpose(1, 2)
        hidden = layer.finish(hidden, attn.o_proj(h.reshape(ids.shape[0], 1, -1)))
    return model.lm_head(inner.norm(hidden))


class GraphedGreedyDecoder:
    """Greedy tokens after a prefill, one CUDA-graph replay per token.

    ``next_ids`` (B, 1) is the token chosen from the prefill's last logits. The first ``warmup``
    steps run eagerly (they are real steps: the cache advances), then one step is captured. The
    step is the fused kernel one where ``fused_step_takes`` (and ``fused``), else the pure-PyTorch
    one; ``fused=False`` lets a benchmark time the two in one process.
    """

    def __init__(self, model, cache: HybridCache, next_ids: torch.Tensor, *, warmup: int = 2, fused: bool = True):
        if not next_ids.is_cuda:
            raise XmergeError("GraphedGreedyDecoder needs the model and cache on CUDA; use model.generate on CPU")
        if model.config.mixer != "mlstm" and model.config.sinks and bool((cache.layers[0].sink_pos < 0).any()):
            raise XmergeError(f"the prompt must hold at least {model.config.sinks} real tokens per row (the sinks)")
        self.model, self.cache = model, cache
        autocast = torch.is_autocast_enabled("cuda")
        dtype = torch.get_autocast_dtype("cuda")
        with torch.inference_mode():
            self.packed = None
            if fused and fused_step_takes(model, next_ids):
                self.packed = pack_projections(model, dtype if autocast else model.dtype)
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
        logits = decode_step(self.model, self.ids, self.slot, self.cache, self.packed)
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
