"""`xmerge convert`: teacher -> hybrid student directory."""

from __future__ import annotations

from pathlib import Path

import typer

from xmerge.cli.app import app
from xmerge.cli.errors import console, user_errors
from xmerge.errors import XmergeError


@app.command()
def convert(
    teacher: str = typer.Option(
        "smollm2-135m-instruct", help="Alias, HF model directory, .gguf file, or a hub id in the local cache."
    ),
    out: Path = typer.Option(..., help="Output directory (must not exist or be empty)."),
    window: int = typer.Option(512, help="Sliding-window length W of the SWA branch."),
    sinks: int = typer.Option(4, help="Number of sink tokens S."),
    seed: int = typer.Option(0, help="RNG seed of the new parameters (same seed = identical student)."),
    mixer: str = typer.Option("hybrid", help="hybrid | swa | mlstm (ablations)."),
    prompt: str = typer.Option("", help="If given, greedily continue this prompt with the student."),
) -> None:
    """Convert a Transformer teacher into a hybrid xLSTM student.

    Example: xmerge convert --teacher smollm2-135m-instruct --out student/ --window 256
    """
    with user_errors():
        if window < 1:
            raise XmergeError(f"--window must be >= 1, got {window}")
        if sinks < 0:
            raise XmergeError(f"--sinks must be >= 0, got {sinks}")
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise XmergeError(f"output directory {out} exists and is not empty")
        from xmerge.modeling.convert import convert_teacher, save_student
        from xmerge.modeling.teacher import load_teacher

        with console.status(f"loading teacher {teacher}"):
            model, tokenizer = load_teacher(teacher)
        with console.status("converting"):
            student = convert_teacher(model, window=window, sinks=sinks, seed=seed, mixer=mixer)
            save_student(student, tokenizer, out, teacher_spec=teacher)
        n_params = sum(p.numel() for p in student.parameters())
        console.print(f"[green]wrote[/] {out} ({n_params / 1e6:.1f}M parameters, window {window}, sinks {sinks})")
        if prompt:
            from xmerge.modeling.generate import greedy_text

            console.print(f"[bold]{prompt}[/]{greedy_text(student, tokenizer, prompt, max_new_tokens=32)}")
