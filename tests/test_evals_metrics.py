"""Recovery, W_τ, τ* and the gate against hand-computed cases; report JSON / PNG / table."""

from __future__ import annotations

import json
import math
import random

import pytest
from rich.console import Console

from xmerge.errors import XmergeError
from xmerge.evals.metrics import (
    Metric,
    compare,
    critical_tolerance,
    recovery,
    summary,
    win_tie_rate,
)
from xmerge.evals.report import plot_recovery, print_report, write_json


def test_recovery_directions_and_zeros():
    assert recovery(0.45, 0.5, higher_is_better=True) == pytest.approx(0.9)
    assert recovery(2.2, 2.0, higher_is_better=False) == pytest.approx(2.0 / 2.2)  # CE went up: r < 1
    assert recovery(1.8, 2.0, higher_is_better=False) == pytest.approx(2.0 / 1.8)  # CE went down: win
    assert recovery(0.0, 0.0, higher_is_better=True) == 1.0  # 0/0 is a tie
    assert recovery(0.0, 0.0, higher_is_better=False) == 1.0
    assert recovery(0.25, 0.0, higher_is_better=True) == math.inf
    assert recovery(0.0, 2.0, higher_is_better=False) == math.inf
    assert recovery(0.0, 0.5, higher_is_better=True) == 0.0
    assert recovery(math.nan, 0.5, higher_is_better=True) == 0.0  # a broken model loses
    with pytest.raises(XmergeError, match="negative"):
        recovery(-1.0, 0.5, higher_is_better=True)
    with pytest.raises(XmergeError, match="reference"):
        recovery(1.0, math.nan, higher_is_better=True)


@pytest.mark.parametrize("rs, w, tau_star", [
    # two ties, one 2 % and one 10 % shortfall: half hold at τ=0, so τ* = 0
    ([1.0, 1.0, 0.98, 0.9], {"0": 0.5, "0.01": 0.5, "0.02": 0.75, "0.05": 0.75, "0.1": 1.0}, 0.0),
    # odd count: needs 2 of 3, shortfalls (0, 0.03, 0.1) → τ* = 0.03
    ([0.97, 0.9, 1.2], {"0": 1 / 3, "0.01": 1 / 3, "0.02": 1 / 3, "0.05": 2 / 3, "0.1": 1.0}, 0.03),
    # all lose: shortfalls (0.05, 0.1, 0.2, 0.3) → τ* is the 2nd = 0.1
    ([0.95, 0.9, 0.8, 0.7], {"0": 0.0, "0.01": 0.0, "0.02": 0.0, "0.05": 0.25, "0.1": 0.5}, 0.1),
    # r exactly at 1 - τ counts despite float rounding of 1 - 0.01
    ([0.99, 0.99, 0.5], {"0": 0.0, "0.01": 2 / 3, "0.02": 2 / 3, "0.05": 2 / 3, "0.1": 2 / 3}, 0.01),
    # an unbounded win counts as a win
    ([math.inf, 0.0], {"0": 0.5, "0.01": 0.5, "0.02": 0.5, "0.05": 0.5, "0.1": 0.5}, 0.0),
])
def test_win_tie_rate_and_critical_tolerance(rs, w, tau_star):
    s = summary(rs)
    assert s["w_tau"] == pytest.approx(w)
    assert s["tau_star"] == pytest.approx(tau_star)


def test_tau_star_is_the_smallest_tau_reaching_half():
    rng = random.Random(0)
    for _ in range(200):
        rs = [rng.choice([1.0, 1.1, rng.uniform(0.5, 1.2)]) for _ in range(rng.randint(1, 9))]
        t = critical_tolerance(rs)
        assert win_tie_rate(rs, t) >= 0.5
        if t > 0:
            assert win_tie_rate(rs, t - 1e-9) < 0.5


def _metrics(**values: float) -> list[Metric]:
    """name=value pairs; names ending in 'ce' are lower-is-better; domain is the name's prefix."""
    return [Metric(n.replace("__", "/"), n.split("__")[0], v, higher_is_better=not n.endswith("ce"))
            for n, v in values.items()]


REFERENCE = _metrics(math__ce=2.0, math__top1=0.5, math__exact_match=0.4, code__ce=1.5, code__top1=0.6)


def test_gate_names_exactly_the_regressed_metrics():
    model = _metrics(math__ce=1.9, math__top1=0.52, math__exact_match=0.3, code__ce=1.6, code__top1=0.595)
    v = compare(model, REFERENCE, tau=0.05)
    assert not v.passed
    # exact_match 0.3/0.4 = 0.75 and code CE 1.5/1.6 = 0.9375 fail; code top1 0.595/0.6 ≈ 0.992 holds
    assert [f.split(":")[0] for f in v.failing] == ["math/exact_match", "code/ce"]
    assert "model=0.3 reference=0.4 r=0.7500" in v.failing[0]
    rows = {m["name"]: m for m in v.report["metrics"]}
    assert rows["math/ce"]["outcome"] == "win" and rows["code/top1"]["outcome"] == "tie"
    assert rows["code/ce"]["recovery"] == pytest.approx(1.5 / 1.6)
    assert v.report["w_tau"]["0.05"] == pytest.approx(3 / 5)
    assert compare(model, REFERENCE, tau=0.3).passed


def test_gate_target_domain_is_held_to_tau_and_must_exist():
    # a code patch: code improves, math drops 4 % → accepted at τ = 0.05
    model = _metrics(math__ce=2.08, math__top1=0.5, math__exact_match=0.4, code__ce=1.4, code__top1=0.7)
    v = compare(model, REFERENCE, tau=0.05, target_domain="code")
    assert v.passed and v.report["target_w_tau"] == 1.0
    # the target domain itself dropping by more than τ rejects the patch
    model = _metrics(math__ce=2.0, math__top1=0.5, math__exact_match=0.4, code__ce=1.4, code__top1=0.55)
    v = compare(model, REFERENCE, tau=0.05, target_domain="code")
    assert not v.passed and [f.split(":")[0] for f in v.failing] == ["code/top1"]
    assert v.report["target_w_tau"] == 0.5
    with pytest.raises(XmergeError, match="target domain 'chat'"):
        compare(model, REFERENCE, tau=0.1, target_domain="chat")


def test_gate_refuses_mismatched_metric_sets():
    with pytest.raises(XmergeError, match=r"only reference: \['code/top1'\]"):
        compare(REFERENCE[:-1], REFERENCE, tau=0.0)
    with pytest.raises(XmergeError, match="tolerance"):
        compare(REFERENCE, REFERENCE, tau=1.5)


def test_report_outputs(tmp_path):
    model = _metrics(math__ce=0.0, math__top1=0.0, math__exact_match=0.6, code__ce=1.6, code__top1=0.6)
    ref = _metrics(math__ce=2.0, math__top1=0.5, math__exact_match=0.0, code__ce=1.5, code__top1=0.6)
    report = compare(model, ref, tau=0.02).report
    data = json.loads(write_json(report, tmp_path / "out" / "eval.json").read_text())
    assert data["metrics"][0]["recovery"] == "inf"  # CE 0 vs 2: unbounded win, strict JSON
    assert data["failing"] == report["failing"] and data["tau_star"] == report["tau_star"]
    png = plot_recovery(report, tmp_path / "recovery.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    console = Console(record=True, width=120)
    print_report(report, console)
    text = console.export_text()
    assert "math/top1" in text and "W_τ (τ=0.05)" in text and "τ*" in text
    assert "regressed: math/top1" in text and "regressed: code/ce" in text
