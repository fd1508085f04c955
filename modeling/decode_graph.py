"""Greedy decode of the student with one captured CUDA graph per token step.

The eager decode step launches a few thousand small kernels from Python (≈120 ops per layer), so it
is Python-bound. Every decode buffer already has its final shape (HybridCache: mLSTM state, ring and
sink buffers), so the step can be captured once
and replayed: ``decode_step`` is the student's layer forward for one token with the position held
in a device tensor and no host syncs; it reuses the student's own modules and branch functions.

Fast path (CUDA, triton, power-of-two head dim, static RoPE, ``XMERGE_KERNELS`` not 0) of a pre-norm
teacher (Llama, Qwen2): per layer the fused attention kernel (kernels/decode_step.py: the RoPE row and
rotation, feature maps, mLSTM step, window+sink attention, output gate, ring write) between the products,
each layer's four products packed once by ``pack_projections``. Up to ``ROW_PRODUCTS_MAX_B`` rows the
products are Triton launches (kernels/decode_rowwise.py) that fold the residual add + RMSNorm into the
q/k/v/gates and gate/up products and SiLU(gate)·up into down_proj, and on Hopper stream their weights
while the kernel before still runs (programmatic dependent launch): 5 launches a layer. Wider batches, or
widths past ``LINEAR_MAX_K``, run cuBLAS products between row kernels for the norms and the SiLU: 8 a layer.
Olmo2 adds its two QK-norms and does hidden + RMSNorm(delta) in one launch each. With row products the
final norm, the LM head and the greedy argmax are two launches (``_fused_head``). Elsewhere the
pure-PyTorch step below, which the fast path is tested against.

Precondition: the prefill saw every sink of every row (at least ``sinks`` real prompt tokens),
so a decode step never writes a sink.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from xmerge.errors import XmergeError
from xmerge.modeling.cache import HybridCache, LayerCache
from xmerge.modeling.dispatch import cached_window_attention, kernels_enabled

Packed = tuple[torch.Tensor, torch.Tensor | None]  # weight (N, d), bias (N,) or None
SILU_ACTS = ("silu", "swish")  # hidden_act values whose act(gate)·up runs in the Triton kernel


# Up to this many rows the products are few-row Triton launches, each weight read once a step; wider batches
# keep cuBLAS, whose tiles reuse each weight across rows. SmolLM2 graphed decode after a 4K prompt on an H200
# (benchmarks/RESULTS-gpu.md run 6), against cuBLAS products in the same call: B=2 1.85×, 3 1.55×, 4 1.09×.
ROW_PRODUCTS_MAX_B = 4


@dataclass(frozen=True)
class PackedLayer:
    """One layer's projections for the fused step, stacked and cast once to the compute dtype.

    qkv: [q; k; v; ĩ; f̃; õ], weight (N, d), bias (N,), N = (H + 2·Hkv)·D + 3H (a projection without bias
    contributes zeros). õ, the output gate's pre-activation W_og [q; k; v] + b_og, is linear in the layer's
    input, so its H rows are W_og·W_qkv and W_og·b_qkv + b_og (computed in fp64): the kernel step reads it
    like a projection. o: o_proj; gate_up: [gate; up], weight (2I, d), bias (2I,) or None (no mlp_bias);
    down: down_proj.
    """

    qkv: Packed
    o: Packed
    gate_up: Packed
    down: Packed


def fused_step_takes(model, x: torch.Tensor) -> bool:
    """Whether the fused kernel step can run for ``model`` with inputs on ``x``'s device: a power-of-two head
    dim, and a RoPE whose frequencies do not change with the length (the kernel makes the rows itself)."""
    D = model.config.head_dim
    rope_type = getattr(model.model.rotary_emb, "rope_type", "default")
    static_rope = "dynamic" not in rope_type and rope_type != "longrope"
    return D >= 16 and D & (D - 1) == 0 and static_rope and kernels_enabled(x)


def pack_projections(model, dtype: torch.dtype) -> list[PackedLayer]:
    """Per layer, the packed q/k/v/igate/fgate/output-gate input, o, gate/up and down projections in ``dtype``.

    Memory: a second copy of the q/k/v/gates and gate/up weights, (N + 2I)·d elements of ``dtype`` per
    layer (SmolLM2-135M in bf16: 34 MB and 106 MB, beside its ~270 MB of weights); o and down are the
    modules' own weights where they are in ``dtype`` already, else a cast copy.
    """

    def own(linear) -> Packed:
        bias = None if linear.bias is None else linear.bias.detach().to(dtype)
        return linear.weight.detach().to(dtype), bias

    def bias_or_zeros(linear) -> torch.Tensor:
        return linear.bias.detach() if linear.bias is not None else linear.weight.new_zeros(linear.out_features)

    packed = []
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        raw = (attn.q_proj, attn.k_proj, attn.v_proj)
        og_w = attn.ogate.weight.detach().double()
        og_rows = og_w @ torch.cat([p.weight.detach() for p in raw]).double()
        og_bias = og_w @ torch.cat([bias_or_zeros(p) for p in raw]).double() + bias_or_zeros(attn.ogate).double()
        parts = (*raw, attn.igate, attn.fgate)
        qkv = torch.cat([*(p.weight.detach().to(dtype) for p in parts), og_rows.to(dtype)])
        qkv_bias = torch.cat([*(bias_or_zeros(p).to(dtype) for p in parts), og_bias.to(dtype)])
        mlp_bias = None
        if mlp.gate_proj.bias is not None:
            mlp_bias = torch.cat([mlp.gate_proj.bias.detach(), mlp.up_proj.bias.detach()]).to(dtype)
        packed.append(PackedLayer(
            qkv=(qkv, qkv_bias),
            o=own(attn.o_proj),
            gate_up=(torch.cat([mlp.gate_proj.weight.detach(), mlp.up_proj.weight.detach()]).to(dtype), mlp_bias),
            down=own(mlp.down_proj),
        ))
    return packed


def row_products_take(config, batch: int, max_width: int) -> bool:
    """Whether the step's products run as few-row Triton launches: at most ROW_PRODUCTS_MAX_B rows, and
    every product's input (hidden, intermediate, attention output) at most max_width wide (one tile)."""
    widths = (config.hidden_size, config.intermediate_size, config.num_attention_heads * config.head_dim)
    return batch <= ROW_PRODUCTS_MAX_B and max(widths) <= max_width


class Products:
    """The step's products, as cuBLAS launches between row kernels or (``rows``) as few-row Triton launches
    with the norm or the SiLU folded into their input. Inputs and outputs are (B, width) rows; dtype is the
    packed weights' (the compute dtype)."""

    def __init__(self, rows: bool, dtype: torch.dtype):
        self.rows, self.dtype = rows, dtype

    def plain(self, x: torch.Tensor, packed: Packed) -> torch.Tensor:
        if self.rows:
            from xmerge.kernels.decode_rowwise import linear

            return linear(x, *packed)
        return F.linear(x, *packed)

    def normed(self, hidden: torch.Tensor, delta: torch.Tensor | None, norm, packed: Packed):
        """(residual, y): residual = hidden (+ delta), y = the product of RMSNorm(residual) (pre-norm)."""
        from xmerge.kernels.decode_rowwise import add_rms_norm, norm_linear, rms_norm

        if self.rows:
            residual, y = norm_linear(hidden, *packed, norm.weight, norm.eps, delta)
            return hidden if delta is None else residual, y
        if delta is None:
            return hidden, F.linear(rms_norm(hidden, norm.weight, norm.eps), *packed)
        hidden, x = add_rms_norm(hidden, delta, norm.weight, norm.eps)
        return hidden, F.linear(x, *packed)

    def down(self, mlp, gate_up: torch.Tensor, packed: Packed, silu: bool) -> torch.Tensor:
        """down_proj(act(gate)·up) of gate_up (B, 2I); SiLU in Triton where ``silu``, else the module's act."""
        if silu:
            from xmerge.kernels.decode_rowwise import silu_linear, silu_mul

            return silu_linear(gate_up, *packed) if self.rows else F.linear(silu_mul(gate_up), *packed)
        gate, up = gate_up.chunk(2, dim=-1)
        return self.plain(mlp.act(gate) * up, packed)


def _fused_attention(attn, proj, rope, slot, start, lc: LayerCache, arrivals, products: Products) -> torch.Tensor:
    """h (B, H·D) of one token from its raw [q; k; v; ĩ; f̃; õ] projections proj (B, N) through the fused
    kernel; updates lc's state and ring in place (arrivals: the cache's counters for a split step)."""
    from xmerge.kernels.decode_rowwise import pdl_capable, rms_norm
    from xmerge.kernels.decode_step import fused_decode_step

    if not all(t.is_contiguous() for t in lc.mlstm):  # the kernel updates the state in place
        lc.mlstm = tuple(t.contiguous() for t in lc.mlstm)
    qd, kd = attn.heads * attn.head_dim, attn.kv_heads * attn.head_dim
    q, k = proj[:, :qd], proj[:, qd : qd + kd]
    config = attn.config
    if config.qk_norm:
        q, k = rms_norm(q, attn.q_norm.weight, attn.q_norm.eps), rms_norm(k, attn.k_norm.weight, attn.k_norm.eps)
    h = fused_decode_step(
        proj, q, k, rope, slot, start, lc.mlstm,
        (attn.fmap_q.weight, attn.fmap_q.bias), (attn.fmap_k.weight, attn.fmap_k.bias),
        (lc.ring_k, lc.ring_v, lc.ring_pos), (lc.sink_k, lc.sink_v, lc.sink_pos),
        mixer=config.mixer, fmap_after_rope=config.fmap_after_rope, eps=config.mlstm_eps, arrivals=arrivals,
        pdl=products.rows and pdl_capable(proj),
    )
    return h.view(h.shape[0], -1)


def _fused_layers(model, hidden, slot, start, cache: HybridCache, packed: list[PackedLayer], products):
    """(residual, delta) for embeddings hidden (B, d) through every layer on the fast path: the final norm's
    input is residual + delta (pre-norm: delta is the last MLP's output, not yet added), or residual alone
    (post-norm, delta None). The attention kernel makes each row's RoPE row as the rotary module would from
    hidden (fused_step_takes: a static RoPE)."""
    from xmerge.kernels.decode_rowwise import add_normed

    layers = model.model.layers
    silu = model.config.hidden_act in SILU_ACTS
    rotary = model.model.rotary_emb
    rope = (rotary.inv_freq, rotary.attention_scaling, hidden.dtype)
    if layers[0].post_norm:  # Olmo2: hidden + RMSNorm(attn(hidden)); hidden + RMSNorm(mlp(hidden))
        for layer, lc, pack in zip(layers, cache.layers, packed):
            h = _fused_attention(layer.self_attn, products.plain(hidden, pack.qkv), rope, slot, start, lc,
                                 cache.arrivals, products)
            norm, ff_norm = layer.post_attention_layernorm, layer.post_feedforward_layernorm
            hidden = add_normed(hidden, products.plain(h, pack.o), norm.weight, norm.eps)
            mlp_out = products.down(layer.mlp, products.plain(hidden, pack.gate_up), pack.down, silu)
            hidden = add_normed(hidden, mlp_out, ff_norm.weight, ff_norm.eps)
        return hidden, None
    mlp_out = None  # the last MLP's output, added to hidden by the next norm
    for layer, lc, pack in zip(layers, cache.layers, packed):
        hidden, proj = products.normed(hidden, mlp_out, layer.input_layernorm, pack.qkv)
        h = _fused_attention(layer.self_attn, proj, rope, slot, start, lc, cache.arrivals, products)
        attn_out = products.plain(h, pack.o)
        hidden, gate_up = products.normed(hidden, attn_out, layer.post_attention_layernorm, pack.gate_up)
        mlp_out = products.down(layer.mlp, gate_up, pack.down, silu)
    return hidden, mlp_out


def _fused_head(model, hidden, delta, products: Products, next_ids: torch.Tensor | None) -> torch.Tensor:
    """Logits (B, 1, V) of the final norm of hidden (+ delta); the greedy tokens into next_ids if given.

    With row products and the LM head in the compute dtype (not an fp32 head under autocast), the add, the
    norm, the head and the argmax are two launches; else the row norm, the module and torch's argmax.
    """
    from xmerge.kernels.decode_rowwise import add_rms_norm, norm_linear, rms_norm

    norm, head = model.model.norm, model.lm_head
    if products.rows and head.weight.dtype == products.dtype and head.weight.is_contiguous():
        logits = norm_linear(hidden, head.weight, head.bias, norm.weight, norm.eps, delta, ids=next_ids)[1]
        return logits[:, None]
    final = rms_norm(hidden, norm.weight, norm.eps) if delta is None else add_rms_norm(hidden, delta, norm.weight,
                                                                                       norm.eps)[1]
    logits = head(final[:, None])
    if next_ids is not None:
        next_ids.copy_(logits[:, -1].argmax(-1, keepdim=True))
    return logits


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
        return attn.hybrid_mix(q_raw, k_raw, v_raw, mlstm, swa)
    return swa if config.mixer == "swa" else mlstm


def decode_step(
    model, ids: torch.Tensor, slot: torch.Tensor, cache: HybridCache, packed: list[PackedLayer] | None = None,
    next_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits (B, 1, V) for ids (B, 1) at absolute slot (1,); updates the cache in place, not ``seen``.

    packed: ``pack_projections(model, ...)`` to run the fused kernels per layer (the caller checked
    ``fused_step_takes``); None runs the pure-PyTorch step. next_ids: a (B, 1) int64 tensor to receive the
    greedy tokens, the logits' argmax (it may be ids itself).
    """
    inner = model.model
    start = cache.start
    hidden = inner.embed_tokens(ids)
    if packed is not None:
        from xmerge.kernels.decode_rowwise import LINEAR_MAX_K

        products = Products(rows=row_products_take(model.config, ids.shape[0], LINEAR_MAX_K),
                            dtype=packed[0].qkv[0].dtype)
        hidden, delta = _fused_layers(model, hidden[:, 0], slot, start, cache, packed, products)
        return _fused_head(model, hidden, delta, products, next_ids)
    position_ids = (slot[None, :] - start[:, None]).clamp(min=0)  # (B, 1)
    cos, sin = inner.rotary_emb(hidden, position_ids)
    for layer, lc in zip(inner.layers, cache.layers):
        attn = layer.self_attn
        h = _reference_attention(attn, layer.attention_input(hidden), cos, sin, slot, start, lc).transpose(1, 2)
        hidden = layer.finish(hidden, attn.o_proj(h.reshape(ids.shape[0], 1, -1)))
    logits = model.lm_head(inner.norm(hidden))
    if next_ids is not None:
        next_ids.copy_(logits[:, -1].argmax(-1, keepdim=True))
    return logits


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
        decode_step(self.model, self.ids, self.slot, self.cache, self.packed, next_ids=self.ids)
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
