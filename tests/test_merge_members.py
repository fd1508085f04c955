"""Patch and replace: member-list formulas, merged outputs equal to the documented Σλθ, no drift."""

import pytest
import torch
from safetensors.torch import load_file

from xmerge.errors import XmergeError
from xmerge.merge.linear import merge_linear
from xmerge.merge.members import Member, patch_members, replace_member
from xmerge.tests.merge_fixtures import perturbed, random_tensors, student_shapes, write_student

COMPOSITION = [Member("math", "m1", 0.5), Member("code", "c1", 0.3), Member("chat", "h1", 0.2)]


@pytest.fixture
def experts(tmp_path):
    seed = random_tensors(student_shapes("llama", tied=True), 0, torch.bfloat16)
    names = ["m1", "m2", "c1", "c2", "h1", "s1"]
    return {name: write_student(tmp_path / name, perturbed(seed, i + 1), "llama") for i, name in enumerate(names)}


def compose(members, experts, out):
    return load_file(merge_linear([experts[m.model] for m in members], [m.weight for m in members], out) / "model.safetensors")


def formula(terms, experts):
    """Σ λ θ over (weight, expert name) terms: fp32 fused multiply-add in order, cast to the experts' dtype."""
    loaded = [(w, load_file(experts[name] / "model.safetensors")) for w, name in terms]
    out = {}
    for tensor_name, first in loaded[0][1].items():
        acc = torch.zeros(first.shape)
        for w, tensors in loaded:
            acc.addcmul_(tensors[tensor_name], torch.tensor(w, dtype=torch.float32))
        out[tensor_name] = acc.to(first.dtype)
    return out


def assert_same(a, b):
    assert a.keys() == b.keys()
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_patch_adds_a_domain_and_rescales_the_others(tmp_path, experts):
    patched = patch_members(COMPOSITION, "stem", "s1", 0.2)
    scale = (1.0 - 0.2) / 1.0
    assert patched == [
        Member("math", "m1", 0.5 * scale),
        Member("code", "c1", 0.3 * scale),
        Member("chat", "h1", 0.2 * scale),
        Member("stem", "s1", 0.2),
    ]
    assert sum(m.weight for m in patched) == pytest.approx(1.0)
    expected = formula([(0.5 * scale, "m1"), (0.3 * scale, "c1"), (0.2 * scale, "h1"), (0.2, "s1")], experts)
    assert_same(compose(patched, experts, tmp_path / "out"), expected)


def test_patch_updates_a_domain_weight_and_expert(tmp_path, experts):
    patched = patch_members(COMPOSITION, "code", "c2", 0.4)
    scale = (1.0 - 0.4) / (1.0 - 0.3)
    assert patched == [Member("math", "m1", 0.5 * scale), Member("code", "c2", 0.4), Member("chat", "h1", 0.2 * scale)]
    expected = formula([(0.5 * scale, "m1"), (0.4, "c2"), (0.2 * scale, "h1")], experts)
    assert_same(compose(patched, experts, tmp_path / "out"), expected)


def test_patch_without_keeping_the_total_leaves_the_others(experts):
    assert patch_members(COMPOSITION, "stem", "s1", 0.2, keep_total=False) == [*COMPOSITION, Member("stem", "s1", 0.2)]
    assert patch_members(COMPOSITION, "code", "c2", keep_total=False) == [
        Member("math", "m1", 0.5),
        Member("code", "c2", 0.3),
        Member("chat", "h1", 0.2),
    ]


def test_replace_swaps_the_expert_and_keeps_every_weight(tmp_path, experts):
    replaced = replace_member(COMPOSITION, "math", "m2")
    assert replaced == [Member("math", "m2", 0.5), Member("code", "c1", 0.3), Member("chat", "h1", 0.2)]
    expected = formula([(0.5, "m2"), (0.3, "c1"), (0.2, "h1")], experts)
    assert_same(compose(replaced, experts, tmp_path / "out"), expected)


def test_patch_and_undo_return_the_original_bits_unlike_the_delta_form(tmp_path, experts):
    original = compose(COMPOSITION, experts, tmp_path / "original")
    there = patch_members(COMPOSITION, "code", "c2", keep_total=False)
    back = patch_members(there, "code", "c1", keep_total=False)
    assert back == COMPOSITION
    assert_same(compose(back, experts, tmp_path / "back"), original)
    # the delta form θ + λ(θ_new − θ_old), applied and undone in the stored dtype, drifts
    c1, c2 = (load_file(experts[n] / "model.safetensors") for n in ("c1", "c2"))
    name = "model.layers.0.mlp.up_proj.weight"
    patched = (original[name].float() + 0.3 * (c2[name].float() - c1[name].float())).to(torch.bfloat16)
    undone = (patched.float() + 0.3 * (c1[name].float() - c2[name].float())).to(torch.bfloat16)
    assert not torch.equal(undone, original[name])


@pytest.mark.parametrize(
    "call, fragment",
    [
        (lambda: patch_members(COMPOSITION, "stem", "s1"), "'stem' is new to this composition; give it a weight"),
        (lambda: patch_members(COMPOSITION, "stem", "s1", 1.5), "cannot give 'stem' weight 1.5 and keep"),
        (lambda: patch_members(COMPOSITION, "math", "m1", 0.5), "already has expert m1 at weight 0.5"),
        (lambda: patch_members(COMPOSITION, "math", "m2", float("nan")), "finite"),
        (lambda: replace_member(COMPOSITION, "stem", "s1"), "'stem' is not in this composition .*math, code, chat"),
        (lambda: replace_member(COMPOSITION, "code", "c1"), "already uses expert c1"),
        (lambda: replace_member([*COMPOSITION, Member("code", "c2", 0.1)], "code", "c3"), "each domain once"),
    ],
)
def test_bad_patches_and_replacements_are_refused(call, fragment):
    with pytest.raises(XmergeError, match=fragment):
        call()
