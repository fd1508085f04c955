"""The student on CUDA: kernel path (modeling/dispatch.py) against the reference path (XMERGE_KERNELS=0).

Tests marked gpu run on the device machine and are skipped without CUDA; the last two (graph-safe
decode step, analytic block mask) run on CPU too. Errors are relative in the Frobenius norm.
Tolerances: fp32 1e-4 for logits and 1e-3 for gradients (both paths fp32 IEEE; the chunkwise and
FlexAttention sums run in another order). bf16 autocast: the kernel path must be within
max(3e-2, 2 × the reference path's own autocast error), both measured against the fp32 reference.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from common import gpu, tiny_student
from test_compiled_regions import REGIONS


SEQ, WINDOW, SINKS, CHUNK = 200, 32, 4, 16  # crosses chunk and window boundaries many times


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


@pytest.fixture
def student():
    return tiny_student("llama", window=WINDOW, sinks=SINKS, chunk_size=CHUNK).cuda()


def logits_and_grads(model, ids, *, kernels: bool, autocast: bool, monkeypatch, attention_mask=None):
    monkeypatch.setenv("XMERGE_KERNELS", "1" if kernels else "0")
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        logits = model(input_ids=ids, attention_mask=attention_mask).logits.float()
    target = torch.randn(logits.shape, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    (logits * target).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


@gpu
def test_kernel_path_is_taken_and_switch_forces_reference(student, monkeypatch):
    from xmerge.modeling import dispatch

    calls = []
    real = dispatch.mlstm_chunkwise
    monkeypatch.setattr(dispatch, "mlstm_chunkwise", lambda *a, **k: calls.append(1) or real(*a, **k))
    ids = torch.randint(0, 259, (2, 64), device="cuda")
    monkeypatch.setenv("XMERGE_KERNELS", "1")
    with torch.no_grad():
        student(ids)
    assert calls == []  # every layer took the Triton kernel
    monkeypatch.setenv("XMERGE_KERNELS", "0")
    with torch.no_grad():
        student(ids)
    assert len(calls) == student.config.num_hidden_layers


@gpu
def test_fp32_logits_and_all_gradients_match_reference(student, monkeypatch):
    ids = torch.randint(0, 259, (2, SEQ), device="cuda")
    ref_logits, ref_grads = logits_and_grads(student, ids, kernels=False, autocast=False, monkeypatch=monkeypatch)
    logits, grads = logits_and_grads(student, ids, kernels=True, autocast=False, monkeypatch=monkeypatch)
    assert rel_err(logits, ref_logits) < 1e-4
    assert grads.keys() == ref_grads.keys() and len(grads) == len(list(student.parameters()))
    errors = {n: rel_err(grads[n], ref_grads[n]) for n in grads}
    assert max(errors.values()) < 1e-3, sorted(errors.items(), key=lambda kv: -kv[1])[:3]


@gpu
def test_bf16_autocast_within_reference_autocast_error(student, monkeypatch):
    ids = torch.randint(0, 259, (2, SEQ), device="cuda")
    exact_logits, exact_grads = logits_and_grads(student, ids, kernels=False, autocast=False, monkeypatch=monkeypatch)
    ref_logits, ref_grads = logits_and_grads(student, ids, kernels=False, autocast=True, monkeypatch=monkeypatch)
    logits, grads = logits_and_grads(student, ids, kernels=True, autocast=True, monkeypatch=monkeypatch)
    assert rel_err(logits, exact_logits) < max(3e-2, 2 * rel_err(ref_logits, exact_logits))
    for name in exact_grads:
        bound = max(3e-2, 2 * rel_err(ref_grads[name], exact_grads[name]))
        assert rel_err(grads[name], exact_grads[name]) < bound, name


@gpu
def test_left_padded_batch_matches_reference(student, monkeypatch):
    # padding sends SWA to the reference; the mLSTM kernel sees ĩ = -inf on the padded slots
    ids = torch.randint(0, 259, (3, 150), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, :37] = 0
    mask[2, :100] = 0
    ref, _ = logits_and_grads(student, ids, kernels=False, autocast=False, monkeypatch=monkeypatch, attention_mask=mask)
    ours, _ = logits_and_grads(student, ids, kernels=True, autocast=False, monkeypatch=monkeypatch, attention_mask=mask)
    real = mask.bool()
    assert rel_err(ours[real], ref[real]) < 1e-4


@gpu
@pytest.mark.parametrize("mixer", ["hybrid", "mlstm", "swa"])
def test_greedy_generate_with_cache_equals_reference(mixer, monkeypatch):
    model = tiny_student("qwen2", mixer=mixer, window=WINDOW, sinks=SINKS, chunk_size=CHUNK).cuda()
    prompt = torch.randint(0, 259, (2, 150), device="cuda")
    outs = {}
    for kernels in (False, True):
        monkeypatch.setenv("XMERGE_KERNELS", "1" if kernels else "0")
        with torch.no_grad():
            outs[kernels] = model.generate(  # explicit mask: random prompts contain the pad id
                prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=40, do_sample=False,
                eos_token_id=None, pad_token_id=256,
            )
    assert outs[True].shape == (2, 190)  # prefill through the kernels, then 40 cached decode steps
    assert torch.equal(outs[True], outs[False])


@gpu
@pytest.mark.parametrize("prompt", [130, 400])  # 400 = 25 chunks: the mLSTM's two-level forward pass
def test_prefill_state_passes_to_decode(prompt, monkeypatch):
    # logits of a kernel prefill + cached steps equal the reference's full recompute at every step
    model = tiny_student("llama", window=WINDOW, sinks=SINKS, chunk_size=CHUNK).cuda()
    ids = torch.randint(0, 259, (1, prompt + 50), device="cuda")
    monkeypatch.setenv("XMERGE_KERNELS", "1")
    with torch.no_grad():
        out = model(ids[:, :prompt], use_cache=True)
        stepped = [out.logits[:, -1]]
        for t in range(prompt, prompt + 50):
            out = model(ids[:, t : t + 1], past_key_values=out.past_key_values)
            stepped.append(out.logits[:, -1])
        monkeypatch.setenv("XMERGE_KERNELS", "0")
        full = model(ids).logits[:, prompt - 1 :]
    assert rel_err(torch.stack(stepped, dim=1), full) < 1e-4


@gpu
@pytest.mark.parametrize("mixer", ["hybrid", "swa"])
def test_graphed_greedy_decode_equals_eager_generate(mixer):
    from xmerge.modeling.decode_graph import GraphedGreedyDecoder

    model = tiny_student("llama", mixer=mixer, window=WINDOW, sinks=SINKS, chunk_size=CHUNK).cuda()
    prompt = torch.randint(0, 259, (2, 100), device="cuda")
    mask = torch.ones_like(prompt)
    mask[1, :10] = 0
    with torch.no_grad():
        eager = model.generate(
            prompt, attention_mask=mask, max_new_tokens=60, do_sample=False, eos_token_id=None, pad_token_id=256
        )[:, 100:]
        out = model(prompt, attention_mask=mask, use_cache=True)
        decoder = GraphedGreedyDecoder(model, out.past_key_values, out.logits[:, -1:].argmax(-1))
        graphed = torch.cat([decoder.generate(25), decoder.generate(35)], dim=1)
    assert out.past_key_values.seen == 160
    assert torch.equal(graphed, eager)


@pytest.mark.parametrize("mixer,family", itertools.product(["hybrid", "swa", "mlstm"], ["llama", "olmo2"]))
def test_graph_safe_decode_step_equals_eager_step(mixer, family):
    from xmerge.modeling.decode_graph import decode_step

    model = tiny_student(family, mixer=mixer, window=8, sinks=3, chunk_size=4)
    ids = torch.randint(0, 259, (2, 20))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    with torch.no_grad():
        eager = model(ids, attention_mask=mask, use_cache=True)
        stepped = model(ids, attention_mask=mask, use_cache=True)
        eager_cache, step_cache = eager.past_key_values, stepped.past_key_values
        tok = eager.logits[:, -1:].argmax(-1)
        slot = torch.tensor([step_cache.seen])
        for _ in range(25):  # crosses the window (8) three times
            logits_eager = model(tok, past_key_values=eager_cache).logits
            logits_step = decode_step(model, tok, slot, step_cache)
            slot += 1
            assert torch.equal(logits_step, logits_eager)
            tok = logits_eager[:, -1:].argmax(-1)


@pytest.mark.parametrize("seq,window,sinks", [(1000, 512, 4), (2048, 2048, 4), (700, 100, 0), (1300, 130, 200), (129, 5, 130)])
def test_block_mask_from_block_coordinates_equals_create_block_mask(seq, window, sinks):
    from torch.nn.attention.flex_attention import create_block_mask

    from xmerge.kernels.swa import window_sink_block_mask

    ours = window_sink_block_mask(seq, window, sinks, "cpu")
    ref = create_block_mask(
        lambda b, h, q, k: (k <= q) & ((q - k < window) | (k < sinks)), None, None, seq, seq, device="cpu"
    )
    assert torch.equal(ours.to_dense(), ref.to_dense())
    assert torch.equal(ours.kv_num_blocks, ref.kv_num_blocks)
    assert torch.equal(ours.full_kv_num_blocks, ref.full_kv_num_blocks)
    for row in range(ours.kv_num_blocks.shape[-1]):
        for num, idx, ref_num, ref_idx in (
            (ours.kv_num_blocks, ours.kv_indices, ref.kv_num_blocks, ref.kv_indices),
            (ours.full_kv_num_blocks, ours.full_kv_indices, ref.full_kv_num_blocks, ref.full_kv_indices),
        ):
            n = int(num[0, 0, row])
            assert set(idx[0, 0, row, :n].tolist()) == set(ref_idx[0, 0, row, :n].tolist())


@gpu
def test_auto_compile_takes_long_inference_calls_only(monkeypatch):
    """XMERGE_COMPILE=auto (the default): regions compile for CUDA inference calls from COMPILE_MIN_TOKENS
    tokens, not below and not with autograd; the compiled forward equals the eager one."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from xmerge.modeling.dispatch import COMPILE_MIN_TOKENS, compile_wanted

    monkeypatch.delenv("XMERGE_COMPILE", raising=False)
    long = torch.empty(1, COMPILE_MIN_TOKENS, 4, device="cuda")
    with torch.no_grad():
        assert compile_wanted(long) and not compile_wanted(long[:, 1:])
    assert not compile_wanted(long)  # grad mode on: training stays eager unless XMERGE_COMPILE=1
    model = tiny_student("llama", window=WINDOW, sinks=SINKS, chunk_size=CHUNK).cuda().eval()
    ids = torch.randint(0, 259, (2, COMPILE_MIN_TOKENS // 2), device="cuda")
    torch._dynamo.reset()
    with torch.no_grad():
        monkeypatch.setenv("XMERGE_COMPILE", "0")
        eager = model(input_ids=ids).logits  # compiles FlexAttention for this shape
        counters.clear()
        monkeypatch.delenv("XMERGE_COMPILE")
        compiled = model(input_ids=ids).logits
    assert counters["stats"]["unique_graphs"] == REGIONS
    assert rel_err(compiled, eager) < 1e-4
