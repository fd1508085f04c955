"""benchmarks/pipeline_report.py on a fake RAW dir: a real registry (forced compose), hand-written eval reports."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from common import add_noised_expert, tiny_registry
from xmerge.benchmarks.pipeline_report import main, parse_runs
from xmerge.cli.app import app
from xmerge.errors import XmergeError
from xmerge.merge.operations import compose

TEACHER = "teacher:/t/SmolLM2.gguf"


def write_report(raw, folder, model, recoveries, w_tau, tau_star):
    """An eval report.json; `recoveries` maps metric name ("math/ce") -> recovery (values are 2 r, ref 2)."""
    metrics = [{"name": name, "domain": name.split("/")[0], "higher_is_better": True, "model": 2 * r,
                "reference": 2.0, "recovery": r, "outcome": "win" if r > 1 else "loss"}
               for name, r in recoveries.items()]
    (raw / folder).mkdir()
    (raw / folder / "report.json").write_text(json.dumps({
        "model": model, "reference": TEACHER, "suite": "full", "domains": ["chat", "code", "math"],
        "metrics": metrics, "w_tau": w_tau, "tau_star": tau_star}))


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    reg = tiny_registry(root, seed_name="base")
    math_e, code_e, _chat = (add_noised_expert(reg, d, 1e-3, i, seed_name="base")
                             for i, d in enumerate(("math", "code", "chat"), 1))
    assert compose(reg, "mix", "math=1,code=1,chat=1", gate=False).decision == "forced"
    raw = root / "raw"
    raw.mkdir()
    reg.close()  # the last connection's close checkpoints SQLite's WAL into registry.db, as the script's cp expects
    shutil.copy(reg.home / "registry.db", raw / "registry.db")
    listed = CliRunner().invoke(app, ["experts", "list", "--json", "--home", str(reg.home)])
    assert listed.exit_code == 0, listed.output
    (raw / "experts.json").write_text(listed.output)  # compositions.json left out: read from the registry
    (raw / "commands.tsv").write_text("step\tseconds\texit\tcommand\n"
                                      "seed\t54\t0\txmerge seed create base --window 8\n"
                                      "compose-mix\t149\t2\txmerge compose mix --weights a|b\n")
    grid = {"0": 0.25, "0.01": 0.5, "0.02": 0.75, "0.05": 0.9375, "0.1": 1.0}
    # merged: math (1.0, 1.5) -> 1.25, code 0.75, chat 0.875; experts: math (1.0, 1.5) -> 1.25, code 1.0
    write_report(raw, "eval-comp-mix-v1", "comp:mix@v1",
                 {"math/ce": 1.0, "math/top1": 1.5, "code/ce": 0.75, "chat/ce": 0.875}, grid, 0.015625)
    write_report(raw, "eval-math-v1", f"expert:{math_e.id}", {"math/ce": 1.0, "math/top1": 1.5}, grid, 0.0)
    write_report(raw, "eval-code-v1", f"expert:{code_e.id}", {"code/ce": 1.0}, grid, 0.0)
    return raw


def test_report_retention_goals_and_files(raw, tmp_path):
    out = tmp_path / "report"
    main(["--run", f"run1={raw}", "--out", str(out)])
    summary = json.loads((out / "summary.json").read_text())
    run = summary["runs"][0]

    assert [(r["domain"], r["expert"], r["merged"], r["expert_recovery"], r["retention"]) for r in run["retention"]] \
        == [("math", "math@v1", 1.25, 1.25, 1.0), ("code", "code@v1", 0.75, 1.0, 0.75),
            ("chat", "chat@v1", 0.875, None, None)]
    goal = run["goals"][0]
    assert (goal["w_0.05"], goal["w_0.05_met"]) == (0.9375, True)
    assert (goal["tau_star"], goal["tau_star_met"]) == (0.015625, True)
    assert (goal["min_retention"], goal["min_retention_domain"], goal["min_retention_met"]) == (0.75, "code", False)
    assert goal["retention_not_measured"] == ["chat"]

    text = (out / "REPORT-data.md").read_text()
    assert ("- comp:mix@v1: W_0.05 = 0.938 ≥ 0.9 ✓ · τ* = 0.0156 ≤ 0.02 ✓ · "
            "min retention = 0.750 (code) ≥ 0.95 ✗ (not measured: chat)") in text
    assert "| chat@v1 | not run |" in text and "| seed:base | not run |" in text
    assert "| comp:mix@v1 | full | 0.250 | 0.500 | 0.750 | 0.938 | 1.000 | 0.0156 | 1.250 | 0.750 | 0.875 |" in text
    assert "| code | code@v1 | 0.750 | 1.000 | 0.750 | ✗ |" in text
    assert "| **total** | 203 |  |  |" in text and "`xmerge compose mix --weights a\\|b`" in text
    assert "| window 8" not in text and "window 8, sinks 2" in text

    [op] = run["operations"]
    assert (op["kind"], op["decision"], op["gate_skipped"], op["result"]) == ("compose", "forced", True, "mix@v1")
    assert "| forced | 0.02 | skipped |" in text
    assert [m["name"] for m in run["models"]] == ["comp:mix@v1", "math@v1", "code@v1", "chat@v1", "seed:base"]
    png = out / "recovery.png"
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size < 200_000


def test_run_labels(tmp_path):
    raw = tmp_path / "h100r" / "raw"
    assert parse_runs([str(raw)], ["second=/x/raw"]) == [("h100r", raw), ("second", Path("/x/raw"))]
    with pytest.raises(XmergeError, match="repeat"):
        parse_runs([str(raw), str(tmp_path / "h100r" / "raw")], [])
    with pytest.raises(XmergeError, match="LABEL=DIR"):
        parse_runs([], ["no-equals-sign"])
