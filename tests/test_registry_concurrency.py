"""Many writers at once, and writers killed with SIGKILL mid-registration (SQLite and PostgreSQL)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import create_engine, text

from registry_support import BARE_XMERGE, add_seed, db_url, expert_weights, postgres_server, reg  # noqa: F401
from xmerge.registry import Registry

REGISTER = BARE_XMERGE + """
import sys, time
from pathlib import Path
from xmerge.registry import Registry
home, url, worker, count, weights_dir, go = sys.argv[1:7]
reg = Registry(home, url or None)
reg.init()  # every worker runs init too: concurrent migrations must serialise
while not Path(go).exists():
    time.sleep(0.005)
weights = sorted(Path(weights_dir).glob("*.safetensors"))
i = 0
while int(count) == 0 or i < int(count):
    reg.add_expert("s0", "math", weights[i % len(weights)], team=f"w{worker}", metrics={"i": i})
    i += 1
"""


def _spawn(reg: Registry, worker: int, count: int, weights_dir: Path, go: Path) -> subprocess.Popen:
    url = "" if reg.db_url.startswith("sqlite") else reg.db_url
    return subprocess.Popen([sys.executable, "-c", REGISTER, str(reg.home), url, str(worker), str(count),
                             str(weights_dir), str(go)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _assert_consistent(reg: Registry) -> None:
    """Every row's blobs exist and verify; no row of any kind points at a missing blob or a missing seed."""
    for expert in reg.list_experts():
        reg.blob_path(expert.weights_sha)
        for sha in expert.files.values():
            reg.blob_path(sha)
    engine = create_engine(reg.db_url)
    with engine.connect() as conn:
        dangling = conn.execute(text(
            "SELECT count(*) FROM experts e LEFT JOIN blobs b ON b.sha256 = e.weights_sha "
            "LEFT JOIN seeds s ON s.id = e.seed_id WHERE b.sha256 IS NULL OR s.id IS NULL")).scalar()
    engine.dispose()
    assert dangling == 0


def test_eight_processes_register_200_experts(reg, tmp_path):
    add_seed(reg, tmp_path)
    go = tmp_path / "go"
    procs = []
    for worker in range(8):
        weights_dir = tmp_path / f"w{worker}"
        for j in range(25):
            expert_weights(weights_dir / f"{j:02d}.safetensors", worker * 100 + j + 1)
        procs.append(_spawn(reg, worker, 25, weights_dir, go))
    go.touch()
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * 8, "\n".join(outputs)
    assert not any("locked" in out.lower() for out in outputs)

    experts = reg.list_experts()
    assert len(experts) == 200
    assert sorted(e.version for e in experts) == list(range(1, 201))  # race-free auto-increment
    assert {e.team for e in experts} == {f"w{i}" for i in range(8)}
    assert len({e.weights_sha for e in experts}) == 200
    _assert_consistent(reg)
    assert reg.gc(grace_s=0).blobs == 0  # nothing orphaned


def _wait_for(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.001)


def test_sigkill_mid_registration_leaves_no_half_row(reg, tmp_path):
    # Big enough (32 MB) that the kill lands while the weights are being copied into the store.
    big = {"embed.weight": np.random.default_rng(0).standard_normal((2048, 4096)).astype(np.float32)}
    add_seed(reg, tmp_path, tensors=big)
    weights_dir = tmp_path / "w"
    for j in range(2):
        expert_weights(weights_dir / f"{j}.safetensors", j + 1.0, base=big)
    go = tmp_path / "go"
    go.touch()

    proc = _spawn(reg, 0, 0, weights_dir, go)
    _wait_for(lambda: len(reg.list_experts()) >= 2)
    _wait_for(lambda: any(reg.blobs.tmp.iterdir()))  # a blob copy is in flight
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    leftovers = list(reg.blobs.tmp.iterdir())
    assert leftovers, "the kill should have interrupted a blob write"

    listed = reg.list_experts()
    assert [e.version for e in listed] == list(range(1, len(listed) + 1))
    _assert_consistent(reg)

    Registry(reg.home, reg.db_url).init()  # what `xmerge init` does: the dead writer's temp files go
    assert list(reg.blobs.tmp.iterdir()) == []
    reg.gc(grace_s=0)
    (seed,) = reg.list_seeds()
    referenced = {e.weights_sha for e in listed} | {seed.weights_sha} | set(seed.files.values())
    assert {sha for sha, _ in reg.blobs.iter_blobs()} == referenced


@pytest.mark.parametrize("delay", [0.05, 0.3])
def test_sigkill_at_random_moments_keeps_registry_consistent(reg, tmp_path, delay):
    add_seed(reg, tmp_path)
    weights_dir = tmp_path / "w"
    for j in range(3):
        expert_weights(weights_dir / f"{j}.safetensors", j + 1.0)
    go = tmp_path / "go"
    go.touch()
    proc = _spawn(reg, 0, 0, weights_dir, go)
    _wait_for(lambda: len(reg.list_experts()) >= 1)
    time.sleep(delay)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    again = Registry(reg.home, reg.db_url)
    again.init()
    listed = again.list_experts()
    assert [e.version for e in listed] == list(range(1, len(listed) + 1))
    _assert_consistent(again)
    # The registry is still writable after the kill (no stale lock).
    assert again.add_expert("s0", "math", weights_dir / "0.safetensors").version == len(listed) + 1
    again.close()
