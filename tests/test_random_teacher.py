"""benchmarks/random_teacher.py: a random teacher of SmolLM2-135M's shape that the benchmarks' loading path takes."""

from __future__ import annotations

import torch

from xmerge.benchmarks.random_teacher import SMOLLM2_135M, write_random_teacher
from xmerge.modeling.convert import convert_teacher
from xmerge.modeling.teacher import load_teacher


def test_random_teacher_loads_and_converts_like_the_real_one(tmp_path):
    write_random_teacher(str(tmp_path), layers=1)
    assert (tmp_path / "model.safetensors").is_file()
    teacher, tokenizer = load_teacher(str(tmp_path))
    config = teacher.config
    for name, value in SMOLLM2_135M.items():
        if name != "rope_theta":  # transformers 5 keeps it in rope_parameters: checked through the frequencies
            assert getattr(config, name) == (1 if name == "num_hidden_layers" else value), name
    inv_freq = teacher.model.rotary_emb.inv_freq
    torch.testing.assert_close(inv_freq[1], torch.tensor(SMOLLM2_135M["rope_theta"] ** (-2 / 64)))
    assert teacher.model.embed_tokens.weight.std() > 0  # random, not zeros
    assert tokenizer("<unk>")["input_ids"][-1] == 0
    student = convert_teacher(teacher).eval()
    with torch.no_grad():
        logits = student(input_ids=torch.randint(0, config.vocab_size, (1, 8))).logits
    assert logits.shape == (1, 8, config.vocab_size) and torch.isfinite(logits).all()
