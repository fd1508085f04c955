"""Greedy batched completions with stop strings, for the task checks (math answers, HumanEval)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to (not including) the earliest stop string."""
    ends = [i for i in (text.find(s) for s in stop) if i >= 0]
    return text[: min(ends)] if ends else text


def left_padded(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask, both (B, L), sequences right-aligned."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            input_ids[row, width - len(seq) :] = torch.tensor(seq)
            attention_mask[row, width - len(seq) :] = 1
    return input_ids, attention_mask


CHECK_EVERY = 32  # graphed decode: tokens between checks whether every row has stopped


def _graphed_student(model) -> bool:
    """The xLSTM student on CUDA decodes with one CUDA-graph replay per token; HF's eager
    `generate` of it is Python-bound (~80 ms a step on an H100 for a 135M model)."""
    from xmerge.modeling.student import XLSTMStudentForCausalLM

    return isinstance(model, XLSTMStudentForCausalLM) and model.device.type == "cuda"


def _graphed_greedy(model, input_ids, attention_mask, max_new_tokens: int, stopped) -> torch.Tensor:
    """(B, <= max_new_tokens) greedy tokens after a cached prefill; stops early once ``stopped(tokens)``."""
    from xmerge.modeling.decode_graph import GraphedGreedyDecoder

    out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True, logits_to_keep=1)
    decoder = GraphedGreedyDecoder(model, out.past_key_values, out.logits[:, -1:].argmax(-1))
    tokens = input_ids.new_empty(len(input_ids), 0)
    while tokens.shape[1] < max_new_tokens and not stopped(tokens):
        tokens = torch.cat([tokens, decoder.generate(min(CHECK_EVERY, max_new_tokens - tokens.shape[1]))], dim=1)
    return tokens


def _texts(tokenizer, new_tokens: torch.Tensor, stop: Sequence[str]) -> list[str]:
    """Each row decoded up to its first eos token, then cut at the first stop string."""
    eos = tokenizer.eos_token_id
    rows = []
    for row in new_tokens.tolist():
        rows.append(row[: row.index(eos)] if eos in row else row)
    return [cut_at_stop(t, stop) for t in tokenizer.batch_decode(rows, skip_special_tokens=True)]


@torch.inference_mode()
def greedy_completions(model, tokenizer, prompts: Sequence[str], max_new_tokens: int,
                       stop: Sequence[str] = (), batch_size: int = 8) -> list[str]:
    """Greedy continuation of each prompt, cut at the first stop string (or EOS).

    Prompts are sorted by length and left-padded in batches, so the model must honour
    `attention_mask` (every HF causal LM does). The student on CUDA decodes through CUDA graphs
    (same tokens as `generate`), other models through HF `generate`.
    """
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[str] = [""] * len(prompts)

    def stopped(tokens: torch.Tensor) -> bool:  # (B, n): has every row produced eos or a stop string?
        if tokens.shape[1] == 0:
            return False
        return all(tokenizer.eos_token_id in row or any(s in tokenizer.decode(row) for s in stop)
                   for row in tokens.tolist())

    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        encoded = [tokenizer(prompts[i])["input_ids"] for i in rows]
        input_ids, attention_mask = left_padded(encoded, pad_id)
        input_ids, attention_mask = input_ids.to(model.device), attention_mask.to(model.device)
        if _graphed_student(model) and min(map(len, encoded)) >= model.config.sinks:
            new_tokens = _graphed_greedy(model, input_ids, attention_mask, max_new_tokens, stopped)
        else:
            extra = {"stop_strings": list(stop), "tokenizer": tokenizer} if stop else {}
            generated = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                                       max_new_tokens=max_new_tokens, pad_token_id=pad_id, **extra)
            new_tokens = generated[:, input_ids.shape[1] :]  # (B, new)
        for i, text in zip(rows, _texts(tokenizer, new_tokens, stop)):
            out[i] = text
    return out
