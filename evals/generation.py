"""Greedy batched completions with stop strings, for the task checks (math answers, HumanEval)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to (not including) the earliest stop string."""
    ends = [i for i in (text.find(s) for s in stop) if i >= 0]
    return text[: min(ends)] if ends else text


def _left_padded(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask, both (B, L), sequences right-aligned."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            input_ids[row, width - len(seq) :] = torch.tensor(seq)
            attention_mask[row, width - len(seq) :] = 1
    return input_ids, attention_mask


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
        input_ids, attention_mask = _left_padded([tokenizer(prompts[i])["input_ids"] for i in rows], pad_id)
        extra = {"stop_strings": list(stop), "tokenizer": tokenizer} if stop else {}
        generated = model.generate(input_ids=input_ids.to(model.device),
                                   attention_mask=attention_mask.to(model.device), do_sample=False,
                                   max_new_tokens=max_new_tokens, pad_token_id=pad_id, **extra)
        new_tokens = generated[:, input_ids.shape[1] :]  # (B, new)
        for i, text in zip(rows, tokenizer.batch_decode(new_tokens, skip_special_tokens=True)):
            out[i] = cut_at_stop(text, stop)
    return out
