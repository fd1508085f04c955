"""Issue 8's report data from the raw output of benchmarks/h100_pipeline.sh: tables, JSON, one chart.

    .venv/bin/python -m xmerge.benchmarks.pipeline_report RAW_DIR... --out reports/h100-smollm2
    .venv/bin/python -m xmerge.benchmarks.pipeline_report --run run1=/tmp/h100r/raw --run run2=/tmp/h100r2/raw \
        --out reports/h100-smollm2

A RAW_DIR holds eval-*/report.json, experts.json, compositions.json, commands.tsv and registry.db;
a positional one is labelled by its parent folder's name. Writes REPORT-data.md (tables only),
summary.json (the same data) and recovery.png (per-domain recovery of every evaluated model) to --out.
W_τ and τ* are read from the eval reports; a domain's recovery is the mean recovery of its metrics.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import re
import sys
from pathlib import Path

from xmerge.errors import XmergeError
from xmerge.evals.report import json_safe
from xmerge.merge.operations import RECOVERY_CAP
from xmerge.registry import Registry

TAUS = ("0", "0.01", "0.02", "0.05", "0.1")
GOAL_W005, GOAL_TAU_STAR, GOAL_RETENTION = 0.9, 0.02, 0.95
RECOVERY_PLOT_CAP = 2.0  # an unbounded win (x/0) would flatten every other bar
FAILING_SHOWN = 6


# ---- reading one run ------------------------------------------------------------------------------


def load_run(label: str, raw: Path) -> dict:
    """Everything the report shows about one RAW directory, JSON-ready."""
    raw = Path(raw)
    if not raw.is_dir():
        raise XmergeError(f"raw directory {raw} does not exist; pass the REPORT_DIR of h100_pipeline.sh")
    registry = _registry(raw)
    seeds = [dataclasses.asdict(s) for s in registry.list_seeds()] if registry else []
    experts = _records(raw / "experts.json", registry.list_experts if registry else None)
    compositions = _records(raw / "compositions.json", registry.list_compositions if registry else None)
    operations = [dataclasses.asdict(o) for o in registry.list_operations()] if registry else None
    reports = _eval_reports(raw)
    experts_by_id = {e["id"]: e for e in experts}
    domains = _ordered([e["domain"] for e in experts]
                       + [m["domain"] for r in reports.values() for m in r["metrics"]])
    models = _models(seeds, experts, compositions, reports, domains)
    retention = _retention(compositions, experts_by_id, models)
    return {
        "label": label,
        "raw": str(raw),
        "registry": registry is not None,
        "domains": domains,
        "seeds": [{"name": s["name"], "teacher": s["teacher_spec"],
                   **{k: s["student_config"].get(k) for k in ("window", "sinks", "mixer", "num_hidden_layers")}}
                  for s in seeds],
        "setup": [{"expert": e["ref"], **e["recipe"]} for e in experts],
        "commands": _commands(raw / "commands.tsv"),
        "models": models,
        "retention": retention,
        "operations": None if operations is None else [_operation(o, compositions) for o in operations],
        "training": [_training(e) for e in experts],
        "goals": [_goals(m, retention) for m in models if m["kind"] == "composition" and m["evaluated"]],
    }


def _registry(raw: Path) -> Registry | None:
    db = raw / "registry.db"
    return Registry(home=raw, db_url=f"sqlite:///{db}") if db.is_file() else None


def _records(path: Path, from_registry) -> list[dict]:
    """experts.json / compositions.json, else the same rows from the registry, else none."""
    if path.is_file():
        return json.loads(path.read_text())
    if from_registry is None:
        return []
    return [{**dataclasses.asdict(r), "ref": r.ref} for r in from_registry()]


def _eval_reports(raw: Path) -> dict[str, dict]:
    """model ref -> report.json (+ the folder it came from); the first folder of a model wins."""
    reports = {}
    for path in sorted(raw.glob("eval-*/report.json")):
        report = json.loads(path.read_text())
        reports.setdefault(report["model"], {**report, "folder": path.parent.name})
    return reports


def _ordered(items) -> list:
    return list(dict.fromkeys(items))


def _float(value) -> float | None:
    """Report numbers; json_safe writes non-finite ones as "inf"/"nan"."""
    return None if value is None else float(value)


def domain_recovery(metrics: list[dict]) -> dict[str, float]:
    """Mean recovery of each domain's metrics, each capped at RECOVERY_CAP (as the weight search does):
    one large win, e.g. exact match 0.86 against a teacher's 0.035, must not swamp the domain."""
    by_domain: dict[str, list[float]] = {}
    for m in metrics:
        by_domain.setdefault(m["domain"], []).append(min(_float(m["recovery"]), RECOVERY_CAP))
    return {domain: sum(rs) / len(rs) for domain, rs in by_domain.items()}


def _models(seeds, experts, compositions, reports, domains) -> list[dict]:
    """Compositions, experts, seeds (registry order), then any other evaluated model; evaluated or not."""
    known = ([("composition", f"comp:{c['ref']}", f"comp:{c['ref']}", [f"comp:{c['ref']}"]) for c in compositions]
             + [("expert", f"expert:{e['id']}", e["ref"], [f"expert:{e['id']}", e["ref"]]) for e in experts]
             + [("seed", f"seed:{s['name']}", f"seed:{s['name']}", [f"seed:{s['name']}"]) for s in seeds])
    claimed = {alias for *_, aliases in known for alias in aliases}
    known += [("other", ref, ref, [ref]) for ref in reports if ref not in claimed]
    models = []
    for kind, key, name, aliases in known:
        report = next((reports[a] for a in aliases if a in reports), None)
        model = {"key": key, "name": name, "kind": kind, "evaluated": report is not None}
        if report is not None:
            recovery = domain_recovery(report["metrics"])
            model.update(
                folder=report["folder"], reference=report["reference"], suite=report["suite"],
                w_tau={t: _float(report["w_tau"].get(t)) for t in TAUS}, tau_star=_float(report["tau_star"]),
                domain_recovery={d: recovery[d] for d in domains if d in recovery},
                metrics=[{k: m[k] for k in ("name", "domain", "higher_is_better", "model", "reference", "recovery")}
                         for m in report["metrics"]])
        models.append(model)
    return models


def _retention(compositions, experts_by_id, models) -> list[dict]:
    """Per composition and member domain: merged domain recovery / that domain's expert recovery."""
    by_key = {m["key"]: m for m in models}
    rows = []
    for comp in compositions:
        merged = by_key[f"comp:{comp['ref']}"]
        for member in comp["members"]:
            expert = experts_by_id[member["expert_id"]]
            alone = by_key[f"expert:{expert['id']}"]
            domain = expert["domain"]
            row = {"composition": f"comp:{comp['ref']}", "domain": domain, "expert": expert["ref"],
                   "merged": merged.get("domain_recovery", {}).get(domain),
                   "expert_recovery": alone.get("domain_recovery", {}).get(domain), "retention": None}
            if row["merged"] is not None and row["expert_recovery"]:
                row["retention"] = row["merged"] / row["expert_recovery"]
            rows.append(row)
    return rows


def _commands(path: Path) -> list[dict] | None:
    if not path.is_file():
        return None
    with path.open(newline="") as f:
        return [{"step": r["step"], "seconds": int(r["seconds"]), "exit": int(r["exit"]), "command": r["command"]}
                for r in csv.DictReader(f, delimiter="\t")]


def _operation(op: dict, compositions: list[dict]) -> dict:
    report, inputs = op["report"], op["inputs"]
    gate = report.get("gate")
    refs = {c["id"]: c["ref"] for c in compositions}
    result = op["result_composition_id"]
    return {"id": op["id"], "kind": op["kind"], "composition": op["composition"], "decision": op["decision"],
            "inputs": _inputs_text(op["kind"], inputs),
            "gate_reference": report.get("reference"),
            "tau": gate["tau"] if gate else inputs.get("tau"),
            "gate_w_tau": gate and {t: _float(gate["w_tau"].get(t)) for t in TAUS},
            "gate_tau_star": gate and _float(gate["tau_star"]),
            "result": None if result is None else refs.get(result, f"composition {result}"),
            "failing": gate["failing"] if gate else [],
            "gate_skipped": gate is None}


def _inputs_text(kind: str, inputs: dict) -> str:
    if kind == "compose":
        search = f", search budget {inputs['search_budget']}" if inputs.get("search_budget") else ""
        return f"{inputs.get('method', 'linear')} {inputs.get('weights')}{search}"
    if kind == "replace":
        return f"{inputs.get('composition')}: {inputs.get('domain')} → {inputs.get('expert')}"
    return f"{inputs.get('composition')}: + {inputs.get('expert')} weight {inputs.get('weight')}"


def _training(expert: dict) -> dict:
    metrics = expert.get("metrics") or {}

    def ends(key):
        values = metrics.get(key) or []
        return [values[0], values[-1]] if values else None

    return {"expert": expert["ref"], "stage1_tokens_per_s": metrics.get("stage1_tokens_per_s"),
            "stage2_tokens_per_s": metrics.get("stage2_tokens_per_s"),
            "stage1_loss": ends("stage1_loss"), "stage2_loss": ends("stage2_loss"),
            "heldout_kl": [metrics.get("heldout_kl_before"), metrics.get("heldout_kl_after")]}


def _goals(model: dict, retention: list[dict]) -> dict:
    rows = [r for r in retention if r["composition"] == model["key"]]
    measured = [r for r in rows if r["retention"] is not None]
    lowest = min(measured, key=lambda r: r["retention"]) if measured else None
    w005, tau_star = model["w_tau"]["0.05"], model["tau_star"]
    return {"composition": model["key"], "w_0.05": w005, "w_0.05_met": w005 is not None and w005 >= GOAL_W005,
            "tau_star": tau_star, "tau_star_met": tau_star is not None and tau_star <= GOAL_TAU_STAR,
            "min_retention": lowest and lowest["retention"], "min_retention_domain": lowest and lowest["domain"],
            "min_retention_met": None if lowest is None else lowest["retention"] >= GOAL_RETENTION,
            "retention_not_measured": [r["domain"] for r in rows if r["retention"] is None]}


# ---- markdown ----------------------------------------------------------------------------------------


def _num(value, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _table(header: list[str], rows: list[list]) -> list[str]:
    cell = lambda v: str(v).replace("|", "\\|")  # noqa: E731
    return (["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
            + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows] + [""])


def _setting(recipe: dict, key: str) -> str:
    value = recipe.get(key)
    if value is None:
        return "—"
    return f"{value:,}" if key.endswith("tokens") else str(value)


def _span(pair: list | None) -> str:
    """first → last (losses) or before → after (held-out KL)."""
    return "—" if not pair or None in pair else f"{_num(pair[0])} → {_num(pair[1])}"


def _mark(met: bool | None) -> str:
    return "n/a" if met is None else ("✓" if met else "✗")


def goals_line(goal: dict) -> str:
    """One line per composition: each goal with its number and ✓/✗."""
    retention = "min retention not measured"
    if goal["min_retention"] is not None:
        retention = (f"min retention = {_num(goal['min_retention'])} ({goal['min_retention_domain']}) ≥ "
                     f"{GOAL_RETENTION} {_mark(goal['min_retention_met'])}")
    missing = (f" (not measured: {', '.join(goal['retention_not_measured'])})"
               if goal["retention_not_measured"] else "")
    return (f"{goal['composition']}: W_0.05 = {_num(goal['w_0.05'])} ≥ {GOAL_W005} {_mark(goal['w_0.05_met'])}"
            f" · τ* = {_num(goal['tau_star'], 4)} ≤ {GOAL_TAU_STAR} {_mark(goal['tau_star_met'])}"
            f" · {retention}{missing}")


def _short_failing(lines: list[str]) -> str:
    parts = []
    for line in lines[:FAILING_SHOWN]:
        found = re.search(r"r=(\S+)", line)
        parts.append(f"{line.split(':', 1)[0]} {found.group(1) if found else ''}".strip())
    more = len(lines) - FAILING_SHOWN
    return ", ".join(parts) + (f", +{more} more" if more > 0 else "") if parts else "—"


def run_markdown(run: dict) -> list[str]:
    out = [f"## {run['label']} (`{run['raw']}`)", ""]
    domains = run["domains"]

    out += ["### 1. Setup", ""]
    for s in run["seeds"]:
        out.append(f"- seed {s['name']}: teacher `{s['teacher']}`, window {s['window']}, sinks {s['sinks']}, "
                   f"mixer {s['mixer']}, {s['num_hidden_layers']} layers")
    if not run["registry"]:
        out.append("- registry.db not found: seeds (window) and gate decisions not available")
    out.append("")
    keys = ["seq_len", "batch_size", "stage1_tokens", "stage2_tokens", "lr1", "lr2", "gamma", "beta", "top_k",
            "mixed_precision"]
    header = ["expert", "seq_len", "batch", "Stage I tokens", "Stage II tokens", "lr1", "lr2", "γ (CE)", "β (KL)",
              "top_k", "precision"]
    if run["setup"]:
        out += _table(header, [[s["expert"]] + [_setting(s, k) for k in keys] for s in run["setup"]])
    else:
        out += ["experts.json not found and no registry: no recipes", ""]

    out += ["### 2. Commands", ""]
    if run["commands"] is None:
        out += ["commands.tsv not found", ""]
    else:
        rows = [[c["step"], c["seconds"], c["exit"], f"`{c['command']}`"] for c in run["commands"]]
        rows.append(["**total**", sum(c["seconds"] for c in run["commands"]), "", ""])
        out += _table(["step", "wall s", "exit", "command"], rows)

    out += ["### 3. Recovery vs the reference (per model)", ""]
    references = _ordered(m["reference"] for m in run["models"] if m["evaluated"])
    out += [f"Reference: {', '.join(f'`{r}`' for r in references) or 'none (no evals)'}; "
            f"domain recovery = mean recovery of the domain's metrics, each capped at {RECOVERY_CAP:g}.", ""]
    header = ["model", "eval"] + [f"W_{t}" for t in TAUS] + ["τ*"] + domains
    rows = []
    for m in run["models"]:
        if not m["evaluated"]:
            rows.append([m["name"], "not run"] + [""] * (len(TAUS) + 1 + len(domains)))
            continue
        rows.append([m["name"], m["suite"]] + [_num(m["w_tau"][t]) for t in TAUS] + [_num(m["tau_star"], 4)]
                    + [_num(m["domain_recovery"].get(d)) for d in domains])
    out += _table(header, rows)

    out += ["### 4. Per metric: model value · recovery r (teacher value alongside)", ""]
    evaluated = [m for m in run["models"] if m["evaluated"]]
    if evaluated:
        names = _ordered(x["name"] for m in evaluated for x in m["metrics"])
        cells = {(m["key"], x["name"]): x for m in evaluated for x in m["metrics"]}
        rows = []
        for name in names:
            first = next(cells[(m["key"], name)] for m in evaluated if (m["key"], name) in cells)
            arrow = "↑" if first["higher_is_better"] else "↓"
            row = [f"{name} {arrow}", _num(_float(first["reference"]), 4)]
            for m in evaluated:
                x = cells.get((m["key"], name))
                row.append(f"{_num(_float(x['model']), 4)} · r {_num(_float(x['recovery']))}" if x else "—")
            rows.append(row)
        out += _table(["metric", "teacher"] + [m["name"] for m in evaluated], rows)
    else:
        out += ["no eval reports", ""]

    out += [f"### 5. Retention in the merge (merged domain recovery / its expert's; goal ≥ {GOAL_RETENTION})", ""]
    rows = [[r["composition"], r["domain"], r["expert"], _num(r["merged"]) if r["merged"] is not None else "not run",
             _num(r["expert_recovery"]) if r["expert_recovery"] is not None else "not run", _num(r["retention"]),
             "—" if r["retention"] is None else _mark(r["retention"] >= GOAL_RETENTION)]
            for r in run["retention"]]
    out += _table(["composition", "domain", "expert", "merged r", "expert r", "retention", "≥ 0.95"], rows) \
        if rows else ["no compositions", ""]

    out += ["### 6. Gate decisions", ""]
    if run["operations"] is None:
        out += ["registry.db not found", ""]
    else:
        rows = [[o["id"], o["kind"], o["composition"], o["inputs"], o["decision"], _num(o["tau"], 2),
                 "skipped" if o["gate_skipped"] else o["gate_reference"],
                 _num(o["gate_w_tau"] and o["gate_w_tau"]["0.05"]), _num(o["gate_tau_star"], 4),
                 o["result"] or "—", "gate skipped" if o["gate_skipped"] else _short_failing(o["failing"])]
                for o in run["operations"]]
        out += _table(["#", "kind", "composition", "inputs", "decision", "τ", "gate compares against",
                       "gate W_0.05", "gate τ*", "result", "failing (metric r)"], rows)

    out += ["### 7. Training", ""]
    rows = [[t["expert"], _num(t["stage1_tokens_per_s"], 0), _num(t["stage2_tokens_per_s"], 0),
             _span(t["stage1_loss"]), _span(t["stage2_loss"]), _span(t["heldout_kl"])] for t in run["training"]]
    out += _table(["expert", "Stage I tok/s", "Stage II tok/s", "Stage I loss first → last",
                   "Stage II loss first → last", "held-out KL before → after"], rows)

    out += ["### 8. Goals (merged student vs the teacher)", ""]
    out += [f"- {goals_line(g)}" for g in run["goals"]] or ["- no composition was evaluated"]
    out.append("")
    return out


def markdown(runs: list[dict], command: str) -> str:
    lines = ["# Issue 8 pipeline: report data (generated)", "",
             f"Generated by `{command}`. Tables only; the analysis is in REPORT.md.", ""]
    for run in runs:
        lines += run_markdown(run)
    return "\n".join(lines)


# ---- chart ---------------------------------------------------------------------------------------------


def plot(runs: list[dict], path: Path) -> Path:
    """Grouped bars: per evaluated model (run-prefixed), one bar per domain; dashed lines at 1.0 and 0.95."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [(f"{run['label']} {m['name']}", m) for run in runs for m in run["models"] if m["evaluated"]]
    domains = _ordered(d for run in runs for d in run["domains"])
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(models) + 2), 4.5))
    width = 0.8 / max(1, len(domains))
    for i, domain in enumerate(domains):
        xs = [j + (i - (len(domains) - 1) / 2) * width for j in range(len(models))]
        values = [m["domain_recovery"].get(domain, math.nan) for _, m in models]
        ax.bar(xs, [min(v, RECOVERY_PLOT_CAP) for v in values], width, label=domain)
        for x, value in zip(xs, values):
            if value > RECOVERY_PLOT_CAP:
                ax.text(x, RECOVERY_PLOT_CAP, f"{value:.3g}", ha="center", va="bottom", fontsize="small")
    ax.axhline(1.0, color="black", linestyle="--", linewidth=1, label="r = 1")
    ax.axhline(GOAL_RETENTION, color="tab:red", linestyle="--", linewidth=1, label=f"r = {GOAL_RETENTION}")
    ax.set_xticks(range(len(models)), [label for label, _ in models], rotation=30, ha="right")
    ax.set_ylabel("mean recovery vs teacher")
    ax.set_title(f"per-domain recovery (bars capped at {RECOVERY_PLOT_CAP:g}, value above)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# ---- entry point -----------------------------------------------------------------------------------------


def parse_runs(raw_dirs: list[str], labelled: list[str]) -> list[tuple[str, Path]]:
    """Positional dirs are labelled by their parent folder; --run LABEL=DIR names its own."""
    runs = [(Path(d).absolute().parent.name, Path(d)) for d in raw_dirs]
    for item in labelled:
        label, sep, directory = item.partition("=")
        if not sep or not label or not directory:
            raise XmergeError(f"--run {item!r} is not LABEL=DIR; e.g. --run run1=/tmp/h100r/raw")
        runs.append((label, Path(directory)))
    if not runs:
        raise XmergeError("no raw directory given; pass RAW_DIR or --run LABEL=DIR")
    labels = [label for label, _ in runs]
    if len(set(labels)) != len(labels):
        raise XmergeError(f"run labels {labels} repeat; name each with --run LABEL=DIR")
    return runs


def build(runs: list[tuple[str, Path]], out: Path, command: str) -> dict:
    """Write REPORT-data.md, summary.json and recovery.png under `out`; returns the summary."""
    loaded = [load_run(label, raw) for label, raw in runs]
    out.mkdir(parents=True, exist_ok=True)
    (out / "REPORT-data.md").write_text(markdown(loaded, command))
    summary = json_safe({"command": command, "runs": loaded})
    (out / "summary.json").write_text(json.dumps(summary, indent=1, allow_nan=False) + "\n")
    plot(loaded, out / "recovery.png")
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("raw_dirs", nargs="*", metavar="RAW_DIR", help="raw output of one pipeline run")
    parser.add_argument("--run", action="append", default=[], metavar="LABEL=DIR",
                        help="a raw dir with its label")
    parser.add_argument("--out", type=Path, required=True, help="report folder, e.g. reports/h100-smollm2")
    args = parser.parse_args(argv)
    command = "python -m xmerge.benchmarks.pipeline_report " + " ".join(argv if argv is not None else sys.argv[1:])
    try:
        build(parse_runs(args.raw_dirs, args.run), args.out, command)
    except XmergeError as exc:
        sys.exit(f"error: {exc}")
    print(f"wrote {args.out}/REPORT-data.md, summary.json, recovery.png")


if __name__ == "__main__":
    main()
