"""CPU pieces of the fused decode step (modeling/decode_graph.py): the packed projections, and the MLP's
torch fallback for activations the Triton kernels do not take.

The kernels themselves need triton (tests/test_gpu_decode.py, on the device or in the Triton interpreter);
the pure-PyTorch decode step they are tested against is held to the eager forward in
tests/test_gpu_student.py::test_graph_safe_decode_step_equals_eager_step (runs on CPU).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM

from common import tiny_student, tiny_teacher
from xmerge.modeling.convert import convert_teacher
from xmerge.modeling.decode_graph import (
    ROW_PRODUCTS_MAX_B, Products, fused_step_takes, pack_projections, row_products_take,
)


def llama_student_with(**teacher_fields):
    """A tiny Llama student whose teacher config has ``teacher_fields`` changed (biases perturbed)."""
    config = tiny_teacher("llama").config
    for name, value in teacher_fields.items():
        setattr(config, name, value)
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in teacher.named_parameters():
            if name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return convert_teacher(teacher, window=8, sinks=3, chunk_size=4).eval()


STUDENTS = {  # no biases / q,k,v biases / QK-norm / MLP biases
    "llama": lambda: tiny_student("llama"),
    "qwen2": lambda: tiny_student("qwen2"),
    "olmo2": lambda: tiny_student("olmo2"),
    "llama-mlp-bias": lambda: llama_student_with(mlp_bias=True),
}


@pytest.mark.parametrize("name", list(STUDENTS))
def test_packed_projections_give_the_layer_projections(name):
    model = STUDENTS[name]()
    x = torch.randn(3, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    packed = pack_projections(model, torch.float32)
    assert len(packed) == model.config.num_hidden_layers
    with torch.no_grad():
        for layer, pack in zip(model.model.layers, packed):
            attn, mlp = layer.self_attn, layer.mlp
            H, Hkv, D = attn.heads, attn.kv_heads, attn.head_dim
            proj = F.linear(x, *pack.qkv).split([H * D, Hkv * D, Hkv * D, H, H, H], dim=1)
            for got, module in zip(proj, (attn.q_proj, attn.k_proj, attn.v_proj, attn.igate, attn.fgate)):
                assert torch.equal(got, module(x))
            # õ: the output gate's pre-activation, folded into one product with the layer's input
            o_pre = attn.ogate(torch.cat(proj[:3], dim=1))
            torch.testing.assert_close(proj[5], o_pre, rtol=1e-5, atol=1e-5)
            assert not torch.equal(proj[5], torch.zeros_like(proj[5]))
            gate, up = F.linear(x, *pack.gate_up).chunk(2, dim=1)
            assert torch.equal(gate, mlp.gate_proj(x)) and torch.equal(up, mlp.up_proj(x))
            assert (pack.gate_up[1] is None) == (name != "llama-mlp-bias")
            wide = torch.randn(3, mlp.down_proj.in_features, generator=torch.Generator().manual_seed(1))
            assert torch.equal(F.linear(x, *pack.o), attn.o_proj(x))
            assert torch.equal(F.linear(wide, *pack.down), mlp.down_proj(wide))
            assert pack.o[0].data_ptr() == attn.o_proj.weight.data_ptr()  # in the compute dtype: not copied


def test_pack_casts_once_to_the_compute_dtype():
    model = llama_student_with(mlp_bias=True)
    layer = model.model.layers[1]
    attn, mlp = layer.self_attn, layer.mlp
    pack = pack_projections(model, torch.bfloat16)[1]
    assert all(t.dtype == torch.bfloat16 for t in (*pack.qkv, *pack.gate_up, *pack.down, pack.o[0]))
    D, d, inter = attn.head_dim, model.config.hidden_size, model.config.intermediate_size
    N = (attn.heads + 2 * attn.kv_heads) * D + 3 * attn.heads
    assert pack.qkv[0].shape == (N, d) and pack.qkv[1].shape == (N,)
    assert pack.gate_up[0].shape == (2 * inter, d) and pack.gate_up[1].shape == (2 * inter,)
    assert torch.equal(pack.qkv[0][: attn.heads * D], attn.q_proj.weight.to(torch.bfloat16))
    assert torch.equal(pack.qkv[1][-2 * attn.heads : -attn.heads], attn.fgate.bias.to(torch.bfloat16))
    assert torch.equal(pack.gate_up[0][inter:], mlp.up_proj.weight.to(torch.bfloat16))
    assert torch.equal(pack.gate_up[1][:inter], mlp.gate_proj.bias.to(torch.bfloat16))
    assert torch.equal(pack.down[0], mlp.down_proj.weight.to(torch.bfloat16))
    assert torch.equal(pack.down[1], mlp.down_proj.bias.to(torch.bfloat16))


def test_mlp_without_silu_runs_the_modules_activation():
    model = llama_student_with(hidden_act="gelu_pytorch_tanh", mlp_bias=True)
    x = torch.randn(3, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    packed = pack_projections(model, torch.float32)
    products = Products(rows=False, dtype=torch.float32)
    with torch.no_grad():
        for layer, pack in zip(model.model.layers, packed):
            gate_up = products.plain(x, pack.gate_up)
            assert torch.equal(products.down(layer.mlp, gate_up, pack.down, silu=False), layer.mlp(x))


def test_fused_step_stays_off_on_cpu():
    model = tiny_student("llama")
    assert not fused_step_takes(model, torch.zeros(1))


def test_fused_step_takes_only_a_static_rope(monkeypatch):
    """The kernel makes the RoPE rows from inv_freq: RoPE types that rescale it with the length stay off."""
    from xmerge.modeling import decode_graph

    monkeypatch.setattr(decode_graph, "kernels_enabled", lambda x: True)  # as on CUDA with triton
    model = tiny_student("llama")
    assert fused_step_takes(model, torch.zeros(1))
    for rope_type in ("dynamic", "longrope"):
        monkeypatch.setattr(model.model.rotary_emb, "rope_type", rope_type)
        assert not fused_step_takes(model, torch.zeros(1))


def test_row_products_take_few_rows_of_one_tile_width():
    config = tiny_student("llama").config  # hidden 64, intermediate 128, 4 heads × 16
    assert row_products_take(config, 1, 2048) and row_products_take(config, ROW_PRODUCTS_MAX_B, 2048)
    assert not row_products_take(config, ROW_PRODUCTS_MAX_B + 1, 2048)  # cuBLAS tiles for wider batches
    assert row_products_take(config, 1, 128) and not row_products_take(config, 1, 127)  # intermediate too wide
