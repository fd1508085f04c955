"""Small generation helpers shared by the CLI, the evals and the demo."""

from __future__ import annotations

import torch


@torch.inference_mode()
def greedy_text(model, tokenizer, prompt: str, *, max_new_tokens: int = 32, chat: bool = True) -> str:
    """Greedy continuation of ``prompt`` (wrapped in the chat template when the tokenizer has one)."""
    if chat and tokenizer.chat_template:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    out = model.generate(
        ids.to(model.device),
        attention_mask=torch.ones_like(ids).to(model.device),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
