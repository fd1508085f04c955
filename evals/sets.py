"""Eval sets of a seed's domains: fixed held-out blocks, the teacher's cached top-k, math problems.

Every model of one seed (the seed, its experts, their compositions) is evaluated on the same
sets, so their metrics compare directly and the teacher runs at most once per domain.
"""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer

from xmerge.errors import XmergeError
from xmerge.evals.quick import SUITES, EvalSet
from xmerge.experts.data import PRESETS, load_domain
from xmerge.experts.seed import SeedTeacher, checkout_cached

TOP_K = 64  # enough for top-1 agreement and a top-k KL; keeps the cache small


def _domain_source(reg, seed, domain: str) -> str | None:
    """A preset needs no data; a user domain is evaluated on the data its newest expert trained on."""
    if domain in PRESETS:
        return None
    expert = reg.latest_expert(seed.name, domain)
    data = expert.recipe.get("data") if expert is not None else None
    if not data:
        raise XmergeError(f"domain {domain!r} is not a preset ({', '.join(PRESETS)}) and no expert of seed "
                          f"{seed.name!r} records its data; train one with --data first")
    return data


def domain_eval_sets(reg, seed, domains, *, suite: str = "quick", device="cpu",
                     teacher: SeedTeacher | None = None) -> dict[str, EvalSet]:
    """{domain: EvalSet} for ``seed`` (a registry Seed); ``suite`` sets the block length (raised to twice
    the seed's window, capped at its context) and how many held-out tokens.
    Pass ``teacher`` to share one loaded teacher with the caller."""
    if suite not in SUITES:
        raise XmergeError(f"unknown suite {suite!r}; choose one of {sorted(SUITES)}")
    seed_dir = checkout_cached(reg, seed)
    tokenizer = AutoTokenizer.from_pretrained(seed_dir)
    cache_dir = Path(reg.home) / "cache"
    teacher = teacher or SeedTeacher(seed, device)
    cfg = SUITES[suite]
    # Blocks of at least twice the window, so the mLSTM carries half of each block's context: at
    # 256-token blocks a 256 window hides it (an H100 run's quick gate passed a merge that the full
    # suite, at 2K blocks, found 11% below its math expert).
    window = seed.student_config.get("window") or 0
    seq_len = min(max(cfg.seq_len, 2 * window), seed.student_config["max_position_embeddings"])
    heldout_tokens = max(cfg.max_tokens or 64 * seq_len, seq_len)
    sets = {}
    for domain in sorted(set(domains)):
        data = load_domain(domain, tokenizer, seq_len=seq_len, data=_domain_source(reg, seed, domain),
                           cache_dir=cache_dir, teacher=teacher() if domain == "chat" else None,
                           max_train_tokens=seq_len, max_heldout_tokens=heldout_tokens)
        targets = teacher.targets(data.heldout, split="heldout", k=TOP_K, fingerprint=data.fingerprint,
                                  cache_dir=cache_dir)
        sets[domain] = EvalSet(blocks=data.heldout, target_indices=targets.indices,
                               target_logprobs=targets.logprobs, problems=data.math_problems_heldout or ())
    return sets
