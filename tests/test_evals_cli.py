"""evaluate_ref and `xmerge eval` on a real registry with a tiny teacher: references, caching, outputs, errors.

One registry per module (its eval sets and cached metrics are shared); each test uses its own models.
"""

from __future__ import annotations

import json
import shutil

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from common import add_noised_expert as add_expert
from common import tiny_registry
from xmerge.cli.app import app
from xmerge.evals.run import evaluate_ref, resolve_subject
from xmerge.evals.sets import domain_eval_sets
from xmerge.registry.schema import EvalRunRow

BAD_NOISE = 0.5


@pytest.fixture(scope="module")
def reg(tmp_path_factory):
    return tiny_registry(tmp_path_factory.mktemp("evals"))


def eval_rows(reg) -> int:
    with Session(reg.engine) as session:
        return session.scalar(select(func.count()).select_from(EvalRunRow))


def invoke(reg, *args):
    return CliRunner().invoke(app, ["eval", *args, "--home", str(reg.home)])


def test_teacher_against_itself_ties_everywhere(reg):
    teacher_dir = reg.home.parent / "teacher"
    report = evaluate_ref(reg, teacher_dir)
    assert report.domains == ("code", "math")
    assert report.reference.ref.startswith("teacher:") and report.reference.hash == report.model.hash
    assert {m.name for m in report.metrics} == {"code/ce", "code/top1", "code/exp_neg_kl", "math/ce", "math/top1",
                                                "math/exp_neg_kl", "math/exact_match"}
    assert report.w_tau["0"] == 1.0 and report.tau_star == 0.0 and report.verdict.passed
    # the directory holds the teacher's own weights: the teacher's metrics are its, not computed again
    assert report.evaluated == (f"{report.model.ref} code", f"{report.model.ref} math")


def test_noised_expert_fails_and_a_repeat_runs_nothing(reg, tmp_path):
    expert = add_expert(reg, "code", BAD_NOISE, seed=1)
    out = tmp_path / "report"
    first = invoke(reg, f"expert:{expert.id}", "--json", "--out", str(out))
    assert first.exit_code == 0, first.output
    data = json.loads(first.stdout)
    assert data["domains"] == ["code"] and data["cached"] is False and not data["passed"]
    assert f"expert:{expert.id} code" in data["evaluated"]
    assert any(line.startswith("code/ce:") for line in data["failing"])
    assert set(data["w_tau"]) == {"0", "0.01", "0.02", "0.05", "0.1"}
    saved = json.loads((out / "report.json").read_text())
    assert saved["metrics"] == data["metrics"] and (out / "recovery.png").stat().st_size > 0
    with Session(reg.engine) as session:
        run = session.get(EvalRunRow, data["eval_run_id"])
        assert (run.model_hash, run.suite, run.report_path) == (expert.weights_sha, "quick", str(out / "report.json"))
        assert run.metrics["model"]["code/ce"]["value"] == next(
            m["model"] for m in data["metrics"] if m["name"] == "code/ce")

    # a repeat neither checks the model out nor loads it, and records nothing new
    shutil.rmtree(reg.home / "cache" / "models" / expert.weights_sha)
    rows = eval_rows(reg)
    second = invoke(reg, expert.ref)
    assert second.exit_code == 0, second.output
    assert "(cached)" in second.output and "W_τ (τ=0.05)" in second.output and "τ*" in second.output
    assert "regressed: code/ce" in second.output
    assert not (reg.home / "cache" / "models" / expert.weights_sha).exists()
    assert eval_rows(reg) == rows
    assert (reg.home / "reports" / f"{expert.ref}-quick" / "report.json").is_file()


def test_against_another_model_reuses_its_cached_metrics(reg):
    expert = add_expert(reg, "code", BAD_NOISE, seed=2)
    alone = evaluate_ref(reg, f"expert:{expert.id}")
    versus = evaluate_ref(reg, "seed:tiny", against=f"expert:{expert.id}", domains=["code"])
    assert versus.evaluated == ("seed:tiny code",)  # the expert's code metrics came from the cache
    assert versus.reference_metrics == alone.metrics
    seed_alone = evaluate_ref(reg, "seed:tiny", domains=["code"])
    assert seed_alone.evaluated == () and not seed_alone.cached  # a new comparison, no model run
    expected = {m.name: (m.value / r.value if m.higher_is_better else r.value / m.value)
                for m, r in zip(versus.metrics, versus.reference_metrics)}
    assert versus.recoveries == pytest.approx(expected)
    # the noised expert is worse than the seed: the seed recovers more than all of it on CE
    assert versus.recoveries["code/ce"] > 1 and versus.verdict.passed


def test_checked_out_directory_shares_the_registry_cache(reg, tmp_path):
    expert = add_expert(reg, "code", BAD_NOISE, seed=3)
    by_ref = evaluate_ref(reg, expert.ref)
    directory = reg.checkout(expert, tmp_path / "expert-dir")
    by_dir = evaluate_ref(reg, str(directory), domains=["code"])
    assert by_dir.model.hash == expert.weights_sha and by_dir.evaluated == ()
    assert by_dir.metrics == by_ref.metrics


def test_gate_reads_the_same_per_domain_cache(reg):
    from xmerge.merge.gate import ModelEvaluator

    seed = reg.resolve("seed:tiny")
    sets = domain_eval_sets(reg, seed, ["code"])
    expert = add_expert(reg, "code", BAD_NOISE, seed=4)
    ours = evaluate_ref(reg, expert.ref)
    gate = ModelEvaluator(reg, seed, eval_sets=lambda domains: {d: sets[d] for d in domains})
    theirs = gate.metrics(reg.home / "unused", expert.weights_sha, f"expert:{expert.id}", ["code"])
    assert gate.evaluated == 0 and theirs == list(ours.metrics)


def test_default_domains_of_refs(reg):
    math_expert, code_expert = add_expert(reg, "math", 1e-5, seed=5), add_expert(reg, "code", 1e-5, seed=6)
    weights = reg.home / "comp.safetensors"
    shutil.copy(reg.blob_path(math_expert.weights_sha), weights)
    reg.add_composition("mix", seed="tiny", members=[(math_expert.id, 0.5), (code_expert.id, 0.5)],
                        method="linear", params={}, parent_id=None, weights=weights)
    assert resolve_subject(reg, "comp:mix", "cpu").domains == ("code", "math")
    assert resolve_subject(reg, f"expert:{math_expert.id}", "cpu").domains == ("math",)
    assert resolve_subject(reg, "seed:tiny", "cpu").domains == ("code", "math")


@pytest.mark.parametrize("args, message", [
    (["no-such-model"], "names no seed, expert or composition"),
    (["./missing-dir"], "model directory ./missing-dir does not exist"),
    (["seed:tiny", "--suite", "huge"], "unknown suite 'huge'"),
    (["seed:tiny", "--against", "expert:999"], "expert 999 does not exist"),
    (["seed:tiny", "--domains", "poetry"], "domain 'poetry' is not a preset"),
])
def test_bad_input_is_one_line_and_writes_nothing(reg, args, message):
    rows = eval_rows(reg)
    result = invoke(reg, *args)
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.output
    assert eval_rows(reg) == rows
    assert not (reg.home / "reports" / f"{args[0].strip('./')}-quick").exists()


def test_eval_blocks_are_at_least_twice_the_window(reg):
    from xmerge.experts.seed import create_seed

    create_seed(reg, "wide", str(reg.home.parent / "teacher"), window=200, sinks=2)  # context 512
    wide = domain_eval_sets(reg, reg.resolve("seed:wide"), ["code"])["code"]
    narrow = domain_eval_sets(reg, reg.resolve("seed:tiny"), ["code"])["code"]  # window 8: the suite's 256
    assert wide.blocks.shape[1] == 400 and narrow.blocks.shape[1] == 256
