"""evaluate() on a tiny real teacher: self-comparison is a perfect tie, a noised copy fails the gate."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from xmerge.tests.common import tiny_teacher, tiny_tokenizer
from xmerge.errors import XmergeError
from xmerge.evals.generation import greedy_completions
from xmerge.evals.humaneval import humaneval_pass_at_1
from xmerge.evals.metrics import compare
from xmerge.evals.quick import EvalSet, Suite, evaluate, last_integer, token_metrics
from xmerge.experts.mathgen import math_problems
from xmerge.experts.targets import topk_logprobs

K = 8


@pytest.fixture(scope="module")
def teacher():
    """The tiny teacher with a scaled-up head: random init alone predicts near-uniformly."""
    model = tiny_teacher("llama")
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    return model


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def _targets(model, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher top-k (indices int32, log-probs float16), each (N, T, k), as experts/targets.py caches."""
    with torch.no_grad():
        return topk_logprobs(model(blocks).logits, K)


@pytest.fixture(scope="module")
def eval_sets(teacher, tokenizer):
    sets = {}
    for seed, domain in enumerate(("chat", "math")):
        blocks = torch.randint(0, 256, (6, 48), generator=torch.Generator().manual_seed(seed))
        idx, lp = _targets(teacher, blocks)
        problems = math_problems(3, "heldout") if domain == "math" else ()
        sets[domain] = EvalSet(blocks, idx, lp, problems)
    return sets


def test_token_metrics_match_a_direct_computation(teacher, eval_sets):
    data = eval_sets["chat"]
    student = _noised(teacher, 0.02)
    got = token_metrics(student, data, max_tokens=5 * 48 + 47, batch_size=2)  # 5 whole blocks
    with torch.no_grad():
        logits = student(data.blocks[:5]).logits
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), data.blocks[:5, 1:].reshape(-1))
    top1 = (logits.argmax(-1) == data.target_indices[:5, :, 0]).float().mean()
    kls = []
    for n in range(5):
        for t in range(data.blocks.shape[1]):
            p = torch.softmax(data.target_logprobs[n, t].float(), -1)
            q = torch.softmax(logits[n, t, data.target_indices[n, t].long()], -1)
            kls.append((p * (p / q).log()).sum().item())
    assert got["ce"] == pytest.approx(ce.item(), rel=1e-5)
    assert got["top1"] == pytest.approx(top1.item())
    assert got["exp_neg_kl"] == pytest.approx(math.exp(-sum(kls) / len(kls)), rel=1e-5)
    assert got["exp_neg_kl"] < 0.999 and got["top1"] < 1.0


def test_teacher_against_itself_is_a_perfect_tie(teacher, tokenizer, eval_sets):
    metrics = evaluate(teacher, tokenizer, "quick", eval_sets)
    names = [m.name for m in metrics]
    assert names == ["chat/ce", "chat/top1", "chat/exp_neg_kl",
                     "math/ce", "math/top1", "math/exp_neg_kl", "math/exact_match"]
    by_name = {m.name: m for m in metrics}
    assert by_name["chat/top1"].value == 1.0
    assert by_name["chat/exp_neg_kl"].value == pytest.approx(1.0, abs=1e-6)
    again = evaluate(teacher, tokenizer, "quick", eval_sets)  # the reference: a second, independent run
    verdict = compare(metrics, again, tau=0.0)
    assert verdict.passed and verdict.failing == []
    assert verdict.report["w_tau"]["0"] == 1.0 and verdict.report["tau_star"] == 0.0


def _noised(model, scale: float):
    noisy = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(scale * p.std() * torch.randn(p.shape, generator=gen))
    return noisy


def test_noised_copy_fails_the_gate_and_names_the_metrics(teacher, tokenizer, eval_sets):
    ref = evaluate(teacher, tokenizer, "quick", eval_sets)
    damaged = evaluate(_noised(teacher, 1.0), tokenizer, "quick", eval_sets)
    verdict = compare(damaged, ref, tau=0.02)
    assert not verdict.passed
    failing = {f.split(":")[0] for f in verdict.failing}
    assert {"chat/top1", "chat/exp_neg_kl", "math/top1", "math/exp_neg_kl"} <= failing
    assert failing == {m["name"] for m in verdict.report["metrics"] if m["recovery"] < 0.98}
    assert verdict.report["tau_star"] > 0.02


def _bigram_model(tokenizer, chain: str):
    """A real one-layer Llama that is a bigram table: greedy decoding after chain[0] spells chain[1:].

    One-hot embeddings, the layer's outputs zeroed (residual passes through), lm_head scores
    each chain successor; the chain must not repeat a character.
    """
    ids = [tokenizer(ch, add_special_tokens=False)["input_ids"][0] for ch in chain]
    vocab, hidden = len(tokenizer), 264
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=8,
                                         num_hidden_layers=1, num_attention_heads=4,
                                         num_key_value_heads=4, pad_token_id=256, eos_token_id=258))
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight.zero_()
        model.model.layers[0].mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.copy_(torch.eye(vocab, hidden))
        model.lm_head.weight.zero_()
        for prev, nxt in zip(ids, ids[1:]):
            model.lm_head.weight[nxt, prev] = 10.0
    return model.eval()


def test_math_exact_match_scores_the_last_integer(tokenizer):
    assert last_integer("costs 3 * 4 = 12 dollars. The answer is 1,250.") == 1250
    assert last_integer("no digits") is None and last_integer("it is -7") == -7
    first, second = [p for p in math_problems(6, "heldout") if 10 <= p.answer <= 98][:2]
    digits = str(first.answer)
    assert first.answer != second.answer and digits[0] != digits[1]
    # every prompt ends in "Answer:"; the model answers " <first.answer>" and a newline to every one
    solver = _bigram_model(tokenizer, f": {digits}\n")
    data = {"math": EvalSet(torch.randint(0, 256, (1, 16)), problems=[first, second])}
    metrics = {m.name: m.value for m in evaluate(solver, tokenizer, "quick", data)}
    assert set(metrics) == {"math/ce", "math/exact_match"}  # no teacher targets: no top1 / KL
    assert metrics["math/exact_match"] == 0.5  # right on the first problem only


def test_batched_greedy_equals_one_by_one(teacher, tokenizer):
    prompts = ["Question: 2 + 2?\nAnswer:", "def f(x):\n", "a much longer prompt with many bytes in it", "x"]
    batched = greedy_completions(teacher, tokenizer, prompts, 12, stop=("\n",), batch_size=4)
    single = [greedy_completions(teacher, tokenizer, [p], 12, stop=("\n",))[0] for p in prompts]
    assert batched == single and all("\n" not in c for c in batched)
    no_pad = tiny_tokenizer()
    no_pad.pad_token = None  # many base-model tokenizers have none: padding falls back to eos
    assert greedy_completions(teacher, no_pad, prompts, 12, stop=("\n",), batch_size=4) == batched


def test_full_suite_adds_humaneval_end_to_end(teacher, tokenizer, eval_sets):
    tiny_full = Suite(max_tokens=96, batch_size=2, max_problems=1, answer_tokens=8,
                      humaneval_limit=2, humaneval=True, humaneval_tokens=8)
    sets = {"code": eval_sets["chat"]}
    metrics = {m.name: m.value for m in evaluate(teacher, tokenizer, tiny_full, sets)}
    assert metrics["code/humaneval_pass1"] == 0.0  # random weights write no working Python
    result = humaneval_pass_at_1(teacher, tokenizer, limit=2, max_new_tokens=8)
    assert set(result.results) == {"HumanEval/0", "HumanEval/1"}
    assert all(r.status == "failed" for r in result.results.values())


def test_bad_inputs_are_user_errors(teacher, tokenizer, eval_sets):
    with pytest.raises(XmergeError, match="unknown suite"):
        evaluate(teacher, tokenizer, "fast", eval_sets)
    bad = EvalSet(torch.zeros(2, 8, dtype=torch.long), torch.zeros(2, 7, 3, dtype=torch.long),
                  torch.zeros(2, 7, 3))
    with pytest.raises(XmergeError, match=r"target indices must be \(N, T, k\)"):
        evaluate(teacher, tokenizer, "quick", {"chat": bad})
