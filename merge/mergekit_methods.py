"""Merge methods of mergekit (task_arithmetic, ties, dare_ties, ...), run with the seed as base.

mergekit only merges the tensors its architecture definition lists and silently drops the rest,
so the student architecture is registered with it from `xlstm_student.json` (a mergekit JSON
architecture: the Llama layout plus the per-layer feature maps and gates; biases, QK-norm,
input/post-feedforward norms and the untied lm_head are optional, because which exist depends
on the teacher family). After every run the output must have exactly the input tensor set.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from mergekit.architecture.base import ModelArchitecture, ModuleDefinition
from mergekit.architecture.json_definitions import NAME_TO_ARCH, JsonModuleArchDef, JsonModuleArchitecture
from mergekit.common import ModelPath, ModelReference
from mergekit.config import InputModelDefinition, MergeConfiguration
from mergekit.merge import run_merge
from mergekit.merge_methods.registry import get as get_mergekit_method
from mergekit.options import MergeOptions
from transformers import AutoConfig

from xmerge.errors import XmergeError
from xmerge.merge.checkpoint import (
    MODEL_FILE,
    atomic_output_dir,
    check_finite,
    check_output_layout,
    check_same_layout,
    copy_sidecars,
)
from xmerge.merge.safetensors_io import TORCH_DTYPES
from xmerge.modeling.config import XLSTMStudentConfig

STUDENT_ARCHITECTURE = "XLSTMStudentForCausalLM"
ARCHITECTURE_JSON = Path(__file__).with_name("xlstm_student.json")

# Methods that take one weight per expert and the seed as base. mergekit's unweighted methods
# (model_stock, sce, karcher, ...) are left out: compose always states the experts' weights.
MERGEKIT_METHODS = (
    "task_arithmetic",
    "ties",
    "dare_ties",
    "dare_linear",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
    "multislerp",
)
# mergekit names torch dtypes in its YAML ("bfloat16"); ours are safetensors' ("BF16")
MERGEKIT_DTYPES = {name: str(dtype).removeprefix("torch.") for name, dtype in TORCH_DTYPES.items()}


def register_student_architecture() -> None:
    """Make mergekit (and transformers' AutoConfig, which mergekit reads configs with) know the student."""
    AutoConfig.register(XLSTMStudentConfig.model_type, XLSTMStudentConfig, exist_ok=True)
    if STUDENT_ARCHITECTURE not in NAME_TO_ARCH:
        module = JsonModuleArchitecture(definition=JsonModuleArchDef.model_validate_json(ARCHITECTURE_JSON.read_text()))
        NAME_TO_ARCH[STUDENT_ARCHITECTURE] = [
            ModelArchitecture(
                modules={"default": ModuleDefinition(architecture=module)},
                architectures=[STUDENT_ARCHITECTURE],
                model_type=XLSTMStudentConfig.model_type,
            )
        ]


def method_parameters(method: str) -> dict[str, object]:
    """{name: default} of the settings a mergekit method takes besides the per-expert weight."""
    if method not in MERGEKIT_METHODS:
        raise XmergeError(f"unknown merge method {method!r}; choose one of linear, {', '.join(MERGEKIT_METHODS)}")
    spec = get_mergekit_method(method).spec
    return {p.name: (None if type(p.default) is object else p.default) for p in spec.parameters if p.name != "weight"}


def merge_with_mergekit(
    method: str,
    base: Path,
    experts: Sequence[Path],
    weights: Sequence[float],
    out: Path,
    params: dict[str, object] | None = None,
    random_seed: int | None = None,
) -> Path:
    """Run mergekit's `method` over the expert dirs with the seed dir `base`; write the new dir `out`.

    `params` are the method's global settings (e.g. density, lambda, normalize); random_seed
    fixes the random drops of dare/della. Raises XmergeError, writing nothing, on bad settings,
    mismatched layouts, NaN/inf inputs, or a mergekit output whose tensor set differs."""
    params = dict(params or {})
    allowed = method_parameters(method)
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise XmergeError(f"{method} has no setting {unknown[0]!r}; it takes {', '.join(allowed) or 'none'}")
    experts = [Path(e) for e in experts]
    if not experts or len(weights) != len(experts):
        raise XmergeError(f"{len(experts)} experts but {len(weights)} weights; give one weight per expert")
    models = [Path(base), *experts]
    layout = check_same_layout(models)
    check_finite(models, layout)
    dtype = MERGEKIT_DTYPES[next(iter(layout.values())).dtype]
    register_student_architecture()

    config = MergeConfiguration(
        merge_method=method,
        base_model=_reference(base),
        models=[
            InputModelDefinition(model=_reference(e), parameters={"weight": float(w)})
            for e, w in zip(experts, weights)
        ],
        parameters=params or None,
        dtype="float32",
        out_dtype=dtype,
    )
    options = MergeOptions(
        copy_tokenizer=False,
        write_model_card=False,
        random_seed=random_seed,
        quiet=True,
        out_shard_size=1 << 62,  # one model.safetensors, never shards
    )
    with atomic_output_dir(out) as tmp:
        raw = tmp / "mergekit"
        try:
            run_merge(config, str(raw), options)
        except (RuntimeError, ValueError, TypeError) as exc:  # mergekit's own errors on bad settings
            raise XmergeError(f"mergekit {method} failed: {exc}") from exc
        check_output_layout(raw / MODEL_FILE, layout)
        os.replace(raw / MODEL_FILE, tmp / MODEL_FILE)
        for leftover in raw.iterdir():
            leftover.unlink()
        raw.rmdir()
        copy_sidecars(base, tmp)
    return Path(out)


def _reference(model_dir: Path) -> ModelReference:
    # built field by field: mergekit's string form would read a '+' in a path as "model+lora"
    return ModelReference(model=ModelPath(path=str(Path(model_dir).resolve())))

