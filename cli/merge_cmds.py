"""Merge commands: `xmerge compose`, `xmerge patch`, `xmerge replace` (each gated by the quick eval).

Exit codes: 0 accepted or forced, 2 rejected by the gate (the attempt is still recorded), 1 bad input.
"""

from __future__ import annotations

import contextlib
import json
import sys
from typing import Annotated

import typer
from rich.table import Table

from xmerge.cli.app import app
from xmerge.cli.errors import console, user_errors
from xmerge.cli.registry_cmds import AsJson, DbUrl, Home
from xmerge.registry import Registry

REJECTED_EXIT = 2

Tau = Annotated[float, typer.Option(help="Gate tolerance τ: a metric may drop to (1 − τ) of the reference.")]
Force = Annotated[bool, typer.Option(help="Register even if the gate fails (recorded as forced).")]
Device = Annotated[str, typer.Option(help="Device of the quick eval: auto, cpu, cuda, cuda:1 ...")]


@app.command("compose")
def compose_cmd(
    name: Annotated[str, typer.Argument(help="Composition name; an existing name gets its next version.")],
    weights: Annotated[str, typer.Option(help="DOMAIN=w (its newest ready expert) or EXPERT_ID=w, comma-separated.")],
    method: Annotated[str, typer.Option(help="linear, or a mergekit method with the seed as base "
                                             "(task_arithmetic, ties, dare_ties, ...).")] = "linear",
    normalize: Annotated[bool, typer.Option(help="Divide the weights by their sum.")] = True,
    allow_negative: Annotated[bool, typer.Option(help="Permit negative weights.")] = False,
    gate: Annotated[bool, typer.Option(help="Quick-eval gate (--no-gate registers unevaluated, as forced).")] = True,
    tau: Tau = 0.02,
    force: Force = False,
    search: Annotated[bool, typer.Option(help="Search the weights on the simplex (--weights is the start).")] = False,
    budget: Annotated[int | None, typer.Option(help="Evaluations the search may spend (default 12).")] = None,
    search_seed: Annotated[int, typer.Option(help="RNG seed of the search's samples.")] = 0,
    seed: Annotated[str | None, typer.Option("--seed", help="Seed of the experts (default: the only seed).")] = None,
    device: Device = "auto",
    home: Home = None,
    db_url: DbUrl = None,
    as_json: AsJson = False,
) -> None:
    """Merge experts of one seed into a new composition version, gated by the quick eval.

    A first compose must keep every metric ≥ (1 − τ) of each member's own expert on its domain;
    a new version of an existing name is gated against the current one.

    Example: xmerge compose team-mix --weights math=0.35,code=0.35,chat=0.3

    Example: xmerge compose team-mix --weights math=1,code=1 --search --budget 16
    """
    from xmerge.errors import XmergeError
    from xmerge.merge.operations import compose

    with user_errors(), _human_output(as_json), console.status("composing") as status:
        if budget is not None and not search:
            raise XmergeError("--budget only applies with --search")
        result = compose(Registry(home, db_url), name, weights, seed=seed, method=method, normalize=normalize,
                         allow_negative=allow_negative, gate=gate, tau=tau, force=force,
                         search_budget=(12 if budget is None else budget) if search else None,
                         search_seed=search_seed, device=_device(device), say=status.update)
    render_result(result, as_json)


@app.command("patch")
def patch_cmd(
    composition: Annotated[str, typer.Argument(help="Composition: NAME or NAME@vN (its newest version).")],
    expert: Annotated[str, typer.Option(help="Expert: id, DOMAIN (newest), DOMAIN@vN or SEED/DOMAIN.")],
    weight: Annotated[float | None, typer.Option(help="New weight of its domain (required for a new domain).")] = None,
    keep_total: Annotated[bool, typer.Option(help="Rescale the other members so the weights' sum stays.")] = True,
    tau: Tau = 0.02,
    force: Force = False,
    device: Device = "auto",
    home: Home = None,
    db_url: DbUrl = None,
    as_json: AsJson = False,
) -> None:
    """Add a domain to a composition, or update one domain's expert or weight, gated by the quick eval.

    Accepted only if the patched domain holds within τ and no other metric drops by more than τ.

    Example: xmerge patch team-mix --expert chat --weight 0.2
    """
    from xmerge.merge.operations import patch

    with user_errors(), _human_output(as_json), console.status("patching") as status:
        result = patch(Registry(home, db_url), composition, expert, weight, keep_total=keep_total, tau=tau,
                       force=force, device=_device(device), say=status.update)
    render_result(result, as_json)


@app.command("replace")
def replace_cmd(
    composition: Annotated[str, typer.Argument(help="Composition: NAME or NAME@vN (its newest version).")],
    domain: Annotated[str, typer.Option(help="The domain whose expert is swapped.")],
    expert: Annotated[str, typer.Option(help="The new expert: id, DOMAIN@vN or SEED/DOMAIN@vN.")],
    tau: Tau = 0.02,
    force: Force = False,
    device: Device = "auto",
    home: Home = None,
    db_url: DbUrl = None,
    as_json: AsJson = False,
) -> None:
    """Swap one domain's expert for another version, weights unchanged; gated like patch.

    Example: xmerge replace team-mix --domain code --expert code@v3
    """
    from xmerge.merge.operations import replace

    with user_errors(), _human_output(as_json), console.status("replacing") as status:
        result = replace(Registry(home, db_url), composition, domain, expert, tau=tau, force=force,
                         device=_device(device), say=status.update)
    render_result(result, as_json)


def _human_output(as_json: bool):
    """With --json, progress written to stdout by the work (bars, status) goes to stderr instead."""
    return contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext()


def _device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def render_result(result, as_json: bool = False, *, exit_on_reject: bool = True) -> None:
    """Members, search trace, gate table and decision (or one JSON object); exit 2 when rejected."""
    if as_json:
        typer.echo(json.dumps({
            "kind": result.kind, "decision": result.decision, "operation_id": result.operation.id,
            "composition": result.composition.ref if result.composition else None,
            "parent": result.parent.ref if result.parent else None, "report": result.report,
        }, indent=2, sort_keys=True))
    else:
        report = result.report
        members = Table(title=f"{result.kind}: {report['method']} merge of {len(report['members'])} experts")
        for column in ("domain", "expert", "id", "weight"):
            members.add_column(column, justify="right" if column in ("id", "weight") else "left")
        for m in report["members"]:
            members.add_row(m["domain"], m["expert"], str(m["expert_id"]), f"{m['weight']:.4g}")
        console.print(members)
        if "search" in report:
            console.print(_search_table(report["search"]))
        if "gate" in report:
            console.print(_gate_table(report["gate"], report["reference"], "current" if result.parent else "expert"))
        _print_decision(result)
    if result.decision == "rejected" and exit_on_reject:
        raise typer.Exit(REJECTED_EXIT)


def _search_table(search: dict) -> Table:
    table = Table(title=f"weight search: {search['evaluations']} evaluations")
    for column in ("#", "phase", "weights", "mean recovery", "W_τ"):
        table.add_column(column, justify="left" if column in ("phase", "weights") else "right")
    best = search["best"]["weights"]
    for i, trial in enumerate(search["trace"], 1):
        mark = " [green]← best[/]" if trial["weights"] == best else ""
        table.add_row(str(i), trial["phase"], ", ".join(f"{w:.3f}" for w in trial["weights"]) + mark,
                      f"{trial['mean_recovery']:.4f}", f"{trial['w_tau']:.3f}")
    return table


def _gate_table(gate: dict, reference: str, reference_column: str) -> Table:
    verdict = "[green]passed[/]" if gate["passed"] else "[bold red]failed[/]"
    target = f", target {gate['target_domain']}" if gate.get("target_domain") else ""
    table = Table(title=f"gate τ={gate['tau']:g} vs {reference}{target}: {verdict}")
    for column in ("metric", reference_column, "candidate", "recovery", "ok?"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for m in gate["metrics"]:
        arrow = "↑" if m["higher_is_better"] else "↓"
        ok = {"win": "[green]better[/]", "tie": "[yellow]holds[/]", "loss": "[bold red]regressed[/]"}[m["outcome"]]
        table.add_row(f"{m['name']} {arrow}", _number(m["reference"]), _number(m["model"]),
                      _number(m["recovery"]), ok)
    table.add_section()
    held = sum(m["outcome"] != "loss" for m in gate["metrics"]) / len(gate["metrics"])
    table.add_row(f"W_τ (τ={gate['tau']:g})", "", "", _number(held), "")
    table.add_row("τ*", "", "", _number(gate["tau_star"]), "")
    return table


def _number(value) -> str:
    return f"{value:.4f}" if isinstance(value, float | int) else str(value)


def _print_decision(result) -> None:
    if result.decision == "rejected":
        console.print(f"[bold red]rejected[/] (operation {result.operation.id}): {result.report['reason']}; "
                      f"{result.parent.ref if result.parent else 'nothing'} stays current. "
                      "Re-run with --force to register it anyway.", highlight=False)
        return
    style = "green" if result.decision == "accepted" else "yellow"
    console.print(f"[{style}]{result.decision}[/] (operation {result.operation.id}): {result.report['reason']}",
                  highlight=False)
    console.print(f"new version [bold]{result.composition.ref}[/]"
                  + (f" (parent {result.parent.ref})" if result.parent else ""), highlight=False)
