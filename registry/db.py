"""Engine setup, write transactions with retries, and schema migration to head.

SQLite runs in WAL mode with a busy timeout, and every write transaction starts with
BEGIN IMMEDIATE: a deferred transaction that reads first and then writes can fail at once
with "database is locked" when another writer committed in between, which the busy
handler does not retry. Writers that still collide are retried here, so no lock error
reaches the user.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from xmerge.registry.errors import RegistryError

T = TypeVar("T")
MIGRATIONS = Path(__file__).parent / "migrations"
WRITE = "xmerge_write"
BUSY_TIMEOUT_MS = 30_000
RETRY_DEADLINE_S = 300.0
# Any key works; it only has to be the same for every process migrating one PostgreSQL database.
PG_MIGRATION_LOCK = 0x786D65726765


def make_engine(url: str) -> Engine:
    """An engine for `url`; SQLite gets WAL, a busy timeout, foreign keys and explicit BEGINs."""
    if not url.startswith("sqlite"):
        return create_engine(url, pool_pre_ping=True)
    engine = create_engine(url, connect_args={"timeout": BUSY_TIMEOUT_MS / 1000})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record) -> None:
        dbapi_conn.isolation_level = None  # we emit BEGIN ourselves (below)
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get(WRITE) else "BEGIN")

    return engine


def _retryable(exc: Exception) -> bool:
    if isinstance(exc, IntegrityError):  # a concurrent writer took the same (name, version): recount
        return True
    message = str(exc).lower()
    return isinstance(exc, OperationalError) and ("locked" in message or "busy" in message
                                                   or "could not serialize" in message or "deadlock" in message)


def write(engine: Engine, work: Callable[[Session], T]) -> T:
    """Run `work(session)` in one write transaction, committed at the end; retried on lock/race errors.

    `work` must raise RegistryError for conflicts it detects itself (those are not retried) and
    return plain values (not ORM rows) since the session is closed afterwards.
    """
    deadline = time.monotonic() + RETRY_DEADLINE_S
    attempt = 0
    while True:
        try:
            with engine.connect().execution_options(**{WRITE: True}) as conn, Session(bind=conn) as session:
                with session.begin():
                    return work(session)
        except (IntegrityError, OperationalError) as exc:
            attempt += 1
            if not _retryable(exc) or time.monotonic() > deadline or (
                    isinstance(exc, IntegrityError) and attempt > 20):
                raise RegistryError(f"database write failed after {attempt} attempts: {exc.orig}") from exc
            time.sleep(min(1.0, 0.01 * 2 ** min(attempt, 7)) * random.random())


def read(engine: Engine, work: Callable[[Session], T]) -> T:
    """Run `work(session)` in a read transaction (retried on lock errors like `write`)."""
    deadline = time.monotonic() + RETRY_DEADLINE_S
    attempt = 0
    while True:
        try:
            with Session(bind=engine) as session:
                return work(session)
        except OperationalError as exc:
            attempt += 1
            if not _retryable(exc) or time.monotonic() > deadline:
                raise RegistryError(f"database read failed: {exc.orig}") from exc
            time.sleep(min(1.0, 0.01 * 2 ** min(attempt, 7)) * random.random())


def head_revision() -> str:
    return ScriptDirectory.from_config(_alembic_config()).get_current_head()


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade_to_head(engine: Engine) -> None:
    """Migrate to head in one transaction; concurrent callers serialise (BEGIN IMMEDIATE / advisory lock)."""

    def migrate(session: Session) -> None:
        conn = session.connection()
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": PG_MIGRATION_LOCK})
        cfg = _alembic_config()
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")

    write(engine, migrate)


def _alembic_config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return cfg
