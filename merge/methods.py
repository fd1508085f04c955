"""Merge methods by name: our streaming `linear`, and mergekit's weighted methods with the seed as base."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from xmerge.errors import XmergeError
from xmerge.merge.checkpoint import model_file
from xmerge.merge.safetensors_io import TORCH_DTYPES, read_layout
from xmerge.merge.linear import Progress, merge_linear
from xmerge.merge.mergekit_methods import MERGEKIT_METHODS, merge_with_mergekit, method_parameters


@dataclass(frozen=True)
class MergeMethod:
    """A merge method: whether it needs the seed as base, and its settings with their defaults."""

    name: str
    uses_base: bool
    settings: dict[str, object]
    source: str  # "xmerge" (streaming, ours) or "mergekit"


MERGE_METHODS: dict[str, MergeMethod] = {
    "linear": MergeMethod("linear", uses_base=False, settings={"normalize": False}, source="xmerge"),
} | {name: MergeMethod(name, True, method_parameters(name), "mergekit") for name in MERGEKIT_METHODS}


def merge_models(
    method: str,
    experts: Sequence[Path],
    weights: Sequence[float],
    out: Path,
    *,
    base: Path | None = None,
    params: dict[str, object] | None = None,
    random_seed: int | None = None,
    progress: Progress | None = None,
) -> Path:
    """Merge the expert dirs with `method` into the new dir `out`; return `out`.

    base is the seed dir (required by every method but linear, refused by linear);
    params are the method's settings (see MERGE_METHODS[method].settings); progress is called
    with bytes of input merged (as they stream for linear, once at the end for mergekit's)."""
    if method not in MERGE_METHODS:
        raise XmergeError(f"unknown merge method {method!r}; choose one of {', '.join(MERGE_METHODS)}")
    spec = MERGE_METHODS[method]
    params = dict(params or {})
    unknown = sorted(set(params) - set(spec.settings))
    if unknown:
        raise XmergeError(f"{method} has no setting {unknown[0]!r}; it takes {', '.join(spec.settings) or 'none'}")
    if spec.uses_base and base is None:
        raise XmergeError(f"{method} needs the seed as base model; pass the seed the experts were trained from")
    if not spec.uses_base and base is not None:
        raise XmergeError(f"{method} does not use a base model; drop the base")
    if spec.source == "xmerge":
        return merge_linear(experts, weights, out, normalize=bool(params.get("normalize", False)), progress=progress)
    merge_with_mergekit(method, base, experts, weights, out, params, random_seed)
    if progress is not None:
        layout, _ = read_layout(model_file(experts[0]))
        progress(len(experts) * sum(s.numel * TORCH_DTYPES[s.dtype].itemsize for s in layout.values()))
    return Path(out)
