"""Expert bundles: one tar archive (manifest.json + model.safetensors + files/*) that a team sends to another.

Import trusts nothing in the archive. It checks every member (regular files only, no absolute or
parent paths, no duplicates, bounded sizes), stages the bytes in the registry's temp folder while
hashing them, and checks the manifest's hashes, the seed's identity, the tensor names/shapes/dtypes
and that no tensor holds NaN/inf. Only then does it register the expert; any failure before that
writes nothing (no row, no blob).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from xmerge.registry.blobs import CHUNK, HOST
from xmerge.registry.errors import RegistryError
from xmerge.registry.records import Expert, Seed
from xmerge.registry.tensors import non_finite_tensors, tensor_spec

if TYPE_CHECKING:
    from xmerge.registry.registry import Registry

FORMAT = "xmerge-expert-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
FILES_DIR = "files"
MAX_MANIFEST_BYTES = 1 << 20
MAX_FILE_BYTES = 64 << 20  # tokenizer/config/README-sized files, not a second set of weights
WEIGHTS_SLACK_BYTES = 1 << 20  # same tensors as the seed: only the header may differ in size
MAX_MEMBERS = 256


class BundleError(RegistryError):
    """A bundle was rejected; nothing was written to the registry."""


def config_sha(student_config: dict) -> str:
    return hashlib.sha256(json.dumps(student_config, sort_keys=True).encode()).hexdigest()


def export_expert(reg: Registry, expert_id: int, out: Path) -> Path:
    """Write expert `expert_id` (blobs verified while copied) as a bundle at `out`, atomically."""
    expert = reg.get_expert(expert_id)
    seed = reg.resolve(f"seed:{expert.seed}")
    weights = reg.blob_path(expert.weights_sha)
    files = {f"{FILES_DIR}/{name}": reg.blob_path(sha) for name, sha in expert.files.items()}
    members = {WEIGHTS: weights, **files}
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "seed": {"name": seed.name, "teacher_spec": seed.teacher_spec, "teacher_hash": seed.teacher_hash,
                 "weights_sha": seed.weights_sha, "config_sha": config_sha(seed.student_config)},
        "expert": {"domain": expert.domain, "version": expert.version, "team": expert.team, "recipe": expert.recipe,
                   "data_fingerprint": expert.data_fingerprint, "metrics": expert.metrics, "status": expert.status},
        "tensors": {name: {"dtype": dtype, "shape": list(shape)} for name, (dtype, shape) in
                    sorted(tensor_spec(weights).items())},
        "members": {arc: {"sha256": sha, "size": reg.blob_path(sha, verify=False).stat().st_size}
                    for arc, sha in [(WEIGHTS, expert.weights_sha)] +
                    [(f"{FILES_DIR}/{n}", s) for n, s in sorted(expert.files.items())]},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    try:
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            raw = json.dumps(manifest, indent=1, sort_keys=True).encode()
            info = tarfile.TarInfo(MANIFEST)
            info.size, info.mode, info.mtime = len(raw), 0o644, int(time.time())
            tar.addfile(info, BytesIO(raw))
            for arc, path in members.items():
                info = tarfile.TarInfo(arc)
                info.size, info.mode, info.mtime = path.stat().st_size, 0o644, int(time.time())
                with open(path, "rb") as f:
                    tar.addfile(info, f)
        # blob_path verified the blobs above; a blob changed since then would not match the manifest.
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def import_bundle(reg: Registry, bundle: Path) -> Expert:
    """Check `bundle` completely, then register its expert under the next free version of its domain."""
    if not bundle.is_file():
        raise BundleError(f"bundle {bundle} does not exist")
    staging = Path(tempfile.mkdtemp(prefix=f"{HOST}-{os.getpid()}-", suffix=".import", dir=_tmp_dir(reg)))
    try:
        manifest, staged = _stage(reg, bundle, staging)
        seed, expert = manifest["seed"], manifest["expert"]
        known = reg.resolve(f"seed:{seed['name']}")
        duplicate = [e for e in reg.list_experts(seed=known.name, domain=expert["domain"])
                     if e.weights_sha == manifest["members"][WEIGHTS]["sha256"]]
        if duplicate:
            raise BundleError(f"bundle {bundle.name}: these weights are already registered as "
                              f"expert:{duplicate[0].id} ({duplicate[0].ref}); nothing was imported")
        return reg.add_expert(known.name, expert["domain"], staged[WEIGHTS], team=expert["team"],
                              recipe=expert["recipe"], data_fingerprint=expert["data_fingerprint"],
                              metrics=expert["metrics"], status=expert["status"],
                              extra_files={arc.split("/", 1)[1]: p for arc, p in staged.items() if arc != WEIGHTS})
    except RegistryError as exc:
        if isinstance(exc, BundleError):
            raise
        raise BundleError(f"bundle {bundle.name}: {exc}; nothing was imported") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _tmp_dir(reg: Registry) -> Path:
    if not reg.blobs.tmp.is_dir():
        raise RegistryError(f"no registry at {reg.home}; run `xmerge init` first")
    return reg.blobs.tmp


def _stage(reg: Registry, bundle: Path, staging: Path) -> tuple[dict, dict[str, Path]]:
    """Validate the archive and copy its members into `staging`; returns (manifest, {arcname: path})."""

    def reject(reason: str) -> BundleError:
        return BundleError(f"bundle {bundle.name}: {reason}; nothing was imported")

    try:
        tar = tarfile.open(bundle, "r:*")
    except (tarfile.TarError, OSError):
        raise reject("not a readable tar archive") from None
    with tar:
        try:
            manifest, seed, staged = _stage_members(reg, tar, staging, reject)
        except (tarfile.TarError, EOFError):
            raise reject("the tar archive is truncated or damaged") from None
    spec = tensor_spec(staged[WEIGHTS])
    try:
        declared = {name: (t.get("dtype"), tuple(t.get("shape", ()))) for name, t in manifest["tensors"].items()}
    except TypeError:
        raise reject(f"{MANIFEST} has a malformed tensor list") from None
    if spec != declared:
        raise reject("the tensors in model.safetensors differ from the manifest's tensor list")
    try:
        reg.check_tensors_match_seed(seed, staged[WEIGHTS])
    except RegistryError as exc:
        raise reject(str(exc)) from None
    bad = non_finite_tensors(staged[WEIGHTS])
    if bad:
        raise reject(f"tensor(s) {', '.join(bad[:5])} contain NaN or inf")
    return manifest, staged


def _stage_members(reg: Registry, tar: tarfile.TarFile, staging: Path, reject) -> tuple[dict, Seed, dict[str, Path]]:
    """Check member types/names/sizes and the manifest's seed, then copy members out while hashing."""
    members = _checked_members(tar, reject)
    if MANIFEST not in members:
        raise reject(f"it has no {MANIFEST}")
    manifest = _read_manifest(tar, members[MANIFEST], reject)
    seed = _known_seed(reg, manifest, reject)
    listed = manifest["members"]
    present = set(members) - {MANIFEST}
    if set(listed) != present:
        missing, extra = sorted(set(listed) - present), sorted(present - set(listed))
        raise reject(f"archive members do not match the manifest (missing {missing}, unlisted {extra})")
    if WEIGHTS not in present:
        raise reject(f"it has no {WEIGHTS}")
    weights_cap = reg.blob_path(seed.weights_sha, verify=False).stat().st_size + WEIGHTS_SLACK_BYTES
    staged = {}
    for arc in sorted(present):
        member, cap = members[arc], weights_cap if arc == WEIGHTS else MAX_FILE_BYTES
        if member.size > cap:
            raise reject(f"member {arc} is {member.size} bytes, over the {cap}-byte limit")
        if member.size != listed[arc].get("size"):
            raise reject(f"member {arc} is {member.size} bytes but the manifest says {listed[arc].get('size')}")
        staged[arc] = staging / arc.replace("/", "__")
        if _copy_hashing(tar.extractfile(member), staged[arc]) != listed[arc].get("sha256"):
            raise reject(f"member {arc} does not match its sha256 in the manifest")
    return manifest, seed, staged


def _checked_members(tar: tarfile.TarFile, reject) -> dict[str, tarfile.TarInfo]:
    members: dict[str, tarfile.TarInfo] = {}
    for count, member in enumerate(tar, start=1):
        name = member.name
        if count > MAX_MEMBERS:
            raise reject(f"it has more than {MAX_MEMBERS} members")
        if member.issym() or member.islnk():
            raise reject(f"member {name} is a link")
        if not member.isreg():
            raise reject(f"member {name} is not a regular file")
        path = PurePosixPath(name)
        if name.startswith("/") or "\\" in name or ":" in name or path.is_absolute():
            raise reject(f"member {name} has an absolute path")
        if ".." in path.parts or str(path) != name:
            raise reject(f"member {name} has a path that leaves the bundle or is not normalised")
        allowed = name in (MANIFEST, WEIGHTS) or (len(path.parts) == 2 and path.parts[0] == FILES_DIR)
        if not allowed:
            raise reject(f"member {name} is not part of the bundle format ({MANIFEST}, {WEIGHTS}, {FILES_DIR}/NAME)")
        if name in members:
            raise reject(f"member {name} appears twice")
        members[name] = member
    return members


def _read_manifest(tar: tarfile.TarFile, member: tarfile.TarInfo, reject) -> dict:
    if member.size > MAX_MANIFEST_BYTES:
        raise reject(f"{MANIFEST} is {member.size} bytes, over the {MAX_MANIFEST_BYTES}-byte limit")
    try:
        manifest = json.loads(tar.extractfile(member).read())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise reject(f"{MANIFEST} is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise reject(f"{MANIFEST} is not an xmerge expert bundle manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise reject(f"bundle format version {manifest.get('format_version')} is not supported "
                     f"(this xmerge reads {FORMAT_VERSION})")
    shapes = {"seed": dict, "expert": dict, "tensors": dict, "members": dict}
    for key, kind in shapes.items():
        if not isinstance(manifest.get(key), kind):
            raise reject(f"{MANIFEST} lacks its '{key}' section")
    if not all(isinstance(v, dict) for v in list(manifest["members"].values()) + list(manifest["tensors"].values())):
        raise reject(f"{MANIFEST} has malformed members or tensors")
    expert = manifest["expert"]
    for key, kind in (("domain", str), ("team", str), ("recipe", dict), ("data_fingerprint", str),
                      ("metrics", dict), ("status", str)):
        if not isinstance(expert.get(key), kind):
            raise reject(f"{MANIFEST} expert field '{key}' is missing or not a {kind.__name__}")
    return manifest


def _known_seed(reg: Registry, manifest: dict, reject) -> Seed:
    claimed = manifest["seed"]
    try:
        seed = reg.resolve(f"seed:{claimed.get('name')}")
    except RegistryError:
        raise reject(f"its seed '{claimed.get('name')}' is not registered here; add that seed first") from None
    mine = {"teacher_hash": seed.teacher_hash, "weights_sha": seed.weights_sha,
            "config_sha": config_sha(seed.student_config)}
    differ = [key for key, value in mine.items() if claimed.get(key) != value]
    if differ:
        raise reject(f"its seed '{seed.name}' is not identical to the registered one ({', '.join(differ)} differ)")
    return seed


def _copy_hashing(src, dest: Path) -> str:
    digest = hashlib.sha256()
    with src, open(dest, "wb") as out:
        while chunk := src.read(CHUNK):
            digest.update(chunk)
            out.write(chunk)
    return digest.hexdigest()
