"""compose / patch / replace on the registry: resolve members, merge a candidate, gate it, register, record.

Every attempt that gets as far as a candidate is recorded as an operation (kind compose, patch or
replace) with its report; only accepted and forced attempts register a new composition version,
whose parent is the version the candidate was gated against. Bad input raises XmergeError before
anything is written. Patch and replace re-merge from the member list (see members.py for the
formulas and why), with the composition's own method and settings. Gate references: gate.py.
"""

from __future__ import annotations

import getpass
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from xmerge.errors import XmergeError
from xmerge.evals.metrics import GateVerdict, compare, recoveries, win_tie_rate
from xmerge.evals.report import json_safe
from xmerge.experts.seed import checkout_cached
from xmerge.merge.checkpoint import MODEL_FILE
from xmerge.merge.gate import EvalSetsFn, ModelEvaluator, decide
from xmerge.merge.members import Member, patch_members, replace_member
from xmerge.merge.methods import MERGE_METHODS, merge_models
from xmerge.merge.recipe import CARD_FILE, RECIPE_FILE, MergeRecipe, write_recipe
from xmerge.merge.search import Score, check_search, search_weights
from xmerge.merge.weights import parse_weights
from xmerge.registry import Composition, Expert, Operation, Registry, Seed
from xmerge.registry.blobs import file_sha256

RANDOM_SEED = 0  # fixes the random drops of dare/della, so a recipe reproduces its composition
RECOVERY_CAP = 2.0  # search averages min(r, cap): one unbounded win (x/0) must not swamp the mean
Say = Callable[[str], None]


@dataclass(frozen=True)
class OperationResult:
    kind: str
    decision: str  # accepted, rejected or forced
    operation: Operation
    members: list[Member]  # the candidate's members; model = "expert:ID"
    report: dict
    composition: Composition | None  # the new version (accepted / forced), else None
    parent: Composition | None  # the version gated against (None for a first compose)


@dataclass
class _Context:
    reg: Registry
    seed: Seed
    evaluator: ModelEvaluator
    say: Say


def compose(reg: Registry, name: str, weights_text: str, *, seed: str | None = None, method: str = "linear",
            normalize: bool = True, allow_negative: bool = False, gate: bool = True, tau: float = 0.02,
            force: bool = False, search_budget: int | None = None, search_seed: int = 0, who: str | None = None,
            eval_sets: EvalSetsFn | None = None, device: str = "cpu", say: Say | None = None) -> OperationResult:
    """Merge the experts named in `weights_text` ("math=0.5,17=0.5": a domain = its newest ready expert of
    the seed, a number = that expert id) into the next version of composition `name`.

    With search_budget, the weights are searched on the simplex (the given ones are the start point)
    and the best candidate is composed. gate=False registers without evaluating (decision forced)."""
    if method not in MERGE_METHODS:
        raise XmergeError(f"unknown merge method {method!r}; choose one of {', '.join(MERGE_METHODS)}")
    _check_tau(tau)
    searching = search_budget is not None
    if searching and allow_negative:
        raise XmergeError("--search looks for weights on the simplex (≥ 0, sum 1); drop --allow-negative")
    parsed = parse_weights(weights_text, allow_negative=allow_negative, normalize=normalize or searching)
    seed_rec, experts = _resolve_weights(reg, parsed, seed)
    if searching:
        check_search(len(experts), search_budget)
    current = _newest(reg, name)
    if current is not None and current.seed != seed_rec.name:
        raise XmergeError(f"composition {name!r} is built on seed {current.seed!r}, these experts on "
                          f"{seed_rec.name!r}; choose another composition name")
    settings = {"normalize": False} if method == "linear" else {}
    ctx = _context(reg, seed_rec, eval_sets, device, say)
    pairs = sorted(zip(experts, parsed.values()), key=lambda pair: pair[0].id)  # merge order: see _attempt
    experts, weights = [e for e, _ in pairs], [w for _, w in pairs]
    inputs = {"weights": weights_text, "method": method, "normalize": normalize, "allow_negative": allow_negative,
              "gate": gate, "tau": tau, "force": force, "search_budget": search_budget, "search_seed": search_seed}
    extra: dict = {}
    if searching:
        found = _search(ctx, name, experts, method, settings, weights, search_budget, search_seed, tau)
        weights, extra["search"] = list(found.best.weights), found.report()
    members = [Member(e.domain, f"expert:{e.id}", w) for e, w in zip(experts, weights)]
    return _attempt(ctx, "compose", name, members, {e.id: e for e in experts}, method, settings, current,
                    target_domain=None, gate=gate, tau=tau, force=force, who=who, inputs=inputs, extra=extra)


def patch(reg: Registry, composition_ref: str, expert_ref: str, weight: float | None = None, *,
          keep_total: bool = True, tau: float = 0.02, force: bool = False, who: str | None = None,
          eval_sets: EvalSetsFn | None = None, device: str = "cpu", say: Say | None = None) -> OperationResult:
    """Add the expert's domain to the newest version of a composition, or update that domain's expert
    and/or weight (members.patch_members); gated against the current version, the domain as target."""
    _check_tau(tau)
    current = _current_composition(reg, composition_ref)
    seed_rec = reg.resolve(f"seed:{current.seed}")
    expert = _expert_in_seed(reg, current.seed, expert_ref)
    members, experts = _members_of(reg, current)
    experts[expert.id] = expert
    new_members = patch_members(members, expert.domain, f"expert:{expert.id}", weight, keep_total=keep_total)
    inputs = {"composition": current.ref, "expert": expert_ref, "expert_id": expert.id, "weight": weight,
              "keep_total": keep_total, "tau": tau, "force": force}
    ctx = _context(reg, seed_rec, eval_sets, device, say)
    return _attempt(ctx, "patch", current.name, new_members, experts, current.method, current.params, current,
                    target_domain=expert.domain, gate=True, tau=tau, force=force, who=who, inputs=inputs)


def replace(reg: Registry, composition_ref: str, domain: str, expert_ref: str, *, tau: float = 0.02,
            force: bool = False, who: str | None = None, eval_sets: EvalSetsFn | None = None, device: str = "cpu",
            say: Say | None = None) -> OperationResult:
    """Swap `domain`'s expert in the newest version of a composition for `expert_ref`, weights unchanged
    (members.replace_member); gated against the current version, the domain as target."""
    _check_tau(tau)
    current = _current_composition(reg, composition_ref)
    seed_rec = reg.resolve(f"seed:{current.seed}")
    expert = _expert_in_seed(reg, current.seed, expert_ref)
    if expert.domain != domain:
        raise XmergeError(f"expert {expert.id} ({expert.ref}) is a {expert.domain!r} expert, not {domain!r}; "
                          f"pick a {domain} expert, or patch to add {expert.domain!r}")
    members, experts = _members_of(reg, current)
    experts[expert.id] = expert
    new_members = replace_member(members, domain, f"expert:{expert.id}")
    inputs = {"composition": current.ref, "domain": domain, "expert": expert_ref, "expert_id": expert.id,
              "tau": tau, "force": force}
    ctx = _context(reg, seed_rec, eval_sets, device, say)
    return _attempt(ctx, "replace", current.name, new_members, experts, current.method, current.params, current,
                    target_domain=domain, gate=True, tau=tau, force=force, who=who, inputs=inputs)


# ---- one attempt: merge, gate, register, record ------------------------------------------------------


def _attempt(ctx: _Context, kind: str, name: str, members: list[Member], experts: dict[int, Expert], method: str,
             settings: dict, parent: Composition | None, *, target_domain: str | None, gate: bool, tau: float,
             force: bool, who: str | None, inputs: dict, extra: dict | None = None) -> OperationResult:
    reg = ctx.reg
    # the registry lists members by expert id: merging in that order lets its rows reproduce the bits
    members = sorted(members, key=_expert_id)
    member_experts = [experts[_expert_id(m)] for m in members]
    with tempfile.TemporaryDirectory(prefix=".merge-", dir=reg.home) as tmp:
        ctx.say(f"merging {len(members)} experts ({method})")
        candidate = _merge(ctx, name, members, member_experts, method, settings, Path(tmp) / "candidate")
        candidate_sha = file_sha256(candidate / MODEL_FILE)
        report: dict = {
            "members": [{"domain": m.domain, "expert_id": e.id, "expert": e.ref, "weight": m.weight}
                        for m, e in zip(members, member_experts)],
            "method": method, "settings": settings, "candidate_sha256": candidate_sha, **(extra or {}),
        }
        verdict = None
        if gate:
            verdict, report["reference"] = _gate(ctx, name, candidate, candidate_sha, member_experts, parent,
                                                 tau, target_domain)
            report["gate"] = verdict.report
        decision = decide(verdict.passed if verdict is not None else None, force)
        report["reason"] = _reason(decision, verdict)
        composition = None
        if decision != "rejected":
            composition = reg.add_composition(
                name, seed=ctx.seed.name, members=[(e.id, m.weight) for m, e in zip(members, member_experts)],
                method=method, params=settings, parent_id=parent.id if parent is not None else None,
                weights=candidate / MODEL_FILE,
                extra_files={RECIPE_FILE: candidate / RECIPE_FILE, CARD_FILE: candidate / CARD_FILE})
    report = json_safe(report)
    operation = reg.record_operation(kind, composition=name, inputs=inputs, report=report, decision=decision,
                                     who=who or _user(), result_composition_id=composition.id if composition else None)
    return OperationResult(kind, decision, operation, members, report, composition, parent)


def _merge(ctx: _Context, name: str, members: Sequence[Member], experts: Sequence[Expert], method: str,
           settings: dict, out: Path) -> Path:
    """Merge into the new dir `out` with the recipe and model card; expert paths in errors become refs."""
    uses_base = MERGE_METHODS[method].uses_base
    dirs = [checkout_cached(ctx.reg, e) for e in experts]
    try:
        merge_models(method, dirs, [m.weight for m in members], out,
                     base=checkout_cached(ctx.reg, ctx.seed) if uses_base else None, params=settings,
                     random_seed=RANDOM_SEED if uses_base else None)
    except XmergeError as exc:
        message = str(exc)
        for model_dir, expert in zip(dirs, experts):
            message = message.replace(str(model_dir), f"{expert.ref} [id {expert.id}]")
        raise XmergeError(message) from None
    recipe = MergeRecipe.from_members(members, method, base_model=ctx.seed.ref if uses_base else None,
                                      parameters=settings, random_seed=RANDOM_SEED if uses_base else None)
    write_recipe(recipe, out, name=name)
    return out


def _gate(ctx: _Context, name: str, candidate: Path, candidate_sha: str, experts: Sequence[Expert],
          parent: Composition | None, tau: float, target_domain: str | None) -> tuple[GateVerdict, str]:
    """The verdict on the candidate and the name of what it was compared with."""
    evaluator = ctx.evaluator
    domains = {e.domain for e in experts}
    if parent is None:
        ctx.say("evaluating each expert on its own domain (reference of a first compose)")
        reference, reference_name = evaluator.expert_reference(experts), "each member's expert on its own domain"
    else:
        domains |= {ctx.reg.get_expert(m.expert_id).domain for m in parent.members}
        ctx.say(f"evaluating the current version {parent.ref}")
        reference = evaluator.metrics(checkout_cached(ctx.reg, parent), parent.weights_sha, parent.ref,
                                      sorted(domains))
        reference_name = f"comp:{parent.ref}"
    ctx.say("evaluating the candidate")
    metrics = evaluator.metrics(candidate, candidate_sha, f"{name} (candidate)", sorted(domains))
    return compare(metrics, reference, tau, target_domain=target_domain), reference_name


def _search(ctx: _Context, name: str, experts: Sequence[Expert], method: str, settings: dict,
            start: Sequence[float], budget: int, seed: int, tau: float):
    """search_weights with score = (mean capped recovery, W_τ) of a merge vs each expert on its own domain."""
    reference = ctx.evaluator.expert_reference(experts)
    domains = sorted({e.domain for e in experts})

    def score(weights: tuple[float, ...]) -> Score:
        members = [Member(e.domain, f"expert:{e.id}", w) for e, w in zip(experts, weights)]
        with tempfile.TemporaryDirectory(prefix=".search-", dir=ctx.reg.home) as tmp:
            out = _merge(ctx, name, members, experts, method, settings, Path(tmp) / "trial")
            ctx.say(f"search: evaluating weights {', '.join(f'{w:.3f}' for w in weights)}")
            metrics = ctx.evaluator.metrics(out, file_sha256(out / MODEL_FILE), f"{name} (search trial)", domains)
        rs = [r.recovery for r in recoveries(metrics, reference)]
        return Score(sum(min(r, RECOVERY_CAP) for r in rs) / len(rs), win_tie_rate(rs, tau))

    return search_weights(score, len(experts), budget, start=start, seed=seed)


# ---- resolving names to registry records ------------------------------------------------------------


def _resolve_weights(reg: Registry, weights: dict[str, float], seed: str | None) -> tuple[Seed, list[Expert]]:
    """The seed and the expert of every --weights key, in order; all of one seed, each domain once."""
    by_id = {key: reg.get_expert(int(key)) for key in weights if key.isdigit()}
    seed_names = sorted({e.seed for e in by_id.values()} | ({seed} if seed else set()))
    if len(seed_names) > 1:
        owners = ", ".join(f"expert {e.id} is of seed {e.seed!r}" for e in by_id.values())
        given = f"--seed is {seed!r}; " if seed else ""
        raise XmergeError(f"experts of different seeds: {given}{owners}; only experts of one seed can be merged")
    if seed_names:
        seed_rec = reg.resolve(f"seed:{seed_names[0]}")
    else:
        seeds = reg.list_seeds()
        if len(seeds) != 1:
            raise XmergeError("no seed is registered; create one with `xmerge seed create`" if not seeds else
                              f"several seeds ({', '.join(s.name for s in seeds)}); pass --seed to pick one")
        seed_rec = seeds[0]
    experts = [by_id[key] if key in by_id else _newest_ready(reg, seed_rec.name, key) for key in weights]
    for expert in experts:
        _check_ready(expert)
    domains = [e.domain for e in experts]
    for domain in domains:
        if domains.count(domain) > 1:
            ids = [e.id for e in experts if e.domain == domain]
            raise XmergeError(f"experts {ids} all cover domain {domain!r}; a composition has one expert per domain")
    return seed_rec, experts


def _newest_ready(reg: Registry, seed: str, domain: str) -> Expert:
    ready = [e for e in reg.list_experts(seed=seed, domain=domain) if e.status == "ready"]
    if not ready:
        raise XmergeError(f"seed {seed!r} has no ready expert for domain {domain!r}; "
                          "see `xmerge experts list` (a number in --weights is an expert id)")
    return max(ready, key=lambda e: e.version)


def _expert_in_seed(reg: Registry, seed: str, ref: str) -> Expert:
    """An expert by id, expert:ID, DOMAIN[@vN] (within `seed`) or SEED/DOMAIN[@vN]; ready and of `seed`."""
    if ref.isdigit():
        expert = reg.get_expert(int(ref))
    else:
        found = reg.resolve(ref if ":" in ref or "/" in ref else f"{seed}/{ref}")
        if not isinstance(found, Expert):
            raise XmergeError(f"{ref!r} is not an expert; give an expert id, DOMAIN or DOMAIN@vN")
        expert = found
    if expert.seed != seed:
        raise XmergeError(f"expert {expert.id} ({expert.ref}) is of seed {expert.seed!r}, the composition of "
                          f"{seed!r}; only experts of one seed can be merged")
    _check_ready(expert)
    return expert


def _check_ready(expert: Expert) -> None:
    if expert.status != "ready":
        raise XmergeError(f"expert {expert.id} ({expert.ref}) is {expert.status!r}; only ready experts can be merged")


def _newest(reg: Registry, name: str) -> Composition | None:
    versions = reg.list_compositions(name=name)
    return max(versions, key=lambda c: c.version) if versions else None


def _current_composition(reg: Registry, ref: str) -> Composition:
    """The composition `ref` names, which must be its name's newest version (patches never fork history)."""
    found = reg.resolve(ref if ":" in ref else f"comp:{ref}")
    if not isinstance(found, Composition):
        raise XmergeError(f"{ref!r} is not a composition; see `xmerge compositions list`")
    newest = _newest(reg, found.name)
    if newest.id != found.id:
        raise XmergeError(f"{found.ref} is not the newest version of {found.name!r} ({newest.ref}); "
                          f"patch or replace {newest.ref}")
    return found


def _members_of(reg: Registry, composition: Composition) -> tuple[list[Member], dict[int, Expert]]:
    experts = {m.expert_id: reg.get_expert(m.expert_id) for m in composition.members}
    members = [Member(experts[m.expert_id].domain, f"expert:{m.expert_id}", m.weight) for m in composition.members]
    return members, experts


def _expert_id(member: Member) -> int:
    return int(member.model.removeprefix("expert:"))


def _context(reg: Registry, seed: Seed, eval_sets: EvalSetsFn | None, device: str, say: Say | None) -> _Context:
    return _Context(reg, seed, ModelEvaluator(reg, seed, eval_sets=eval_sets, device=device), say or (lambda _: None))


def _check_tau(tau: float) -> None:
    if not 0 <= tau < 1:
        raise XmergeError(f"--tau {tau} must lie in [0, 1), e.g. 0.02 for a 2% tolerance")


def _reason(decision: str, verdict: GateVerdict | None) -> str:
    if verdict is None:
        return "gate skipped (--no-gate); registered without evaluation"
    if verdict.passed:
        return "every metric within τ of the reference"
    failing = "; ".join(verdict.failing)
    return f"{'registered despite regressions (--force)' if decision == 'forced' else 'regressed'}: {failing}"


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"
