"""Eval generation on CUDA: the student's CUDA-graph decode gives the same completions as HF `generate`."""

from __future__ import annotations

import pytest
import torch

from common import gpu, tiny_student, tiny_tokenizer
from xmerge.evals import generation


@gpu
@pytest.mark.parametrize("stop", [(), ("\n", "e")])
def test_graphed_completions_equal_generate(monkeypatch, stop):
    tokenizer = tiny_tokenizer()
    model = tiny_student("llama", window=16, sinks=4, chunk_size=8).cuda()
    prompts = ["def add(a, b):", "Question: 12 + 30 =", "x" * 40, "The cat sat on the"]  # lengths 9..40
    assert generation._graphed_student(model)
    graphed = generation.greedy_completions(model, tokenizer, prompts, 70, stop=stop, batch_size=3)
    monkeypatch.setattr(generation, "_graphed_student", lambda m: False)
    eager = generation.greedy_completions(model, tokenizer, prompts, 70, stop=stop, batch_size=3)
    assert graphed == eager
    assert any(len(t) > 20 for t in graphed)  # the decode crossed the window (16) and a check (32 tokens)
