"""Merge recipes: a mergekit-style YAML that reproduces a merge, the model card, and re-running one.

A recipe is written as mergekit's own configuration format (merge_method, base_model, models
with per-model weight, parameters, dtype, out_dtype), so `mergekit-yaml` reads it too; the only
extra key is `random_seed` (for dare/della), which mergekit ignores. Models are references
(a model dir path, or whatever the caller's `resolve` turns into one, e.g. a registry ref).
Semantics follow mergekit's: a linear recipe without `normalize` normalises the weights.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from xmerge.errors import XmergeError
from xmerge.merge.checkpoint import atomic_output_dir, model_file
from xmerge.merge.safetensors_io import read_layout
from xmerge.merge.members import Member
from xmerge.merge.mergekit_methods import MERGEKIT_DTYPES
from xmerge.merge.methods import merge_models

RECIPE_FILE = "mergekit_config.yml"
CARD_FILE = "README.md"
COMPUTE_DTYPE = "float32"


class RecipeModel(BaseModel):
    """One input of a recipe: a model reference and its weight."""

    model_config = ConfigDict(frozen=True)
    model: str
    weight: float


class MergeRecipe(BaseModel):
    """Everything that determines a merge's output."""

    model_config = ConfigDict(frozen=True)
    method: str
    models: tuple[RecipeModel, ...]
    base_model: str | None = None
    parameters: dict[str, bool | int | float] = {}
    out_dtype: str | None = None  # mergekit's dtype name ("bfloat16"); None: the experts' dtype
    random_seed: int | None = None

    @classmethod
    def from_members(
        cls,
        members: Sequence[Member],
        method: str = "linear",
        base_model: str | None = None,
        parameters: dict[str, bool | int | float] | None = None,
        random_seed: int | None = None,
    ) -> MergeRecipe:
        return cls(
            method=method,
            models=tuple(RecipeModel(model=m.model, weight=m.weight) for m in members),
            base_model=base_model,
            parameters=parameters or {},
            random_seed=random_seed,
        )

    def to_yaml(self) -> str:
        data: dict[str, object] = {"merge_method": self.method}
        if self.base_model is not None:
            data["base_model"] = self.base_model
        data["models"] = [{"model": m.model, "parameters": {"weight": m.weight}} for m in self.models]
        if self.parameters:
            data["parameters"] = dict(self.parameters)
        data["dtype"] = COMPUTE_DTYPE
        if self.out_dtype is not None:
            data["out_dtype"] = self.out_dtype
        if self.random_seed is not None:
            data["random_seed"] = self.random_seed
        return yaml.safe_dump(data, sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> MergeRecipe:
        """Parse a recipe (the subset of mergekit's format that lists whole models with weights)."""
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise XmergeError(f"recipe is not valid YAML: {exc}") from None
        if not isinstance(data, dict) or "merge_method" not in data or not isinstance(data.get("models"), list):
            raise XmergeError("a recipe needs `merge_method` and a `models` list (mergekit format)")
        unsupported = sorted(set(data) & {"slices", "modules", "tokenizer", "tokenizer_source", "chat_template"})
        if unsupported:
            raise XmergeError(f"recipe key {unsupported[0]!r} is not supported; list whole models under `models`")
        if data.get("dtype", COMPUTE_DTYPE) != COMPUTE_DTYPE:
            raise XmergeError(f"recipe dtype is {data['dtype']!r}; xmerge computes merges in {COMPUTE_DTYPE}")
        models = []
        for entry in data["models"]:
            params = entry.get("parameters") if isinstance(entry, dict) else None
            if not isinstance(params, dict) or "model" not in entry or set(params) != {"weight"}:
                raise XmergeError(f"recipe model entry {entry!r} must be `model: REF` with `parameters: {{weight: W}}`")
            models.append({"model": str(entry["model"]), "weight": params["weight"]})
        parameters = dict(data.get("parameters") or {})
        if data["merge_method"] == "linear":
            parameters.setdefault("normalize", True)  # mergekit's default
        try:
            return cls(
                method=data["merge_method"],
                models=models,
                base_model=data.get("base_model"),
                parameters=parameters,
                out_dtype=data.get("out_dtype"),
                random_seed=data.get("random_seed"),
            )
        except ValidationError as exc:
            raise XmergeError(f"recipe is malformed: {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}") from None


def model_card(recipe: MergeRecipe, name: str) -> str:
    """A Hugging Face model card: `base_model` lists the experts; the body holds the recipe."""
    front = {"base_model": [m.model for m in recipe.models], "library_name": "transformers", "tags": ["merge", "xmerge"]}
    base = f", with `{recipe.base_model}` as base" if recipe.base_model else ""
    rows = "\n".join(f"| `{m.model}` | {m.weight:g} |" for m in recipe.models)
    return (
        f"---\n{yaml.safe_dump(front, sort_keys=False)}---\n\n# {name}\n\n"
        f"A merge of {len(recipe.models)} xLSTM student experts of one seed, made with xmerge "
        f"using the `{recipe.method}` method{base}.\n\n"
        f"| expert | weight |\n|---|---|\n{rows}\n\n"
        f"## Merge recipe\n\nRe-run it with `xmerge.merge.recipe.run_recipe('{RECIPE_FILE}', OUT)`:\n\n"
        f"```yaml\n{recipe.to_yaml()}```\n"
    )


def write_recipe(recipe: MergeRecipe, out_dir: Path, name: str | None = None) -> None:
    """Write `mergekit_config.yml` and the model card `README.md` into `out_dir`."""
    out_dir = Path(out_dir)
    (out_dir / RECIPE_FILE).write_text(recipe.to_yaml(), encoding="utf-8")
    (out_dir / CARD_FILE).write_text(model_card(recipe, name or out_dir.name), encoding="utf-8")


def run_recipe(recipe: MergeRecipe | Path, out: Path, resolve: Callable[[str], Path] = Path) -> Path:
    """Run a recipe (object or YAML file) into the new dir `out`, with its recipe and model card.

    `resolve` maps each model reference to a model dir (default: the reference is a path)."""
    if not isinstance(recipe, MergeRecipe):
        recipe = MergeRecipe.from_yaml(Path(recipe).read_text(encoding="utf-8"))
    if not recipe.models:
        raise XmergeError("the recipe lists no models")
    experts = [resolve(m.model) for m in recipe.models]
    base = resolve(recipe.base_model) if recipe.base_model is not None else None
    layout, _ = read_layout(model_file(experts[0]))
    dtype = MERGEKIT_DTYPES[next(iter(layout.values())).dtype]
    if recipe.out_dtype not in (None, dtype):
        raise XmergeError(f"recipe out_dtype {recipe.out_dtype} differs from the experts' {dtype}; xmerge keeps their dtype")
    recipe = recipe.model_copy(update={"out_dtype": dtype})
    with atomic_output_dir(out) as tmp:
        merge_models(
            recipe.method,
            experts,
            [m.weight for m in recipe.models],
            tmp,
            base=base,
            params=recipe.parameters,
            random_seed=recipe.random_seed,
        )
        write_recipe(recipe, tmp, name=Path(out).name)
    return Path(out)
