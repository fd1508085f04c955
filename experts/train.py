"""`xmerge train-expert`: one domain, Stage I then Stage II from the shared seed, then register.

Runs through accelerate, so `accelerate launch -m xmerge.cli train-expert ...` spreads the
batches over several GPUs (each process takes its slice of every global batch).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from transformers import AutoTokenizer

from xmerge.errors import XmergeError
from xmerge.experts.checkpoint import Progress, load_checkpoint, read_progress, save_checkpoint, weights_state
from xmerge.experts.data import PRESETS, load_domain, take_tokens
from xmerge.experts.loop import run_stage
from xmerge.experts.seed import SeedTeacher, checkout_cached
from xmerge.experts.stages import Stage1Aligner, freeze_for_stage1, sparse_kl, stage2_loss, unfreeze_all, warmup_cosine
from xmerge.experts.targets import TeacherTargets
from xmerge.modeling.student import XLSTMStudentForCausalLM


@dataclass(frozen=True)
class TrainRecipe:
    """Everything that determines an expert's weights (recorded with it)."""

    domain: str
    data: str | None = None
    seq_len: int = 512
    batch_size: int = 4
    stage1_tokens: int = 65536
    stage2_tokens: int = 65536
    lr1: float = 1e-2  # Stage I peak (paper), warmup + cosine to 1e-5
    lr2: float = 1e-5  # Stage II constant (paper)
    gamma: float = 0.9
    beta: float = 0.1
    top_k: int = 256
    weight_decay: float = 0.1  # Stage II AdamW; Stage I uses none (identity feature maps must not decay)
    grad_clip: float = 1.0
    heldout_blocks: int = 4

    def validate(self) -> None:
        for field in ("seq_len", "batch_size", "top_k"):
            if getattr(self, field) < 1:
                raise XmergeError(f"{field.replace('_', '-')} must be >= 1, got {getattr(self, field)}")
        for field in ("stage1_tokens", "stage2_tokens", "heldout_blocks"):
            if getattr(self, field) < 0:
                raise XmergeError(f"{field.replace('_', '-')} must be >= 0, got {getattr(self, field)}")
        for field in ("lr1", "lr2", "gamma", "beta", "weight_decay", "grad_clip"):
            if not getattr(self, field) >= 0:
                raise XmergeError(f"{field} must be >= 0, got {getattr(self, field)}")
        if self.gamma + self.beta <= 0:
            raise XmergeError("Stage II needs a loss: give --ce-weight or --kl-weight a positive value")
        if self.data is None and self.domain not in PRESETS:
            raise XmergeError(
                f"unknown domain {self.domain!r}: presets are {', '.join(PRESETS)}; "
                "for another domain pass its data with --data FILE.jsonl|FILE.parquet|DATASET"
            )


def pick_seed(reg, name: str | None):
    seeds = reg.list_seeds()
    if name is not None:
        for seed in seeds:
            if seed.name == name:
                return seed
        raise XmergeError(f"unknown seed {name!r}; known: {', '.join(s.name for s in seeds) or 'none'} "
                          "(create one with `xmerge seed create NAME --teacher SPEC`)")
    if len(seeds) != 1:
        raise XmergeError("no seed in the registry; create one with `xmerge seed create NAME --teacher SPEC`"
                          if not seeds else f"several seeds ({', '.join(s.name for s in seeds)}); pick one with --seed")
    return seeds[0]


def _rows(step: int, batch: int, world: int, rank: int, n: int) -> torch.Tensor:
    """Block indices of this process's slice of global batch ``step`` (wrapping around the data)."""
    return (torch.arange(batch) + step * batch * world + rank * batch) % n


@torch.no_grad()
def heldout_kl(student, blocks, targets: TeacherTargets, device) -> float:
    was_training = student.training
    student.eval()
    total = 0.0
    for i in range(len(blocks)):
        idx, lp = targets.load(i, i + 1)
        total += sparse_kl(student(input_ids=blocks[i : i + 1].to(device)).logits, idx.to(device), lp.to(device)).item()
    student.train(was_training)
    return total / max(1, len(blocks))


@dataclass
class PreparedRun:
    seed: object
    seed_dir: Path
    data: object
    blocks1: torch.Tensor  # (N1, T) Stage I blocks, in step order
    blocks2: torch.Tensor  # (N2, T) Stage II blocks, in step order
    unique2: torch.Tensor  # the distinct blocks of blocks2 (row r of blocks2 is unique2[r % len])
    heldout: torch.Tensor
    targets2: TeacherTargets | None
    targets_heldout: TeacherTargets | None


def prepare_run(reg, recipe: TrainRecipe, *, seed_name: str | None, device, say) -> PreparedRun:
    """Seed checkout, domain data, and the teacher's cached top-k targets (built if missing)."""
    recipe.validate()
    seed = pick_seed(reg, seed_name)
    context = seed.student_config["max_position_embeddings"]
    if recipe.seq_len > context:
        raise XmergeError(f"--seq-len {recipe.seq_len} exceeds the teacher's context of {context} tokens")
    seed_dir = checkout_cached(reg, seed)
    tokenizer = AutoTokenizer.from_pretrained(seed_dir)
    cache_dir = Path(reg.home) / "cache"
    teacher = SeedTeacher(seed, device)
    chat_teacher = teacher() if recipe.domain == "chat" and recipe.data is None else None
    budget = max(recipe.stage1_tokens, recipe.stage2_tokens, recipe.seq_len)
    data = load_domain(recipe.domain, tokenizer, seq_len=recipe.seq_len, data=recipe.data, cache_dir=cache_dir,
                       teacher=chat_teacher, max_train_tokens=budget,
                       max_heldout_tokens=max(1, recipe.heldout_blocks) * recipe.seq_len)
    say(f"data {recipe.domain}: {data.train.numel():,} train tokens, {data.heldout.numel():,} held-out "
        f"(fingerprint {data.fingerprint[:12]})")
    blocks2 = take_tokens(data.train, recipe.stage2_tokens)
    unique2 = data.train[: min(len(blocks2), len(data.train))]
    heldout = data.heldout[: recipe.heldout_blocks]
    common = dict(k=recipe.top_k, fingerprint=data.fingerprint, cache_dir=cache_dir, batch_size=recipe.batch_size)
    return PreparedRun(
        seed=seed, seed_dir=seed_dir, data=data, blocks1=take_tokens(data.train, recipe.stage1_tokens),
        blocks2=blocks2, unique2=unique2, heldout=heldout,
        targets2=teacher.targets(unique2, split="train", **common) if len(blocks2) else None,
        targets_heldout=teacher.targets(heldout, split="heldout", **common) if len(heldout) else None,
    )


def build_domain_targets(reg, recipe: TrainRecipe, *, seed_name: str | None = None, console=None) -> dict:
    """`xmerge targets build`: the targets train-expert would use for this recipe."""
    say = console.print if console is not None else (lambda *a, **k: None)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    run = prepare_run(reg, recipe, seed_name=seed_name, device=device, say=say)
    return {name: t for name, t in (("train", run.targets2), ("held-out", run.targets_heldout)) if t is not None}


def _mixed_precision(precision: str, device: str) -> str | None:
    """accelerate's mixed_precision for --precision: auto = bf16 autocast on CUDA, fp32 on CPU
    (an `accelerate launch --mixed_precision` setting wins over auto)."""
    if precision not in ("auto", "fp32", "bf16"):
        raise XmergeError(f"--precision must be auto, fp32 or bf16, got {precision!r}")
    if precision == "auto":
        if os.environ.get("ACCELERATE_MIXED_PRECISION"):
            return None
        return "bf16" if device != "cpu" and torch.cuda.is_available() else "no"
    return "no" if precision == "fp32" else "bf16"


def train_expert(reg, recipe: TrainRecipe, *, seed_name: str | None = None, device: str = "auto",
                 precision: str = "auto", resume: bool = False, version: int | None = None, team: str = "local",
                 checkpoint_every: int = 50, console=None):
    """Train one expert and register it; returns the registry Expert (None on non-main processes).

    Weights and optimizer state stay fp32; ``precision`` bf16 runs the forward under autocast."""
    recipe.validate()
    if device not in ("auto", "cpu", "cuda"):
        raise XmergeError(f"--device must be auto, cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise XmergeError("--device cuda requested but no CUDA device is available")
    say = console.print if console is not None else (lambda *a, **k: None)
    accelerator = Accelerator(cpu=device == "cpu", mixed_precision=_mixed_precision(precision, device))
    world, rank = accelerator.num_processes, accelerator.process_index
    per_step = recipe.batch_size * world
    run = prepare_run(reg, recipe, seed_name=seed_name, device=accelerator.device, say=say)
    seed, seed_dir, data = run.seed, run.seed_dir, run.data
    blocks1, blocks2, unique2, heldout = run.blocks1, run.blocks2, run.unique2, run.heldout
    targets2, targets_heldout = run.targets2, run.targets_heldout

    run_key = hashlib.sha256(json.dumps([seed.weights_sha, asdict(recipe), data.fingerprint]).encode()).hexdigest()[:16]
    run_dir = Path(reg.home) / "runs" / f"{seed.name}-{recipe.domain}-{run_key}"
    ckpt = run_dir / "checkpoint"
    progress = read_progress(ckpt) if resume else None
    if progress is None:
        shutil.rmtree(run_dir, ignore_errors=True)
        progress = Progress(stage=1, step=0)
    else:
        say(f"resuming Stage {'I' * progress.stage} at step {progress.step}")

    student = XLSTMStudentForCausalLM.from_pretrained(seed_dir, dtype=torch.float32)
    student.train()
    tokens_per_step = per_step * recipe.seq_len
    steps1 = math.ceil(len(blocks1) / per_step) if len(blocks1) else 0
    steps2 = math.ceil(len(blocks2) / per_step) if len(blocks2) else 0

    if progress.stage == 1:
        opt1 = torch.optim.AdamW(freeze_for_stage1(student), lr=recipe.lr1, weight_decay=0.0)
        if progress.step:
            load_checkpoint(ckpt, student, opt1)
        aligner, opt1 = accelerator.prepare(Stage1Aligner(student), opt1)

        def loss1(step):
            return aligner(blocks1[_rows(step, recipe.batch_size, world, rank, len(blocks1))].to(accelerator.device))

        run_stage(accelerator=accelerator, stage=1, loss_at=loss1, optimizer=opt1,
                  lr_at=lambda s: warmup_cosine(s, steps1, recipe.lr1), total_steps=steps1,
                  tokens_per_step=tokens_per_step, state=progress, checkpoint_dir=ckpt,
                  checkpoint_every=checkpoint_every, model_to_save=student, grad_clip=recipe.grad_clip)
        progress = Progress(stage=2, step=0, losses=progress.losses, tokens_per_s=progress.tokens_per_s)
        if accelerator.is_main_process:
            save_checkpoint(ckpt, student, None, progress)
    elif progress.step == 0:
        load_checkpoint(ckpt, student, None)

    opt2 = torch.optim.AdamW(unfreeze_all(student), lr=recipe.lr2, weight_decay=recipe.weight_decay)
    if progress.step:
        load_checkpoint(ckpt, student, opt2)
    model2, opt2 = accelerator.prepare(student, opt2)
    if targets_heldout is not None and "heldout_kl_before" not in progress.losses:
        progress.losses["heldout_kl_before"] = heldout_kl(student, heldout, targets_heldout, accelerator.device)

    def loss2(step):
        rows = _rows(step, recipe.batch_size, world, rank, len(blocks2))
        idx, lp = zip(*(targets2.load(int(r) % len(unique2), int(r) % len(unique2) + 1) for r in rows))
        dev = accelerator.device
        return stage2_loss(model2, blocks2[rows].to(dev), torch.cat(idx).to(dev), torch.cat(lp).to(dev),
                           gamma=recipe.gamma, beta=recipe.beta)[0]

    run_stage(accelerator=accelerator, stage=2, loss_at=loss2, optimizer=opt2, lr_at=lambda s: recipe.lr2,
              total_steps=steps2, tokens_per_step=tokens_per_step, state=progress, checkpoint_dir=ckpt,
              checkpoint_every=checkpoint_every, model_to_save=student, grad_clip=recipe.grad_clip)

    if not accelerator.is_main_process:
        return None
    metrics = {
        "stage1_loss": progress.losses.get("1"),
        "stage2_loss": progress.losses.get("2"),
        "stage1_tokens_per_s": progress.tokens_per_s.get("1"),
        "stage2_tokens_per_s": progress.tokens_per_s.get("2"),
    }
    if targets_heldout is not None:
        metrics["heldout_kl_before"] = progress.losses["heldout_kl_before"]
        metrics["heldout_kl_after"] = heldout_kl(student, heldout, targets_heldout, accelerator.device)
    weights = run_dir / "expert.safetensors"
    from safetensors.torch import save_file

    save_file(weights_state(student), weights, metadata={"format": "pt"})
    expert = reg.add_expert(seed.name, recipe.domain, weights, version=version, team=team,
                            recipe={**asdict(recipe), "world_size": world,
                                    "mixed_precision": accelerator.mixed_precision}, data_fingerprint=data.fingerprint,
                            metrics=metrics)
    shutil.rmtree(run_dir, ignore_errors=True)
    return expert
