"""The fused Triton decode step (kernels/decode_step.py, kernels/decode_rowwise.py) against the
pure-PyTorch reference.

Marked gpu: CI (no CUDA) skips them. They also run on CPU in the Triton interpreter:
``TRITON_INTERPRET=1 PYTHONPATH=/tmp/triton-site .venv/bin/pytest -q tests/test_gpu_decode.py``
(the CUDA-graph and autocast tests still need CUDA). Errors are relative in the Frobenius norm.
Tolerances: fp32 1e-5 (same math, other summation order); row kernels against the torch modules
fp32 1e-6, bf16 4e-3 on CUDA (at most one rounding apart), 1.6e-2 in the interpreter (it truncates
fp32 -> bf16 instead of rounding to nearest: up to 2^-7 per cast, two casts in a row); bf16 weights and buffers against the fp32
reference 2e-2; under bf16 autocast within max(2e-2, 2 × the reference path's own autocast error).
"""

from __future__ import annotations

import copy
import importlib.util
import itertools
import math
import os

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from common import gpu, tiny_student, tiny_teacher
from test_kernels_decode import llama_student_with
from xmerge.modeling.convert import convert_teacher
from xmerge.modeling.student import RMSNorm
from xmerge.modeling.mlstm import mlstm_recurrent_step
from xmerge.modeling.swa import window_sink_attention

CUDA = torch.cuda.is_available()
INTERPRETED = not CUDA and os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None
DEVICE = "cuda" if CUDA else "cpu"
kernel_test = (lambda test: test) if INTERPRETED else gpu  # the interpreter runs the kernel on CPU tensors
WINDOW, SINKS = 8, 3


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def reference_branches(proj, cos, sin, pos, start, state, fmaps, ogate, ring, sinks, *, H, Hkv, mixer, after_rope, eps):
    """The kernel's contract written with the student's reference functions: h (B, H, D), new state, new ring."""
    B, D, rep = proj.shape[0], fmaps[0][0].shape[-1], H // Hkv
    qd, kd = H * D, Hkv * D
    q = proj[:, :qd].view(B, H, 1, D)
    k = proj[:, qd : qd + kd].view(B, Hkv, 1, D)
    v = proj[:, qd + kd : qd + 2 * kd].view(B, Hkv, 1, D)
    i_pre, f_pre = proj[:, qd + 2 * kd : qd + 2 * kd + 2 * H].split(H, dim=1)
    q_rot, k_rot = apply_rotary_pos_emb(q, k, cos[:, None], sin[:, None])
    ring_k, ring_v, ring_pos = (t.clone() for t in ring)
    outs = {}
    if mixer != "swa":
        fq, fk = (q_rot, k_rot) if after_rope else (q, k)
        phi = [torch.softmax(torch.einsum("bhd,hde->bhe", u[:, :, 0], w) + b, dim=-1)
               for u, (w, b) in zip((fq, fk), fmaps)]
        outs["mlstm"], state = mlstm_recurrent_step(
            phi[0], phi[1].repeat_interleave(rep, 1), v[:, :, 0].repeat_interleave(rep, 1), i_pre, f_pre, state, eps
        )
    if mixer != "mlstm":
        positions = torch.tensor([pos], device=proj.device)
        outs["swa"] = window_sink_attention(
            q_rot, torch.cat([ring_k, k_rot], 2), torch.cat([ring_v, v], 2), torch.cat([ring_pos, positions]),
            *sinks, q_pos=positions, start=start, window=ring_pos.shape[0],
        )[:, :, 0]
        slot = pos % ring_pos.shape[0]
        ring_k[:, :, slot], ring_v[:, :, slot], ring_pos[slot] = k_rot[:, :, 0], v[:, :, 0], pos
    if mixer == "hybrid":
        o = torch.sigmoid(proj[:, : qd + 2 * kd] @ ogate[0].T + ogate[1])[..., None]
        h = o * outs["mlstm"] + (1 - o) * outs["swa"]
    else:
        h = outs[mixer]
    return h, state, (ring_k, ring_v, ring_pos)


@kernel_test
@pytest.mark.parametrize("H,Hkv,D,W,S,mixer,after_rope,launch,split", [
    (9, 3, 64, 100, 4, "hybrid", False, None, 0),  # SmolLM2 heads, W not a power of two, one program a head
    (9, 3, 64, 100, 4, "hybrid", False, (16, 2), 0),  # seven ring blocks
    (9, 3, 64, 100, 4, "hybrid", False, (256, 8), 0),  # one block wider than the ring
    (9, 3, 64, 100, 4, "hybrid", False, None, None),  # the default split (2 window programs at B·H = 27)
    (9, 3, 64, 100, 4, "hybrid", False, (8, 4), 2),  # split, each share over four ring blocks
    (9, 3, 64, 100, 4, "hybrid", False, None, 8),  # split 8 ways: 13 slots a share, the last one 9
    (4, 4, 32, 64, 0, "hybrid", True, None, None),  # no GQA, no sinks, feature maps on rotated q/k
    (6, 2, 16, 5, 7, "hybrid", False, None, None),  # more sinks than window
    (6, 2, 16, 5, 7, "hybrid", False, None, 4),  # split wider than the window: shares of 2, the last empty
    (4, 2, 16, 100, 4, "swa", False, None, 0),
    (4, 2, 16, 100, 4, "swa", False, None, 2),
    (4, 2, 16, 100, 4, "mlstm", True, None, None),
    (6, 2, 128, 64, 2, "hybrid", False, None, 0),  # wider heads: their default launch
])
def test_kernel_equals_reference_branches(H, Hkv, D, W, S, mixer, after_rope, launch, split):
    from xmerge.kernels.decode_step import fused_decode_step

    g = torch.Generator().manual_seed(0)
    rnd = lambda *shape: torch.randn(*shape, generator=g).to(DEVICE)  # noqa: E731
    B, pos, eps = 3, 150, 1e-6
    ogate = (0.1 * rnd(H, (H + 2 * Hkv) * D), rnd(H))
    raw = rnd(B, (H + 2 * Hkv) * D + 2 * H)
    proj = torch.cat([raw, raw[:, : (H + 2 * Hkv) * D] @ ogate[0].T + ogate[1]], 1)  # õ: the output gate's input
    start = torch.tensor([0, 70, 140], device=DEVICE)[:B]  # row 1: sinks inside the window; row 2: short
    rotary = LlamaRotaryEmbedding(config=LlamaConfig(hidden_size=H * D, num_attention_heads=H, head_dim=D)).to(DEVICE)
    rotary.attention_scaling = 1.25  # as YaRN scales the rows
    cos, sin = (t[:, 0] for t in rotary(proj, (pos - start).clamp(min=0)[:, None]))  # the rows the kernel makes
    state = (rnd(B, H, D, D).abs(), rnd(B, H, D).abs(), rnd(B, H))
    state[2][0, 0] = float("-inf")  # a head with no mass yet
    fmaps = ((rnd(H, D, D), rnd(H, D)), (rnd(Hkv, D, D), rnd(Hkv, D)))
    ring_pos = torch.arange(pos - W, pos, device=DEVICE)
    ring_pos = ring_pos[torch.argsort(ring_pos % W)]  # slot = position % W, slot pos % W holds the stale pos - W
    ring = (rnd(B, Hkv, W, D), rnd(B, Hkv, W, D), ring_pos)
    sink_pos = start[:, None] + torch.arange(S, device=DEVICE)
    sinks = (rnd(B, Hkv, S, D), rnd(B, Hkv, S, D), sink_pos)
    want_h, want_state, want_ring = reference_branches(
        proj, cos, sin, pos, start, state, fmaps, ogate, ring, sinks, H=H, Hkv=Hkv, mixer=mixer,
        after_rope=after_rope, eps=eps,
    )
    state = tuple(t.clone() for t in state)
    arrivals = torch.zeros(B * H, dtype=torch.int32, device=DEVICE)
    h = fused_decode_step(
        proj, proj[:, : H * D], proj[:, H * D : (H + Hkv) * D], (rotary.inv_freq, 1.25, torch.float32),
        torch.tensor([pos], device=DEVICE), start, state, *fmaps, ring, sinks, mixer=mixer,
        fmap_after_rope=after_rope, eps=eps, launch=launch, split=split, arrivals=arrivals,
    )
    assert rel_err(h, want_h) < 1e-5
    assert not arrivals.any()  # the split step's counters are left at zero for the next step
    if mixer != "swa":
        for got, want in zip(state, want_state):
            assert rel_err(got.nan_to_num(neginf=0), want.nan_to_num(neginf=0)) < 1e-5
        assert state[2][0, 0] != float("-inf") and torch.equal(state[2].isinf(), want_state[2].isinf())
    for got, want in zip(ring, want_ring):
        assert rel_err(got.float(), want.float()) < 1e-6


@kernel_test
@pytest.mark.parametrize("launch", [(48, 4), (0, 4), (64, 3)])
def test_kernel_refuses_a_bad_launch_or_rope(launch):
    from xmerge.kernels.decode_step import fused_decode_step

    z = torch.zeros
    fmaps = ((z(2, 16, 16), z(2, 16)), (z(1, 16, 16), z(1, 16)))
    ring, sinks = (z(1, 1, 8, 16), z(1, 1, 8, 16), z(8)), (z(1, 1, 2, 16), z(1, 1, 2, 16), z(1, 2))
    step = lambda **kw: fused_decode_step(  # noqa: E731
        z(1, 70), z(1, 32), z(1, 16), kw.get("rope", (z(8), 1.0, torch.float32)), z(1), z(1), (z(1), z(1), z(1)),
        *fmaps, ring, sinks, mixer="hybrid", fmap_after_rope=False, eps=1e-6, launch=kw.get("launch"),
        split=kw.get("split"), arrivals=kw.get("arrivals"))
    with pytest.raises(ValueError, match="powers of two"):
        step(launch=launch)
    with pytest.raises(ValueError, match="split=3"):
        step(split=3)
    with pytest.raises(ValueError, match="arrivals must be"):  # B·H = 2 counters, int32
        step(split=2, arrivals=z(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="RoPE"):
        step(rope=(z(16), 1.0, torch.float32))  # inv_freq is D/2 wide


ROW_DTYPES = {  # hidden, delta, norm weight: fp32 model, bf16 model, fp32 model under bf16 autocast
    "fp32": (torch.float32, torch.float32, torch.float32),
    "bf16": (torch.bfloat16, torch.bfloat16, torch.bfloat16),
    "autocast": (torch.float32, torch.bfloat16, torch.float32),
}


@kernel_test
@pytest.mark.parametrize("dtypes", list(ROW_DTYPES))
def test_row_kernels_equal_the_torch_modules(dtypes):
    from xmerge.kernels.decode_rowwise import add_normed, add_rms_norm, rms_norm, silu_mul

    hidden_dtype, delta_dtype, weight_dtype = ROW_DTYPES[dtypes]
    tol = 1e-6 if dtypes == "fp32" else 4e-3 if CUDA else 1.6e-2
    g = torch.Generator().manual_seed(0)
    rnd = lambda *shape: torch.randn(*shape, generator=g).to(DEVICE)  # noqa: E731
    B, N, inter = 3, 576, 1536  # SmolLM2's widths: N not a power of two, two SiLU blocks per row
    norm = RMSNorm(N, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(N, generator=g))
    norm = norm.to(DEVICE, weight_dtype)
    hidden, delta = (4 * rnd(B, N)).to(hidden_dtype), rnd(B, N).to(delta_dtype)
    rows = rnd(B, 2 * N).to(delta_dtype)[:, N // 2 : N // 2 + N]  # a strided view, as q/k in the packed projection
    gate_up = rnd(B, 3 * inter).to(delta_dtype)[:, : 2 * inter]

    def check(got, want):
        assert got.dtype == want.dtype and rel_err(got, want) < tol

    with torch.no_grad():
        residual, normed = add_rms_norm(hidden, delta, norm.weight, norm.eps)
        check(residual, hidden + delta)
        check(normed, norm(hidden + delta))
        check(add_normed(hidden, delta, norm.weight, norm.eps), hidden + norm(delta))
        check(rms_norm(rows, norm.weight, norm.eps), norm(rows))
        check(silu_mul(gate_up), torch.nn.functional.silu(gate_up[:, :inter]) * gate_up[:, inter:])


@kernel_test
@pytest.mark.parametrize("dtypes", list(ROW_DTYPES))
@pytest.mark.parametrize("B", [1, 3])
def test_row_products_equal_torch(dtypes, B):
    """The few-row products (plain, residual add + RMSNorm folded in, SiLU folded in) against F.linear
    after the torch modules, with biases, a strided input and the residual they store."""
    from xmerge.kernels.decode_rowwise import linear, norm_linear, silu_linear

    hidden_dtype, delta_dtype, weight_dtype = ROW_DTYPES[dtypes]
    compute = torch.bfloat16 if dtypes == "autocast" else weight_dtype  # the packed weights' dtype
    tol = 1e-5 if dtypes == "fp32" else 8e-3 if CUDA else 1.6e-2  # the interpreter: as for the row kernels
    g = torch.Generator().manual_seed(1)
    rnd = lambda *shape: torch.randn(*shape, generator=g).to(DEVICE)  # noqa: E731
    K, N, inter = 576, 978, 1536  # SmolLM2's hidden, packed q/k/v/gates and intermediate widths
    norm = RMSNorm(K, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(K, generator=g))
    norm = norm.to(DEVICE, weight_dtype)
    w, bias = (rnd(N, K) / K**0.5).to(compute), rnd(N).to(compute)
    w_down = (rnd(K, inter) / inter**0.5).to(compute)
    hidden, delta = (4 * rnd(B, K)).to(hidden_dtype), rnd(B, K).to(delta_dtype)
    rows = rnd(B, 2 * K).to(compute)[:, K // 2 : K // 2 + K]  # a strided view: any row stride is taken
    gate_up = rnd(B, 3 * inter).to(compute)[:, : 2 * inter]

    def check(got, want):
        assert got.dtype == want.dtype and rel_err(got, want) < tol

    F = torch.nn.functional
    with torch.no_grad():
        check(linear(rows, w, bias), F.linear(rows, w, bias))
        check(linear(rows, w), F.linear(rows, w))
        residual, y = norm_linear(hidden, w, bias, norm.weight, norm.eps, delta)
        check(residual, hidden + delta)
        check(y, F.linear(norm(hidden + delta).to(compute), w, bias))
        residual, y = norm_linear(hidden, w, None, norm.weight, norm.eps)
        assert residual is None
        check(y, F.linear(norm(hidden).to(compute), w))
        act = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
        check(silu_linear(gate_up, w_down), F.linear(act, w_down))
        with pytest.raises(ValueError, match="at most"):
            linear(torch.zeros(B, 4096, device=DEVICE), torch.zeros(8, 4096, device=DEVICE))
        with pytest.raises(ValueError, match="weight"):
            linear(rows, w.t())


@kernel_test
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B", [1, 3])
def test_norm_linear_argmax_is_the_first_largest_logit(dtype, B):
    """The LM head with the greedy argmax folded in: the logits as without it, and each row's index the
    first largest of them, also where equal logits sit in different programs' rows and one is NaN."""
    from xmerge.kernels.decode_rowwise import LINEAR_BLOCK_ROWS, norm_linear

    g = torch.Generator().manual_seed(2)
    K, V = 64, 1001  # V not a multiple of the rows per program
    w = torch.randn(V, K, generator=g).to(DEVICE, dtype)
    hidden, delta = torch.randn(B, K, generator=g).to(DEVICE, dtype), torch.randn(B, K, generator=g).to(DEVICE, dtype)
    norm_w = torch.ones(K, device=DEVICE, dtype=dtype)
    tie = [3, 3 + LINEAR_BLOCK_ROWS, V - 1]  # rows of three programs, the first one's row first
    with torch.no_grad():
        _, want = norm_linear(hidden, w, None, norm_w, 1e-5, delta)
        w[tie] = 10 * w[want[0].argmax()]  # row 0's logits tie at the top in those three rows
        _, want = norm_linear(hidden, w, None, norm_w, 1e-5, delta)
        ids = torch.full((B, 1), -1, dtype=torch.int64, device=DEVICE)
        _, logits = norm_linear(hidden, w, None, norm_w, 1e-5, delta, ids=ids)
        assert torch.equal(logits, want)
        assert torch.equal(ids, logits.argmax(-1, keepdim=True)) and ids[0, 0] == tie[0]
        w[500, 0] = float("nan")  # NaN logits in every row: torch ranks NaN above all
        _, logits = norm_linear(hidden, w, None, norm_w, 1e-5, delta, ids=ids)
        assert torch.equal(ids, logits.argmax(-1, keepdim=True)) and (ids == 500).all()
        with pytest.raises(ValueError, match="ids"):
            norm_linear(hidden, w, None, norm_w, 1e-5, delta, ids=ids.int())


def prefilled(model, prompt_len: int = 20):
    """The model's cache after a left-padded prompt of 2 rows (row 1: 5 pads) and the next tokens."""
    ids = torch.randint(0, 259, (2, prompt_len), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    out = model(ids, attention_mask=mask, use_cache=True)
    return out.past_key_values, out.logits[:, -1:].argmax(-1)


def student(family: str, mixer: str):
    """A tiny student for the step tests; "llama-mlp-bias" has biases on gate, up and down."""
    if family == "llama-mlp-bias":
        return llama_student_with(mlp_bias=True)  # hybrid, window 8, 3 sinks
    return tiny_student(family, mixer=mixer, window=WINDOW, sinks=SINKS, chunk_size=4)


FAMILIES = ["llama", "qwen2", "olmo2"]  # pre-norm; pre-norm with q/k/v biases; post-norm with QK-norm


def products_as(rows: bool, monkeypatch):
    """Route the fused step's products to the few-row Triton launches (rows) or to cuBLAS (B = 2 here)."""
    from xmerge.modeling import decode_graph

    monkeypatch.setattr(decode_graph, "ROW_PRODUCTS_MAX_B", 4 if rows else 0)


@kernel_test
@pytest.mark.parametrize("rows", [True, False])
@pytest.mark.parametrize("mixer,family", [
    *itertools.product(["hybrid", "swa", "mlstm"], FAMILIES), ("hybrid", "llama-mlp-bias"),
])
def test_fused_step_equals_reference_step_fp32(mixer, family, rows, monkeypatch):
    from xmerge.modeling.decode_graph import decode_step, pack_projections

    products_as(rows, monkeypatch)
    model = student(family, mixer).to(DEVICE)
    with torch.no_grad():
        ref_cache, tok = prefilled(model)
        cache = copy.deepcopy(ref_cache)
        packed = pack_projections(model, torch.float32)
        slot = torch.tensor([cache.seen], device=DEVICE)
        greedy = torch.empty_like(tok)
        for _ in range(25):  # wraps the window (8) three times; row 0's sinks fall outside it
            ref = decode_step(model, tok, slot, ref_cache)
            ours = decode_step(model, tok, slot, cache, packed, next_ids=greedy)
            slot += 1
            assert rel_err(ours, ref) < 1e-5 and torch.equal(greedy, ours[:, -1:].argmax(-1))
            tok = ref[:, -1:].argmax(-1)
    for got, want in zip(cache.layers, ref_cache.layers):
        assert torch.equal(got.ring_pos, want.ring_pos)
        assert rel_err(got.ring_k, want.ring_k) < 1e-5 and rel_err(got.ring_v, want.ring_v) < 1e-5
        if mixer != "swa":
            assert all(rel_err(a, b) < 1e-5 for a, b in zip(got.mlstm, want.mlstm))  # m is finite after a step


@kernel_test
@pytest.mark.parametrize("mixer,family", [
    ("hybrid", "qwen2"), ("swa", "qwen2"), ("mlstm", "qwen2"), ("hybrid", "llama"), ("hybrid", "olmo2"),
])
def test_fused_step_bf16_within_tolerance_of_fp32_reference(mixer, family):
    from xmerge.modeling.decode_graph import decode_step, pack_projections

    model = student(family, mixer).to(DEVICE)
    half = copy.deepcopy(model).to(torch.bfloat16)
    with torch.no_grad():
        ref_cache, tok = prefilled(model)
        cache = copy.deepcopy(ref_cache)
        for layer in cache.layers:  # bf16 ring and sinks, as a bf16 model allocates them; the state stays fp32
            for name in ("ring_k", "ring_v", "sink_k", "sink_v"):
                setattr(layer, name, getattr(layer, name).to(torch.bfloat16))
        packed = pack_projections(half, torch.bfloat16)
        slot = torch.tensor([cache.seen], device=DEVICE)
        for _ in range(20):
            ref = decode_step(model, tok, slot, ref_cache)
            ours = decode_step(half, tok, slot, cache, packed)
            slot += 1
            assert ours.dtype == torch.bfloat16 and rel_err(ours, ref) < 2e-2
            tok = ref[:, -1:].argmax(-1)


@gpu
def test_fused_step_under_autocast_within_reference_autocast_error():
    from xmerge.modeling.decode_graph import decode_step, pack_projections

    model = tiny_student("llama", window=WINDOW, sinks=SINKS, chunk_size=4).cuda()
    with torch.no_grad():
        exact_cache, tok = prefilled(model)
        ref_cache, cache = copy.deepcopy(exact_cache), copy.deepcopy(exact_cache)
        packed = pack_projections(model, torch.bfloat16)
        slot = torch.tensor([cache.seen], device="cuda")
        for _ in range(20):
            exact = decode_step(model, tok, slot, exact_cache)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                ref = decode_step(model, tok, slot, ref_cache)
                ours = decode_step(model, tok, slot, cache, packed)
            slot += 1
            assert rel_err(ours, exact) < max(2e-2, 2 * rel_err(ref, exact))
            tok = exact[:, -1:].argmax(-1)


@gpu
@pytest.mark.parametrize("mixer", ["hybrid", "swa", "mlstm"])
def test_graphed_decoder_with_fused_step_equals_generate(mixer, monkeypatch):
    from xmerge.modeling.decode_graph import GraphedGreedyDecoder

    model = tiny_student("llama", mixer=mixer, window=32, sinks=4, chunk_size=16).cuda()
    prompt = torch.randint(0, 259, (3, 100), device="cuda")
    mask = torch.ones_like(prompt)
    mask[1, :10] = 0
    mask[2, :60] = 0
    monkeypatch.setenv("XMERGE_KERNELS", "1")  # same kernel prefill for both; generate() decodes with the eager step
    with torch.no_grad():
        eager = model.generate(
            prompt, attention_mask=mask, max_new_tokens=70, do_sample=False, eos_token_id=None, pad_token_id=256
        )[:, 100:]
        out = model(prompt, attention_mask=mask, use_cache=True)
        decoder = GraphedGreedyDecoder(model, out.past_key_values, out.logits[:, -1:].argmax(-1))
        graphed = torch.cat([decoder.generate(30), decoder.generate(40)], dim=1)  # 70 > 2 windows
    assert decoder.packed is not None  # the fused kernel step was captured
    assert torch.equal(graphed, eager)


@gpu
def test_switch_off_or_fused_false_captures_the_reference_step(monkeypatch):
    from xmerge.modeling.decode_graph import GraphedGreedyDecoder

    model = tiny_student("llama", window=WINDOW, sinks=SINKS, chunk_size=4).cuda()
    monkeypatch.setenv("XMERGE_KERNELS", "0")
    with torch.no_grad():
        cache, tok = prefilled(model)
        assert GraphedGreedyDecoder(model, cache, tok).packed is None
    monkeypatch.setenv("XMERGE_KERNELS", "1")
    with torch.no_grad():
        cache, tok = prefilled(model)
        assert GraphedGreedyDecoder(model, cache, tok, fused=False).packed is None
        cache, tok = prefilled(model)
        assert GraphedGreedyDecoder(model, cache, tok).packed is not None


@kernel_test
@pytest.mark.parametrize("family,rows,launches", [
    ("llama", True, 5), ("llama", False, 8), ("olmo2", True, 9), ("olmo2", False, 10),
])
def test_fused_step_launches_few_kernels_per_layer(family, rows, launches, monkeypatch):
    """Launches per layer of the fused step: the ops the torch dispatcher runs (views and allocations
    excluded) plus the Triton kernels, against the reference step's ops (the interpreter's own torch ops
    inside a Triton call are not counted)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from xmerge.kernels.decode_rowwise import _norm_rows
    from xmerge.modeling.decode_graph import decode_step, pack_projections

    products_as(rows, monkeypatch)

    class CountOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = self.allocations = self.triton = 0
            self.paused = False

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not (self.paused or func.is_view):
                allocation = func.overloadpacket in (torch.ops.aten.new_empty, torch.ops.aten.empty)
                self.allocations += allocation
                self.ops += not allocation
            return func(*args, **(kwargs or {}))

    counter = None
    kernel_class = type(_norm_rows)  # JITFunction on CUDA, InterpretedFunction in the interpreter
    run = kernel_class.run

    def counted_run(self, *args, **kwargs):
        if counter is None:
            return run(self, *args, **kwargs)
        counter.triton += 1
        counter.paused = True
        try:
            return run(self, *args, **kwargs)
        finally:
            counter.paused = False

    monkeypatch.setattr(kernel_class, "run", counted_run)
    counts = {}
    for layers in (2, 4):
        config = tiny_teacher(family).config
        config.num_hidden_layers = layers
        torch.manual_seed(0)
        teacher = type(tiny_teacher(family))(config).eval()
        model = convert_teacher(teacher, window=WINDOW, sinks=SINKS, chunk_size=4).eval().to(DEVICE)
        with torch.no_grad():
            cache, tok = prefilled(model)
            packed = pack_projections(model, torch.float32)
            slot = torch.tensor([cache.seen], device=DEVICE)
            for name, args in (("reference", ()), ("fused", (packed,))):
                decode_step(model, tok, slot, cache, *args)  # compiles the kernels outside the count
                with CountOps() as counter:
                    decode_step(model, tok, slot, cache, *args)
                counts[name, layers] = counter
                counter = None
    per_layer = {
        name: {kind: (getattr(counts[name, 4], kind) - getattr(counts[name, 2], kind)) / 2
               for kind in ("ops", "triton", "allocations")}
        for name in ("reference", "fused")
    }
    fused_launches = per_layer["fused"]["ops"] + per_layer["fused"]["triton"]
    print(f"{family} per layer per step:", per_layer, "fused launches:", fused_launches)
    assert fused_launches == launches and per_layer["reference"]["triton"] == 0
    assert per_layer["reference"]["ops"] >= 8 * launches
