"""The merge gate: quick-eval metrics of models per domain (cached in the registry), and the verdict.

Metrics are cached per domain: one eval run per (model weights sha256, "<suite>/<domain>",
fingerprint of that domain's eval set), so a composition is evaluated once per domain however many
patches are tried against it, and a candidate that gets registered is never evaluated twice (its
weights hash is its blob's sha256).

Which reference a candidate is gated against:
- patch / replace / a compose of an existing name: the current (newest) version of the composition,
  on the union of both member lists' domains, the patched domain as target (evals.metrics.compare).
- a first compose (no previous version): each member's own expert on that member's domain, i.e.
  the merge must keep ≥ 1 − τ of every expert's quality on its own domain. Against a common
  reference (teacher or seed) this is exactly "each domain keeps ≥ 1 − τ of its expert's recovery":
  recovery(merge)/recovery(expert) = merge/expert, the teacher's value cancels. The weight search
  optimises the mean of the same recoveries.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from xmerge.errors import XmergeError
from xmerge.evals.metrics import Metric
from xmerge.evals.quick import EvalSet
from xmerge.evals.run import Subject, domain_metrics, eval_set_fingerprint
from xmerge.registry import Expert, Registry, Seed

EvalSetsFn = Callable[[list[str]], Mapping[str, EvalSet]]  # domains -> each domain's held-out eval set


class ModelEvaluator:
    """Per-domain quick-eval metrics of the seed's models, looked up in / added to the registry's eval runs.

    eval_sets builds the held-out sets of some domains (default: evals.sets.domain_eval_sets for
    the seed); the model is loaded from its dir only when some domain is not cached."""

    def __init__(self, reg: Registry, seed: Seed, *, suite: str = "quick", eval_sets: EvalSetsFn | None = None,
                 device: str = "cpu") -> None:
        self.reg, self.seed, self.suite, self.device = reg, seed, suite, device
        if eval_sets is None:

            def eval_sets(domains: list[str]) -> Mapping[str, EvalSet]:
                from xmerge.evals.sets import domain_eval_sets

                return domain_eval_sets(reg, seed, domains, suite=suite, device=device)
        self._build_sets = eval_sets
        self._sets: dict[str, tuple[EvalSet, str]] = {}  # domain -> (eval set, fingerprint)
        self._tokenizer = None
        self._evaluated: list[str] = []  # "<ref> <domain>" of every cache miss

    def _eval_sets(self, domains: Sequence[str]) -> dict[str, tuple[EvalSet, str]]:
        missing = sorted(set(domains) - self._sets.keys())
        if missing:
            built = self._build_sets(missing)
            for domain in missing:
                if domain not in built:
                    raise XmergeError(f"no eval set for domain {domain!r}; the quick eval needs held-out data "
                                      "for every member's domain")
                self._sets[domain] = (built[domain], eval_set_fingerprint(built[domain]))
        return {domain: self._sets[domain] for domain in domains}

    def metrics(self, model_dir: Path, model_hash: str, model_ref: str, domains: Sequence[str]) -> list[Metric]:
        """Metrics of the model in `model_dir` (weights sha256 `model_hash`) on `domains`, in sorted domain order."""
        subject = Subject(ref=model_ref, hash=model_hash, load=lambda: self._load(model_dir), seed=self.seed,
                          domains=tuple(domains))
        return domain_metrics(self.reg, subject, self._eval_sets(domains), self.suite, self._load_tokenizer(),
                              self._evaluated)

    @property
    def evaluated(self) -> int:
        """Domains actually evaluated (cache misses), for reports and tests."""
        return len(self._evaluated)

    def expert_reference(self, experts: Sequence[Expert]) -> list[Metric]:
        """Each expert's metrics on its own domain: the reference of a first compose and of the search."""
        from xmerge.experts.seed import checkout_cached

        reference: list[Metric] = []
        for expert in sorted(experts, key=lambda e: e.domain):
            reference += self.metrics(checkout_cached(self.reg, expert), expert.weights_sha,
                                      f"expert:{expert.id}", [expert.domain])
        return reference

    def _load(self, model_dir: Path):
        import xmerge  # noqa: F401  (registers the student with the Auto classes)
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(self.device).eval()

    def _load_tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            from xmerge.experts.seed import checkout_cached

            self._tokenizer = AutoTokenizer.from_pretrained(checkout_cached(self.reg, self.seed))
        return self._tokenizer


def decide(passed: bool | None, force: bool) -> str:
    """accepted (gate passed), forced (failed or skipped, registered anyway) or rejected."""
    if passed:
        return "accepted"
    return "forced" if force or passed is None else "rejected"
