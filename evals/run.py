"""evaluate_ref: a registry model or a model directory on a suite, against the teacher or another model, cached.

Two caches, both in the registry's eval runs:
- per model and domain: (weights sha256, "<suite>/<domain>", fingerprint of the domain's eval set),
  keyed exactly as the merge gate keys them, so a model the gate already evaluated is not run again;
- the comparison: (model sha256, suite, reference key), reference key = sha256 of the reference's
  hash and the eval sets' fingerprints. A repeat finds it, loads no model and records nothing.
The eval sets (held-out blocks, the teacher's cached top-k, math problems) come from the seed, so
every model of one seed is measured on the same tokens.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from xmerge.errors import XmergeError
from xmerge.evals.metrics import GateVerdict, Metric, compare
from xmerge.evals.quick import SUITES, EvalSet, evaluate
from xmerge.evals.report import json_safe
from xmerge.evals.report import plot_recovery, write_json
from xmerge.experts.targets import teacher_hash
from xmerge.registry import Composition, Expert, Registry, RegistryError, Seed

DEFAULT_DOMAINS = ("code", "math")  # chat only on request: its preset makes the teacher write answers first
DEFAULT_TAU = 0.02
TEACHER = "teacher"


@dataclass(frozen=True)
class Subject:
    """A model to evaluate: the ref recorded for it, its weights hash, and how to load it (on a cache miss)."""

    ref: str  # seed:NAME, expert:ID, comp:NAME@vN, teacher:SPEC or an absolute directory
    hash: str
    load: Callable[[], torch.nn.Module] = field(repr=False)
    seed: Seed | None  # None for a plain directory
    domains: tuple[str, ...]  # what it is evaluated on unless told otherwise


@dataclass(frozen=True)
class EvalReport:
    """Metrics of a model and its reference on one suite, their recoveries, W_τ grid and τ*."""

    model: Subject
    reference: Subject
    suite: str
    domains: tuple[str, ...]
    metrics: tuple[Metric, ...]
    reference_metrics: tuple[Metric, ...]
    verdict: GateVerdict  # metrics.compare at tau: per-metric recovery and outcome, W_τ, τ*, failing
    cached: bool  # the whole comparison came from a recorded eval run
    evaluated: tuple[str, ...]  # "<ref> <domain>" pairs actually run (cache misses)
    eval_run_id: int

    @property
    def recoveries(self) -> dict[str, float]:
        return {m["name"]: m["recovery"] for m in self.verdict.report["metrics"]}

    @property
    def w_tau(self) -> dict[str, float]:
        return self.verdict.report["w_tau"]

    @property
    def tau_star(self) -> float:
        return self.verdict.report["tau_star"]

    def to_dict(self) -> dict:
        """The gate report plus what was compared, JSON-ready: report.json and `xmerge eval --json`."""
        return json_safe({
            "model": self.model.ref, "model_hash": self.model.hash,
            "reference": self.reference.ref, "reference_hash": self.reference.hash,
            "suite": self.suite, "domains": list(self.domains), "cached": self.cached,
            "evaluated": list(self.evaluated), "eval_run_id": self.eval_run_id, **self.verdict.report})


def resolve_device(device: str) -> str:
    """'auto' -> cuda when available, else cpu; anything else as given."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _load_dir(path: Path, device: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    from xmerge.modeling.teacher import load_teacher

    if (path / "config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, trust_remote_code=False)
    else:  # a GGUF-only directory
        model = load_teacher(str(path))[0]
    return model.to(device).eval()


def _record_subject(reg: Registry, record: Seed | Expert | Composition, device: str) -> Subject:
    from xmerge.experts.seed import checkout_cached

    if isinstance(record, Seed):
        seed, ref, domains = record, record.ref, DEFAULT_DOMAINS
    elif isinstance(record, Expert):
        seed, ref, domains = reg.resolve(f"seed:{record.seed}"), f"expert:{record.id}", (record.domain,)
    else:
        seed, ref = reg.resolve(f"seed:{record.seed}"), f"comp:{record.ref}"
        domains = tuple(sorted({reg.get_expert(m.expert_id).domain for m in record.members}))
    return Subject(ref, record.weights_sha, lambda: _load_dir(checkout_cached(reg, record), device), seed, domains)


def _looks_like_path(ref: str | Path) -> bool:
    return isinstance(ref, Path) or ref.startswith((".", "/", "~")) or ref.endswith("/")


def _is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file() or any(path.glob("*.safetensors")) or any(path.glob("*.gguf"))


def resolve_subject(reg: Registry, ref_or_dir: str | Path, device: str) -> Subject:
    """A registry ref (seed, expert, composition) or a model directory, as a Subject. A bare name is a
    directory only if it holds a model (a folder ./code does not hide the code expert)."""
    path = Path(ref_or_dir).expanduser()
    if path.is_dir() and (_looks_like_path(ref_or_dir) or _is_model_dir(path)):
        path = path.absolute()
        return Subject(str(path), teacher_hash(path), lambda: _load_dir(path, device), None, DEFAULT_DOMAINS)
    if path.is_file():
        raise XmergeError(f"{ref_or_dir} is a file; pass a model directory or a registry ref")
    if _looks_like_path(ref_or_dir):
        raise XmergeError(f"model directory {ref_or_dir} does not exist")
    return _record_subject(reg, reg.resolve(ref_or_dir), device)


def teacher_subject(seed: Seed, teacher) -> Subject:
    """The seed's teacher (an experts.seed.SeedTeacher, which checks the teacher's hash on load)."""
    return Subject(f"teacher:{seed.teacher_spec}", seed.teacher_hash, teacher, seed, DEFAULT_DOMAINS)


def _seed_for_directory(reg: Registry, subject: Subject, seed_name: str | None) -> Seed:
    """The seed whose eval sets a plain directory is measured on: named, the one it matches, or the only one."""
    if seed_name is not None:
        return reg.resolve(f"seed:{seed_name}")
    seeds = reg.list_seeds()
    if not seeds:
        raise XmergeError("no seed is registered; the eval sets (held-out data, teacher targets) come from a "
                          "seed: create one with `xmerge seed create NAME`")

    def matches(seed: Seed) -> bool:
        if seed.teacher_hash == subject.hash:
            return True
        try:
            reg.check_tensors_match_seed(seed, Path(subject.ref) / "model.safetensors")
        except RegistryError:
            return False
        return True

    found = [s for s in seeds if matches(s)] or (seeds if len(seeds) == 1 else [])
    if len(found) != 1:
        names = ", ".join(s.name for s in (found or seeds))
        raise XmergeError(f"cannot tell which seed's eval sets {subject.ref} belongs to (candidates: {names}); "
                          "pass --seed NAME")
    return found[0]


def eval_set_fingerprint(data: EvalSet) -> str:
    """sha256 over an eval set's tokens, teacher targets and problems (the gate's per-domain cache key)."""
    digest = hashlib.sha256()
    for tensor in (data.blocks, data.target_indices, data.target_logprobs):
        if tensor is None:
            digest.update(b"none")
            continue
        digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
        digest.update(tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    for problem in data.problems:
        digest.update(f"{problem.prompt}\0{problem.answer}\0".encode())
    return digest.hexdigest()


def metrics_to_json(metrics: Sequence[Metric]) -> dict:
    """{name: {value, higher_is_better, domain}} with non-finite values as strings (strict JSON)."""
    return {m.name: {"value": m.value if math.isfinite(m.value) else str(m.value),
                     "higher_is_better": m.higher_is_better, "domain": m.domain} for m in metrics}


def metrics_from_json(stored: Mapping[str, dict]) -> list[Metric]:
    return [Metric(name, m.get("domain", name.split("/")[0]), float(m["value"]), m["higher_is_better"])
            for name, m in stored.items()]


def domain_metrics(reg: Registry, subject: Subject, sets: Mapping[str, tuple[EvalSet, str]], suite: str,
                   tokenizer, evaluated: list[str]) -> list[Metric]:
    """Metrics of `subject` on each (eval set, fingerprint), sorted by domain; loads it only on a cache miss
    and appends "<ref> <domain>" to `evaluated` for each domain it runs."""
    out: list[Metric] = []
    model = None
    for domain, (data, fingerprint) in sorted(sets.items()):
        key = f"{suite}/{domain}"
        cached = reg.find_eval(subject.hash, key, fingerprint)
        if cached is not None:
            out += metrics_from_json(cached.metrics)
            continue
        model = model if model is not None else subject.load()
        found = evaluate(model, tokenizer, suite, {domain: data})
        reg.record_eval(model_ref=subject.ref, model_hash=subject.hash, suite=key,
                        reference_ref=f"eval-set:{domain}", reference_hash=fingerprint, w_tau={}, tau_star=None,
                        report_path=None, metrics=metrics_to_json(found))
        evaluated.append(f"{subject.ref} {domain}")
        out += found
    return out


def _reference_key(reference: Subject, fingerprints: Mapping[str, str]) -> str:
    text = reference.hash + "".join(f"\n{d}:{fp}" for d, fp in sorted(fingerprints.items()))
    return hashlib.sha256(text.encode()).hexdigest()


def report_dir(reg: Registry, model_ref: str, suite: str) -> Path:
    """<home>/reports/<ref>-<suite>, the ref made a safe folder name."""
    if Path(model_ref).expanduser().is_dir():
        model_ref = Path(model_ref).expanduser().absolute().name
    name = re.sub(r"[^A-Za-z0-9._@-]+", "_", model_ref).strip("_") or "model"
    return Path(reg.home) / "reports" / f"{name}-{suite}"


def write_outputs(report: EvalReport, out: Path) -> Path:
    """report.json and recovery.png under `out`; returns the JSON's path."""
    path = write_json(report.to_dict(), Path(out) / "report.json")
    plot_recovery(report.verdict.report, Path(out) / "recovery.png")
    return path


def evaluate_ref(reg: Registry, ref_or_dir: str | Path, *, suite: str = "quick", against: str | Path | None = None,
                 device: str = "cpu", domains: Sequence[str] | None = None, tau: float = DEFAULT_TAU,
                 seed: str | None = None, out: Path | None = None,
                 say: Callable[[str], object] = lambda _: None) -> EvalReport:
    """Evaluate a seed / expert / composition ref or a model directory on `suite` against `against`
    (a ref or directory; None or "teacher" = the seed's teacher), on `domains` (default: an expert's
    domain, a composition's members' domains, else math and code). `seed` names the seed whose eval sets
    a plain directory uses (default: the one it matches). With `out`, report.json and recovery.png go there.
    """
    from transformers import AutoTokenizer

    from xmerge.evals.sets import domain_eval_sets
    from xmerge.experts.seed import SeedTeacher, checkout_cached

    if suite not in SUITES:
        raise XmergeError(f"unknown suite {suite!r}; choose one of {sorted(SUITES)}")
    device = resolve_device(device)
    model = resolve_subject(reg, ref_or_dir, device)
    reference = None if against in (None, TEACHER) else resolve_subject(reg, against, device)
    the_seed = model.seed or (reference.seed if reference is not None else None)
    if the_seed is None or (seed is not None and model.seed is None):
        the_seed = _seed_for_directory(reg, model, seed)
    elif seed is not None and seed != the_seed.name:
        raise XmergeError(f"{model.ref} belongs to seed {the_seed.name!r}, not {seed!r}; drop --seed")
    teacher = SeedTeacher(the_seed, device)
    reference = reference or teacher_subject(the_seed, teacher)
    domains = tuple(sorted(set(domains if domains is not None else model.domains)))
    if not domains:
        raise XmergeError("no domains to evaluate; pass --domains math,code")

    say(f"eval sets of seed {the_seed.name}: {', '.join(domains)}")
    built = domain_eval_sets(reg, the_seed, domains, suite=suite, device=device, teacher=teacher)
    sets = {d: (built[d], eval_set_fingerprint(built[d])) for d in domains}
    reference_key = _reference_key(reference, {d: fp for d, (_, fp) in sets.items()})
    evaluated: list[str] = []
    found = reg.find_eval(model.hash, suite, reference_key)
    cached = found is not None
    if cached:
        metrics = metrics_from_json(found.metrics["model"])
        reference_metrics = metrics_from_json(found.metrics["reference"])
    else:
        tokenizer = AutoTokenizer.from_pretrained(checkout_cached(reg, the_seed))
        say(f"evaluating {model.ref}")
        metrics = domain_metrics(reg, model, sets, suite, tokenizer, evaluated)
        say(f"evaluating {reference.ref}")
        reference_metrics = domain_metrics(reg, reference, sets, suite, tokenizer, evaluated)
    verdict = compare(metrics, reference_metrics, tau)
    if not cached:
        found = reg.record_eval(model_ref=model.ref, model_hash=model.hash, suite=suite, reference_ref=reference.ref,
                                reference_hash=reference_key,
                                metrics={"model": metrics_to_json(metrics),
                                         "reference": metrics_to_json(reference_metrics)},
                                w_tau=verdict.report["w_tau"], tau_star=verdict.report["tau_star"],
                                report_path=str(Path(out) / "report.json") if out is not None else None)
    report = EvalReport(model, reference, suite, domains, tuple(metrics), tuple(reference_metrics), verdict,
                        cached, tuple(evaluated), found.id)
    if out is not None:
        write_outputs(report, out)
    return report
