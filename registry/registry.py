"""The Registry: seeds, experts, compositions, operations and eval runs over a database + blob store."""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from xmerge.registry import bundles, convert, db, lineage, refs
from xmerge.registry.blobs import BlobStore, check_sha
from xmerge.registry.errors import CorruptBlobError, RegistryError
from xmerge.registry.records import Composition, EvalRun, Expert, GcStats, Operation, Seed
from xmerge.registry.schema import (
    BlobRow,
    CompositionRow,
    EvalRunRow,
    ExpertRow,
    FileRow,
    MemberRow,
    OperationRow,
    SeedRow,
)
from xmerge.registry.tensors import tensor_spec

WEIGHTS = "model.safetensors"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
FILENAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")
STATUSES = ("ready", "training", "failed", "retired")
KINDS = ("compose", "patch", "replace")
DECISIONS = ("accepted", "rejected", "forced")
GC_GRACE_S = 600.0  # an unreferenced blob younger than this may belong to a registration in progress

ModelRecord = Seed | Expert | Composition


class Registry:
    """Lineage store + content-addressed weights. `home`: arg > $XMERGE_HOME > ./.xmerge;
    `db_url`: arg > $XMERGE_DB_URL > sqlite:///<home>/registry.db."""

    def __init__(self, home: Path | str | None = None, db_url: str | None = None) -> None:
        self.home = Path(home or os.environ.get("XMERGE_HOME") or ".xmerge").absolute()
        self.db_url = db_url or os.environ.get("XMERGE_DB_URL") or f"sqlite:///{self.home / 'registry.db'}"
        self.blobs = BlobStore(self.home)
        self._engine = None
        self._schema_checked = False

    def __repr__(self) -> str:
        return f"Registry(home={str(self.home)!r})"

    @property
    def engine(self):
        if self._engine is None:
            if self.db_url.startswith("sqlite") and not self.home.is_dir():
                raise RegistryError(f"no registry at {self.home}; run `xmerge init` (or pass --home)")
            self._engine = db.make_engine(self.db_url)
        return self._engine

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None

    # ---- setup and blobs -------------------------------------------------------------------------

    def init(self) -> None:
        """Create the home, upgrade the schema to head, and remove temp files of dead writers."""
        for sub in (self.home, self.home / "blobs" / "sha256", self.blobs.tmp):
            sub.mkdir(parents=True, exist_ok=True)
        db.upgrade_to_head(self.engine)
        self._schema_checked = True
        self.blobs.clean_temp(grace_s=float("inf"))

    def _write(self, work):
        self._check_schema()
        return db.write(self.engine, work)

    def _read(self, work):
        self._check_schema()
        return db.read(self.engine, work)

    def _check_schema(self) -> None:
        if self._schema_checked:
            return
        current, head = db.current_revision(self.engine), db.head_revision()
        if current != head:
            state = "is not initialised" if current is None else f"has an older schema ({current}, need {head})"
            raise RegistryError(f"the registry database {self._safe_url()} {state}; run `xmerge init`")
        self._schema_checked = True

    def _safe_url(self) -> str:
        return re.sub(r"//[^@/]*@", "//***@", self.db_url)

    def put_blob(self, path: Path) -> str:
        """Store a file by content; returns its sha256. Unreferenced blobs are removed by gc()."""
        sha, size = self.blobs.put(Path(path))
        self._write(lambda s: _ensure_blob_rows(s, self.blobs, {sha: size}))
        return sha

    def blob_path(self, sha: str, verify: bool = True) -> Path:
        """Path of a stored blob; with `verify`, its content is re-hashed (CorruptBlobError if it differs)."""
        check_sha(sha)
        if verify:
            return self.blobs.verify(sha)
        path = self.blobs.path(sha)
        if not path.is_file():
            raise CorruptBlobError(f"blob {sha} is missing: {path} does not exist")
        return path

    def _put_files(self, weights: Path, extra_files: dict[str, Path]) -> tuple[str, dict[str, str], dict[str, int]]:
        """Store weights + extra files; returns (weights sha, {filename: sha}, {sha: size})."""
        if not Path(weights).is_file():
            raise RegistryError(f"weights file {weights} does not exist")
        for filename, path in extra_files.items():
            _check_filename(filename)
            if not Path(path).is_file():
                raise RegistryError(f"file {path} (for {filename}) does not exist")
        weights_sha, weights_size = self.blobs.put(Path(weights))
        sizes, files = {weights_sha: weights_size}, {}
        for filename, path in sorted(extra_files.items()):
            sha, sizes[sha] = self.blobs.put(Path(path))
            files[filename] = sha
        return weights_sha, files, sizes

    # ---- registration ---------------------------------------------------------------------------

    def add_seed(self, name: str, *, teacher_spec: str, teacher_hash: str, student_config: dict,
                 model_dir: Path) -> Seed:
        """Register a seed from an HF model dir (model.safetensors + config/tokenizer files)."""
        _check_name(name, "seed name")
        model_dir = Path(model_dir)
        if not (model_dir / WEIGHTS).is_file():
            raise RegistryError(f"{model_dir} has no {WEIGHTS}; save the seed student with safetensors first")
        tensor_spec(model_dir / WEIGHTS)
        extra = {p.name: p for p in sorted(model_dir.iterdir())
                 if p.is_file() and p.name != WEIGHTS and not p.name.startswith(".")}
        weights_sha, files, sizes = self._put_files(model_dir / WEIGHTS, extra)

        def work(s: Session) -> Seed:
            if s.scalar(select(SeedRow).where(SeedRow.name == name)) is not None:
                raise RegistryError(f"seed '{name}' already exists; choose another name")
            _ensure_blob_rows(s, self.blobs, sizes)
            row = SeedRow(name=name, teacher_spec=teacher_spec, teacher_hash=teacher_hash,
                          student_config=student_config, weights_sha=weights_sha)
            s.add(row)
            s.flush()
            _add_file_rows(s, "seed", row.id, files)
            return convert.seed(s, row)

        return self._write(work)

    def add_expert(self, seed: str, domain: str, weights: Path, *, version: int | None = None, team: str = "local",
                   recipe: dict | None = None, data_fingerprint: str = "", metrics: dict | None = None,
                   status: str = "ready", extra_files: dict[str, Path] | None = None) -> Expert:
        """Register an expert of `seed` for `domain`; its tensors must match the seed's names/shapes/dtypes."""
        _check_name(domain, "domain")
        if status not in STATUSES:
            raise RegistryError(f"status '{status}' is not one of {', '.join(STATUSES)}")
        if version is not None and version < 1:
            raise RegistryError(f"version {version} must be >= 1")
        for field, value in (("team", team), ("data_fingerprint", data_fingerprint)):
            if len(value) > 200:
                raise RegistryError(f"{field} is {len(value)} characters long; at most 200 are stored")
        seed_rec = self._seed(seed)
        self.check_tensors_match_seed(seed_rec, Path(weights))
        weights_sha, files, sizes = self._put_files(weights, extra_files or {})

        def work(s: Session) -> Expert:
            taken = select(func.max(ExpertRow.version)).where(ExpertRow.seed_id == seed_rec.id,
                                                              ExpertRow.domain == domain)
            newest = s.scalar(taken) or 0
            if version is not None and s.scalar(select(ExpertRow.id).where(
                    ExpertRow.seed_id == seed_rec.id, ExpertRow.domain == domain, ExpertRow.version == version)):
                raise RegistryError(f"expert {domain}@v{version} of seed '{seed}' already exists; "
                                    "leave the version out to get the next one")
            _ensure_blob_rows(s, self.blobs, sizes)
            row = ExpertRow(seed_id=seed_rec.id, domain=domain, version=version or newest + 1, team=team,
                            weights_sha=weights_sha, recipe=recipe or {}, data_fingerprint=data_fingerprint,
                            metrics=metrics or {}, status=status)
            s.add(row)
            s.flush()
            _add_file_rows(s, "expert", row.id, files)
            return convert.expert(s, row)

        return self._write(work)

    def add_composition(self, name: str, *, seed: str, members: list[tuple[int, float]], method: str,
                        params: dict, parent_id: int | None, weights: Path,
                        extra_files: dict[str, Path] | None = None) -> Composition:
        """Register the next version of composition `name` (experts of one seed merged with `method`)."""
        _check_name(name, "composition name")
        if not members:
            raise RegistryError(f"composition '{name}' needs at least one member expert")
        if len({expert_id for expert_id, _ in members}) != len(members):
            raise RegistryError(f"composition '{name}' lists an expert twice")
        seed_rec = self._seed(seed)
        self.check_tensors_match_seed(seed_rec, Path(weights))
        weights_sha, files, sizes = self._put_files(weights, extra_files or {})

        def work(s: Session) -> Composition:
            for expert_id, _ in members:
                expert_row = s.get(ExpertRow, expert_id)
                if expert_row is None:
                    raise RegistryError(f"expert {expert_id} does not exist; see `xmerge experts list`")
                if expert_row.seed_id != seed_rec.id:
                    raise RegistryError(f"expert {expert_id} belongs to another seed than '{seed}'; "
                                        "only experts of one seed can be merged")
            if parent_id is not None and s.get(CompositionRow, parent_id) is None:
                raise RegistryError(f"parent composition {parent_id} does not exist")
            newest = s.scalar(select(func.max(CompositionRow.version)).where(CompositionRow.name == name)) or 0
            _ensure_blob_rows(s, self.blobs, sizes)
            row = CompositionRow(name=name, version=newest + 1, seed_id=seed_rec.id, method=method, params=params,
                                 parent_id=parent_id, weights_sha=weights_sha)
            s.add(row)
            s.flush()
            s.add_all(MemberRow(composition_id=row.id, expert_id=e, weight=float(w)) for e, w in members)
            _add_file_rows(s, "composition", row.id, files)
            s.flush()
            return convert.composition(s, row)

        return self._write(work)

    def record_operation(self, kind: str, *, composition: str, inputs: dict, report: dict, decision: str,
                         who: str, result_composition_id: int | None) -> Operation:
        """Record one compose/patch/replace attempt with its gate report, accepted or not."""
        if kind not in KINDS:
            raise RegistryError(f"operation kind '{kind}' is not one of {', '.join(KINDS)}")
        if decision not in DECISIONS:
            raise RegistryError(f"decision '{decision}' is not one of {', '.join(DECISIONS)}")

        def work(s: Session) -> Operation:
            if result_composition_id is not None and s.get(CompositionRow, result_composition_id) is None:
                raise RegistryError(f"result composition {result_composition_id} does not exist")
            row = OperationRow(kind=kind, composition=composition, inputs=inputs, report=report,
                               decision=decision, who=who, result_composition_id=result_composition_id)
            s.add(row)
            s.flush()
            return convert.operation(row)

        return self._write(work)

    def record_eval(self, *, model_ref: str, model_hash: str, suite: str, reference_ref: str, reference_hash: str,
                    metrics: dict, w_tau: dict, tau_star: float | None, report_path: str | None) -> EvalRun:
        """Record one quick-eval run (also the eval cache, looked up by find_eval)."""

        def work(s: Session) -> EvalRun:
            row = EvalRunRow(model_ref=model_ref, model_hash=model_hash, suite=suite, reference_ref=reference_ref,
                             reference_hash=reference_hash, metrics=metrics,
                             w_tau={str(k): v for k, v in w_tau.items()}, tau_star=tau_star, report_path=report_path)
            s.add(row)
            s.flush()
            return convert.eval_run(row)

        return self._write(work)

    def find_eval(self, model_hash: str, suite: str, reference_hash: str) -> EvalRun | None:
        """The newest eval run of this model on this suite against this reference, if any."""
        return self._read(lambda s: _maybe(convert.eval_run, s.scalar(
            select(EvalRunRow).where(EvalRunRow.model_hash == model_hash, EvalRunRow.suite == suite,
                                     EvalRunRow.reference_hash == reference_hash)
            .order_by(EvalRunRow.id.desc()).limit(1))))

    def check_tensors_match_seed(self, seed: Seed, weights: Path) -> None:
        """Raise unless `weights` has exactly the seed's tensor names, shapes and dtypes."""
        if not weights.is_file():
            raise RegistryError(f"weights file {weights} does not exist")
        theirs, ours = tensor_spec(weights), tensor_spec(self.blob_path(seed.weights_sha, verify=False))
        if theirs == ours:
            return
        missing, extra = sorted(ours.keys() - theirs.keys()), sorted(theirs.keys() - ours.keys())
        differ = sorted(n for n in ours.keys() & theirs.keys() if ours[n] != theirs[n])
        parts = [f"missing {missing[:3]}" if missing else "", f"unexpected {extra[:3]}" if extra else "",
                 "; ".join(f"{n}: {theirs[n][0]}{list(theirs[n][1])} vs seed {ours[n][0]}{list(ours[n][1])}"
                           for n in differ[:3])]
        raise RegistryError(f"{weights.name} does not match seed '{seed.name}' tensors: "
                            + "; ".join(p for p in parts if p))

    # ---- queries --------------------------------------------------------------------------------

    def _seed(self, name: str) -> Seed:
        found = self._read(lambda s: _maybe(lambda r: convert.seed(s, r),
                                            s.scalar(select(SeedRow).where(SeedRow.name == name))))
        if found is None:
            raise RegistryError(f"seed '{name}' is not registered; see `xmerge seeds list`")
        return found

    def list_seeds(self) -> list[Seed]:
        return self._read(lambda s: [convert.seed(s, r) for r in s.scalars(select(SeedRow).order_by(SeedRow.id))])

    def list_experts(self, seed: str | None = None, domain: str | None = None) -> list[Expert]:
        query = select(ExpertRow).order_by(ExpertRow.id)
        if seed is not None:
            query = query.where(ExpertRow.seed_id == self._seed(seed).id)
        if domain is not None:
            query = query.where(ExpertRow.domain == domain)
        return self._read(lambda s: [convert.expert(s, r) for r in s.scalars(query)])

    def list_compositions(self, name: str | None = None) -> list[Composition]:
        query = select(CompositionRow).order_by(CompositionRow.id)
        if name is not None:
            query = query.where(CompositionRow.name == name)
        return self._read(lambda s: [convert.composition(s, r) for r in s.scalars(query)])

    def list_operations(self, composition: str | None = None, kind: str | None = None,
                        decision: str | None = None, result_composition_id: int | None = None) -> list[Operation]:
        query = select(OperationRow).order_by(OperationRow.id)
        for column, value in ((OperationRow.composition, composition), (OperationRow.kind, kind),
                              (OperationRow.decision, decision),
                              (OperationRow.result_composition_id, result_composition_id)):
            if value is not None:
                query = query.where(column == value)
        return self._read(lambda s: [convert.operation(r) for r in s.scalars(query)])

    def get_expert(self, expert_id: int) -> Expert:
        found = self._read(lambda s: _maybe(lambda r: convert.expert(s, r), s.get(ExpertRow, expert_id)))
        if found is None:
            raise RegistryError(f"expert {expert_id} does not exist; see `xmerge experts list`")
        return found

    def get_composition(self, composition_id: int) -> Composition:
        found = self._read(lambda s: _maybe(lambda r: convert.composition(s, r), s.get(CompositionRow, composition_id)))
        if found is None:
            raise RegistryError(f"composition {composition_id} does not exist; see `xmerge compositions list`")
        return found

    def latest_expert(self, seed: str, domain: str) -> Expert | None:
        seed_id = self._seed(seed).id
        return self._read(lambda s: _maybe(lambda r: convert.expert(s, r), s.scalar(
            select(ExpertRow).where(ExpertRow.seed_id == seed_id, ExpertRow.domain == domain)
            .order_by(ExpertRow.version.desc()).limit(1))))

    def resolve(self, ref: str) -> ModelRecord:
        """Seed, expert or composition named by `ref`: seed:NAME, expert:ID, comp:NAME[@vN], DOMAIN[@vN],
        SEED/DOMAIN[@vN], NAME@vN, or a bare seed / domain / composition name."""
        return self._read(lambda s: refs.resolve(s, ref))

    # ---- materialise, remove, collect -----------------------------------------------------------

    def checkout(self, ref_or_obj: str | ModelRecord, dest: Path) -> Path:
        """Write a loadable HF model dir at `dest` (seed files + the object's weights/files), hashes verified."""
        obj = self.resolve(ref_or_obj) if isinstance(ref_or_obj, str) else ref_or_obj
        seed = obj if isinstance(obj, Seed) else self._seed(obj.seed)
        files = {**seed.files, **obj.files, WEIGHTS: obj.weights_sha}
        dest = Path(dest)
        if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
            raise RegistryError(f"{dest} already exists and is not empty; choose an empty or new directory")
        staging = dest.parent / f".{dest.name}.partial-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            for filename, sha in sorted(files.items()):
                self.blobs.copy_verified(sha, staging / filename)
            if dest.exists():
                dest.rmdir()
            staging.rename(dest)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return dest

    def remove_expert(self, expert_id: int) -> Expert:
        """Delete an expert row (its blobs go at the next gc); refused while a composition uses it."""

        def work(s: Session) -> Expert:
            row = s.get(ExpertRow, expert_id)
            if row is None:
                raise RegistryError(f"expert {expert_id} does not exist; see `xmerge experts list`")
            users = s.scalars(select(CompositionRow).join(MemberRow, MemberRow.composition_id == CompositionRow.id)
                              .where(MemberRow.expert_id == expert_id).order_by(CompositionRow.id)).all()
            if users:
                names = ", ".join(f"{c.name}@v{c.version}" for c in users)
                raise RegistryError(f"expert {expert_id} ({row.domain}@v{row.version}) is used by composition(s) "
                                    f"{names}; it stays for their lineage")
            record = convert.expert(s, row)
            for file_row in s.scalars(select(FileRow).where(FileRow.owner == "expert", FileRow.owner_id == expert_id)):
                s.delete(file_row)
            s.delete(row)
            return record

        return self._write(work)

    def gc(self, grace_s: float = GC_GRACE_S) -> GcStats:
        """Remove stale temp files and blobs no row references (only those untouched for `grace_s` seconds)."""
        temp = self.blobs.clean_temp(grace_s)
        cutoff = time.time() - grace_s

        def old_enough(sha: str) -> bool:
            try:
                return self.blobs.path(sha).stat().st_mtime <= cutoff
            except FileNotFoundError:
                return True

        def drop_rows(s: Session) -> list[str]:
            used = set()
            for column in (SeedRow.weights_sha, ExpertRow.weights_sha, CompositionRow.weights_sha, FileRow.sha256):
                used.update(s.scalars(select(column)))
            doomed = [sha for sha in s.scalars(select(BlobRow.sha256)) if sha not in used and old_enough(sha)]
            for sha in doomed:
                s.delete(s.get(BlobRow, sha))
            return doomed

        doomed = set(self._write(drop_rows))
        known = set(self._read(lambda s: list(s.scalars(select(BlobRow.sha256)))))
        removed, freed = [], 0
        for sha, path in list(self.blobs.iter_blobs()):
            if sha in doomed or (sha not in known and old_enough(sha)):
                freed += path.stat().st_size
                path.unlink(missing_ok=True)
                removed.append(sha)
        return GcStats(temp_files=len(temp), blobs=len(removed), bytes_freed=freed, removed=tuple(sorted(removed)))

    # ---- bundles and lineage (own modules) -------------------------------------------------------

    def export_expert(self, expert_id: int, out: Path) -> Path:
        """Write expert `expert_id` as one bundle archive at `out` (see bundles.py)."""
        return bundles.export_expert(self, expert_id, Path(out))

    def import_bundle(self, bundle: Path) -> Expert:
        """Verify a bundle completely, then register its expert; on any failure nothing is written."""
        return bundles.import_bundle(self, Path(bundle))

    def lineage(self, ref: str) -> dict:
        """Nested tree of `ref`: composition -> operations / parent / experts -> seed -> teacher."""
        return lineage.lineage(self, ref)


def _check_name(name: str, what: str) -> None:
    if not NAME.fullmatch(name or ""):
        raise RegistryError(f"{what} '{name}' is invalid: use letters, digits, '.', '_' or '-' (no '@', '/', ':')")


def _check_filename(name: str) -> None:
    if not FILENAME.fullmatch(name or "") or name == WEIGHTS:
        raise RegistryError(f"file name '{name}' is invalid: a plain file name (no folders), not {WEIGHTS}")


def _ensure_blob_rows(s: Session, store: BlobStore, sizes: dict[str, int]) -> None:
    for sha, size in sizes.items():
        if s.get(BlobRow, sha) is None:
            s.add(BlobRow(sha256=sha, size=size, path=store.relpath(sha)))
    s.flush()


def _add_file_rows(s: Session, owner: str, owner_id: int, files: dict[str, str]) -> None:
    s.add_all(FileRow(owner=owner, owner_id=owner_id, filename=name, sha256=sha) for name, sha in files.items())


def _maybe(fn, row):
    return None if row is None else fn(row)
