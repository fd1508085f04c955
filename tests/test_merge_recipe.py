"""Recipes: the written YAML re-runs to the same bits (ours and mergekit's), the card lists the experts."""

import pytest
import torch
import yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
from safetensors.torch import load_file

from xmerge.errors import XmergeError
from xmerge.merge.mergekit_methods import register_student_architecture
from xmerge.merge.recipe import CARD_FILE, RECIPE_FILE, MergeRecipe, RecipeModel, run_recipe
from xmerge.tests.merge_fixtures import perturbed, random_tensors, student_shapes, write_student


@pytest.fixture
def models(tmp_path):
    seed = random_tensors(student_shapes("qwen2"), 0, torch.bfloat16)
    base = write_student(tmp_path / "seed", seed, "qwen2")
    return base, [write_student(tmp_path / f"expert{i}", perturbed(seed, i + 1), "qwen2") for i in range(3)]


def same_tensors(a, b):
    a, b = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


@pytest.mark.parametrize("method, params", [("linear", {"normalize": False}), ("dare_ties", {"density": 0.4})])
def test_written_recipe_reproduces_the_merge(tmp_path, models, method, params):
    base, experts = models
    recipe = MergeRecipe(
        method=method,
        models=[RecipeModel(model=str(e), weight=w) for e, w in zip(experts, [0.5, 0.3, 0.2])],
        base_model=str(base) if method != "linear" else None,
        parameters=params,
        random_seed=3,
    )
    first = run_recipe(recipe, tmp_path / "first")
    assert sorted(p.name for p in first.iterdir()) == sorted([CARD_FILE, RECIPE_FILE, "config.json", "model.safetensors"])
    again = run_recipe(first / RECIPE_FILE, tmp_path / "again")
    assert same_tensors(first, again)
    assert (again / RECIPE_FILE).read_text() == (first / RECIPE_FILE).read_text()
    assert yaml.safe_load((first / RECIPE_FILE).read_text())["out_dtype"] == "bfloat16"


def test_mergekit_reads_the_recipe_and_gets_the_same_bits(tmp_path, models):
    _, experts = models
    recipe = MergeRecipe(
        method="linear", models=[RecipeModel(model=str(e), weight=w) for e, w in zip(experts, [2.0, 1.0, 1.0])]
    )
    ours = run_recipe(recipe.model_copy(update={"parameters": {"normalize": True}}), tmp_path / "ours")
    register_student_architecture()
    config = MergeConfiguration.model_validate(yaml.safe_load((ours / RECIPE_FILE).read_text()))
    run_merge(config, str(tmp_path / "mergekit"), MergeOptions(quiet=True, copy_tokenizer=False))
    assert same_tensors(ours, tmp_path / "mergekit")


def test_linear_recipe_without_normalize_normalizes_like_mergekit(tmp_path, models):
    _, experts = models
    text = yaml.safe_dump(
        {"merge_method": "linear", "models": [{"model": str(e), "parameters": {"weight": 2.0}} for e in experts]}
    )
    (tmp_path / "r.yml").write_text(text)
    out = load_file(run_recipe(tmp_path / "r.yml", tmp_path / "out") / "model.safetensors")
    inputs = [load_file(e / "model.safetensors") for e in experts]
    name = "model.layers.1.self_attn.igate.weight"
    mean = sum(t[name].float() for t in inputs) / 3
    torch.testing.assert_close(out[name].float(), mean, rtol=1e-2, atol=1e-2)


def test_model_card_lists_the_experts_and_the_recipe(tmp_path, models):
    _, experts = models
    refs = {"expert:math@1": experts[0], "expert:code@2": experts[1]}
    recipe = MergeRecipe(method="linear", models=[RecipeModel(model=r, weight=0.5) for r in refs])
    out = run_recipe(recipe, tmp_path / "card", resolve=refs.__getitem__)
    card = (out / CARD_FILE).read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model"] == ["expert:math@1", "expert:code@2"]
    assert "| `expert:code@2` | 0.5 |" in card
    assert (out / RECIPE_FILE).read_text() in card


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("models: []", "needs `merge_method`"),
        ("merge_method: linear\nslices: []\nmodels: []", "'slices' is not supported"),
        ("merge_method: linear\ndtype: bfloat16\nmodels: []", "computes merges in float32"),
        ("merge_method: linear\nmodels:\n- model: a\n  parameters: {weight: 1, density: 0.5}", "must be `model: REF`"),
        ("merge_method: linear\nmodels:\n- just-a-string", "must be `model: REF`"),
        ("merge_method: linear\nmodels:\n- model: a\n  parameters: {weight: heavy}", "malformed"),
        ("merge_method: [", "not valid YAML"),
    ],
)
def test_malformed_recipes_are_refused(text, fragment):
    with pytest.raises(XmergeError, match=fragment):
        MergeRecipe.from_yaml(text)


def test_recipe_dtype_must_match_the_experts(tmp_path, models):
    _, experts = models
    recipe = MergeRecipe(method="linear", models=[RecipeModel(model=str(experts[0]), weight=1.0)], out_dtype="float32")
    with pytest.raises(XmergeError, match="out_dtype float32 differs from the experts' bfloat16"):
        run_recipe(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()
