"""The student's forward reads the device from the host O(1) times, not once per layer, and its kernel
path keeps q/k/v/h in the model's dtype.

A host read (``.item()``, ``.tolist()``, ``bool``/``int`` of a tensor, ``torch.equal``, ...) is a GPU
sync; CPU cannot raise on one, so the reads are counted. The kernel path runs on CPU with stand-ins
for the two kernels that keep their contracts (any dtype in, fp32 inside, output in the input dtype);
the kernels themselves are tested against the reference on the GPU (tests/test_gpu_student.py).
"""

from __future__ import annotations

import collections
import contextlib
import sys
import types

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaForCausalLM

from common import tiny_teacher
from xmerge.modeling import dispatch
from xmerge.modeling.convert import convert_teacher
from xmerge.modeling.mlstm import mlstm_chunkwise
from xmerge.modeling.swa import swa_reference

HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero")
PROMPT, SPLIT = 20, 12


@contextlib.contextmanager
def counting_host_reads():
    """Counter of host reads made inside the block, by kind."""
    counts = collections.Counter()
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}
    real_equal = torch.equal

    def counted(name, real):
        def read(*args, **kwargs):
            counts[name] += 1
            return real(*args, **kwargs)
        return read

    for name, real in originals.items():
        setattr(torch.Tensor, name, counted(name, real))
    torch.equal = counted("equal", real_equal)
    try:
        yield counts
    finally:
        for name, real in originals.items():
            setattr(torch.Tensor, name, real)
        torch.equal = real_equal


def student(layers: int, dtype=torch.float32):
    config = tiny_teacher("llama").config
    config.num_hidden_layers = layers
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(config).eval()
    return convert_teacher(teacher, window=8, sinks=2, chunk_size=16).to(dtype).eval()


def inputs():
    ids = torch.randint(0, 259, (2, PROMPT), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    return ids, mask


# Each scenario prepares a cache if it needs one and returns the one forward to count.
def fresh_prefill(model):
    ids, _ = inputs()
    return lambda: model(ids)


def left_padded_prefill(model):
    ids, mask = inputs()
    return lambda: model(ids, attention_mask=mask)


def prefill_chunk_through_cache(model):
    ids, _ = inputs()
    cache = model(ids[:, :SPLIT], use_cache=True).past_key_values
    return lambda: model(ids[:, SPLIT:], past_key_values=cache)


def decode_step(model):
    ids, _ = inputs()
    out = model(ids, use_cache=True)
    return lambda: model(out.logits[:, -1:].argmax(-1), past_key_values=out.past_key_values)


def decode_step_with_mask(model):  # as generate() calls it: the whole mask every step
    ids, mask = inputs()
    out = model(ids, attention_mask=mask, use_cache=True)
    full = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], dim=1)
    return lambda: model(out.logits[:, -1:].argmax(-1), attention_mask=full, past_key_values=out.past_key_values)


# host reads per forward: only a given attention mask is read (once, to check it is left padding)
SCENARIOS = {
    fresh_prefill: 0,
    left_padded_prefill: 1,
    prefill_chunk_through_cache: 0,
    decode_step: 0,
    decode_step_with_mask: 1,
}


class _Kernels:
    """CPU stand-ins for the Triton mLSTM and the FlexAttention SWA, recording the dtypes they get."""

    def __init__(self):
        self.dtypes = []
        self.running = False

    def mlstm(self, q, k, v, i_pre, f_pre, state=None, chunk_size=64, eps=1e-6):
        self.dtypes.append(("mlstm", q.dtype, k.dtype, v.dtype))
        self.running = True
        rep = q.shape[1] // k.shape[1]  # the kernel reads grouped kv heads in place and gates of any dtype
        h, state = mlstm_chunkwise(q.float(), k.float().repeat_interleave(rep, 1), v.float().repeat_interleave(rep, 1),
                                   i_pre.float(), f_pre.float(), chunk_size=chunk_size, state=state, eps=eps)
        self.running = False
        return h.to(q.dtype), state

    def swa(self, q, k, v, window, sinks):
        self.dtypes.append(("swa", q.dtype, k.dtype, v.dtype))
        self.running = True
        out = swa_reference(q.float(), k.float(), v.float(), window=window, sinks=sinks).to(q.dtype)
        self.running = False
        return out


def use_stand_ins(monkeypatch) -> _Kernels:
    """Route the student to the kernel path on CPU, through the stand-ins."""
    stand_ins = _Kernels()
    monkeypatch.setattr(dispatch, "kernels_enabled", lambda x: True)
    for name, attr, fn in (("mlstm_chunkwise", "mlstm_chunkwise_triton", stand_ins.mlstm),
                           ("swa", "swa_attention", stand_ins.swa), ("swa_triton", "swa_attention_triton", stand_ins.swa)):
        module = types.ModuleType(f"xmerge.kernels.{name}")
        setattr(module, attr, fn)
        module.takes = lambda q: True  # the Triton SWA's shape check
        monkeypatch.setitem(sys.modules, f"xmerge.kernels.{name}", module)
    return stand_ins


def reads_per_forward(layers: int, scenario) -> collections.Counter:
    model = student(layers)
    with torch.no_grad():
        forward = scenario(model)
        with counting_host_reads() as counts:
            forward()
    return counts


@pytest.mark.parametrize("scenario", list(SCENARIOS), ids=lambda s: s.__name__)
@pytest.mark.parametrize("path", ["reference", "kernels"])
def test_host_reads_per_forward_do_not_grow_with_layers(scenario, path, monkeypatch):
    if path == "kernels":
        use_stand_ins(monkeypatch)
    two, four = reads_per_forward(2, scenario), reads_per_forward(4, scenario)
    assert two == four
    assert sum(four.values()) == SCENARIOS[scenario], dict(four)


@pytest.mark.parametrize("scenario", list(SCENARIOS), ids=lambda s: s.__name__)
def test_kernel_path_routing_equals_reference(scenario, monkeypatch):
    """With stand-ins that compute the reference's math, the kernel path's routing (fresh prefill to
    the SWA kernel, sinks taken once, padding masked only where present) gives the reference's logits."""
    model = student(2)
    with torch.no_grad():
        ref = scenario(model)().logits
        stand_ins = use_stand_ins(monkeypatch)
        forward = scenario(model)
        stand_ins.dtypes.clear()  # keep what the last forward used, not its cache's prefill
        ours = forward().logits
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    used = {entry[0] for entry in stand_ins.dtypes}
    # the SWA kernel takes only a fresh unpadded prefill; a decode step runs the recurrent mLSTM step
    assert ("swa" in used) == (scenario is fresh_prefill)
    assert ("mlstm" in used) == (scenario not in (decode_step, decode_step_with_mask))


def test_decode_writes_the_sinks_that_follow_a_short_prompt():
    """A row with one real prompt token gets its second sink from the first decode step: the skipped
    sink gather (host-side TokenSpan.holds_sinks) must not skip it. Oracle: recompute without cache."""
    model = student(2)
    ids, mask = inputs()
    mask[1, : PROMPT - 1] = 0
    with torch.no_grad():
        out = model(ids, attention_mask=mask, use_cache=True)
        for _ in range(4):
            ids = torch.cat([ids, out.logits[:, -1:].argmax(-1)], dim=1)
            mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], dim=1)
            out = model(ids[:, -1:], attention_mask=mask, past_key_values=out.past_key_values)
            full = model(ids, attention_mask=mask).logits[:, -1]
            torch.testing.assert_close(out.logits[:, -1], full, rtol=1e-5, atol=1e-5)
    assert out.past_key_values.layers[0].sink_pos.tolist() == [[0, 1], [PROMPT - 1, PROMPT]]


class _Fp32ActivationLog(TorchDispatchMode):
    """Ops outside the kernel stand-ins that produce a 4-D (B, H, T, D) fp32 tensor."""

    def __init__(self, stand_ins):
        super().__init__()
        self.stand_ins, self.ops = stand_ins, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.stand_ins.running:
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.dim() == 4 and t.dtype == torch.float32:
                    self.ops.append(str(func))
        return out


def test_bf16_kernel_path_keeps_model_dtype(monkeypatch):
    """A bf16 prefill hands the kernels bf16 q/k/v and makes no fp32 copy of any (B, H, T, D) tensor;
    its logits stay within bf16 error of the fp32 model on the reference path."""
    ids, _ = inputs()
    with torch.no_grad():
        ref = student(2)(ids).logits
        kernels = use_stand_ins(monkeypatch)
        with _Fp32ActivationLog(kernels) as log:
            logits = student(2, torch.bfloat16)(ids).logits
    assert log.ops == []
    assert kernels.dtypes == [(name, torch.bfloat16, torch.bfloat16, torch.bfloat16)
                              for _ in range(2) for name in ("swa", "mlstm")]
    err = ((logits.float() - ref).norm() / ref.norm()).item()
    assert err < 3e-2, err


@pytest.mark.parametrize("path", ["reference", "kernels"])
def test_stage1_alignment_reads_nothing_per_layer(path, monkeypatch):
    """Stage I runs each layer's teacher and student attention: none of them may read the host."""
    from xmerge.experts.stages import Stage1Aligner

    if path == "kernels":
        use_stand_ins(monkeypatch)

    def stage1(model):
        ids, _ = inputs()
        return lambda: Stage1Aligner(model)(ids)

    two, four = reads_per_forward(2, stage1), reads_per_forward(4, stage1)
    assert two == four and sum(four.values()) == 0, dict(four)
