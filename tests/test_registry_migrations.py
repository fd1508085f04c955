"""Alembic migrations: a database created at the first (older) revision upgrades on init, rows intact."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, inspect, text

from registry_support import TEACHER_HASH, db_url, expert_weights, make_seed_dir, postgres_server  # noqa: F401
from xmerge.registry import Registry, RegistryError
from xmerge.registry.blobs import file_sha256
from xmerge.registry.db import MIGRATIONS, current_revision, head_revision


def _upgrade_to(url: str, revision: str) -> None:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    engine = create_engine(url)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
    engine.dispose()


def test_old_schema_upgrades_on_init_and_keeps_rows(tmp_path, db_url):
    reg = Registry(tmp_path / "home", db_url)
    reg.home.mkdir()
    _upgrade_to(reg.db_url, "0001")
    engine = create_engine(reg.db_url)
    assert "status" not in {c["name"] for c in inspect(engine).get_columns("experts")}

    # Rows as a registry at revision 0001 wrote them (blob files placed by hand).
    seed_dir = make_seed_dir(tmp_path / "seed")
    weights = expert_weights(tmp_path / "e.safetensors", 0.5)
    seed_sha = reg.blobs.put(seed_dir / "model.safetensors")[0]
    expert_sha = reg.blobs.put(weights)[0]
    now = datetime.now(timezone.utc)
    with engine.begin() as conn:
        for sha in (seed_sha, expert_sha):
            conn.execute(text("INSERT INTO blobs (sha256, size, path, created_at) VALUES (:s, 1, :p, :t)"),
                         {"s": sha, "p": reg.blobs.relpath(sha), "t": now})
        conn.execute(text("INSERT INTO seeds (id, name, teacher_spec, teacher_hash, student_config, weights_sha, "
                          "created_at) VALUES (1, 'old', 'tiny', :h, '{\"a\": 1}', :w, :t)"),
                     {"h": TEACHER_HASH, "w": seed_sha, "t": now})
        conn.execute(text("INSERT INTO experts (id, seed_id, domain, version, team, weights_sha, recipe, "
                          "data_fingerprint, metrics, created_at) VALUES (1, 1, 'math', 1, 'a', :w, '{}', '', "
                          "'{\"ce\": 2.0}', :t)"), {"w": expert_sha, "t": now})
        conn.execute(text("INSERT INTO eval_runs (id, model_ref, model_hash, suite, metrics, w_tau, tau_star, "
                          "created_at) VALUES (1, 'math@v1', :w, 'quick', '{}', '{}', NULL, :t)"),
                     {"w": expert_sha, "t": now})
    with pytest.raises(RegistryError, match=r"older schema \(0001, need 0002\); run `xmerge init`"):
        reg.list_experts()

    Registry(reg.home, reg.db_url).init()
    assert current_revision(engine) == head_revision() == "0002"
    columns = {c["name"] for c in inspect(engine).get_columns("eval_runs")}
    assert {"reference_ref", "reference_hash"} <= columns
    assert "ix_eval_cache" in {i["name"] for i in inspect(engine).get_indexes("eval_runs")}
    engine.dispose()

    upgraded = Registry(reg.home, reg.db_url)
    (expert,) = upgraded.list_experts()
    assert (expert.domain, expert.version, expert.status, expert.metrics) == ("math", 1, "ready", {"ce": 2.0})
    assert upgraded.find_eval(expert_sha, "quick", "").model_ref == "math@v1"
    assert file_sha256(upgraded.blob_path(expert.weights_sha)) == expert_sha
    # The upgraded registry keeps working: next version, new columns written.
    assert upgraded.add_expert("old", "math", weights, status="training").version == 2
    upgraded.close()


def test_init_is_idempotent(tmp_path, db_url):
    reg = Registry(tmp_path / "home", db_url)
    reg.init()
    reg.init()
    assert current_revision(reg.engine) == head_revision()
    assert (reg.home / "blobs" / "sha256").is_dir() and (reg.home / "tmp").is_dir()
    if db_url is None:
        assert (reg.home / "registry.db").is_file()
        with reg.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    reg.close()


def test_home_and_db_url_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("XMERGE_HOME", str(tmp_path / "envhome"))
    reg = Registry()
    assert reg.home == tmp_path / "envhome" and reg.db_url == f"sqlite:///{tmp_path / 'envhome' / 'registry.db'}"
    monkeypatch.setenv("XMERGE_DB_URL", "sqlite:///" + str(tmp_path / "other.db"))
    assert Registry().db_url.endswith("other.db") and Registry(db_url="sqlite:///x.db").db_url == "sqlite:///x.db"
    monkeypatch.delenv("XMERGE_HOME")
    monkeypatch.chdir(tmp_path)
    assert Registry().home == tmp_path / ".xmerge"
