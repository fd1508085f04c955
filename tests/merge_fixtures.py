"""Student-shaped checkpoints of random tensors for the merge tests and benchmark (no model code).

Tensor names and shapes follow the xLSTM student of a Llama / Qwen2 / Olmo2 teacher: the teacher's
own tensors plus per-layer feature maps and gates. Experts of one seed are the seed plus noise.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from xmerge.modeling.config import XLSTMStudentConfig

ARCHITECTURE = "XLSTMStudentForCausalLM"


def student_shapes(
    family: str = "llama",
    layers: int = 2,
    hidden: int = 32,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 8,
    intermediate: int = 48,
    vocab: int = 64,
    tied: bool = False,
) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} of a student; qwen2 adds q/k/v biases, olmo2 QK-norm and post-norms."""
    q_dim, kv_dim = heads * head_dim, kv_heads * head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        layer = {
            "self_attn.q_proj.weight": (q_dim, hidden),
            "self_attn.k_proj.weight": (kv_dim, hidden),
            "self_attn.v_proj.weight": (kv_dim, hidden),
            "self_attn.o_proj.weight": (hidden, q_dim),
            "self_attn.fmap_q.weight": (heads, head_dim, head_dim),
            "self_attn.fmap_q.bias": (heads, head_dim),
            "self_attn.fmap_k.weight": (kv_heads, head_dim, head_dim),
            "self_attn.fmap_k.bias": (kv_heads, head_dim),
            "self_attn.igate.weight": (heads, hidden),
            "self_attn.igate.bias": (heads,),
            "self_attn.fgate.weight": (heads, hidden),
            "self_attn.fgate.bias": (heads,),
            "self_attn.ogate.weight": (heads, q_dim + 2 * kv_dim),
            "self_attn.ogate.bias": (heads,),
            "mlp.gate_proj.weight": (intermediate, hidden),
            "mlp.up_proj.weight": (intermediate, hidden),
            "mlp.down_proj.weight": (hidden, intermediate),
            "post_attention_layernorm.weight": (hidden,),
        }
        if family == "qwen2":
            layer |= {f"self_attn.{x}_proj.bias": (d,) for x, d in (("q", q_dim), ("k", kv_dim), ("v", kv_dim))}
        if family == "olmo2":
            layer |= {
                "self_attn.q_norm.weight": (q_dim,),
                "self_attn.k_norm.weight": (kv_dim,),
                "post_feedforward_layernorm.weight": (hidden,),
            }
        else:
            layer["input_layernorm.weight"] = (hidden,)
        shapes |= {p + name: shape for name, shape in layer.items()}
    shapes["model.norm.weight"] = (hidden,)
    if not tied:
        shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def random_tensors(shapes: dict[str, tuple[int, ...]], seed: int, dtype=torch.float32) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=generator).to(dtype) for name, shape in shapes.items()}


def perturbed(tensors: dict[str, torch.Tensor], seed: int, scale: float = 0.1) -> dict[str, torch.Tensor]:
    """An "expert": every tensor plus Gaussian noise of std `scale` (same dtype)."""
    generator = torch.Generator().manual_seed(seed)
    return {
        name: (t.float() + scale * torch.randn(t.shape, generator=generator)).to(t.dtype) for name, t in tensors.items()
    }


def write_student(model_dir: Path, tensors: dict[str, torch.Tensor], family: str = "llama") -> Path:
    """Save `tensors` as `model_dir/model.safetensors` with an xlstm_student config.json read off their shapes."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    embed = tensors["model.embed_tokens.weight"]
    layers = 1 + max(int(name.split(".")[2]) for name in tensors if name.startswith("model.layers."))
    heads, head_dim, _ = tensors["model.layers.0.self_attn.fmap_q.weight"].shape
    config = XLSTMStudentConfig(
        vocab_size=embed.shape[0],
        hidden_size=embed.shape[1],
        intermediate_size=tensors["model.layers.0.mlp.gate_proj.weight"].shape[0],
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=tensors["model.layers.0.self_attn.fmap_k.weight"].shape[0],
        head_dim=head_dim,
        attention_bias=family == "qwen2",
        qk_norm=family == "olmo2",
        teacher_family=family,
        tie_word_embeddings="lm_head.weight" not in tensors,
        architectures=[ARCHITECTURE],
    )
    config.save_pretrained(model_dir)
    save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})
    return model_dir
