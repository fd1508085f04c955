"""evaluate(): the per-domain metrics of the quick (merge gate) and full suites for any HF causal LM.

Per domain, on fixed held-out token blocks:
- `<domain>/ce`: next-token cross-entropy in nats (lower is better);
- `<domain>/top1`: share of positions where the model's argmax is the teacher's top-1 token;
- `<domain>/exp_neg_kl`: exp(-KL(p_T^k ‖ p_S^k)), KL between teacher and model distributions both
  renormalised over the teacher's top-k ids, averaged over positions. Expressed as
  higher-is-better exp(-KL) because KL is 0 for the teacher itself (see metrics.py);
- `<domain>/exact_match` (when the domain has math problems): greedy answer, last integer parsed;
- `code/humaneval_pass1` (suite "full", when a `code` domain is present): greedy pass@1.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
import torch.nn.functional as F

from xmerge.errors import XmergeError
from xmerge.evals.generation import greedy_completions
from xmerge.evals.humaneval import humaneval_pass_at_1
from xmerge.evals.metrics import Metric


class Problem(Protocol):
    """A math problem (experts.mathgen.MathProblem fits): text up to "Answer:" and the integer answer."""

    @property
    def prompt(self) -> str: ...

    @property
    def answer(self) -> int: ...


@dataclass(frozen=True)
class EvalSet:
    """Held-out data of one domain; teacher targets and problems are optional."""

    blocks: torch.Tensor  # (N, T) int64 token ids
    target_indices: torch.Tensor | None = None  # (N, T, k) int32/int64, teacher's top-k ids, top-1 first
    target_logprobs: torch.Tensor | None = None  # (N, T, k) float16/32, teacher log-probs of those ids
    problems: Sequence[Problem] = ()


@dataclass(frozen=True)
class Suite:
    max_tokens: int | None  # per domain, in whole blocks (at least one); None = all blocks
    batch_size: int
    max_problems: int | None
    answer_tokens: int  # generation budget per math answer
    humaneval_limit: int | None  # None = all 164 problems; only used when humaneval is on
    humaneval: bool = False
    humaneval_tokens: int = 384
    seq_len: int = 256  # eval block length; evals/sets.py raises it to 2x the seed's window, caps it at the context
    generation_batch: int | None = None  # prompts per batch in the generation checks (None: batch_size)

    @property
    def prompts_per_batch(self) -> int:
        return self.generation_batch or self.batch_size


SUITES = {
    "quick": Suite(max_tokens=4096, batch_size=4, max_problems=8, answer_tokens=48, humaneval_limit=None),
    # GPU-sized: 2K blocks leave a 128-256 window most of each block to the mLSTM; big batches
    # keep the generation checks (math answers, HumanEval) off the Python-bound path.
    "full": Suite(max_tokens=32 * 2048, batch_size=8, max_problems=512, answer_tokens=96,
                  humaneval_limit=None, humaneval=True, seq_len=2048, generation_batch=64),
}
_INT = re.compile(r"-?\d[\d,]*")


def last_integer(text: str) -> int | None:
    """The last integer written in `text` (thousands commas allowed), or None."""
    found = _INT.findall(text)
    return int(found[-1].replace(",", "")) if found else None


def _check_targets(domain: str, data: EvalSet) -> None:
    if data.blocks.ndim != 2:
        raise XmergeError(f"eval set {domain!r}: blocks must be (N, T), got {tuple(data.blocks.shape)}")
    if (data.target_indices is None) != (data.target_logprobs is None):
        raise XmergeError(f"eval set {domain!r}: give both teacher target indices and log-probs, or neither")
    if data.target_indices is not None:
        want = tuple(data.blocks.shape)
        for name, t in (("indices", data.target_indices), ("log-probs", data.target_logprobs)):
            if t.ndim != 3 or tuple(t.shape[:2]) != want:
                raise XmergeError(f"eval set {domain!r}: target {name} must be (N, T, k) with (N, T) = "
                                  f"{want}, got {tuple(t.shape)}; recompute the teacher targets")


@torch.inference_mode()
def token_metrics(model, data: EvalSet, max_tokens: int | None, batch_size: int) -> dict[str, float]:
    """ce (always), top1 and exp_neg_kl (when teacher targets are given) over the first blocks."""
    n_all, seq_len = data.blocks.shape
    n = n_all if max_tokens is None else min(n_all, max(1, max_tokens // seq_len))
    ce_sum = top1_sum = kl_sum = 0.0
    ce_count = pos_count = 0
    for start in range(0, n, batch_size):
        ids = data.blocks[start : min(n, start + batch_size)].to(model.device)  # (B, T)
        logits = model(input_ids=ids).logits.float()  # (B, T, V)
        ce_sum += F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").item()
        ce_count += ids[:, 1:].numel()
        if data.target_indices is None:
            continue
        idx = data.target_indices[start : start + ids.shape[0]].to(model.device).long()  # (B, T, k)
        teacher = torch.log_softmax(
            data.target_logprobs[start : start + ids.shape[0]].to(model.device).float(), -1)  # (B, T, k)
        student = torch.log_softmax(logits.gather(-1, idx), -1)  # (B, T, k)
        kl_sum += (teacher.exp() * (teacher - student)).sum().item()
        top1_sum += (logits.argmax(-1) == idx[..., 0]).sum().item()
        pos_count += ids.numel()
    out = {"ce": ce_sum / ce_count}
    if pos_count:
        out["top1"] = top1_sum / pos_count
        out["exp_neg_kl"] = math.exp(-max(0.0, kl_sum / pos_count))  # fp noise can make KL < 0
    return out


def exact_match(model, tokenizer, problems: Sequence[Problem], max_new_tokens: int, batch_size: int) -> float:
    """Share of problems whose greedy answer line ends in the right integer."""
    answers = greedy_completions(model, tokenizer, [p.prompt for p in problems], max_new_tokens,
                                 stop=("\n",), batch_size=batch_size)
    return sum(last_integer(a) == p.answer for a, p in zip(answers, problems)) / len(problems)


def evaluate(model, tokenizer, suite: Literal["quick", "full"] | Suite,
             eval_sets: Mapping[str, EvalSet]) -> list[Metric]:
    """All metrics of `suite` (a name in SUITES or a custom Suite) for `model` on each domain's
    eval set, domains in sorted order."""
    if isinstance(suite, str) and suite not in SUITES:
        raise XmergeError(f"unknown suite {suite!r}; choose one of {sorted(SUITES)}")
    if not eval_sets:
        raise XmergeError("no eval sets given; evaluation needs at least one domain")
    cfg = SUITES[suite] if isinstance(suite, str) else suite
    was_training = model.training
    model.eval()
    metrics: list[Metric] = []
    try:
        for domain in sorted(eval_sets):
            data = eval_sets[domain]
            _check_targets(domain, data)
            for kind, value in token_metrics(model, data, cfg.max_tokens, cfg.batch_size).items():
                metrics.append(Metric(f"{domain}/{kind}", domain, value, higher_is_better=kind != "ce"))
            problems = list(data.problems)[: cfg.max_problems]
            if problems:
                em = exact_match(model, tokenizer, problems, cfg.answer_tokens, cfg.prompts_per_batch)
                metrics.append(Metric(f"{domain}/exact_match", domain, em, higher_is_better=True))
        if cfg.humaneval and "code" in eval_sets:
            he = humaneval_pass_at_1(model, tokenizer, cfg.humaneval_limit, cfg.humaneval_tokens,
                                     cfg.prompts_per_batch)
            metrics.append(Metric("code/humaneval_pass1", "code", he.pass_at_1, higher_is_better=True))
    finally:
        model.train(was_training)
    return metrics
