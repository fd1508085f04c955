"""Patch and replace as pure functions over a composition's member list.

A composition is its members (domain, expert, weight λ); its weights are θ = Σ_j λ_j θ_j
(or the mergekit method applied to the same members). Both operations return a new member
list, and the new composition is a fresh merge of that list.

patch(d, θ', λ'), with S = Σ_j λ_j the current total and λ_d = 0 when d is a new domain:
    keep_total (default): every other member's weight is scaled by c = (S − λ') / (S − λ_d), so
        the total stays S (a normalised composition stays normalised) and the others keep their
        proportions:                   θ_new = Σ_{j≠d} c·λ_j θ_j + λ' θ'
    keep_total=False: the others keep their weights:  θ_new = Σ_{j≠d} λ_j θ_j + λ' θ'
    Updating d without a new weight keeps λ' = λ_d.

replace(d, θ'): the same members and weights, d's expert swapped:
    θ_new = Σ_{j≠d} λ_j θ_j + λ_d θ'

Why re-merge from the members rather than θ + λ'θ' − λ_dθ_d on the stored merge:
- exact: the output is Σλθ computed once from the experts, bit-identical to composing the new
  member list directly; the delta form adds two more rounded terms (in the output dtype, e.g.
  bf16) on every patch, so a patch and its undo do not return to the original bits and errors
  accumulate across repeated patches;
- general: it is the same code path for keep_total rescaling (which touches every member anyway)
  and for the non-linear mergekit methods, where no delta form exists;
- same cost class: the merge streams tensor by tensor, so re-merging N experts reads N files
  instead of 3, with constant memory; for the handful of domains of a composition that is seconds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from xmerge.errors import XmergeError


@dataclass(frozen=True)
class Member:
    """One member of a composition: the domain it covers, its expert (a model reference) and weight."""

    domain: str
    model: str
    weight: float


def patch_members(
    members: Sequence[Member], domain: str, model: str, weight: float | None = None, *, keep_total: bool = True
) -> list[Member]:
    """Members after adding domain `domain` with expert `model`, or updating its expert/weight."""
    current = _index(members, domain)
    if weight is None:
        if current is None:
            raise XmergeError(f"domain {domain!r} is new to this composition; give it a weight")
        weight = members[current].weight
    if not math.isfinite(weight):
        raise XmergeError(f"weight of {domain!r} must be a finite number, got {weight}")
    new_member = Member(domain, model, weight)
    if current is not None and members[current] == new_member:
        raise XmergeError(f"{domain!r} already has expert {model} at weight {weight:g}; nothing to patch")
    others = [m for m in members if m.domain != domain]
    if keep_total and others:
        total = sum(m.weight for m in members)
        others_total = total - (members[current].weight if current is not None else 0.0)
        if others_total == 0 or (total - weight) / others_total < 0:
            raise XmergeError(
                f"cannot give {domain!r} weight {weight:g} and keep the composition's total {total:g} "
                "with the other members' weights; patch without keeping the total"
            )
        scale = (total - weight) / others_total
        others = [replace(m, weight=m.weight * scale) for m in others]
    patched = iter(others)
    result = [new_member if m.domain == domain else next(patched) for m in members]
    return result if current is not None else [*result, new_member]


def replace_member(members: Sequence[Member], domain: str, model: str) -> list[Member]:
    """Members with domain `domain`'s expert swapped for `model`, every weight unchanged."""
    current = _index(members, domain)
    if current is None:
        raise XmergeError(
            f"domain {domain!r} is not in this composition (it has {', '.join(m.domain for m in members)}); "
            "use patch to add it"
        )
    if members[current].model == model:
        raise XmergeError(f"{domain!r} already uses expert {model}; nothing to replace")
    return [replace(m, model=model) if m.domain == domain else m for m in members]


def _index(members: Sequence[Member], domain: str) -> int | None:
    domains = [m.domain for m in members]
    if len(set(domains)) != len(domains):
        raise XmergeError(f"a composition lists each domain once, got {domains}")
    return next((i for i, m in enumerate(members) if m.domain == domain), None)
