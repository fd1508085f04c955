"""The registry CLI through typer's CliRunner: tables, --json, one-line errors, --home/--db-url/env vars."""

from __future__ import annotations

import json
import subprocess
import sys

from typer.testing import CliRunner

from registry_support import BARE_XMERGE, add_seed, db_url, expert_weights, postgres_server, reg  # noqa: F401
from xmerge.cli.app import app


def run(reg, *args: str):
    db = ["--db-url", reg.db_url] if not reg.db_url.startswith("sqlite") else []
    return CliRunner().invoke(app, [*args, "--home", str(reg.home), *db])


def test_registry_commands(reg, tmp_path):
    add_seed(reg, tmp_path)
    m1 = reg.add_expert("s0", "math", expert_weights(tmp_path / "1.safetensors", 0.1), team="alpha")
    m2 = reg.add_expert("s0", "math", expert_weights(tmp_path / "2.safetensors", 0.2), team="beta")
    loose = reg.add_expert("s0", "code", expert_weights(tmp_path / "3.safetensors", 0.3))
    comp = reg.add_composition("mix", seed="s0", members=[(m1.id, 0.5), (m2.id, 0.5)], method="linear", params={},
                               parent_id=None, weights=expert_weights(tmp_path / "4.safetensors", 0.15))
    reg.record_operation("compose", composition="mix", inputs={}, report={}, decision="accepted", who="alice",
                         result_composition_id=comp.id)

    seeds = json.loads(run(reg, "seeds", "list", "--json").stdout)
    assert [(s["name"], s["teacher_spec"]) for s in seeds] == [("s0", "tiny-llama")]
    experts = json.loads(run(reg, "experts", "list", "--domain", "math", "--json").stdout)
    assert [(e["ref"], e["team"]) for e in experts] == [("math@v1", "alpha"), ("math@v2", "beta")]
    table = run(reg, "experts", "list")
    assert table.exit_code == 0 and "math@v2" in table.stdout and "code@v1" in table.stdout
    shown = json.loads(run(reg, "experts", "show", "math", "--json").stdout)
    assert shown["id"] == m2.id and shown["weights_sha"] == m2.weights_sha
    assert json.loads(run(reg, "experts", "show", str(m1.id), "--json").stdout)["ref"] == "math@v1"
    assert "beta" in run(reg, "experts", "show", "s0/math").stdout

    comps = json.loads(run(reg, "compositions", "list", "--json").stdout)
    assert [(c["ref"], c["members"]) for c in comps] == [
        ("mix@v1", [{"expert_id": m1.id, "weight": 0.5}, {"expert_id": m2.id, "weight": 0.5}])]
    assert json.loads(run(reg, "compositions", "show", "mix@v1", "--json").stdout)["id"] == comp.id

    tree = run(reg, "lineage", "mix")
    assert tree.exit_code == 0
    for piece in ("composition comp:mix@v1", "operation operation:1", "accepted by alice",
                  f"expert expert:{m1.id} math@v1", "seed seed:s0", "teacher tiny-llama"):
        assert piece in tree.stdout, tree.stdout
    assert json.loads(run(reg, "lineage", "mix", "--json").stdout) == reg.lineage("mix")

    refused = run(reg, "experts", "remove", str(m1.id))
    assert refused.exit_code == 1
    assert refused.stderr.strip() == (f"error: expert {m1.id} (math@v1) is used by composition(s) mix@v1; "
                                      "it stays for their lineage")
    assert run(reg, "experts", "remove", str(loose.id)).exit_code == 0
    stats = json.loads(run(reg, "gc", "--grace", "0", "--json").stdout)
    assert stats["blobs"] == 1 and stats["removed"] == [loose.weights_sha]

    unknown = run(reg, "experts", "show", "nothing")
    assert unknown.exit_code == 1 and len(unknown.stderr.strip().splitlines()) == 1
    assert "names no seed, expert or composition" in unknown.stderr
    not_expert = run(reg, "experts", "show", "seed:s0")
    assert not_expert.exit_code == 1 and "is a seed, not an expert" in not_expert.stderr


def test_init_from_environment_and_uninitialised_home(tmp_path):
    home = tmp_path / "envhome"
    empty = CliRunner().invoke(app, ["experts", "list"], env={"XMERGE_HOME": str(home), "XMERGE_DB_URL": None})
    assert empty.exit_code == 1 and "run `xmerge init`" in empty.stderr
    done = CliRunner().invoke(app, ["init"], env={"XMERGE_HOME": str(home), "XMERGE_DB_URL": None})
    assert done.exit_code == 0 and (home / "registry.db").is_file()
    listed = CliRunner().invoke(app, ["seeds", "list", "--json"], env={"XMERGE_HOME": str(home), "XMERGE_DB_URL": None})
    assert listed.exit_code == 0 and json.loads(listed.stdout) == []


ISOLATION = BARE_XMERGE + """
sys.modules["torch"] = None  # any attempt to import torch now fails
from pathlib import Path
import numpy as np
from safetensors.numpy import save_file
import xmerge.registry
from xmerge.registry import Registry
work = Path(sys.argv[1])
(work / "seed").mkdir()
tensors = {"w": np.ones((4, 4), np.float32)}
save_file(tensors, str(work / "seed" / "model.safetensors"))
(work / "seed" / "config.json").write_text("{}")
save_file({"w": np.full((4, 4), 2, np.float32)}, str(work / "e.safetensors"))
for name in ("a", "b"):
    reg = Registry(work / name)
    reg.init()
    reg.add_seed("s0", teacher_spec="t", teacher_hash="0" * 64, student_config={}, model_dir=work / "seed")
a, b = Registry(work / "a"), Registry(work / "b")
expert = a.add_expert("s0", "math", work / "e.safetensors")
b.import_bundle(a.export_expert(expert.id, work / "bundle.tar"))
a.checkout("math", work / "out")
a.lineage("math"); a.gc(grace_s=0)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "xmerge")
                and sys.modules[m] is not None)
print(" ".join(loaded))
"""


def test_registry_imports_neither_torch_nor_other_xmerge_packages(tmp_path):
    done = subprocess.run([sys.executable, "-c", ISOLATION, str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    loaded = done.stdout.split()
    assert not [m for m in loaded if m.split(".")[0] in ("torch", "transformers")]
    assert {m for m in loaded if m.startswith("xmerge")} == (
        {"xmerge", "xmerge.errors"} | {m for m in loaded if m.startswith("xmerge.registry")})
    assert "xmerge.registry.bundles" in loaded and (tmp_path / "out" / "model.safetensors").is_file()
