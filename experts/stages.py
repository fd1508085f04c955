"""The two distillation stages as loss functions and schedules; experts/loop.py runs them.

Stage I aligns each hybrid attention block with the teacher's attention, layer by layer, with
layer inputs from the teacher (no error accumulation); only the new parameters train. Because
Stage I starts from the seed and never changes a teacher weight, the teacher's hidden states and
attention outputs are computed by the student's own (teacher) weights with full causal softmax
attention — bit-for-bit the teacher, without loading it.

Stage II trains all parameters on γ·CE + β·KL against the teacher's cached top-k targets.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from xmerge.modeling.student import is_new_parameter


class Stage1Aligner(nn.Module):
    """forward(ids (B, T)) -> mean over layers of MSE(student hybrid attention, teacher attention)."""

    def __init__(self, student):
        super().__init__()
        self.student = student

    def forward(self, ids):
        model = self.student.model
        slots, start, position_ids, span = model.locate(ids, None, None)  # no host sync per layer
        with torch.no_grad():
            hidden = model.embed_tokens(ids)
            cos, sin = model.rotary_emb(hidden, position_ids)
            pairs = []
            for layer in model.layers:
                x = layer.attention_input(hidden)
                target = layer.self_attn.teacher_forward(x, cos, sin, slots, start, span)
                pairs.append((x, target))
                hidden = layer.finish(hidden, target)
        losses = [
            F.mse_loss(layer.self_attn(x, cos, sin, slots, start, span=span), target)
            for layer, (x, target) in zip(model.layers, pairs)
        ]
        return torch.stack(losses).mean()


def freeze_for_stage1(student) -> list[nn.Parameter]:
    """Only the new parameters (feature maps, gates) train in Stage I; returns them."""
    params = []
    for name, p in student.named_parameters():
        p.requires_grad_(is_new_parameter(name))
        if p.requires_grad:
            params.append(p)
    return params


def unfreeze_all(student) -> list[nn.Parameter]:
    for p in student.parameters():
        p.requires_grad_(True)
    return list(student.parameters())


def warmup_cosine(step: int, total: int, peak: float, final: float = 1e-5, warmup_frac: float = 0.1) -> float:
    """Linear warmup to ``peak`` over the first ``warmup_frac`` of steps, cosine down to ``final``."""
    warmup = max(1, int(total * warmup_frac))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return final + 0.5 * (peak - final) * (1 + math.cos(math.pi * min(progress, 1.0)))


def sparse_kl(logits, indices, logprobs):
    """KL(p_T^(k) ‖ p_S) on the teacher's top-k support.

    logits: (B, T, V) student; indices/logprobs: (B, T, k) teacher top-k. The teacher's top-k
    probabilities are renormalised to sum to 1; the student's log-probs are its full-vocabulary
    ones, so mass the student puts outside the teacher's top-k is penalised.
    """
    s_logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, indices.long())
    t_logp = torch.log_softmax(logprobs.float(), dim=-1)
    return (t_logp.exp() * (t_logp - s_logp)).sum(-1).mean()


def stage2_loss(student, ids, indices, logprobs, *, gamma: float, beta: float):
    """γ·CE(next token) + β·sparse KL; returns (loss, ce, kl). ids: (B, T)."""
    logits = student(input_ids=ids).logits
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))
    kl = sparse_kl(logits, indices, logprobs)
    return gamma * ce + beta * kl, ce, kl
