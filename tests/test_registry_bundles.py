"""Expert bundles: export -> import between registries, and every bad bundle rejected with nothing written."""

from __future__ import annotations

import hashlib
import io
import json
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save
from typer.testing import CliRunner

from registry_support import (  # noqa: F401  (fixtures)
    add_seed,
    db_url,
    expert_weights,
    postgres_server,
    reg,
    seed_tensors,
    snapshot,
)
from xmerge.cli.app import app
from xmerge.registry import Registry
from xmerge.registry.bundles import MAX_MANIFEST_BYTES
from xmerge.registry.tensors import non_finite_tensors


def cli(reg: Registry, *args: str):
    db = ["--db-url", reg.db_url] if not reg.db_url.startswith("sqlite") else []
    return CliRunner().invoke(app, [*args, "--home", str(reg.home), *db])


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """A good bundle exported (through the CLI) by another team's registry that shares the seed."""
    tmp_path = tmp_path_factory.mktemp("team-a")
    team = Registry(tmp_path / "team-a")
    team.init()
    add_seed(team, tmp_path)
    notes = tmp_path / "notes.md"
    notes.write_text("trained on math word problems")
    expert = team.add_expert("s0", "math", expert_weights(tmp_path / "m.safetensors", 0.25), team="team-a",
                             recipe={"stage2": {"lr": 1e-5}}, metrics={"ce": 1.25}, data_fingerprint="fp",
                             extra_files={"README.md": notes})
    out = tmp_path / "math.xmerge.tar"
    result = CliRunner().invoke(app, ["experts", "export", str(expert.id), "-o", str(out),
                                      "--home", str(team.home)])
    assert result.exit_code == 0, result.output
    team.close()
    return out


@pytest.fixture
def central(reg, tmp_path):
    """The receiving registry (SQLite or PostgreSQL) with the identical seed and one expert of its own."""
    add_seed(reg, tmp_path / "central")
    reg.add_expert("s0", "math", expert_weights(tmp_path / "own.safetensors", 0.75), team="central")
    return reg


def test_export_import_round_trip(central, bundle, tmp_path):
    result = cli(central, "experts", "import", str(bundle), "--json")
    assert result.exit_code == 0, result.output
    imported = json.loads(result.stdout)
    assert (imported["domain"], imported["version"], imported["team"]) == ("math", 2, "team-a")
    expert = central.get_expert(imported["id"])
    assert expert.recipe == {"stage2": {"lr": 1e-5}} and expert.metrics == {"ce": 1.25}
    sent = bundle.parent / "m.safetensors"
    assert expert.weights_sha == hashlib.sha256(sent.read_bytes()).hexdigest()
    out = central.checkout(expert, tmp_path / "checkout")
    assert (out / "README.md").read_text() == "trained on math word problems"
    assert (out / "model.safetensors").read_bytes() == sent.read_bytes()
    assert list(central.blobs.tmp.iterdir()) == []

    before = snapshot(central)
    again = cli(central, "experts", "import", str(bundle))
    assert again.exit_code == 1 and "already registered as expert:2 (math@v2)" in again.stderr
    assert snapshot(central) == before


def _unpack(bundle: Path) -> tuple[dict, dict[str, bytes]]:
    with tarfile.open(bundle) as tar:
        data = {m.name: tar.extractfile(m).read() for m in tar}
    return json.loads(data.pop("manifest.json")), data


def _pack(path: Path, manifest: dict | bytes, members: dict[str, bytes], extra: list[tarfile.TarInfo] = ()) -> Path:
    raw = manifest if isinstance(manifest, bytes) else json.dumps(manifest).encode()
    with tarfile.open(path, "w") as tar:
        for name, payload in [("manifest.json", raw), *members.items()]:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
        for info in extra:
            tar.addfile(info, io.BytesIO(b"x" * info.size) if info.isreg() else None)
    return path


def _with_weights(manifest: dict, members: dict, tensors: dict[str, np.ndarray]) -> tuple[dict, dict]:
    """Replace the weights consistently: manifest hash, size and tensor list all describe the new file."""
    raw = save(tensors)
    manifest["members"]["model.safetensors"] = {"sha256": hashlib.sha256(raw).hexdigest(), "size": len(raw)}
    manifest["tensors"] = {k: {"dtype": "F32", "shape": list(v.shape)} for k, v in tensors.items()}
    return manifest, {**members, "model.safetensors": raw}


def _info(name: str, kind: bytes, size: int = 0, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.linkname = kind, size, linkname
    return info


def _traversal(m, f, p):
    return _pack(p, m, f, [_info("../evil.txt", tarfile.REGTYPE, 4)])


def _nested_traversal(m, f, p):
    return _pack(p, m, f, [_info("files/../../evil.txt", tarfile.REGTYPE, 4)])


def _absolute(m, f, p):
    return _pack(p, m, f, [_info("/tmp/evil.txt", tarfile.REGTYPE, 4)])


def _symlink(m, f, p):
    return _pack(p, m, f, [_info("files/passwd", tarfile.SYMTYPE, linkname="/etc/passwd")])


def _hardlink(m, f, p):
    return _pack(p, m, f, [_info("files/copy", tarfile.LNKTYPE, linkname="model.safetensors")])


def _directory(m, f, p):
    return _pack(p, m, f, [_info("files/sub", tarfile.DIRTYPE)])


def _foreign_member(m, f, p):
    return _pack(p, m, f, [_info("install.sh", tarfile.REGTYPE, 4)])


def _duplicate(m, f, p):
    return _pack(p, m, f, [_info("files/README.md", tarfile.REGTYPE, 4)])


def _unlisted(m, f, p):
    return _pack(p, m, {**f, "files/extra.txt": b"not in the manifest"})


def _oversized_weights(m, f, p):
    padded = f["model.safetensors"] + b"\0" * (2 << 20)
    m["members"]["model.safetensors"] = {"sha256": hashlib.sha256(padded).hexdigest(), "size": len(padded)}
    return _pack(p, m, {**f, "model.safetensors": padded})


def _oversized_manifest(m, f, p):
    m["padding"] = "x" * (MAX_MANIFEST_BYTES + 10)
    return _pack(p, m, f)


def _tampered(m, f, p):
    data = bytearray(f["model.safetensors"])
    data[-3] ^= 0x01
    return _pack(p, m, {**f, "model.safetensors": bytes(data)})


def _unknown_seed(m, f, p):
    m["seed"]["name"] = "ghost"
    return _pack(p, m, f)


def _different_seed(m, f, p):
    m["seed"]["teacher_hash"] = "00" * 32
    return _pack(p, m, f)


def _wrong_shape(m, f, p):
    tensors = seed_tensors()
    tensors["norm.weight"] = np.ones(9, np.float32)
    return _pack(p, *_with_weights(m, f, tensors))


def _nan(m, f, p):
    tensors = seed_tensors()
    tensors["layers.0.mlp.weight"][3, 4] = np.nan
    return _pack(p, *_with_weights(m, f, tensors))


def _inf(m, f, p):
    tensors = seed_tensors()
    tensors["embed.weight"][0, 0] = -np.inf
    return _pack(p, *_with_weights(m, f, tensors))


def _manifest_lies_about_tensors(m, f, p):
    m["tensors"]["norm.weight"]["shape"] = [2, 4]
    return _pack(p, m, f)


def _bad_json(m, f, p):
    return _pack(p, b"{not json", f)


def _truncated(m, f, p):
    _pack(p, m, f)
    with tarfile.open(p) as tar:
        cut = tar.getmember("model.safetensors").offset_data + 100
    p.write_bytes(p.read_bytes()[:cut])
    return p


def _not_a_tar(m, f, p):
    p.write_bytes(b"PK\x03\x04 this is not a tar archive" * 40)
    return p


BAD_BUNDLES = {
    _traversal: "leaves the bundle",
    _nested_traversal: "leaves the bundle",
    _absolute: "absolute path",
    _symlink: "is a link",
    _hardlink: "is a link",
    _directory: "is not a regular file",
    _foreign_member: "not part of the bundle format",
    _duplicate: "appears twice",
    _unlisted: "do not match the manifest",
    _oversized_weights: "over the",
    _oversized_manifest: "manifest.json is",
    _tampered: "does not match its sha256",
    _unknown_seed: "seed 'ghost' is not registered here",
    _different_seed: "not identical to the registered one (teacher_hash differ)",
    _wrong_shape: "norm.weight: F32[9] vs seed F32[8]",
    _nan: "layers.0.mlp.weight contain NaN or inf",
    _inf: "embed.weight contain NaN or inf",
    _manifest_lies_about_tensors: "differ from the manifest's tensor list",
    _bad_json: "not valid JSON",
    _truncated: "truncated or damaged",
    _not_a_tar: "not a readable tar archive",
}


@pytest.mark.parametrize("make_bad", list(BAD_BUNDLES), ids=[f.__name__.strip("_") for f in BAD_BUNDLES])
def test_bad_bundle_rejected_and_registry_unchanged(central, bundle, tmp_path, make_bad):
    manifest, members = _unpack(bundle)
    bad = make_bad(manifest, members, tmp_path / "bad.xmerge.tar")
    before = snapshot(central)
    result = cli(central, "experts", "import", str(bad))
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: bundle bad.xmerge.tar: "), result.stderr
    assert BAD_BUNDLES[make_bad] in lines[0] and lines[0].endswith("nothing was imported")
    assert snapshot(central) == before
    assert not (tmp_path / "evil.txt").exists() and not Path("/tmp/evil.txt").exists()


def _raw_safetensors(path: Path, dtype: str, words: np.ndarray) -> Path:
    """A one-tensor safetensors file with raw element bits (for dtypes numpy cannot hold, e.g. bf16)."""
    data = words.tobytes()
    header = json.dumps({"t": {"dtype": dtype, "shape": [len(words)], "data_offsets": [0, len(data)]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


@pytest.mark.parametrize("dtype, finite, bad", [
    ("BF16", [0x3F80, 0xC000, 0x7F7F], 0x7F80),  # 1.0, -2.0, max; +inf
    ("BF16", [0x3F80], 0xFFC1),  # NaN
    ("F16", [0x3C00, 0x7BFF], 0xFC00),  # 1.0, max; -inf
    ("F8_E5M2", [0x3C, 0x7B], 0x7C),  # inf
    ("F8_E4M3", [0x38, 0x7E], 0x7F),  # 448 is finite; NaN
])
def test_non_finite_scan_by_dtype_bits(tmp_path, dtype, finite, bad):
    word = np.uint16 if dtype in ("BF16", "F16") else np.uint8
    good = _raw_safetensors(tmp_path / "good.safetensors", dtype, np.array(finite, word))
    assert non_finite_tensors(good) == []
    poisoned = _raw_safetensors(tmp_path / "bad.safetensors", dtype, np.array([*finite, bad], word))
    assert non_finite_tensors(poisoned) == ["t"]
