"""Registry API against SQLite and a real PostgreSQL server: rows, blobs, refs, checkout, lineage, gc."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from registry_support import (  # noqa: F401  (fixtures)
    STUDENT_CONFIG,
    TEACHER_HASH,
    add_seed,
    db_url,
    expert_weights,
    postgres_server,
    reg,
    seed_tensors,
    sha256,
    write_weights,
)
from xmerge.registry import Composition, CorruptBlobError, Expert, Registry, RegistryError, Seed


def test_seed_expert_composition_round_trip(reg, tmp_path):
    seed = add_seed(reg, tmp_path)
    assert seed.student_config == STUDENT_CONFIG and seed.teacher_hash == TEACHER_HASH
    assert set(seed.files) == {"config.json", "tokenizer.json"}
    assert seed.weights_sha == sha256(tmp_path / "seed-s0" / "model.safetensors")

    readme = tmp_path / "README.md"
    readme.write_text("math expert")
    math1 = reg.add_expert("s0", "math", expert_weights(tmp_path / "m1.safetensors", 0.1), team="a",
                           recipe={"lr": 1e-5}, metrics={"ce": 1.5}, data_fingerprint="fp1",
                           extra_files={"README.md": readme})
    math2 = reg.add_expert("s0", "math", expert_weights(tmp_path / "m2.safetensors", 0.2))
    code1 = reg.add_expert("s0", "code", expert_weights(tmp_path / "c1.safetensors", 0.3))
    assert (math1.version, math2.version, code1.version) == (1, 2, 1)
    assert math1.recipe == {"lr": 1e-5} and math1.metrics == {"ce": 1.5}
    assert math1.files == {"README.md": sha256(readme)}
    assert reg.latest_expert("s0", "math") == math2
    assert [e.id for e in reg.list_experts(domain="math")] == [math1.id, math2.id]

    comp = reg.add_composition("mix", seed="s0", members=[(math2.id, 0.7), (code1.id, 0.3)], method="linear",
                               params={"normalize": True}, parent_id=None,
                               weights=expert_weights(tmp_path / "mix.safetensors", 0.25))
    comp2 = reg.add_composition("mix", seed="s0", members=[(math1.id, 1.0)], method="linear", params={},
                                parent_id=comp.id, weights=expert_weights(tmp_path / "mix2.safetensors", 0.1))
    assert (comp.version, comp2.version, comp2.parent_id) == (1, 2, comp.id)
    assert {(m.expert_id, m.weight) for m in comp.members} == {(math2.id, 0.7), (code1.id, 0.3)}
    assert reg.list_compositions("mix") == [comp, comp2]

    # A second Registry object (another process's view) reads the same records.
    again = Registry(reg.home, reg.db_url)
    assert again.list_seeds() == [seed] and again.list_experts() == [math1, math2, code1]
    again.close()


def test_explicit_version_conflict_and_bad_inputs(reg, tmp_path):
    add_seed(reg, tmp_path)
    weights = expert_weights(tmp_path / "m.safetensors", 0.1)
    assert reg.add_expert("s0", "math", weights, version=3).version == 3
    assert reg.add_expert("s0", "math", weights).version == 4
    with pytest.raises(RegistryError, match=r"math@v3 of seed 's0' already exists"):
        reg.add_expert("s0", "math", weights, version=3)
    with pytest.raises(RegistryError, match="seed 'nope' is not registered"):
        reg.add_expert("nope", "math", weights)
    with pytest.raises(RegistryError, match="domain 'a@b' is invalid"):
        reg.add_expert("s0", "a@b", weights)
    with pytest.raises(RegistryError, match="seed 's0' already exists"):
        add_seed(reg, tmp_path / "again")
    wrong = seed_tensors()
    wrong["norm.weight"] = np.zeros(9, np.float32)
    with pytest.raises(RegistryError, match=r"norm.weight: F32\[9\] vs seed F32\[8\]"):
        reg.add_expert("s0", "math", write_weights(tmp_path / "w.safetensors", wrong))
    with pytest.raises(RegistryError, match="expert 999 does not exist"):
        reg.add_composition("c", seed="s0", members=[(999, 1.0)], method="linear", params={}, parent_id=None,
                            weights=weights)
    assert len(reg.list_experts()) == 2 and reg.list_compositions() == []


def test_resolve_every_ref_form(reg, tmp_path):
    s0 = add_seed(reg, tmp_path, "s0")
    m1 = reg.add_expert("s0", "math", expert_weights(tmp_path / "1.safetensors", 0.1))
    m2 = reg.add_expert("s0", "math", expert_weights(tmp_path / "2.safetensors", 0.2))
    comp = reg.add_composition("mix", seed="s0", members=[(m1.id, 1.0)], method="linear", params={}, parent_id=None,
                               weights=expert_weights(tmp_path / "3.safetensors", 0.3))
    assert reg.resolve("seed:s0") == s0 and reg.resolve("s0") == s0
    assert reg.resolve(f"expert:{m1.id}") == m1 and reg.resolve("math@v1") == m1
    assert reg.resolve("math") == m2 and reg.resolve("s0/math") == m2 and reg.resolve("s0/math@v1") == m1
    assert reg.resolve("mix") == comp and reg.resolve("mix@v1") == comp and reg.resolve("comp:mix") == comp
    assert isinstance(reg.resolve("comp:mix@v1"), Composition)

    add_seed(reg, tmp_path, "s1")
    reg.add_expert("s1", "math", expert_weights(tmp_path / "4.safetensors", 0.4))
    with pytest.raises(RegistryError, match="domain 'math' exists under seeds s0, s1; use SEED/math"):
        reg.resolve("math")
    assert reg.resolve("s1/math").seed == "s1"
    reg.add_expert("s0", "mix", expert_weights(tmp_path / "5.safetensors", 0.5))
    with pytest.raises(RegistryError, match="'mix' is ambiguous: it could be expert:.* or comp:mix@v1"):
        reg.resolve("mix")
    for bad, message in [("expert:x", "not a valid expert ref"), ("expert:99", "expert 99 does not exist"),
                         ("nothing", "names no seed, expert or composition"), ("comp:zz", "'zz' does not exist"),
                         ("blob:1", "unknown prefix")]:
        with pytest.raises(RegistryError, match=message):
            reg.resolve(bad)


def test_checkout_materialises_loadable_dir_and_detects_corruption(reg, tmp_path):
    add_seed(reg, tmp_path)
    tensors = {k: v * 2 for k, v in seed_tensors().items()}
    expert = reg.add_expert("s0", "math", write_weights(tmp_path / "e.safetensors", tensors))
    out = reg.checkout("math", tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    loaded = load_file(str(out / "model.safetensors"))
    assert all(np.array_equal(loaded[k], tensors[k]) for k in tensors)
    assert (out / "config.json").read_bytes() == (tmp_path / "seed-s0" / "config.json").read_bytes()
    # The checkout is a copy: editing it leaves the blob intact.
    (out / "model.safetensors").write_bytes(b"scribble")
    assert reg.blob_path(expert.weights_sha) == reg.blobs.path(expert.weights_sha)

    with pytest.raises(RegistryError, match="already exists and is not empty"):
        reg.checkout(expert, out)
    blob = reg.blobs.path(expert.weights_sha)
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    with pytest.raises(CorruptBlobError, match=f"blob {blob} is corrupted"):
        reg.blob_path(expert.weights_sha)
    with pytest.raises(CorruptBlobError, match=str(blob)):
        reg.checkout(expert, tmp_path / "out2")
    assert not (tmp_path / "out2").exists() and not list(tmp_path.glob(".out2*"))
    # Registering the same weights again repairs the blob (same content, atomic replace).
    reg.put_blob(tmp_path / "e.safetensors")
    assert reg.blob_path(expert.weights_sha).read_bytes() == (tmp_path / "e.safetensors").read_bytes()
    blob.unlink()
    with pytest.raises(CorruptBlobError, match="is missing"):
        reg.blob_path(expert.weights_sha, verify=False)


def test_put_blob_dedups_and_is_content_addressed(reg, tmp_path):
    a = tmp_path / "a.bin"
    a.write_bytes(b"x" * 3_000_000)
    b = tmp_path / "b.bin"
    b.write_bytes(b"x" * 3_000_000)
    sha = reg.put_blob(a)
    assert reg.put_blob(b) == sha == sha256(a)
    assert reg.blob_path(sha) == reg.home / "blobs" / "sha256" / sha[:2] / sha
    assert [s for s, _ in reg.blobs.iter_blobs()] == [sha]
    assert list(reg.blobs.tmp.iterdir()) == []


def test_operations_and_eval_cache(reg, tmp_path):
    add_seed(reg, tmp_path)
    e = reg.add_expert("s0", "math", expert_weights(tmp_path / "e.safetensors", 0.1))
    comp = reg.add_composition("mix", seed="s0", members=[(e.id, 1.0)], method="linear", params={}, parent_id=None,
                               weights=expert_weights(tmp_path / "c.safetensors", 0.1))
    ok = reg.record_operation("compose", composition="mix", inputs={"experts": [e.id]}, report={"W_0.05": 0.8},
                              decision="accepted", who="alice", result_composition_id=comp.id)
    no = reg.record_operation("patch", composition="mix", inputs={"add": "code"}, report={"W_0.05": 0.2},
                              decision="rejected", who="bob", result_composition_id=None)
    assert reg.list_operations(composition="mix") == [ok, no]
    assert reg.list_operations(decision="rejected") == [no]
    with pytest.raises(RegistryError, match="decision 'maybe' is not one of"):
        reg.record_operation("compose", composition="mix", inputs={}, report={}, decision="maybe", who="x",
                             result_composition_id=None)

    assert reg.find_eval(comp.weights_sha, "quick", "ref") is None
    first = reg.record_eval(model_ref="mix@v1", model_hash=comp.weights_sha, suite="quick", reference_ref="teacher",
                            reference_hash="ref", metrics={"math/ce": 1.2}, w_tau={0.05: 0.5, 0.1: 1.0},
                            tau_star=0.05, report_path=None)
    newer = reg.record_eval(model_ref="mix@v1", model_hash=comp.weights_sha, suite="quick", reference_ref="teacher",
                            reference_hash="ref", metrics={"math/ce": 1.1}, w_tau={}, tau_star=None,
                            report_path="r.json")
    assert first.w_tau == {"0.05": 0.5, "0.1": 1.0}
    assert reg.find_eval(comp.weights_sha, "quick", "ref") == newer
    assert reg.find_eval(comp.weights_sha, "quick", "other") is None


def test_lineage_tree(reg, tmp_path):
    add_seed(reg, tmp_path)
    m = reg.add_expert("s0", "math", expert_weights(tmp_path / "m.safetensors", 0.1), team="alpha")
    c = reg.add_expert("s0", "code", expert_weights(tmp_path / "c.safetensors", 0.2), team="beta")
    v1 = reg.add_composition("mix", seed="s0", members=[(m.id, 1.0)], method="linear", params={}, parent_id=None,
                             weights=expert_weights(tmp_path / "v1.safetensors", 0.1))
    v2 = reg.add_composition("mix", seed="s0", members=[(m.id, 0.5), (c.id, 0.5)], method="linear", params={},
                             parent_id=v1.id, weights=expert_weights(tmp_path / "v2.safetensors", 0.15))
    reg.record_operation("patch", composition="mix", inputs={"domain": "code"}, report={}, decision="accepted",
                         who="carol", result_composition_id=v2.id)
    tree = reg.lineage("mix")
    json.dumps(tree)  # plain data all the way down
    assert (tree["kind"], tree["ref"]) == ("composition", "comp:mix@v2")
    kinds = [child["kind"] for child in tree["children"]]
    assert kinds == ["operation", "composition", "expert", "expert"]
    assert tree["children"][0]["details"]["who"] == "carol"
    assert tree["children"][1]["ref"] == "comp:mix@v1"
    experts = tree["children"][2:]
    assert {e["ref"] for e in experts} == {f"expert:{m.id} math@v1", f"expert:{c.id} code@v1"}
    assert {e["details"]["weight"] for e in experts} == {0.5}
    seed_node = experts[0]["children"][0]
    assert seed_node["ref"] == "seed:s0"
    assert seed_node["children"][0] == {"kind": "teacher", "ref": "tiny-llama", "details": {"hash": TEACHER_HASH},
                                        "children": []}
    assert reg.lineage("math")["children"][0]["ref"] == "seed:s0"


def test_remove_expert_refused_while_used_then_gc(reg, tmp_path):
    add_seed(reg, tmp_path)
    used = reg.add_expert("s0", "math", expert_weights(tmp_path / "u.safetensors", 0.1))
    loose = reg.add_expert("s0", "code", expert_weights(tmp_path / "l.safetensors", 0.2))
    reg.add_composition("mix", seed="s0", members=[(used.id, 1.0)], method="linear", params={}, parent_id=None,
                        weights=expert_weights(tmp_path / "c.safetensors", 0.3))
    with pytest.raises(RegistryError, match=r"expert 1 \(math@v1\) is used by composition\(s\) mix@v1"):
        reg.remove_expert(used.id)
    assert reg.remove_expert(loose.id) == loose
    assert [e.id for e in reg.list_experts()] == [used.id]

    orphan = tmp_path / "orphan.bin"
    orphan.write_bytes(b"unreferenced")
    orphan_sha = reg.put_blob(orphan)
    assert reg.gc().blobs == 0  # within the grace period: might belong to a registration in progress
    stats = reg.gc(grace_s=0)
    assert set(stats.removed) == {loose.weights_sha, orphan_sha}
    assert not reg.blobs.path(loose.weights_sha).exists()
    reg.blob_path(used.weights_sha)  # everything still referenced verifies
    on_disk = {sha for sha, _ in reg.blobs.iter_blobs()}
    seed = reg.list_seeds()[0]
    assert on_disk == {seed.weights_sha, *seed.files.values(), used.weights_sha,
                       reg.list_compositions()[0].weights_sha}


def test_uninitialised_registry_says_run_init(tmp_path, db_url):
    with pytest.raises(RegistryError, match="run `xmerge init`"):
        Registry(tmp_path / "none", db_url).list_seeds()


def test_records_are_frozen(reg, tmp_path):
    seed = add_seed(reg, tmp_path)
    assert isinstance(seed, Seed)
    with pytest.raises(AttributeError):
        seed.name = "other"
    assert isinstance(reg.resolve("s0"), Seed) and not isinstance(seed, Expert)
