"""Render a gate report (the `report` dict of metrics.compare): rich table, JSON file, PNG bar chart."""

from __future__ import annotations

import json
import math
from pathlib import Path

from rich.console import Console
from rich.table import Table

OUTCOME_STYLE = {"win": "green", "tie": "yellow", "loss": "bold red"}


def report_table(report: dict) -> Table:
    """One row per metric (model, reference, recovery, win/tie at the gate's τ), then W_τ and τ*."""
    verdict = "[green]passed[/]" if report["passed"] else "[bold red]failed[/]"
    table = Table(title=f"quick eval — gate τ={report['tau']:g}: {verdict}")
    for col in ("metric", "model", "reference", "recovery", "win/tie"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for m in report["metrics"]:
        arrow = "↑" if m["higher_is_better"] else "↓"
        style = OUTCOME_STYLE[m["outcome"]]
        table.add_row(f"{m['name']} {arrow}", f"{m['model']:.4f}", f"{m['reference']:.4f}",
                      f"{m['recovery']:.4f}", f"[{style}]{m['outcome']}[/]")
    table.add_section()
    for tau, w in report["w_tau"].items():
        table.add_row(f"W_τ (τ={tau})", "", "", f"{w:.3f}", "")
    table.add_row("τ*", "", "", f"{report['tau_star']:.4f}", "")
    return table


def print_report(report: dict, console: Console | None = None) -> None:
    console = console or Console()
    console.print(report_table(report))
    for line in report["failing"]:
        console.print(f"[bold red]regressed:[/] {line}", highlight=False)


def json_safe(value):
    """Non-finite floats as strings ("inf", "nan"): strict JSON has no Infinity."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


def write_json(report: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(json_safe(report), indent=2, allow_nan=False) + "\n")
    return path


def plot_recovery(report: dict, path: str | Path) -> Path:
    """Bar chart of recovery per metric with lines at r = 1 and r = 1 - τ; unbounded wins drawn at 2."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"win": "tab:green", "tie": "tab:olive", "loss": "tab:red"}
    names = [m["name"] for m in report["metrics"]]
    values = [min(m["recovery"], 2.0) for m in report["metrics"]]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(names) + 2), 4))
    ax.bar(names, values, color=[colors[m["outcome"]] for m in report["metrics"]])
    ax.axhline(1.0, color="black", linewidth=1)
    ax.axhline(1.0 - report["tau"], color="tab:red", linestyle="--", linewidth=1,
               label=f"gate 1 - τ = {1 - report['tau']:g}")
    ax.set_ylabel("recovery r")
    ax.set_title(f"recovery per metric (τ* = {report['tau_star']:.3g})")
    ax.tick_params(axis="x", rotation=45)
    ax.legend(loc="lower right")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
