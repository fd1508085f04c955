"""compose / patch / replace on a real registry: exact formulas, the gate, forced and rejected attempts, search."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from sqlalchemy import func, select

from common import add_noised_expert as add_expert
from common import tiny_registry, tiny_teacher
from xmerge.evals.quick import EvalSet
from xmerge.errors import XmergeError
from xmerge.experts.seed import checkout_cached
from xmerge.experts.targets import topk_logprobs
from xmerge.merge.operations import compose, patch, replace
from xmerge.merge.recipe import RECIPE_FILE, run_recipe
from xmerge.merge.search import Score, search_weights
from xmerge.registry.schema import EvalRunRow

GOOD_NOISE = 1e-5  # an expert that stays within any gate tolerance of the seed
BAD_NOISE = 0.5  # a "noised expert": large noise on every tensor


@pytest.fixture()
def reg(tmp_path):
    return tiny_registry(tmp_path)


def tiny_eval_sets(domains):
    """Random token blocks per domain (fixed per domain) with the tiny teacher's top-16 targets."""
    teacher = tiny_teacher("llama")
    sets = {}
    for domain in domains:
        generator = torch.Generator().manual_seed(sum(map(ord, domain)))
        blocks = torch.randint(0, 256, (2, 32), generator=generator)
        with torch.no_grad():
            indices, logprobs = topk_logprobs(teacher(input_ids=blocks).logits, 16)
        sets[domain] = EvalSet(blocks=blocks, target_indices=indices, target_logprobs=logprobs)
    return sets


def weights_of(reg, record) -> dict[str, torch.Tensor]:
    return load_file(reg.blob_path(record.weights_sha))


def expected_sum(reg, experts_and_weights) -> dict[str, torch.Tensor]:
    """Σ λ_i θ_i computed directly in fp32, experts in order (the documented linear formula)."""
    loaded = [(weights_of(reg, e), w) for e, w in experts_and_weights]
    return {name: sum_in_order([(t[name], w) for t, w in loaded]) for name in loaded[0][0]}


def sum_in_order(terms):
    acc = torch.zeros_like(terms[0][0], dtype=torch.float32)
    for tensor, weight in terms:
        acc.addcmul_(tensor.float(), torch.tensor(weight, dtype=torch.float32))
    return acc


def assert_tensors_equal(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


def test_compose_is_the_exact_weighted_sum_and_is_recorded(reg, tmp_path):
    math, code = add_expert(reg, "math", GOOD_NOISE, 1), add_expert(reg, "code", GOOD_NOISE, 2)
    result = compose(reg, "mix", f"math=1,{code.id}=3", eval_sets=tiny_eval_sets)

    assert result.decision == "accepted" and result.parent is None
    comp = result.composition
    assert (comp.name, comp.version, comp.method, comp.parent_id) == ("mix", 1, "linear", None)
    assert [(m.expert_id, m.weight) for m in comp.members] == [(math.id, 0.25), (code.id, 0.75)]
    merged = weights_of(reg, comp)
    assert_tensors_equal(merged, expected_sum(reg, [(math, 0.25), (code, 0.75)]))
    seed = weights_of(reg, reg.resolve("seed:tiny"))
    assert {n: (t.shape, t.dtype) for n, t in merged.items()} == {n: (t.shape, t.dtype) for n, t in seed.items()}

    # recorded: one accepted compose whose gate compared each domain with its own expert
    (op,) = reg.list_operations(composition="mix")
    assert (op.kind, op.decision, op.result_composition_id) == ("compose", "accepted", comp.id)
    assert op.report["gate"]["passed"] and op.report["reference"] == "each member's expert on its own domain"
    assert {m["name"] for m in op.report["gate"]["metrics"]} == {
        f"{d}/{k}" for d in ("code", "math") for k in ("ce", "top1", "exp_neg_kl")}

    # the stored recipe reproduces the composition bit for bit from the registry
    recipe = reg.checkout(comp, tmp_path / "checkout") / RECIPE_FILE
    again = run_recipe(recipe, tmp_path / "again", resolve=lambda ref: checkout_cached(reg, reg.resolve(ref)))
    assert_tensors_equal(load_file(again / "model.safetensors"), merged)


def test_patch_and_replace_follow_the_member_formulas(reg):
    math, code = add_expert(reg, "math", GOOD_NOISE, 1), add_expert(reg, "code", GOOD_NOISE, 2)
    chat, code2 = add_expert(reg, "chat", GOOD_NOISE, 3), add_expert(reg, "code", GOOD_NOISE, 4)
    v1 = compose(reg, "mix", "math=0.5,code=0.5", eval_sets=tiny_eval_sets).composition
    assert v1.members[1].expert_id == code2.id, "a domain picks its newest expert"

    # patch adds chat at 0.2 and keeps the total: the others scale by (1 - 0.2) / 1
    patched = patch(reg, "mix", "chat", 0.2, eval_sets=tiny_eval_sets)
    v2 = patched.composition
    assert patched.decision == "accepted" and (v2.version, v2.parent_id) == (2, v1.id)
    assert [(m.expert_id, m.weight) for m in v2.members] == [(math.id, 0.4), (chat.id, 0.2), (code2.id, 0.4)]
    assert_tensors_equal(weights_of(reg, v2), expected_sum(reg, [(math, 0.4), (chat, 0.2), (code2, 0.4)]))
    assert patched.report["gate"]["target_domain"] == "chat"

    # replace swaps code's expert, every weight unchanged
    replaced = replace(reg, "mix", "code", f"code@v{code.version}", eval_sets=tiny_eval_sets)
    v3 = replaced.composition
    assert replaced.decision == "accepted" and (v3.version, v3.parent_id) == (3, v2.id)
    assert [(m.expert_id, m.weight) for m in v3.members] == [(math.id, 0.4), (code.id, 0.4), (chat.id, 0.2)]
    assert_tensors_equal(weights_of(reg, v3), expected_sum(reg, [(math, 0.4), (code, 0.4), (chat, 0.2)]))

    # v2 was evaluated once per domain, as the patch's candidate; the replace found it in the cache
    with reg.engine.connect() as connection:
        runs = connection.scalar(select(func.count()).select_from(EvalRunRow)
                                 .where(EvalRunRow.model_hash == v2.weights_sha))
    assert runs == 3


def test_noised_replace_is_rejected_then_forced(reg):
    add_expert(reg, "math", GOOD_NOISE, 1), add_expert(reg, "code", GOOD_NOISE, 2)
    v1 = compose(reg, "mix", "math=0.5,code=0.5", eval_sets=tiny_eval_sets).composition
    noised = add_expert(reg, "code", BAD_NOISE, 5)

    rejected = replace(reg, "mix", "code", str(noised.id), eval_sets=tiny_eval_sets)
    assert rejected.decision == "rejected" and rejected.composition is None
    assert [c.id for c in reg.list_compositions("mix")] == [v1.id], "the current composition is unchanged"
    op = rejected.operation
    assert (op.kind, op.decision, op.result_composition_id) == ("replace", "rejected", None)
    assert op.report["gate"]["failing"] and all(line.split("/")[0] in ("code", "math")
                                                for line in op.report["gate"]["failing"])
    assert any(line.startswith("code/") for line in op.report["gate"]["failing"])
    assert not reg.blobs.path(op.report["candidate_sha256"]).exists(), "a rejected candidate stores no blob"

    forced = replace(reg, "mix", "code", str(noised.id), force=True, eval_sets=tiny_eval_sets)
    assert forced.decision == "forced" and forced.operation.decision == "forced"
    assert (forced.composition.version, forced.composition.parent_id) == (2, v1.id)
    assert forced.operation.report["gate"]["failing"] == op.report["gate"]["failing"]
    assert forced.composition.weights_sha == op.report["candidate_sha256"], "same candidate, bit for bit"
    assert [o.decision for o in reg.list_operations(composition="mix")] == ["accepted", "rejected", "forced"]


def test_compose_without_gate_is_recorded_as_forced(reg):
    add_expert(reg, "math", GOOD_NOISE, 1), add_expert(reg, "code", BAD_NOISE, 2)

    def no_eval(domains):
        raise AssertionError("--no-gate must not evaluate")

    result = compose(reg, "mix", "math=0.5,code=0.5", gate=False, eval_sets=no_eval)
    assert result.decision == "forced" and "gate" not in result.report
    assert result.operation.report["reason"].startswith("gate skipped")


def test_first_compose_with_a_noised_member_is_rejected(reg):
    add_expert(reg, "math", GOOD_NOISE, 1), add_expert(reg, "code", BAD_NOISE, 2)
    result = compose(reg, "mix", "math=0.5,code=0.5", eval_sets=tiny_eval_sets)
    assert result.decision == "rejected" and reg.list_compositions() == []
    assert any(line.startswith("math/") for line in result.report["gate"]["failing"])


def test_search_weights_is_deterministic_within_budget_and_finds_the_optimum():
    target = (0.6, 0.3, 0.1)
    calls = []

    def score(weights):
        calls.append(weights)
        distance = sum((w - t) ** 2 for w, t in zip(weights, target))
        return Score(1 - distance, float(distance < 0.01))

    first = search_weights(score, 3, 40, seed=7)
    assert len(calls) == len(first.trace) <= 40 and len(set(calls)) == len(calls)
    assert all(abs(sum(t.weights) - 1) < 1e-5 and min(t.weights) >= 0 for t in first.trace)
    assert max(abs(w - t) for w, t in zip(first.best.weights, target)) < 0.05
    assert first.best == max(first.trace, key=lambda t: t.score)
    again = search_weights(score, 3, 40, seed=7)
    assert again.trace == first.trace
    assert search_weights(score, 3, 40, seed=8).trace != first.trace


def test_compose_with_search_records_the_trace_and_composes_the_best(reg):
    math, code = add_expert(reg, "math", GOOD_NOISE, 1), add_expert(reg, "code", 0.02, 2)
    result = compose(reg, "mix", "math=1,code=1", search_budget=5, eval_sets=tiny_eval_sets)
    search = result.report["search"]
    assert search["evaluations"] == 5 == len(search["trace"])
    assert search["trace"][0]["weights"] == [0.5, 0.5] and search["trace"][0]["phase"] == "start"
    best = max(search["trace"], key=lambda t: (t["mean_recovery"], t["w_tau"]))
    assert search["best"]["weights"] == best["weights"]
    (op,) = reg.list_operations(composition="mix")
    assert op.report["search"] == search
    assert result.decision == "accepted"
    assert [m.weight for m in result.composition.members] == best["weights"]
    assert_tensors_equal(weights_of(reg, result.composition),
                         expected_sum(reg, [(math, best["weights"][0]), (code, best["weights"][1])]))


def test_an_expert_of_another_shape_never_reaches_a_merge(reg):
    """Shape mismatches are refused when the expert is registered, so compose never sees one."""
    tensors = load_file(reg.blob_path(reg.resolve("seed:tiny").weights_sha))
    name = next(iter(tensors))
    tensors[name] = torch.zeros(tensors[name].shape[0] + 1, *tensors[name].shape[1:])
    save_file(tensors, reg.home / "wrong.safetensors")
    with pytest.raises(XmergeError, match=f"does not match seed 'tiny' tensors: {name}"):
        reg.add_expert("tiny", "math", reg.home / "wrong.safetensors")
    assert reg.list_experts() == []
