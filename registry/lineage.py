"""Lineage trees: composition -> operations / parent / member experts -> seed -> teacher.

Every node is {"kind", "ref", "details": {...}, "children": [nodes]}: one shape for JSON and rich trees.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from xmerge.registry.records import Composition, Expert, Operation, Seed

if TYPE_CHECKING:
    from xmerge.registry.registry import Registry


def lineage(reg: Registry, ref: str) -> dict:
    obj = reg.resolve(ref)
    if isinstance(obj, Seed):
        return _seed(obj)
    if isinstance(obj, Expert):
        return _expert(reg, obj, weight=None)
    return _composition(reg, obj)


def _node(kind: str, ref: str, details: dict, children: list[dict] | None = None) -> dict:
    return {"kind": kind, "ref": ref, "details": details, "children": children or []}


def _composition(reg: Registry, comp: Composition) -> dict:
    children = [_operation(op) for op in reg.list_operations(result_composition_id=comp.id)]
    if comp.parent_id is not None:
        children.append(_composition(reg, reg.get_composition(comp.parent_id)))
    children += [_expert(reg, reg.get_expert(m.expert_id), weight=m.weight) for m in comp.members]
    return _node("composition", f"comp:{comp.ref}",
                 {"id": comp.id, "method": comp.method, "params": comp.params, "weights_sha": comp.weights_sha,
                  "created_at": comp.created_at.isoformat()}, children)


def _operation(op: Operation) -> dict:
    return _node("operation", f"operation:{op.id}",
                 {"kind": op.kind, "decision": op.decision, "who": op.who, "inputs": op.inputs,
                  "report": op.report, "created_at": op.created_at.isoformat()})


def _expert(reg: Registry, expert: Expert, weight: float | None) -> dict:
    details = {"id": expert.id, "team": expert.team, "status": expert.status, "weights_sha": expert.weights_sha,
               "data_fingerprint": expert.data_fingerprint, "metrics": expert.metrics}
    if weight is not None:
        details["weight"] = weight
    return _node("expert", f"expert:{expert.id} {expert.ref}", details,
                 [_seed(reg.resolve(f"seed:{expert.seed}"))])


def _seed(seed: Seed) -> dict:
    teacher = _node("teacher", seed.teacher_spec, {"hash": seed.teacher_hash})
    return _node("seed", f"seed:{seed.name}", {"id": seed.id, "weights_sha": seed.weights_sha}, [teacher])
