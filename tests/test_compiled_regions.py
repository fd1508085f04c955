"""XMERGE_COMPILE=1: the student's kernel-free stretches under torch.compile (modeling/dispatch.py).

Runs on CPU (inductor's C++ backend): the regions hold no kernel call, so the same graphs are what a
GPU compiles. Oracle: the eager student with the same weights. fp32; inductor reorders reductions
(softmax, RMSNorm, the fused matmul epilogues), so outputs agree to 1e-5 relative, not bit for bit.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from common import tiny_student
from xmerge.modeling.dispatch import COMPILE_MIN_TOKENS, compile_wanted

REGIONS = 4  # project, mlstm_inputs, hybrid_mix, finish


def prefill_and_decode(model, ids):
    """Logits of a cached prefill and of two greedy decode steps after it, and the parameter gradients
    of a training forward (no cache)."""
    model.zero_grad()
    model(input_ids=ids).logits.square().mean().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
        logits = [out.logits]
        for _ in range(2):
            out = model(input_ids=out.logits[:, -1:].argmax(-1), past_key_values=out.past_key_values)
            logits.append(out.logits)
    return logits, grads


@pytest.mark.parametrize("family", ["llama", "olmo2"])  # olmo2: QK-norm and post-norms inside the regions
def test_compiled_regions_match_eager(family, monkeypatch):
    model = tiny_student(family, window=8, sinks=2, chunk_size=16)
    ids = torch.randint(0, 200, (2, 40), generator=torch.Generator().manual_seed(0))
    monkeypatch.setenv("XMERGE_COMPILE", "0")
    ref_logits, ref_grads = prefill_and_decode(model, ids)
    torch._dynamo.reset()
    counters.clear()
    monkeypatch.setenv("XMERGE_COMPILE", "1")
    logits, grads = prefill_and_decode(model, ids)
    assert counters["stats"]["unique_graphs"] >= REGIONS  # the regions did compile
    for got, ref in zip(logits, ref_logits):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    for name, ref in ref_grads.items():
        torch.testing.assert_close(grads[name], ref, rtol=1e-4, atol=1e-6, msg=name)


def test_one_graph_per_region_for_every_layer_and_length(monkeypatch):
    """Compile cost does not grow with depth or with new batch and sequence sizes: no graph per layer
    (modules are inputs, not constants), no recompilation per length (dynamic shapes), no graph break.
    Sizes equal to a weight dimension (here a batch of 2 = the kv heads) are specialised by dynamo's
    duck sizing and cost one more compile: the sizes below avoid them."""
    model = tiny_student("llama", window=8, sinks=2, chunk_size=16)
    assert model.config.num_hidden_layers > 1
    monkeypatch.setenv("XMERGE_COMPILE", "1")
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        model(input_ids=torch.randint(0, 200, (5, 40)))
        assert counters["stats"]["unique_graphs"] == REGIONS
        model(input_ids=torch.randint(0, 200, (7, 57)))
    assert counters["stats"]["unique_graphs"] == REGIONS


def test_auto_mode_leaves_cpu_eager_and_bad_modes_raise(monkeypatch):
    """The default (auto) compiles only long CUDA inference calls: CI's CPU runs stay eager, even long."""
    monkeypatch.delenv("XMERGE_COMPILE", raising=False)
    with torch.no_grad():
        assert not compile_wanted(torch.empty(1, COMPILE_MIN_TOKENS, 4))
    monkeypatch.setenv("XMERGE_COMPILE", "1")
    assert compile_wanted(torch.empty(1, 3, 4))
    monkeypatch.setenv("XMERGE_COMPILE", "yes")
    with pytest.raises(ValueError, match="XMERGE_COMPILE='yes'"):
        compile_wanted(torch.empty(1, 3, 4))


def test_auto_mode_falls_back_to_eager_when_compiling_fails(monkeypatch, caplog):
    """Under auto a failed compile is logged and the region runs eagerly from then on; XMERGE_COMPILE=1
    raises it."""
    from xmerge.modeling import dispatch

    calls = []

    def broken_compile(fn, **kwargs):
        def compiled(*args, **kw):
            calls.append(1)
            raise torch._dynamo.exc.InternalTorchDynamoError("backend exploded")

        return compiled

    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setattr(dispatch, "compile_wanted", lambda x: True)
    double = dispatch.compiled_region(lambda module, x: 2 * x)
    x = torch.ones(1, 3, 4)
    monkeypatch.delenv("XMERGE_COMPILE", raising=False)
    with caplog.at_level("WARNING", logger="xmerge.modeling.dispatch"):
        assert torch.equal(double(None, x), 2 * x)
    assert "runs eagerly from now on" in caplog.text and "backend exploded" in caplog.text
    assert torch.equal(double(None, x), 2 * x) and calls == [1]  # not tried again
    strict = dispatch.compiled_region(lambda module, x: 2 * x)
    monkeypatch.setenv("XMERGE_COMPILE", "1")
    with pytest.raises(torch._dynamo.exc.InternalTorchDynamoError):
        strict(None, x)
