"""`xmerge eval`: the quick (or full) suite of a model against the teacher or another model, cached."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from xmerge.cli.app import app
from xmerge.cli.errors import console, user_errors
from xmerge.cli.registry_cmds import AsJson, DbUrl, Home
from xmerge.registry import Registry


@app.command("eval")
def eval_cmd(
    ref: Annotated[str, typer.Argument(help="Seed, expert or composition ref (seed:NAME, math@v2, comp:mix@v1, "
                                            "expert:3 ...) or a model directory.")],
    suite: Annotated[str, typer.Option(help="quick (the merge gate, CPU-sized) or full (adds HumanEval; GPU).")]
    = "quick",
    against: Annotated[str, typer.Option(help="Reference: 'teacher' (the seed's teacher), a registry ref "
                                              "or a model directory.")] = "teacher",
    domains: Annotated[str | None, typer.Option(help="Comma-separated domains (default: an expert's domain, a "
                                                     "composition's members' domains, else math,code).")] = None,
    seed: Annotated[str | None, typer.Option("--seed", help="Seed whose eval sets a plain directory uses "
                                                            "(default: the seed it matches).")] = None,
    tau: Annotated[float, typer.Option(help="Tolerance of the win/tie column and pass/fail line.")] = 0.02,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1 ...")] = "auto",
    out: Annotated[Path | None, typer.Option(help="Folder for report.json and recovery.png "
                                                  "(default <home>/reports/<ref>-<suite>).")] = None,
    home: Home = None,
    db_url: DbUrl = None,
    as_json: AsJson = False,
) -> None:
    """Evaluate a model: per-domain metrics next to the reference's, recovery, W_τ and τ*.

    Results are cached in the registry by (model hash, suite, reference): a repeat prints them
    without running any model. Writes report.json and recovery.png and records an eval run.

    Example: xmerge eval math@v2

    Example: xmerge eval comp:team-mix --against seed:base --domains math,code,chat --json
    """
    from xmerge.evals.report import print_report
    from xmerge.evals.run import evaluate_ref, report_dir

    with user_errors():
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # the status line below is the progress display
        reg = Registry(home, db_url)
        out = out or report_dir(reg, ref, suite)
        wanted = [d.strip() for d in domains.split(",") if d.strip()] if domains is not None else None
        with console.status("evaluating") as status:
            report = evaluate_ref(reg, ref, suite=suite, against=against, device=device, domains=wanted, tau=tau,
                                  seed=seed, out=out, say=status.update)
    if as_json:
        typer.echo(json.dumps(report.to_dict() | {"out": str(out)}, indent=2))
        return
    console.print(f"{report.model.ref} vs {report.reference.ref} — suite {report.suite}, "
                  f"domains {', '.join(report.domains)}" + (" [dim](cached)[/]" if report.cached else ""))
    print_report(report.verdict.report, console)
    console.print(f"wrote {out / 'report.json'} and {out / 'recovery.png'}", highlight=False)
