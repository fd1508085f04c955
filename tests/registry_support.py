"""Shared pieces of the registry tests: a real PostgreSQL server, random safetensors models, snapshots."""

from __future__ import annotations

import glob
import hashlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file
from sqlalchemy import MetaData, create_engine, select

from xmerge.registry import Registry

# Prelude for subprocesses: make `xmerge` a bare namespace so xmerge/__init__.py (which may import the
# torch-based modeling package) does not run; what is imported afterwards is the registry's own doing.
BARE_XMERGE = """
import importlib.util, sys, types
_spec = importlib.util.find_spec("xmerge")
_pkg = types.ModuleType("xmerge")
_pkg.__path__ = list(_spec.submodule_search_locations)
sys.modules["xmerge"] = _pkg
"""

SEED_SHAPES = {"embed.weight": (32, 8), "layers.0.mlp.weight": (8, 8), "layers.0.gate.bias": (4,),
               "norm.weight": (8,)}
STUDENT_CONFIG = {"model_type": "xlstm_student", "hidden_size": 8, "num_hidden_layers": 1}
TEACHER_HASH = "7e" * 32


# ---- models -------------------------------------------------------------------------------------

def seed_tensors(seed: int = 0, shapes: dict = SEED_SHAPES) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def write_weights(path: Path, tensors: dict[str, np.ndarray]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


def make_seed_dir(path: Path, tensors: dict[str, np.ndarray] | None = None) -> Path:
    """An HF-like model dir: model.safetensors + config.json + tokenizer.json."""
    write_weights(path / "model.safetensors", tensors if tensors is not None else seed_tensors())
    (path / "config.json").write_text('{"model_type": "xlstm_student", "hidden_size": 8}')
    (path / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE"}}')
    return path


def expert_weights(path: Path, delta: float, base: dict[str, np.ndarray] | None = None) -> Path:
    """Seed tensors shifted by `delta`: same names/shapes/dtypes, different bytes."""
    base = base if base is not None else seed_tensors()
    return write_weights(path, {k: v + np.float32(delta) for k, v in base.items()})


def add_seed(reg: Registry, work: Path, name: str = "s0", tensors=None):
    return reg.add_seed(name, teacher_spec="tiny-llama", teacher_hash=TEACHER_HASH, student_config=STUDENT_CONFIG,
                        model_dir=make_seed_dir(work / f"seed-{name}", tensors))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---- snapshots ----------------------------------------------------------------------------------

def snapshot(reg: Registry) -> dict:
    """Every DB row of every table, and every file under the home with its sha256 (SQLite: checkpointed)."""
    engine = create_engine(reg.db_url)
    try:
        with engine.connect() as conn:
            if engine.dialect.name == "sqlite":
                conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
            meta = MetaData()
            meta.reflect(conn)
            rows = {name: sorted(map(repr, conn.execute(select(table)))) for name, table in meta.tables.items()}
    finally:
        engine.dispose()
    files = {str(p.relative_to(reg.home)): sha256(p) for p in sorted(reg.home.rglob("*"))
             if p.is_file() and not p.name.endswith(("-wal", "-shm"))}
    return {"rows": rows, "files": files}


# ---- PostgreSQL ---------------------------------------------------------------------------------

class PostgresServer:
    """A throwaway PostgreSQL cluster on a free localhost port (installed with apt if missing)."""

    def __init__(self) -> None:
        self.bin = _postgres_bin()
        self.user = None if os.geteuid() != 0 else ("postgres" if _user_exists("postgres") else "nobody")
        self.dir = Path(tempfile.mkdtemp(prefix="xmerge-pg-"))
        self.data = self.dir / "data"
        self.port = _free_port()
        if self.user:
            shutil.chown(self.dir, self.user)
        self._run(self.bin / "initdb", "-D", self.data, "-U", "postgres", "--auth=trust", "-E", "UTF8")
        self._run(self.bin / "pg_ctl", "-D", self.data, "-l", self.dir / "server.log", "-w", "start", "-o",
                  f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200")

    def _run(self, *args) -> None:
        cmd = [str(a) for a in args]
        if self.user:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}")

    def new_database(self) -> str:
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres", autocommit=True) as c:
            c.execute(f"CREATE DATABASE {name}")
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        self._run(self.bin / "pg_ctl", "-D", self.data, "-m", "fast", "-w", "stop")
        shutil.rmtree(self.dir, ignore_errors=True)


def _postgres_bin() -> Path:
    def found() -> list[str]:
        return sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))

    if not found():
        # Fail loudly (no skip) when the server cannot be installed: the suite must run on PostgreSQL.
        subprocess.run(["apt-get", "update", "-q"], check=True, capture_output=True)
        subprocess.run(["apt-get", "install", "-y", "-q", "postgresql"], check=True, capture_output=True,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    if not found():
        raise RuntimeError("PostgreSQL was installed but no /usr/lib/postgresql/*/bin/pg_ctl exists")
    return Path(found()[-1]).parent


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_SERVER: list[PostgresServer] = []


@pytest.fixture(scope="session")
def postgres_server():
    """One server for the whole session, shared by every registry test module that imports this fixture."""
    if not _SERVER:
        _SERVER.append(PostgresServer())
    yield _SERVER[0]
    if _SERVER:
        _SERVER.pop().stop()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request):
    """None (SQLite under the home) or the URL of a fresh database on the session's PostgreSQL server."""
    if request.param == "sqlite":
        return None
    return request.getfixturevalue("postgres_server").new_database()


@pytest.fixture
def reg(tmp_path, db_url):
    registry = Registry(tmp_path / "home", db_url)
    registry.init()
    yield registry
    registry.close()
