"""CPU pieces of the fused decode step (modeling/decode_graph.py): the packed q/k/v/gate projection.

The kernel itself needs triton (tests/test_gpu_decode.py, on the device or in the Triton interpreter);
the pure-PyTorch decode step it is tested against is held to the eager forward in
tests/test_gpu_student.py::test_graph_safe_decode_step_equals_eager_step (runs on CPU).
"""

from __future__ import annotations

import pytest
import torch

from common import tiny_student
from xmerge.modeling.decode_graph import fused_inputs, fused_step_takes, pack_projections


@pytest.mark.parametrize("family", ["llama", "qwen2", "olmo2"])  # no biases / q,k,v biases / QK-norm
def test_packed_projection_gives_the_layer_projections(family):
    model = tiny_student(family)
    x = torch.randn(3, 1, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    packed = pack_projections(model, torch.float32)
    assert len(packed) == model.config.num_hidden_layers
    with torch.no_grad():
        for layer, pack in zip(model.model.layers, packed):
            attn = layer.self_attn
            proj, q, k = fused_inputs(attn, x, pack)
            H, Hkv, D = attn.heads, attn.kv_heads, attn.head_dim
            raw_q, raw_k, raw_v, i_pre, f_pre = proj.split([H * D, Hkv * D, Hkv * D, H, H], dim=1)
            for got, module in ((raw_q, attn.q_proj), (raw_k, attn.k_proj), (raw_v, attn.v_proj),
                                (i_pre, attn.igate), (f_pre, attn.fgate)):
                assert torch.equal(got, module(x)[:, 0])
            cos, sin = torch.ones(3, 1, D), torch.zeros(3, 1, D)  # only the pre-RoPE q/k are compared
            _, (want_q, want_k), _, _ = attn.project(x, cos, sin)
            assert torch.equal(q, want_q.transpose(1, 2).reshape(3, -1))
            assert torch.equal(k, want_k.transpose(1, 2).reshape(3, -1))


def test_pack_casts_once_to_the_compute_dtype():
    model = tiny_student("qwen2")
    attn = model.model.layers[1].self_attn
    weight, bias = pack_projections(model, torch.bfloat16)[1]
    assert weight.dtype == bias.dtype == torch.bfloat16
    D = attn.head_dim
    N = (attn.heads + 2 * attn.kv_heads) * D + 2 * attn.heads
    assert weight.shape == (N, model.config.hidden_size) and bias.shape == (N,)
    assert torch.equal(weight[: attn.heads * D], attn.q_proj.weight.to(torch.bfloat16))
    assert torch.equal(bias[-attn.heads :], attn.fgate.bias.to(torch.bfloat16))


def test_fused_step_stays_off_on_cpu():
    model = tiny_student("llama")
    assert not fused_step_takes(model, torch.zeros(1))
