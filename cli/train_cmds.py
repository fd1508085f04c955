"""Seed and expert commands: `xmerge seed create`, `xmerge targets build`, `xmerge train-expert`."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from xmerge.cli.app import app
from xmerge.cli.errors import console, user_errors
from xmerge.cli.registry_cmds import DbUrl, Home
from xmerge.registry import Registry

seed_app = typer.Typer(help="Create the shared seed student of a team setup.\n\n"
                       "Example: xmerge seed create base --teacher smollm2-135m-instruct", no_args_is_help=True)
targets_app = typer.Typer(help="Teacher top-k targets (cached once per teacher, data and k).\n\n"
                          "Example: xmerge targets build code", no_args_is_help=True)
app.add_typer(seed_app, name="seed")
app.add_typer(targets_app, name="targets")

Domain = Annotated[str, typer.Argument(help="A preset (math, code, chat) or your own domain name with --data.")]
Data = Annotated[Optional[str], typer.Option(help="Your data: FILE.jsonl, FILE.parquet, or an HF dataset (dir or cached name) "
                                             "with a `text` or `messages` field.")]
SeedName = Annotated[Optional[str], typer.Option("--seed", help="Seed name (default: the only seed).")]


@seed_app.command("create")
def seed_create(
    name: Annotated[str, typer.Argument(help="Name of the new seed.")],
    teacher: Annotated[str, typer.Option(help="Alias, HF directory, .gguf file or cached hub id.")] = "smollm2-135m-instruct",
    window: Annotated[int, typer.Option(help="Sliding-window length W.")] = 512,
    sinks: Annotated[int, typer.Option(help="Sink tokens S.")] = 4,
    seed: Annotated[int, typer.Option("--init-seed", help="RNG seed of the new parameters.")] = 0,
    home: Home = None,
    db_url: DbUrl = None,
) -> None:
    """Convert a teacher into the seed student every expert starts from, and register it.

    Example: xmerge seed create base --teacher smollm2-135m-instruct --window 256
    """
    from xmerge.experts.seed import create_seed

    with user_errors(), console.status("creating seed") as status:
        record = create_seed(Registry(home, db_url), name, teacher, window=window, sinks=sinks, seed=seed,
                             status=status.update)
    console.print(f"[green]seed[/] {record.name}: teacher {record.teacher_spec} "
                  f"(sha256 {record.teacher_hash[:12]}), weights {record.weights_sha[:12]}")


@targets_app.command("build")
def targets_build(
    domain: Domain,
    data: Data = None,
    seed_name: SeedName = None,
    seq_len: Annotated[int, typer.Option(help="Tokens per packed block.")] = 512,
    tokens: Annotated[int, typer.Option(help="Training tokens to cover.")] = 65536,
    top_k: Annotated[int, typer.Option(help="Teacher top-k kept per position.")] = 256,
    home: Home = None,
    db_url: DbUrl = None,
) -> None:
    """Run the teacher once over a domain's data and cache its top-k log-probs (train-expert does this too).

    Example: xmerge targets build math --tokens 131072 --top-k 256
    """
    from xmerge.experts.train import TrainRecipe, build_domain_targets

    with user_errors():
        recipe = TrainRecipe(domain=domain, data=data, seq_len=seq_len, stage2_tokens=tokens, top_k=top_k)
        built = build_domain_targets(Registry(home, db_url), recipe, seed_name=seed_name, console=console)
    for split, targets in built.items():
        console.print(f"[green]{split}[/] targets: {len(targets)} blocks x {targets.seq_len} tokens, "
                      f"k={targets.k} at {targets.directory}")


@app.command("train-expert")
def train_expert_cmd(
    domain: Domain,
    data: Data = None,
    seed_name: SeedName = None,
    stage1_tokens: Annotated[int, typer.Option(help="Stage I (alignment) token budget.")] = 65536,
    stage2_tokens: Annotated[int, typer.Option(help="Stage II (distillation) token budget.")] = 65536,
    seq_len: Annotated[int, typer.Option(help="Tokens per packed block.")] = 512,
    batch_size: Annotated[int, typer.Option(help="Blocks per step per process.")] = 4,
    lr1: Annotated[float, typer.Option(help="Stage I peak lr (warmup + cosine to 1e-5).")] = 1e-2,
    lr2: Annotated[float, typer.Option(help="Stage II constant lr.")] = 1e-5,
    top_k: Annotated[int, typer.Option(help="Teacher top-k for the sparse KL.")] = 256,
    ce_weight: Annotated[float, typer.Option(help="Stage II weight γ of the data cross-entropy.")] = 0.9,
    kl_weight: Annotated[float, typer.Option(help="Stage II weight β of the top-k KL to the teacher.")] = 0.1,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda.")] = "auto",
    precision: Annotated[str, typer.Option(help="auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16.")] = "auto",
    resume: Annotated[bool, typer.Option(help="Continue from the last checkpoint of the same recipe.")] = False,
    checkpoint_every: Annotated[int, typer.Option(help="Steps between checkpoints.")] = 50,
    version: Annotated[Optional[int], typer.Option(help="Expert version (default: next for this domain).")] = None,
    team: Annotated[str, typer.Option(help="Contributing team, recorded with the expert.")] = "local",
    home: Home = None,
    db_url: DbUrl = None,
) -> None:
    """Distill one domain expert from the seed (Stage I alignment, Stage II sparse-KL) and register it.

    Example: xmerge train-expert math --stage1-tokens 65536 --stage2-tokens 65536 --resume
    Multi-GPU: accelerate launch -m xmerge.cli train-expert code --device cuda
    """
    from xmerge.experts.train import TrainRecipe, train_expert

    with user_errors():
        recipe = TrainRecipe(domain=domain, data=data, seq_len=seq_len, batch_size=batch_size,
                             stage1_tokens=stage1_tokens, stage2_tokens=stage2_tokens, lr1=lr1, lr2=lr2, top_k=top_k,
                             gamma=ce_weight, beta=kl_weight)
        expert = train_expert(Registry(home, db_url), recipe, seed_name=seed_name, device=device,
                              precision=precision, resume=resume,
                              version=version, team=team, checkpoint_every=checkpoint_every, console=console)
    if expert is not None:
        m = expert.metrics

        def arrow(pair):
            return "n/a" if not pair else f"{pair[0]:.4g} -> {pair[1]:.4g}"

        kl = (m.get("heldout_kl_before"), m.get("heldout_kl_after"))
        console.print(f"[green]registered expert[/] {expert.ref} (id {expert.id}) of seed {expert.seed}\n"
                      f"  Stage I loss {arrow(m['stage1_loss'])}, Stage II loss {arrow(m['stage2_loss'])}, "
                      f"held-out KL to teacher {arrow(kl) if None not in kl else 'n/a'}")
