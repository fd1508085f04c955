"""The paper's metrics: recovery, Win-and-Tie rate W_τ, critical tolerance τ*, and the merge gate.

Conventions (chosen here, relied on by the gate and the report):
- recovery r = model / reference for higher-is-better metrics, reference / model for
  lower-is-better ones, so r ≥ 1 always means "as good or better".
- zeros: 0/0 is a tie (r = 1); x/0 with x > 0 is an unbounded win (r = inf); 0/x is r = 0.
- a NaN model value (a broken model) scores r = 0, a loss; negative values or a NaN
  reference are errors, since a ratio of them means nothing.
- metrics whose ideal is the reference itself (KL to the teacher is 0 for the teacher) are
  expressed as higher-is-better exp(-KL), so r = exp(-(KL_model - KL_reference)).
- W_τ compares r ≥ 1 - τ with a 1e-12 slack so that e.g. r = 0.99 counts at τ = 0.01
  despite float rounding of 1 - 0.01.
- the gate passes iff every metric has r ≥ 1 - τ; the target domain of a patch is held to the
  same tolerance (it must not drop by more than τ either) and is reported on its own.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from xmerge.errors import XmergeError

TAU_GRID = (0.0, 0.01, 0.02, 0.05, 0.1)
_SLACK = 1e-12


@dataclass(frozen=True)
class Metric:
    name: str  # unique, "<domain>/<kind>", e.g. "math/ce"
    domain: str
    value: float
    higher_is_better: bool


@dataclass(frozen=True)
class Recovery:
    """One metric of the model next to the same metric of the reference."""

    name: str
    domain: str
    higher_is_better: bool
    model: float
    reference: float
    recovery: float


@dataclass(frozen=True)
class GateVerdict:
    passed: bool
    failing: list[str]  # "name: model=… reference=… r=…" for every metric with r < 1 - τ
    report: dict


def recovery(model: float, reference: float, higher_is_better: bool) -> float:
    """r = model/reference (higher-is-better) or reference/model (lower-is-better); see module doc."""
    if math.isnan(reference) or reference < 0:
        raise XmergeError(f"reference value {reference} has no meaningful recovery ratio; "
                          "re-evaluate the reference model")
    if math.isnan(model):
        return 0.0
    if model < 0:
        raise XmergeError(f"metric value {model} is negative; recovery needs values ≥ 0")
    num, den = (model, reference) if higher_is_better else (reference, model)
    if den == 0:
        return 1.0 if num == 0 else math.inf
    return num / den


def recoveries(metrics: Sequence[Metric], reference: Sequence[Metric]) -> list[Recovery]:
    """Pair metrics with the reference's by name (same set required), in the model's order."""
    ref = {m.name: m for m in reference}
    names = [m.name for m in metrics]
    if len(set(names)) != len(names):
        raise XmergeError(f"duplicate metric names in {names}")
    missing, extra = sorted(set(names) - ref.keys()), sorted(ref.keys() - set(names))
    if missing or extra:
        raise XmergeError(f"model and reference were evaluated on different metrics "
                          f"(only model: {missing}, only reference: {extra}); "
                          "evaluate both with the same suite and eval sets")
    out = []
    for m in metrics:
        r = ref[m.name]
        if r.higher_is_better != m.higher_is_better:
            raise XmergeError(f"metric {m.name} disagrees on direction between model and reference")
        out.append(Recovery(m.name, m.domain, m.higher_is_better, m.value, r.value,
                            recovery(m.value, r.value, m.higher_is_better)))
    return out


def _check_nonempty(rs: Sequence[float]) -> None:
    if not rs:
        raise XmergeError("no metrics to score; the eval sets produced no metrics")


def win_tie_rate(rs: Sequence[float], tau: float) -> float:
    """W_τ: the share of recoveries with r ≥ 1 - τ."""
    _check_nonempty(rs)
    return sum(r >= 1 - tau - _SLACK for r in rs) / len(rs)


def critical_tolerance(rs: Sequence[float]) -> float:
    """τ*: the smallest τ ≥ 0 with W_τ ≥ 0.5.

    W_τ counts the r with 1 - r ≤ τ, so τ* is the ceil(n/2)-th smallest of max(0, 1 - r).
    """
    _check_nonempty(rs)
    shortfalls = sorted(max(0.0, 1.0 - r) for r in rs)
    return shortfalls[math.ceil(len(rs) / 2) - 1]


def summary(rs: Sequence[float], taus: Sequence[float] = TAU_GRID) -> dict:
    """W_τ on a grid (keys are the τ as strings, for JSON) and τ*."""
    return {"w_tau": {f"{t:g}": win_tie_rate(rs, t) for t in taus},
            "tau_star": critical_tolerance(rs)}


def outcome(r: float, tau: float) -> str:
    """'win' (r > 1), 'tie' (1 - τ ≤ r ≤ 1) or 'loss'."""
    if r > 1:
        return "win"
    return "tie" if r >= 1 - tau - _SLACK else "loss"


def compare(metrics: Sequence[Metric], reference: Sequence[Metric], tau: float,
            target_domain: str | None = None) -> GateVerdict:
    """The merge gate: pass iff no metric (target domain included) has r < 1 - τ."""
    if not 0 <= tau < 1:
        raise XmergeError(f"tolerance τ={tau} must lie in [0, 1)")
    scored = recoveries(metrics, reference)
    if target_domain is not None and not any(s.domain == target_domain for s in scored):
        raise XmergeError(f"target domain {target_domain!r} has no metrics; domains evaluated: "
                          f"{sorted({s.domain for s in scored})}")
    failing = [f"{s.name}: model={s.model:.4g} reference={s.reference:.4g} r={s.recovery:.4f}"
               for s in scored if outcome(s.recovery, tau) == "loss"]
    rs = [s.recovery for s in scored]
    report = {
        "tau": tau,
        "target_domain": target_domain,
        "passed": not failing,
        "failing": failing,
        "metrics": [{"name": s.name, "domain": s.domain, "higher_is_better": s.higher_is_better,
                     "model": s.model, "reference": s.reference, "recovery": s.recovery,
                     "outcome": outcome(s.recovery, tau)} for s in scored],
        **summary(rs),
    }
    if target_domain is not None:
        report["target_w_tau"] = win_tie_rate(
            [s.recovery for s in scored if s.domain == target_domain], tau)
    return GateVerdict(passed=not failing, failing=failing, report=report)
