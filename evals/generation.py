"""Greedy batched completions with stop strings, for the task checks (math answers, HumanEval)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to (not including) the earliest stop string."""
    ends = [i for i in (text.find(s) for s in stop) if i >= 0]
    return text[: min(ends)] if ends else text


@torch.inference_mode()
def greedy_completions(model, tokenizer, prompts: Sequence[str], max_new_tokens: int,
                       stop: Sequence[str] = (), batch_size: int = 8) -> list[str]:
    """Greedy continuation of each prompt, cut at the first stop string (or EOS).

    Prompts are sorted by length and left-padded in batches, so the model must honour
    `attention_mask` (every HF causal LM does).
    """
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[str] = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        enc = tokenizer([prompts[i] for i in rows], return_tensors="pt", padding=True,
                        padding_side="left").to(model.device)
        extra = {"stop_strings": list(stop), "tokenizer": tokenizer} if stop else {}
        generated = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens,
                                   pad_token_id=pad_id, **extra)
        new_tokens = generated[:, enc["input_ids"].shape[1] :]  # (B, new)
        for i, text in zip(rows, tokenizer.batch_decode(new_tokens, skip_special_tokens=True)):
            out[i] = cut_at_stop(text, stop)
    return out
