"""The hybrid xLSTM student, one readable file: attention, decoder layer, model, causal-LM head.

Everything but the attention mixer is the teacher's (embeddings, MLP, norms, lm_head, q/k/v/o
projections, QK-norm, RoPE). Each attention block computes, per head,

    h_t = o_t · mLSTM_t + (1 − o_t) · SWA_t,   o_t = σ(W_o [q_t; k_t; v_t] + b_o)

then the teacher's o_proj. See DESIGN.md for the equations; modeling/mlstm.py and modeling/swa.py
hold the two branches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from xmerge.modeling.cache import HybridCache, LayerCache
from xmerge.modeling.config import XLSTMStudentConfig
from xmerge.modeling.dispatch import compiled_region, mlstm_dtype, mlstm_forward, swa_forward
from xmerge.modeling.mlstm import mlstm_recurrent_step
from xmerge.modeling.swa import gather_sinks

# Parameters that do not exist in the teacher: Stage I trains only these.
NEW_PARAMETER_KEYS = ("fmap_q", "fmap_k", "igate", "fgate", "ogate")


def is_new_parameter(name: str) -> bool:
    return any(f".{key}." in name for key in NEW_PARAMETER_KEYS)


@dataclass(frozen=True)
class TokenSpan:
    """What the host must know about a forward's new tokens, so that no layer reads the device.

    offset: absolute slot of the first new token; last_start: an upper bound on every row's first
    real slot (0: no row is left-padded). The model fills it once per forward.
    """

    offset: int
    last_start: int

    @classmethod
    def read(cls, positions: torch.Tensor, start: torch.Tensor) -> TokenSpan:
        """From positions (T,) and start (B,), one host sync: for layers run outside the model's forward."""
        offset, last_start = torch.stack([positions[0], start.max()]).tolist()
        return cls(offset, last_start)

    @property
    def fresh(self) -> bool:
        """The new tokens start every row's sequence: slot 0 and no left padding."""
        return self.offset == 0 and self.last_start == 0

    @property
    def padded(self) -> bool:
        """Some row may hold left padding among the new tokens."""
        return self.offset < self.last_start

    def holds_sinks(self, sinks: int) -> bool:
        """Some row may have one of its first ``sinks`` real tokens among the new tokens."""
        return self.offset < self.last_start + sinks


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * x.to(dtype)) if dtype != torch.float32 else self.weight * x


class FeatureMap(nn.Module):
    """φ(u) = softmax(u W_h + b_h) per head, W_h initialised to the identity."""

    def __init__(self, heads: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.eye(dim).repeat(heads, 1, 1))  # (H, D, D)
        self.bias = nn.Parameter(torch.zeros(heads, dim))  # (H, D)

    def forward(self, u):  # u: (B, H, T, D)
        B, H, T, D = u.shape
        rows = u.transpose(0, 1).reshape(H, B * T, D)  # a view for the projections' (B, T, H, D) layout
        logits = torch.baddbmm(self.bias[:, None], rows, self.weight)  # bias added inside the matmul
        return torch.softmax(logits, dim=-1).view(H, B, T, D).transpose(0, 1)


class MLP(nn.Module):
    def __init__(self, config: XLSTMStudentConfig):
        super().__init__()
        d, i, b = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(d, i, bias=b)
        self.up_proj = nn.Linear(d, i, bias=b)
        self.down_proj = nn.Linear(i, d, bias=b)
        self.act = ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class HybridAttention(nn.Module):
    def __init__(self, config: XLSTMStudentConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        H, Hkv, D, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.hidden_size
        self.heads, self.kv_heads, self.head_dim = H, Hkv, D
        self.q_proj = nn.Linear(d, H * D, bias=config.attention_bias)
        self.k_proj = nn.Linear(d, Hkv * D, bias=config.attention_bias)
        self.v_proj = nn.Linear(d, Hkv * D, bias=config.attention_bias)
        self.o_proj = nn.Linear(H * D, d, bias=config.o_bias)
        if config.qk_norm:  # Olmo2: RMSNorm over the whole projection, before the head split
            self.q_norm = RMSNorm(H * D, config.rms_norm_eps)
            self.k_norm = RMSNorm(Hkv * D, config.rms_norm_eps)
        self.fmap_q = FeatureMap(H, D)
        self.fmap_k = FeatureMap(Hkv, D)
        self.igate = nn.Linear(d, H)
        self.fgate = nn.Linear(d, H)
        self.ogate = nn.Linear((H + 2 * Hkv) * D, H)

    @compiled_region
    def project(self, x, cos, sin):
        """Teacher's q/k/v: raw projections (for the output gate), pre-RoPE and rotated heads."""
        B, T, _ = x.shape
        q_raw, k_raw, v_raw = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q, k = (self.q_norm(q_raw), self.k_norm(k_raw)) if self.config.qk_norm else (q_raw, k_raw)
        q = q.view(B, T, self.heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        v = v_raw.view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        q_rot, k_rot = apply_rotary_pos_emb(q, k, cos, sin)
        return (q_raw, k_raw, v_raw), (q, k), (q_rot, k_rot), v

    def _swa(self, q_rot, k_rot, v, positions, start, layer: LayerCache | None, window: int,
             span: TokenSpan | None = None):
        span = span or TokenSpan.read(positions, start)
        sinks = self.config.sinks
        if layer is not None and span.fresh:
            HybridCache.write_first_sinks(layer, k_rot, v)
        elif layer is not None and span.holds_sinks(sinks):
            HybridCache.write_sinks(layer, *gather_sinks(k_rot, v, start, sinks, span.offset))
        out = swa_forward(
            q_rot, k_rot, v, positions, start, window=window, sinks=sinks, fresh=span.fresh, layer=layer
        )
        if layer is not None:
            HybridCache.write_window(layer, k_rot, v, positions)
        return out

    def _mlstm(self, x, q, k, v, positions, start, layer: LayerCache | None, padded: bool = True):
        """mLSTM branch: (B, H, T, D) in the kernel's dtype or fp32. ``padded=False`` (known on the host:
        no row has left padding among these tokens) skips masking ĩ on the device."""
        state = layer.mlstm if layer is not None else None
        step = state is not None and q.shape[2] == 1
        # the decode step and the reference compute in fp32; the chunkwise kernel takes the model's dtype
        dtype = torch.float32 if step else mlstm_dtype(q, self.head_dim, self.config.chunk_size)
        phi_q, phi_k, v, i_pre, f_pre = self.mlstm_inputs(x, q, k, v, dtype)
        if padded:
            padding = positions[None, :] < start[:, None]  # (B, T)
            i_pre = i_pre.masked_fill(padding[:, None, :], float("-inf"))
        eps = self.config.mlstm_eps
        if step:
            rep = self.heads // self.kv_heads
            h, state = mlstm_recurrent_step(
                phi_q[:, :, 0], phi_k[:, :, 0].repeat_interleave(rep, dim=1), v[:, :, 0].repeat_interleave(rep, dim=1),
                i_pre[..., 0].float(), f_pre[..., 0].float(), state, eps,
            )
            h = h.unsqueeze(2)
        else:
            h, state = mlstm_forward(
                phi_q, phi_k, v, i_pre, f_pre, chunk_size=self.config.chunk_size, state=state, eps=eps
            )
        if layer is not None:
            layer.mlstm = state
        return h

    @compiled_region
    def mlstm_inputs(self, x, q, k, v, dtype: torch.dtype):
        """φ(q) (B, H, T, D), φ(k) and v (B, Hkv, T, D) in ``dtype`` (the chunkwise path reads kv heads in
        place); gate pre-activations ĩ, f̃ (B, H, T) in the model's dtype (mlstm_forward takes any)."""
        phi_q = self.fmap_q(q.to(dtype)).to(dtype)
        phi_k = self.fmap_k(k.to(dtype)).to(dtype)
        return phi_q, phi_k, v.to(dtype), self.igate(x).transpose(1, 2), self.fgate(x).transpose(1, 2)

    @compiled_region
    def hybrid_mix(self, q_raw, k_raw, v_raw, mlstm, swa):
        """o · mLSTM + (1 − o) · SWA (B, H, T, D), with o = σ(W_o [q; k; v] + b_o) per head from the raw
        projections."""
        o = torch.sigmoid(self.ogate(torch.cat([q_raw, k_raw, v_raw], dim=-1))).transpose(1, 2).unsqueeze(-1)
        # one operator for swa + o·(mlstm − swa); lerp wants one dtype, and under autocast swa and o come
        # back in bf16 while mlstm is in the residual's dtype (no copy when they already agree)
        dtype = mlstm.dtype
        return torch.lerp(swa.to(dtype), mlstm, o.to(dtype))

    def forward(self, x, cos, sin, positions, start, layer: LayerCache | None = None,
                span: TokenSpan | None = None):
        """x: (B, T, d) block input after the input norm; positions: (T,) absolute slots; start: (B,).

        span: the host-side facts about these tokens (the model passes them); read here if None.
        """
        B, T, _ = x.shape
        mixer = self.config.mixer
        span = span or TokenSpan.read(positions, start)
        (q_raw, k_raw, v_raw), (q, k), (q_rot, k_rot), v = self.project(x, cos, sin)
        if mixer != "mlstm":
            swa = self._swa(q_rot, k_rot, v, positions, start, layer, self.config.window, span)
        if mixer != "swa":
            fq, fk = (q_rot, k_rot) if self.config.fmap_after_rope else (q, k)
            mlstm = self._mlstm(x, fq, fk, v, positions, start, layer, span.padded).to(x.dtype)
        if mixer == "hybrid":
            h = self.hybrid_mix(q_raw, k_raw, v_raw, mlstm, swa)
        else:
            h = swa if mixer == "swa" else mlstm
        return self.o_proj(h.transpose(1, 2).reshape(B, T, -1))

    def teacher_forward(self, x, cos, sin, positions, start, span: TokenSpan | None = None):
        """The teacher's own attention (full causal softmax) with the shared projections."""
        B, T, _ = x.shape
        span = span or TokenSpan.read(positions, start)
        _, _, (q_rot, k_rot), v = self.project(x, cos, sin)
        h = self._swa(q_rot, k_rot, v, positions, start, None, span.offset + T, span)
        return self.o_proj(h.transpose(1, 2).reshape(B, T, -1))


class DecoderLayer(nn.Module):
    def __init__(self, config: XLSTMStudentConfig, layer_idx: int):
        super().__init__()
        self.post_norm = config.teacher_family == "olmo2"
        self.self_attn = HybridAttention(config, layer_idx)
        self.mlp = MLP(config)
        if not self.post_norm:
            self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if self.post_norm:
            self.post_feedforward_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def attention_input(self, hidden):
        """x_t of DESIGN.md: the block input after the teacher's input norm (Olmo2 has none)."""
        return hidden if self.post_norm else self.input_layernorm(hidden)

    def forward(self, hidden, cos, sin, positions, start, layer: LayerCache | None = None,
                span: TokenSpan | None = None):
        attn = self.self_attn(self.attention_input(hidden), cos, sin, positions, start, layer, span)
        return self.finish(hidden, attn)

    @compiled_region
    def finish(self, hidden, attn):
        """Residuals, norms and MLP after the attention output (teacher's placement)."""
        if self.post_norm:
            hidden = hidden + self.post_attention_layernorm(attn)
            return hidden + self.post_feedforward_layernorm(self.mlp(hidden))
        hidden = hidden + attn
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class XLSTMStudentPreTrainedModel(PreTrainedModel):
    config_class = XLSTMStudentConfig
    base_model_prefix = "model"
    _no_split_modules = ["DecoderLayer"]
    supports_gradient_checkpointing = False

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the model builds its own HybridCache

    def _init_weights(self, module):
        # transformers' defaults cover Linear, Embedding, RMSNorm and the rotary buffers; values
        # loaded from a checkpoint are flagged and left alone. New parameters get their real
        # values from convert_teacher (seeded); this only matters for plain construction.
        super()._init_weights(module)
        if isinstance(module, FeatureMap):
            init.copy_(module.weight, torch.eye(module.weight.shape[-1]).expand_as(module.weight))
            init.zeros_(module.bias)


class XLSTMStudentModel(XLSTMStudentPreTrainedModel):
    def __init__(self, config: XLSTMStudentConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.post_init()

    def locate(self, input_ids, attention_mask, past: HybridCache | None):
        """Absolute slots (T,), each row's first real index (B,), RoPE position ids (B, T) and the
        TokenSpan. The forward's only host sync is here, and only with an attention mask (to check it)."""
        B, T = input_ids.shape
        offset = past.seen if past is not None else 0
        slots = torch.arange(offset, offset + T, device=input_ids.device)
        if attention_mask is not None:
            mask = attention_mask.bool()
            start = (~mask).sum(-1)
            expected = torch.arange(mask.shape[1], device=mask.device)[None] >= start[:, None]
            not_left, last_start = torch.stack([(mask != expected).any().long(), start.max()]).tolist()
            if not_left:
                raise ValueError("attention_mask must be left padding (zeros, then ones); other masks are not supported")
        elif past is not None:
            start, last_start = past.start, past.last_start
        else:
            start, last_start = torch.zeros(B, dtype=torch.long, device=input_ids.device), 0
        position_ids = (slots[None, :] - start[:, None]).clamp(min=0)
        return slots, start, position_ids, TokenSpan(offset, last_start)

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False, **kwargs):
        slots, start, default_pos, span = self.locate(input_ids, attention_mask, past_key_values)
        position_ids = default_pos if position_ids is None else position_ids
        hidden = self.embed_tokens(input_ids)
        if use_cache and past_key_values is None:
            past_key_values = HybridCache(
                self.config, input_ids.shape[0], start, span.last_start, device=hidden.device, dtype=hidden.dtype
            )
        cos, sin = self.rotary_emb(hidden, position_ids)
        for i, layer in enumerate(self.layers):
            cache_layer = past_key_values.layers[i] if past_key_values is not None else None
            hidden = layer(hidden, cos, sin, slots, start, cache_layer, span)
        if past_key_values is not None:
            past_key_values.seen += input_ids.shape[1]
        return self.norm(hidden), past_key_values


class XLSTMStudentForCausalLM(XLSTMStudentPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: XLSTMStudentConfig):
        super().__init__(config)
        self.model = XLSTMStudentModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values: HybridCache | None = None,
        labels=None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ):
        use_cache = bool(use_cache) or past_key_values is not None
        hidden, cache = self.model(input_ids, attention_mask, position_ids, past_key_values, use_cache)
        logits = self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=cache if use_cache else None)

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None, **kwargs):
        if past_key_values is not None:
            input_ids = input_ids[:, past_key_values.seen :]
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "past_key_values": past_key_values,
            "use_cache": kwargs.get("use_cache", True),
        }
