"""`xmerge demo`: the whole service on the embedded default teacher with CPU-sized budgets.

Every step reuses what an earlier run already produced (seed, experts with the same recipe,
compositions), and training resumes from its checkpoint, so an interrupted demo simply runs again.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.rule import Rule

from xmerge.cli.app import app
from xmerge.cli.errors import console, user_errors
from xmerge.cli.registry_cmds import DbUrl, Home
from xmerge.errors import XmergeError
from xmerge.registry import Registry

DEMO_SEED = "demo"
TEACHER = "smollm2-135m-instruct"
# SmolLM2 at 256-token blocks with a 128-token window: the mLSTM carries everything older.
WINDOW = 128
BUDGET = dict(seq_len=256, batch_size=2, stage1_tokens=2 * 256 * 6, stage2_tokens=2 * 256 * 4, top_k=64,
              heldout_blocks=2)
# The second code expert: the same data with a larger Stage II lr, offered to the gate as a replacement.
CODE_V2 = dict(BUDGET, lr2=1e-4)
COMPOSITION = "demo-mix"
# Experts trained for a handful of CPU steps move their new parameters apart; the first merge of
# such experts loses a few percent on each domain, so the demo gates it at τ = 0.1 (the gate's
# default, 0.02, is what the replace below uses).
COMPOSE_TAU = 0.1


def _step(title: str) -> None:
    console.print(Rule(f"[bold]{title}"))


def _expert(reg, domain: str, recipe, *, console):
    """The demo's expert of ``domain`` trained with ``recipe``: reused if registered, else trained."""
    from xmerge.experts.train import train_expert

    for expert in reversed(reg.list_experts(seed=DEMO_SEED, domain=domain)):
        if {k: expert.recipe.get(k) for k in asdict(recipe)} == asdict(recipe):
            console.print(f"reusing expert {expert.ref} (id {expert.id})")
            return expert
    expert = train_expert(reg, recipe, seed_name=DEMO_SEED, device="cpu", resume=True, checkpoint_every=2,
                          console=console)
    console.print(f"[green]registered[/] {expert.ref} (id {expert.id}): Stage I loss "
                  f"{expert.metrics['stage1_loss'][0]:.4g} -> {expert.metrics['stage1_loss'][1]:.4g}, Stage II loss "
                  f"{expert.metrics['stage2_loss'][0]:.4g} -> {expert.metrics['stage2_loss'][1]:.4g}")
    return expert


@app.command()
def demo(home: Home = None, db_url: DbUrl = None,
         out: Annotated[Optional[Path], typer.Option(help="Where to write the merged model.")] = None) -> None:
    """Run the pipeline end to end on SmolLM2-135M-Instruct with CPU-sized budgets (safe to re-run).

    Example: xmerge demo --home .xmerge-demo
    """
    from xmerge.cli.merge_cmds import render_result
    from xmerge.evals.report import print_report
    from xmerge.evals.run import evaluate_ref, report_dir
    from xmerge.experts.seed import checkout_cached, create_seed
    from xmerge.experts.train import TrainRecipe
    from xmerge.merge.operations import compose, replace

    with user_errors():
        reg = Registry(home, db_url)
        _step("1. registry")
        reg.init()
        console.print(f"registry at {reg.home} ({reg.db_url.split(':', 1)[0]})")

        _step(f"2. seed from {TEACHER} (window {WINDOW}, 4 sinks)")
        seed = next((s for s in reg.list_seeds() if s.name == DEMO_SEED), None)
        if seed is None:
            with console.status("converting the teacher") as status:
                seed = create_seed(reg, DEMO_SEED, TEACHER, window=WINDOW, sinks=4, status=status.update)
        console.print(f"seed {seed.name}: weights {seed.weights_sha[:12]}, teacher sha256 {seed.teacher_hash[:12]}")

        experts = {}
        for domain in ("math", "code"):
            _step(f"3. expert {domain}: Stage I alignment + Stage II sparse-KL distillation")
            experts[domain] = _expert(reg, domain, TrainRecipe(domain=domain, **BUDGET), console=console)

        _step(f"4. compose {COMPOSITION}: math=0.5, code=0.5 (linear), gated by the quick eval at τ={COMPOSE_TAU}")
        current = next(iter(reg.list_compositions(COMPOSITION)[-1:]), None)
        if current is None:
            result = compose(reg, COMPOSITION, f"{experts['math'].id}=0.5,{experts['code'].id}=0.5",
                             seed=DEMO_SEED, tau=COMPOSE_TAU, say=console.print)
            render_result(result, exit_on_reject=False)
            current = result.composition
        else:
            console.print(f"reusing composition {current.ref}")

        _step("5. a second code expert, then a gated replace")
        code_v2 = _expert(reg, "code", TrainRecipe(domain="code", **CODE_V2), console=console)
        tried = [op for op in reg.list_operations(COMPOSITION, kind="replace") if op.inputs.get("expert_id") == code_v2.id]
        if tried:
            console.print(f"replace with {code_v2.ref} already decided: {tried[-1].decision} (operation {tried[-1].id})")
        elif current is not None:
            render_result(replace(reg, current.ref, "code", f"expert:{code_v2.id}", say=console.print),
                          exit_on_reject=False)

        _step(f"6. quick eval of the newest {COMPOSITION} against the teacher")
        versions = reg.list_compositions(COMPOSITION)
        if not versions:
            raise XmergeError(f"the gate rejected the first compose of {COMPOSITION} (table above); nothing to evaluate")
        newest = versions[-1]
        reports = report_dir(reg, newest.ref, "quick")
        with console.status("evaluating") as status:
            report = evaluate_ref(reg, newest.ref, suite="quick", out=reports, say=status.update)
        print_report(report.verdict.report, console)
        merged = reg.checkout(newest, out) if out is not None else checkout_cached(reg, newest)
        console.print(f"\n[bold green]done.[/] merged model {newest.ref}: {merged}\n"
                      f"report: {reports / 'report.json'} and {reports / 'recovery.png'}\n"
                      f"lineage: xmerge lineage {newest.ref} --home {reg.home}", highlight=False)
