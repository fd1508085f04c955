"""One optimisation loop for both stages: lr per step, clip, checkpoint, progress, Ctrl-C.

Batches are a pure function of the step index, so a run resumed from a checkpoint sees exactly
the batches an uninterrupted run would have seen (bit-identical weights on CPU).
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from xmerge.errors import XmergeError
from xmerge.experts.checkpoint import Progress as RunProgress
from xmerge.experts.checkpoint import save_checkpoint


class TrainingInterrupted(XmergeError):
    """Ctrl-C during training: a checkpoint was written; --resume continues from it."""


@contextlib.contextmanager
def _ctrl_c_at_step_boundary() -> Iterator[Callable[[], bool]]:
    """Yields ``pressed()``: a first Ctrl-C only sets it, so the loop stops after the step in flight
    and never checkpoints a half-applied optimizer step; a second one interrupts at once (the last
    periodic checkpoint stays valid)."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False  # signal handlers can only be set from the main thread
        return
    pressed = False

    def handle(signum, frame):
        nonlocal pressed
        if pressed:
            raise KeyboardInterrupt
        pressed = True

    previous = signal.signal(signal.SIGINT, handle)
    try:
        yield lambda: pressed
    finally:
        signal.signal(signal.SIGINT, previous)


def run_stage(
    *,
    accelerator,
    stage: int,
    loss_at: Callable[[int], torch.Tensor],
    optimizer,
    lr_at: Callable[[int], float],
    total_steps: int,
    tokens_per_step: int,
    state: RunProgress,
    checkpoint_dir: Path,
    checkpoint_every: int,
    model_to_save,
    grad_clip: float = 1.0,
) -> RunProgress:
    """Run steps ``state.step .. total_steps`` of ``stage``; ``loss_at(step)`` computes one loss."""
    key = str(stage)
    started, done_here = time.perf_counter(), 0
    columns = (
        TextColumn(f"Stage {'I' * stage}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, disable=not accelerator.is_main_process, transient=False) as bar:
        task = bar.add_task("train", total=total_steps, completed=state.step, info="")
        with _ctrl_c_at_step_boundary() as interrupted:
            for step in range(state.step, total_steps):
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(step)
                loss = loss_at(step)
                if not torch.isfinite(loss):
                    raise XmergeError(f"Stage {'I' * stage} loss became {loss.item()} at step {step}; lower the learning rate")
                accelerator.backward(loss)
                if grad_clip:
                    accelerator.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                value = accelerator.reduce(loss.detach(), reduction="mean").item()
                first = state.losses.get(key, [value, value])[0]
                state.losses[key] = [first, value]
                state.step, done_here = step + 1, done_here + 1
                tok_s = done_here * tokens_per_step / (time.perf_counter() - started)
                state.tokens_per_s[key] = tok_s
                bar.update(task, completed=state.step, info=f"loss {value:.4g}  {tok_s:,.0f} tok/s")
                if interrupted():
                    _save(accelerator, checkpoint_dir, model_to_save, optimizer, state)
                    raise TrainingInterrupted(
                        f"interrupted in Stage {'I' * stage} at step {state.step}/{total_steps}; checkpoint saved, "
                        "re-run with --resume to continue")
                if checkpoint_every and state.step % checkpoint_every == 0 and state.step < total_steps:
                    _save(accelerator, checkpoint_dir, model_to_save, optimizer, state)
    return state


def _save(accelerator, directory, model, optimizer, state) -> None:
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_checkpoint(directory, accelerator.unwrap_model(model), optimizer, state)
