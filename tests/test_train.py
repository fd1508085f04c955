"""Expert training on a tiny teacher: stage behaviour, target reuse, resume after SIGKILL, bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from common import tiny_registry
from xmerge.errors import XmergeError
from xmerge.experts.train import TrainRecipe, train_expert
from xmerge.modeling.student import is_new_parameter

XMERGE = [sys.executable, "-m", "xmerge.cli"]
# A random tiny teacher is no language model: CE on real text pulls away from it, so the KL term leads here.
SMALL = dict(seq_len=32, batch_size=4, lr1=3e-2, lr2=3e-3, gamma=0.1, beta=0.9, top_k=16, heldout_blocks=2)


@pytest.fixture()
def setup(tmp_path):
    return tiny_registry(tmp_path), tmp_path / "teacher"


def weights_of(reg, record) -> dict[str, torch.Tensor]:
    return load_file(reg.blob_path(record.weights_sha))


def test_stage1_then_stage2(setup):
    reg, teacher_dir = setup
    seed = weights_of(reg, reg.list_seeds()[0])
    e1 = train_expert(reg, TrainRecipe(domain="math", stage1_tokens=32 * 4 * 80, stage2_tokens=0, **SMALL), device="cpu")
    first, last = e1.metrics["stage1_loss"]
    assert last < first / 2
    w1 = weights_of(reg, e1)
    changed = {n for n in seed if not torch.equal(seed[n], w1[n])}
    assert changed and all(is_new_parameter(n) for n in changed)
    assert all(is_new_parameter(n) or torch.equal(seed[n], w1[n]) for n in seed)

    e2 = train_expert(reg, TrainRecipe(domain="math", stage1_tokens=32 * 4 * 80, stage2_tokens=32 * 4 * 20, **SMALL),
                      device="cpu")
    w2 = weights_of(reg, e2)
    assert all(not torch.equal(w1[n], w2[n]) for n in w1), "Stage II trains every parameter"
    assert e2.metrics["heldout_kl_after"] < e2.metrics["heldout_kl_before"]
    assert (e1.version, e2.version) == (1, 2) and e2.data_fingerprint == e1.data_fingerprint

    # targets are cached: with the teacher gone, the same recipe still trains (the teacher is never run)
    shutil.rmtree(teacher_dir)
    e3 = train_expert(reg, TrainRecipe(domain="math", stage1_tokens=32 * 4 * 80, stage2_tokens=32 * 4 * 20, **SMALL),
                      device="cpu")
    assert all(torch.equal(w2[n], weights_of(reg, e3)[n]) for n in w2)


def _train_cmd(home: Path, *extra: str) -> list[str]:
    return [*XMERGE, "train-expert", "math", "--home", str(home), "--device", "cpu", "--seq-len", "32",
            "--batch-size", "2", "--stage1-tokens", str(32 * 2 * 60), "--stage2-tokens", str(32 * 2 * 60),
            "--lr2", "3e-3", "--top-k", "16", "--checkpoint-every", "1", *extra]


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_interrupt_then_resume_is_bit_identical(setup, sig):
    reg, _ = setup
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    subprocess.run(_train_cmd(reg.home), check=True, env=env, capture_output=True)
    # Ctrl-C reaches the process as SIGINT with the default disposition (a shell's & would ignore it)
    proc = subprocess.Popen(_train_cmd(reg.home), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    sent = False
    while not sent and time.time() < deadline and proc.poll() is None:
        for progress in reg.home.glob("runs/*/checkpoint/progress.json"):
            try:
                state = json.loads(progress.read_text())
            except (OSError, ValueError):
                continue
            if state["stage"] == 2 and state["step"] >= 5:
                proc.send_signal(sig)
                sent = True
                break
        time.sleep(0.02)
    _, err = proc.communicate()
    assert sent, "run finished before it could be interrupted"
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
    else:
        assert proc.returncode == 1 and "Traceback" not in err
        assert "interrupted in Stage II at step" in err and "--resume" in err
    assert len(reg.list_experts()) == 1, "an interrupted run registers nothing"
    out = subprocess.run(_train_cmd(reg.home, "--resume"), env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "resuming Stage II" in out.stdout
    first, resumed = reg.list_experts()
    a, b = weights_of(reg, first), weights_of(reg, resumed)
    assert all(torch.equal(a[n], b[n]) for n in a)


@pytest.mark.parametrize(
    "args,message",
    [
        (["physics"], "unknown domain 'physics'"),
        (["--seed", "nope", "math"], "unknown seed 'nope'"),
        (["--stage1-tokens", "-5", "math"], "stage1-tokens must be >= 0"),
        (["--seq-len", "100000", "math"], "--seq-len 100000 exceeds the teacher's context of 512"),
        (["--seq-len", "400", "--data", "SMALL", "legal"], "seq_len 400 is larger than"),
        (["--data", "EMPTY", "legal"], "empty"),
        (["--data", "BAD", "legal"], "line 2"),
        (["--precision", "fp8", "math"], "--precision must be auto, fp32 or bf16"),
        (["--ce-weight", "0", "--kl-weight", "0", "math"], "Stage II needs a loss"),
    ],
)
def test_bad_input(setup, tmp_path, args, message):
    reg, _ = setup
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{not json\n')
    (tmp_path / "small.jsonl").write_text("".join(f'{{"text": "record {i}"}}\n' for i in range(30)))
    files = {name: str(tmp_path / f"{name.lower()}.jsonl") for name in ("EMPTY", "BAD", "SMALL")}
    args = [files.get(a, a) for a in args]
    defaults = ["--home", str(reg.home), "--device", "cpu", "--stage1-tokens", "64", "--stage2-tokens", "64",
                "--seq-len", "16"]
    out = subprocess.run([*XMERGE, "train-expert", *defaults, *args], capture_output=True, text=True)
    assert out.returncode == 1
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], out.stderr
    assert reg.list_experts() == []


def test_recipe_validation_needs_no_registry():
    with pytest.raises(XmergeError, match="batch-size must be >= 1"):
        TrainRecipe(domain="math", batch_size=0).validate()
