"""`xmerge convert`: a loadable student from a local teacher; one clear line for each bad input."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from common import tiny_teacher, tiny_tokenizer
from xmerge.cli.app import app

runner = CliRunner()


@pytest.fixture()
def teacher_dir(tmp_path):
    path = tmp_path / "teacher"
    tiny_teacher("qwen2").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def test_convert_local_dir(teacher_dir, tmp_path):
    out = tmp_path / "student"
    result = runner.invoke(app, ["convert", "--teacher", str(teacher_dir), "--out", str(out), "--window", "8"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["window"] == 8
    student = AutoModelForCausalLM.from_pretrained(out)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    for name, tensor in teacher.state_dict().items():
        assert torch.equal(student.state_dict()[name], tensor)


def _unsupported_dir(tmp_path):
    path = tmp_path / "gpt2"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    return str(path)


@pytest.mark.parametrize(
    "teacher,extra,message",
    [
        ("no-such-alias", [], "unknown teacher 'no-such-alias'"),
        ("./missing/dir", [], "does not exist"),
        (None, [], "unsupported teacher architecture 'gpt2'; supported: llama, qwen2, olmo2"),
        ("smollm2-135m-instruct", ["--window", "0"], "--window must be >= 1"),
    ],
)
def test_convert_bad_input(tmp_path, teacher, extra, message):
    teacher = teacher or _unsupported_dir(tmp_path)
    out = tmp_path / "out"
    result = runner.invoke(app, ["convert", "--teacher", teacher, "--out", str(out), *extra])
    assert result.exit_code == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.output
    assert not out.exists()
