"""`xmerge compose / patch / replace` through typer's CliRunner: gated runs on the real eval sets, bad input."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from common import tiny_registry
from test_merge_ops import BAD_NOISE, GOOD_NOISE, add_expert, reg  # noqa: F401  (reg: a fixture)
from xmerge.cli.app import app
from xmerge.merge.operations import compose


def run(reg, *args: str):
    return CliRunner().invoke(app, [*args, "--home", str(reg.home), "--device", "cpu"])


def blob_files(reg) -> set[str]:
    return {p.name for p in (reg.home / "blobs").rglob("*") if p.is_file()}


def add_experts(reg) -> dict:
    """Seed tiny gets math, code and a NaN `bio` expert; a second seed `other` its own math expert."""
    experts = {"math": add_expert(reg, "math", GOOD_NOISE, 1), "code": add_expert(reg, "code", GOOD_NOISE, 2),
               "nan": add_expert(reg, "bio", GOOD_NOISE, 3, nan=True)}
    tiny = reg.resolve("seed:tiny")
    reg.add_seed("other", teacher_spec=tiny.teacher_spec, teacher_hash=tiny.teacher_hash,
                 student_config=tiny.student_config, model_dir=reg.checkout(tiny, reg.home / "other-seed"))
    experts["other"] = add_expert(reg, "math", GOOD_NOISE, 4, seed_name="other")
    return experts


@pytest.fixture()
def setup(reg):  # noqa: F811
    return reg, add_experts(reg)


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One registry for the bad-input tests (none of them may write): experts and composition mix@v1."""
    registry = tiny_registry(tmp_path_factory.mktemp("shared"))
    experts = add_experts(registry)
    compose(registry, "mix", "math=0.5,code=0.5", seed="tiny", gate=False)
    return registry, experts


def snapshot(reg):
    return reg.list_compositions(), reg.list_operations(), blob_files(reg)


def test_compose_patch_replace_on_the_quick_eval_sets(setup):
    reg, experts = setup
    composed = run(reg, "compose", "mix", "--seed", "tiny", "--weights", "math=1,code=1", "--json")
    assert composed.exit_code == 0, composed.output
    out = json.loads(composed.stdout)
    assert (out["decision"], out["composition"], out["parent"]) == ("accepted", "mix@v1", None)
    assert {m["name"].split("/")[0] for m in out["report"]["gate"]["metrics"]} == {"code", "math"}

    noised = add_expert(reg, "code", BAD_NOISE, 5)
    rejected = run(reg, "replace", "mix", "--domain", "code", "--expert", f"code@v{noised.version}")
    assert rejected.exit_code == 2
    assert "rejected" in rejected.stdout and "code/" in rejected.stdout and "regressed" in rejected.stdout
    assert [c.version for c in reg.list_compositions("mix")] == [1]

    forced = run(reg, "replace", "mix", "--domain", "code", "--expert", str(noised.id), "--force", "--json")
    assert forced.exit_code == 0, forced.output
    out = json.loads(forced.stdout)
    assert (out["decision"], out["composition"], out["parent"]) == ("forced", "mix@v2", "mix@v1")
    assert out["report"]["gate"]["failing"]
    assert [(o.kind, o.decision) for o in reg.list_operations(composition="mix")] == [
        ("compose", "accepted"), ("replace", "rejected"), ("replace", "forced")]


def test_compose_table_output_without_gate(setup):
    reg, experts = setup
    done = run(reg, "compose", "mix", "--seed", "tiny", "--weights", f"math=0.3,{experts['code'].id}=0.7", "--no-gate")
    assert done.exit_code == 0, done.output
    assert "math@v1" in done.stdout and "forced" in done.stdout and "gate skipped" in done.stdout
    assert "new version mix@v1" in done.stdout


COMPOSE_ERRORS = [
    (["--weights", "math=abc"], "'abc', not a number"),
    (["--weights", "math="], "has no weight after '='"),
    (["--weights", "math=0.5,math=0.5"], "'math' appears twice"),
    (["--weights", "physics=1"], "no ready expert for domain 'physics'"),
    (["--weights", "999=1"], "expert 999 does not exist"),
    (["--weights", "math=-0.5,code=1.5"], "pass --allow-negative"),
    (["--weights", "math=0,code=0"], "all weights are zero"),
    (["--weights", "{math}=0.5,{other}=0.5"], "experts of different seeds"),
    (["--weights", "math=0.5,{nan}=0.5"], "has NaN/inf in tensor"),
    (["--weights", "math=1", "--method", "nope"], "unknown merge method 'nope'"),
    (["--weights", "math=1,code=1", "--budget", "3"], "--budget only applies with --search"),
    (["--weights", "math=1", "--search"], "at least two members"),
    (["--weights", "math=1,code=1", "--tau", "1.5"], "must lie in [0, 1)"),
]


@pytest.mark.parametrize("args,fragment", COMPOSE_ERRORS, ids=[" ".join(a) for a, _ in COMPOSE_ERRORS])
def test_bad_compose_input_writes_nothing(shared, args, fragment):
    reg, experts = shared
    seed = [] if "{other}" in " ".join(args) else ["--seed", "tiny"]
    args = [a.format(**{k: e.id for k, e in experts.items()}) for a in args]
    before = snapshot(reg)
    failed = run(reg, "compose", "mix", *seed, *args)
    assert failed.exit_code == 1
    assert len(failed.stderr.strip().splitlines()) == 1 and fragment in failed.stderr, failed.stderr
    assert snapshot(reg) == before


PATCH_ERRORS = [
    (["patch", "nope", "--expert", "math"], "'nope' does not exist"),
    (["patch", "mix", "--expert", "physics"], "has no expert 'physics'"),
    (["patch", "mix", "--expert", "bio"], "give it a weight"),
    (["patch", "mix", "--expert", "{other}", "--weight", "0.2"], "is of seed 'other'"),
    (["patch", "mix", "--expert", "bio", "--weight", "0.2"], "has NaN/inf in tensor"),
    (["patch", "mix", "--expert", "math"], "nothing to patch"),
    (["replace", "mix", "--domain", "code", "--expert", "math"], "is a 'math' expert, not 'code'"),
    (["replace", "mix", "--domain", "bio", "--expert", "bio"], "not in this composition"),
]


@pytest.mark.parametrize("args,fragment", PATCH_ERRORS, ids=[" ".join(a) for a, _ in PATCH_ERRORS])
def test_bad_patch_and_replace_input_writes_nothing(shared, args, fragment):
    reg, experts = shared
    before = snapshot(reg)
    failed = run(reg, *[a.format(**{k: e.id for k, e in experts.items()}) for a in args])
    assert failed.exit_code == 1
    assert len(failed.stderr.strip().splitlines()) == 1 and fragment in failed.stderr, failed.stderr
    assert snapshot(reg) == before
