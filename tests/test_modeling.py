"""The student: exactness against the teacher, the three mLSTM forms, the cache, save/load."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from common import tiny_student, tiny_teacher, tiny_tokenizer
from xmerge.modeling.cache import HybridCache
from xmerge.modeling.convert import convert_teacher, save_student
from xmerge.modeling.mlstm import mlstm_chunkwise, mlstm_parallel, mlstm_recurrent
from xmerge.modeling.swa import blocked_window_sink_attention, gather_sinks, swa_reference
from xmerge.modeling.student import is_new_parameter

FAMILIES = ["llama", "qwen2", "olmo2"]


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("family", FAMILIES)
def test_swa_student_with_full_window_equals_teacher(family):
    teacher = tiny_teacher(family)
    student = convert_teacher(teacher, mixer="swa", window=64)
    ids = torch.randint(0, 259, (2, 48))
    with torch.no_grad():
        torch.testing.assert_close(student(ids).logits, teacher(ids).logits, rtol=1e-5, atol=1e-5)


def test_hybrid_forward_and_backward_under_bf16_autocast():
    """Under autocast the SWA branch and the output gate come back in bf16 while the mLSTM branch is in the
    residual's dtype (fp32): the mix must take both, and stay near the fp32 logits."""
    student = tiny_student("llama", window=16).train()
    ids = torch.randint(0, 259, (2, 40))
    exact = student(ids).logits
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = student(ids).logits
    logits.float().sum().backward()
    assert rel_err(logits.float(), exact.detach()) < 3e-2
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in student.parameters() if p.requires_grad)


@pytest.mark.parametrize("family", FAMILIES)
def test_hybrid_with_output_gate_zero_equals_teacher(family):
    """DESIGN invariant: W >= sequence length and o forced to 0 gives the teacher's logits."""
    teacher = tiny_teacher(family)
    student = convert_teacher(teacher, window=64)
    with torch.no_grad():
        for layer in student.model.layers:
            layer.self_attn.ogate.weight.zero_()
            layer.self_attn.ogate.bias.fill_(-1e4)  # σ = 0 exactly in fp32
    ids = torch.randint(0, 259, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(student(ids).logits, teacher(ids).logits, rtol=1e-5, atol=1e-5)


def test_teacher_padding_matches_unpadded():
    """Left padding: each row's logits equal the same row run alone."""
    student = tiny_student("llama", window=8, sinks=2)
    a = torch.randint(0, 259, (1, 20))
    b = torch.randint(0, 259, (1, 13))
    ids = torch.cat([a, torch.cat([torch.full((1, 7), 256), b], dim=1)])
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    with torch.no_grad():
        both = student(ids, attention_mask=mask).logits
        torch.testing.assert_close(both[0], student(a).logits[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(both[1, 7:], student(b).logits[0], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="left padding"):
        student(ids, attention_mask=mask.flip(1))


def test_conversion_is_bit_identical_and_copies_teacher():
    teacher = tiny_teacher("qwen2")
    s1, s2 = convert_teacher(teacher, seed=3), convert_teacher(teacher, seed=3)
    s3 = convert_teacher(teacher, seed=4)
    st1, st2, st3 = s1.state_dict(), s2.state_dict(), s3.state_dict()
    assert all(torch.equal(st1[k], st2[k]) for k in st1)
    assert any(not torch.equal(st1[k], st3[k]) for k in st1 if is_new_parameter(k))
    for name, tensor in teacher.state_dict().items():
        assert torch.equal(st1[name], tensor), name


def test_save_load_round_trip(tmp_path):
    student = tiny_student("olmo2", window=16)
    out = save_student(student, tiny_tokenizer(), tmp_path / "student", teacher_spec="tiny-olmo2")
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert "tiny-olmo2" in (out / "README.md").read_text()
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(loaded).__name__ == "XLSTMStudentForCausalLM"
    ids = torch.randint(0, 259, (1, 30))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, student(ids).logits)


def _mlstm_inputs(B=2, H=3, S=37, DK=8, DV=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.softmax(torch.randn(B, H, S, DK, generator=g, dtype=torch.float64), -1)
    k = torch.softmax(torch.randn(B, H, S, DK, generator=g, dtype=torch.float64), -1)
    v = torch.randn(B, H, S, DV, generator=g, dtype=torch.float64)
    i = torch.randn(B, H, S, generator=g, dtype=torch.float64) * 2
    f = torch.randn(B, H, S, generator=g, dtype=torch.float64) + 3
    return [t.requires_grad_() for t in (q, k, v, i, f)]


@pytest.mark.parametrize("S,chunk", [(37, 8), (37, 16), (64, 64), (5, 16), (50, 1)])
def test_mlstm_forms_agree_forward_and_gradients(S, chunk):
    inputs = _mlstm_inputs(S=S)
    ref = mlstm_parallel(*inputs)
    grads_ref = torch.autograd.grad(ref.square().sum(), inputs)
    chunked, _ = mlstm_chunkwise(*inputs, chunk_size=chunk)
    grads_chunk = torch.autograd.grad(chunked.square().sum(), inputs)
    rec, _ = mlstm_recurrent(*inputs)
    grads_rec = torch.autograd.grad(rec.square().sum(), inputs)
    torch.testing.assert_close(chunked, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(rec, ref, rtol=1e-10, atol=1e-12)
    for gc, gr, g0 in zip(grads_chunk, grads_rec, grads_ref):
        torch.testing.assert_close(gc, g0, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(gr, g0, rtol=1e-9, atol=1e-11)


def test_mlstm_state_passing_and_padding():
    q, k, v, i, f = [t.detach() for t in _mlstm_inputs(S=40)]
    full, state_full = mlstm_chunkwise(q, k, v, i, f, chunk_size=16)
    h1, st = mlstm_chunkwise(q[..., :23, :], k[..., :23, :], v[..., :23, :], i[..., :23], f[..., :23], chunk_size=16)
    h2, st2 = mlstm_recurrent(q[..., 23:, :], k[..., 23:, :], v[..., 23:, :], i[..., 23:], f[..., 23:], state=st)
    torch.testing.assert_close(torch.cat([h1, h2], -2), full, rtol=1e-10, atol=1e-12)
    for a, b in zip(st2, state_full):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # -inf input gates (padding) on a prefix: outputs there are 0, the rest as if the prefix were absent
    i_pad = i.clone()
    i_pad[..., :10] = float("-inf")
    inputs = [t.clone().requires_grad_() for t in (q, k, v, i_pad, f)]
    out, _ = mlstm_chunkwise(*inputs, chunk_size=8)
    assert torch.all(out[..., :10, :] == 0)
    alone = mlstm_parallel(q[..., 10:, :], k[..., 10:, :], v[..., 10:, :], i[..., 10:], f[..., 10:])
    torch.testing.assert_close(out[..., 10:, :], alone, rtol=1e-10, atol=1e-12)
    grads = torch.autograd.grad(out.sum(), inputs)
    assert all(torch.isfinite(g).all() for g in grads)


def test_window_sink_attention_matches_dense_oracle():
    student = tiny_student("llama", mixer="swa", window=5, sinks=3)
    attn = student.model.layers[0].self_attn
    B, T = 2, 19
    x = torch.randn(B, T, 64)
    pos = torch.arange(T)
    start = torch.tensor([0, 4])
    cos, sin = student.model.rotary_emb(x, (pos[None] - start[:, None]).clamp(min=0))
    with torch.no_grad():
        _, _, (q, k), v = attn.project(x, cos, sin)
        ours = attn._swa(q, k, v, pos, start, None, window=5)
        ref = swa_reference(q, k, v, window=5, sinks=3, start=start)
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours[1, :, 4:], ref[1, :, 4:], rtol=1e-5, atol=1e-6)
    # query blocks that see only the keys they need (blocks of 3 < window, and of 4 < sinks + window)
    sink_k, sink_v, sink_pos = gather_sinks(k, v, start, 3, 0)
    for block in (2, 3, 4):
        blocked = blocked_window_sink_attention(q, k, v, pos, sink_k, sink_v, sink_pos, start=start, window=5,
                                                block=block)
        torch.testing.assert_close(blocked[0], ref[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(blocked[1, :, 4:], ref[1, :, 4:], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mixer", ["hybrid", "mlstm", "swa"])
def test_greedy_generate_with_cache_equals_recompute(mixer):
    student = tiny_student("qwen2", mixer=mixer, window=6, sinks=2, chunk_size=4)
    prompt = torch.randint(0, 259, (1, 9))
    with torch.no_grad():
        out = student.generate(prompt, max_new_tokens=14, do_sample=False, eos_token_id=None, pad_token_id=256)
        ids = prompt
        for _ in range(14):  # no cache: recompute the whole sequence each step
            nxt = student(ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
    assert out.shape[1] == 23  # crossed the window (6) several times
    assert torch.equal(out, ids)


def test_batched_generate_with_left_padding_matches_single():
    student = tiny_student("llama", window=6, sinks=2)
    tok = tiny_tokenizer()
    tok.padding_side = "left"
    prompts = ["the quick brown fox", "hi"]
    batch = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = student.generate(**batch, max_new_tokens=10, do_sample=False, eos_token_id=None)
        for row, prompt in enumerate(prompts):
            single = tok(prompt, return_tensors="pt")
            alone = student.generate(**single, max_new_tokens=10, do_sample=False, eos_token_id=None)
            assert torch.equal(out[row, -10:], alone[0, -10:])


def test_cache_memory_independent_of_generated_length():
    student = tiny_student("llama", window=16, sinks=4)
    with torch.no_grad():
        cache_sizes = {}
        for n in (100, 1000):
            out = student(torch.randint(0, 259, (1, 8)), use_cache=True)
            cache = out.past_key_values
            tok = out.logits[:, -1:].argmax(-1)
            for _ in range(n):
                out = student(tok, past_key_values=cache)
                tok = out.logits[:, -1:].argmax(-1)
            assert cache.seen == 8 + n
            cache_sizes[n] = cache.nbytes()
    assert cache_sizes[100] == cache_sizes[1000] > 0


def test_beam_search_with_cache_equals_without():
    student = tiny_student("llama", window=6, sinks=2)
    prompt = torch.randint(0, 259, (1, 9))
    kwargs = dict(max_new_tokens=10, num_beams=3, do_sample=False, eos_token_id=None, pad_token_id=256)
    with torch.no_grad():
        cached = student.generate(prompt, **kwargs)
        uncached = student.generate(prompt, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)


def test_long_prefill_equals_chunked_prefill_through_the_cache():
    """A 600-token forward (query-blocked SWA, chunkwise mLSTM) equals prefilling it 150 tokens at a
    time through the cache (ring buffer, sink buffer, carried mLSTM state)."""
    student = tiny_student("llama", window=100, sinks=4)
    ids = torch.randint(0, 259, (2, 600))
    with torch.no_grad():
        full = student(ids).logits
        cache, parts = None, []
        for first in range(0, 600, 150):
            out = student(ids[:, first : first + 150], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            parts.append(out.logits)
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("prompt", [2, 9])  # shorter and longer than the 4 sinks
def test_fresh_prefill_writes_the_sinks_of_the_general_path(prompt, monkeypatch):
    """A fresh prefill fills the sink buffers by slicing (HybridCache.write_first_sinks); oracle: the
    general gather + masked write that prefill chunks and padded rows use. Then decode from both."""
    student = tiny_student("llama", window=6, sinks=4)
    ids = torch.randint(0, 259, (2, prompt), generator=torch.Generator().manual_seed(prompt))

    def prefill_and_decode():
        with torch.no_grad():
            out = student(ids, use_cache=True)
            cache, logits = out.past_key_values, [out.logits]
            sinks = [(lc.sink_k.clone(), lc.sink_v.clone(), lc.sink_pos.clone()) for lc in cache.layers]
            for _ in range(3):
                out = student(out.logits[:, -1:].argmax(-1), past_key_values=cache)
                logits.append(out.logits)
        return sinks, logits

    sinks, logits = prefill_and_decode()
    monkeypatch.setattr(HybridCache, "write_first_sinks", lambda layer, k, v: HybridCache.write_sinks(
        layer, *gather_sinks(k, v, torch.zeros(k.shape[0], dtype=torch.long), layer.sink_pos.shape[1], 0)))
    ref_sinks, ref_logits = prefill_and_decode()
    for got, ref in zip(sinks, ref_sinks):
        assert all(torch.equal(g, r) for g, r in zip(got, ref))
    assert sinks[0][2].tolist() == [list(range(min(prompt, 4))) + [-1] * (4 - min(prompt, 4))] * 2
    for got, ref in zip(logits, ref_logits):
        assert torch.equal(got, ref)
