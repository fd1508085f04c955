"""mergekit methods with the seed as base: every student tensor survives, formulas hold, bad input is refused."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from xmerge.errors import XmergeError
from xmerge.merge.safetensors_io import read_layout
from xmerge.merge.mergekit_methods import MERGEKIT_METHODS
from xmerge.merge.methods import MERGE_METHODS, merge_models
from xmerge.tests.common import tiny_student
from xmerge.tests.merge_fixtures import perturbed, random_tensors, student_shapes, write_student

WEIGHTS = [0.5, 0.3, 0.2]


def make_seed_and_experts(root, family="olmo2", tied=False, extra=None):
    seed = random_tensors(student_shapes(family, tied=tied), 0) | (extra or {})
    base = write_student(root / "seed", seed, family)
    return base, [write_student(root / f"expert{i}", perturbed(seed, i + 1), family) for i in range(3)]


@pytest.mark.parametrize("method", MERGEKIT_METHODS)
def test_every_method_keeps_the_input_tensor_set(tmp_path, method):
    base, experts = make_seed_and_experts(tmp_path)
    params = {"density": 0.5} if "density" in MERGE_METHODS[method].settings else {}
    out = merge_models(method, experts, WEIGHTS, tmp_path / "merged", base=base, params=params, random_seed=0)
    assert read_layout(out / "model.safetensors")[0] == read_layout(base / "model.safetensors")[0]
    merged = load_file(out / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in merged.values())
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]


def test_task_arithmetic_is_base_plus_weighted_deltas(tmp_path):
    base, experts = make_seed_and_experts(tmp_path, "qwen2", tied=True)
    out = merge_models("task_arithmetic", experts, WEIGHTS, tmp_path / "merged", base=base)
    merged = load_file(out / "model.safetensors")
    seed = load_file(base / "model.safetensors")
    inputs = [load_file(e / "model.safetensors") for e in experts]
    for name, theta0 in seed.items():
        expected = theta0.double() + sum(w * (t[name].double() - theta0.double()) for w, t in zip(WEIGHTS, inputs))
        torch.testing.assert_close(merged[name].double(), expected, rtol=1e-5, atol=1e-6)


def test_dare_is_reproducible_with_a_seed(tmp_path):
    base, experts = make_seed_and_experts(tmp_path, "llama")
    runs = [
        load_file(
            merge_models(
                "dare_ties", experts, WEIGHTS, tmp_path / f"run{i}", base=base, params={"density": 0.3}, random_seed=7
            )
            / "model.safetensors"
        )
        for i in range(2)
    ]
    assert all(torch.equal(runs[0][n], runs[1][n]) for n in runs[0])
    seed = load_file(base / "model.safetensors")
    assert not torch.equal(runs[0]["model.layers.0.mlp.up_proj.weight"], seed["model.layers.0.mlp.up_proj.weight"])


@pytest.mark.parametrize("family", ["llama", "qwen2", "olmo2"])
def test_real_student_checkpoints_merge_completely(tmp_path, family):
    student = tiny_student(family)
    student.save_pretrained(tmp_path / "seed")
    seed = load_file(tmp_path / "seed" / "model.safetensors")
    experts = [write_student(tmp_path / f"e{i}", perturbed(seed, i), family) for i in range(3)]
    # the saved experts carry the real student's config, not the fixture's
    for e in experts:
        (e / "config.json").write_bytes((tmp_path / "seed" / "config.json").read_bytes())
    out = merge_models("ties", experts, WEIGHTS, tmp_path / "merged", base=tmp_path / "seed", params={"density": 0.5})
    assert read_layout(out / "model.safetensors")[0] == read_layout(tmp_path / "seed" / "model.safetensors")[0]


def test_a_tensor_mergekit_does_not_know_is_caught(tmp_path):
    # a per-layer parameter missing from the architecture definition: mergekit drops it silently
    base, experts = make_seed_and_experts(tmp_path, extra={"model.layers.0.self_attn.swa_scale": torch.ones(4)})
    with pytest.raises(XmergeError, match=r"1 tensors dropped \(first: model.layers.0.self_attn.swa_scale\)"):
        merge_models("task_arithmetic", experts, WEIGHTS, tmp_path / "merged", base=base)
    assert not (tmp_path / "merged").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged")]


def test_nan_in_the_seed_is_refused(tmp_path):
    base, experts = make_seed_and_experts(tmp_path)
    tensors = load_file(base / "model.safetensors")
    tensors["model.norm.weight"][0] = float("nan")
    save_file(tensors, base / "model.safetensors")
    with pytest.raises(XmergeError, match="seed has NaN/inf in tensor model.norm.weight"):
        merge_models("ties", experts, WEIGHTS, tmp_path / "merged", base=base)
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize(
    "method, base, params, fragment",
    [
        ("ties", None, {}, "needs the seed as base"),
        ("linear", "seed", {}, "does not use a base"),
        ("ties", "seed", {"densty": 0.5}, "no setting 'densty'"),
        ("linear", None, {"density": 0.5}, "no setting 'density'"),
        ("frankenmerge", None, {}, "unknown merge method 'frankenmerge'"),
    ],
)
def test_bad_method_settings_are_refused(tmp_path, method, base, params, fragment):
    seed, experts = make_seed_and_experts(tmp_path)
    with pytest.raises(XmergeError, match=fragment):
        merge_models(method, experts, WEIGHTS, tmp_path / "merged", base=seed if base else None, params=params)
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize("method", ["linear", "ties"])
def test_progress_counts_every_input_byte(tmp_path, method):
    base, experts = make_seed_and_experts(tmp_path)
    seen = []
    seed = base if method != "linear" else None
    merge_models(method, experts, WEIGHTS, tmp_path / "merged", base=seed, progress=seen.append)
    assert sum(seen) == 3 * sum(spec.numel * 4 for spec in read_layout(base / "model.safetensors")[0].values())


def test_a_setting_mergekit_rejects_is_one_clear_error(tmp_path):
    base, experts = make_seed_and_experts(tmp_path)
    with pytest.raises(XmergeError, match="mergekit ties failed"):
        merge_models("ties", experts, WEIGHTS, tmp_path / "merged", base=base, params={"density": "dense"})
    assert not (tmp_path / "merged").exists()
