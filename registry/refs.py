"""Parsing model refs (seed:NAME, expert:ID, comp:NAME@vN, DOMAIN@vN, SEED/DOMAIN, bare names) to records."""

from __future__ import annotations

import re

from sqlalchemy import select
from sqlalchemy.orm import Session

from xmerge.registry import convert
from xmerge.registry.errors import RegistryError
from xmerge.registry.records import Composition, Expert, Seed
from xmerge.registry.schema import CompositionRow, ExpertRow, SeedRow

VERSIONED = re.compile(r"(?P<name>[^@]+)@v(?P<version>\d+)")


def resolve(s: Session, ref: str) -> Seed | Expert | Composition:
    kind, colon, rest = ref.partition(":")
    if colon and kind == "seed":
        return _seed(s, rest)
    if colon and kind == "expert":
        if not rest.isdigit():
            raise RegistryError(f"'{ref}' is not a valid expert ref: use expert:ID with a number")
        row = s.get(ExpertRow, int(rest))
        if row is None:
            raise RegistryError(f"expert {rest} does not exist; see `xmerge experts list`")
        return convert.expert(s, row)
    if colon and kind == "comp":
        name, version = _split_version(rest)
        found = _compositions(s, name, version)
        if found is None:
            raise RegistryError(f"composition '{rest}' does not exist; see `xmerge compositions list`")
        return found
    if colon:
        raise RegistryError(f"'{ref}' has an unknown prefix '{kind}:'; use seed:, expert: or comp:")

    name, version = _split_version(ref)
    seed_name, slash, domain = name.partition("/")
    if slash:
        seed = _seed(s, seed_name)
        found = _experts(s, domain, version, seed.id)
        if not found:
            raise RegistryError(f"seed '{seed_name}' has no expert '{domain}"
                                f"{f'@v{version}' if version else ''}'; see `xmerge experts list`")
        return found[0]

    candidates: list[tuple[str, Seed | Expert | Composition]] = []
    if version is None:
        seed_row = s.scalar(select(SeedRow).where(SeedRow.name == name))
        if seed_row is not None:
            candidates.append((f"seed:{name}", convert.seed(s, seed_row)))
    experts = _experts(s, name, version, None)
    if len(experts) > 1:
        seeds = ", ".join(sorted(e.seed for e in experts))
        raise RegistryError(f"'{ref}' is ambiguous: domain '{name}' exists under seeds {seeds}; "
                            f"use SEED/{ref} or expert:ID")
    candidates += [(f"expert:{e.id}", e) for e in experts]
    composition = _compositions(s, name, version)
    if composition is not None:
        candidates.append((f"comp:{composition.ref}", composition))
    if not candidates:
        raise RegistryError(f"'{ref}' names no seed, expert or composition; see `xmerge seeds list`, "
                            "`xmerge experts list` and `xmerge compositions list`")
    if len(candidates) > 1:
        raise RegistryError(f"'{ref}' is ambiguous: it could be {' or '.join(c for c, _ in candidates)}; "
                            "use one of those")
    return candidates[0][1]


def _split_version(ref: str) -> tuple[str, int | None]:
    match = VERSIONED.fullmatch(ref)
    return (match["name"], int(match["version"])) if match else (ref, None)


def _seed(s: Session, name: str) -> Seed:
    row = s.scalar(select(SeedRow).where(SeedRow.name == name))
    if row is None:
        raise RegistryError(f"seed '{name}' is not registered; see `xmerge seeds list`")
    return convert.seed(s, row)


def _experts(s: Session, domain: str, version: int | None, seed_id: int | None) -> list[Expert]:
    """The given version (or the newest) of `domain`, one per seed (only `seed_id`'s if given)."""
    query = select(ExpertRow).where(ExpertRow.domain == domain)
    if seed_id is not None:
        query = query.where(ExpertRow.seed_id == seed_id)
    if version is not None:
        query = query.where(ExpertRow.version == version)
    newest: dict[int, ExpertRow] = {}
    for row in s.scalars(query.order_by(ExpertRow.version)):
        newest[row.seed_id] = row
    return [convert.expert(s, row) for row in newest.values()]


def _compositions(s: Session, name: str, version: int | None) -> Composition | None:
    query = select(CompositionRow).where(CompositionRow.name == name)
    if version is not None:
        query = query.where(CompositionRow.version == version)
    row = s.scalar(query.order_by(CompositionRow.version.desc()).limit(1))
    return None if row is None else convert.composition(s, row)
