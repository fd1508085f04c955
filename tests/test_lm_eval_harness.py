"""A student directory under lm-evaluation-harness (`--model hf`), through xmerge's entry point, on a local task."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from common import tiny_student, tiny_tokenizer
from xmerge.modeling.convert import save_student


TASK = """task: xmerge_local_sums
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""


def docs() -> list[dict]:
    pairs = [(1, 2), (3, 4), (5, 6), (7, 1), (2, 9), (8, 8), (4, 0), (6, 3)]
    return [{"question": f"{a} plus {b} is", "choices": [f"{a + b}", f"{a + b + 1}", f"{a * b}"], "answer": 0}
            for a, b in pairs]


@torch.inference_mode()
def choice_loglikelihoods(model, tokenizer, row: dict) -> list[float]:
    """log p(" " + choice | question) of each choice (lm_eval's default target delimiter is a space)."""
    context = tokenizer(row["question"])["input_ids"]
    scores = []
    for choice in row["choices"]:
        ids = torch.tensor([context + tokenizer(" " + choice)["input_ids"]])  # (1, L)
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)  # (L-1, V)
        scores.append(sum(logprobs[p, ids[0, p + 1]].item() for p in range(len(context) - 1, ids.shape[1] - 1)))
    return scores


def test_student_dir_runs_under_lm_eval_without_remote_code(tmp_path):
    student = tiny_student("llama", window=8, sinks=2)
    model_dir = save_student(student, tiny_tokenizer(), tmp_path / "student", teacher_spec="tiny")
    assert not list(model_dir.glob("*.py"))  # nothing for trust_remote_code to run
    rows = docs()
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "local.yaml").write_text(TASK.format(data=tmp_path / "data.jsonl"))
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = tmp_path / "results"
    run = subprocess.run(
        [sys.executable, "-m", "xmerge.evals.harness", "--model", "hf", "--model_args", f"pretrained={model_dir}",
         "--include_path", str(tasks), "--tasks", "xmerge_local_sums", "--device", "cpu",
         "--output_path", str(out), "--log_samples"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    results = [json.loads(p.read_text()) for p in out.rglob("results_*.json")]
    assert len(results) == 1
    # every log-likelihood lm_eval computed is the student's own, and acc follows from them
    samples = [json.loads(line) for p in out.rglob("samples_xmerge_local_sums_*.jsonl")
               for line in p.read_text().splitlines()]
    assert sorted(x["doc_id"] for x in samples) == list(range(len(rows)))
    expected = {i: choice_loglikelihoods(student, tiny_tokenizer(), row) for i, row in enumerate(rows)}
    for sample in samples:
        got = [float(resp[0]) for resp in sample["filtered_resps"]]
        assert got == pytest.approx(expected[sample["doc_id"]], abs=1e-4)
    accuracy = sum(max(range(3), key=expected[i].__getitem__) == row["answer"] for i, row in enumerate(rows)) / len(rows)
    assert results[0]["results"]["xmerge_local_sums"]["acc,none"] == pytest.approx(accuracy)
