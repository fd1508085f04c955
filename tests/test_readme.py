"""Docs that cannot rot: README.md's commands run in order, as a user types them, in one fresh registry.

Every line of a ```bash block runs through the installed console scripts (`.venv/bin/xmerge`,
`.venv/bin/accelerate`) in a subprocess, after the CI substitutions below; it must exit 0 (2 only where
the README says a gated operation may be rejected) and leave the effect its command promises. A line
whose command has no effect check here fails the test, so a new README command cannot go unexercised.
The ```python snippets run with the same interpreter; inline `xmerge ...` commands in the prose are
parsed against the real CLI (command and options exist) without running.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from common import tiny_teacher, tiny_tokenizer
from test_cli_help import parse
from xmerge.evals.run import report_dir
from xmerge.registry import Registry

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
BIN = Path(sys.executable).parent  # the virtualenv's console scripts

# What CI (2 CPU cores, no GPU) changes in a README line before running it: regex -> replacement.
# Each pattern must still match a README command (checked), so the table cannot go stale.
SUBSTITUTIONS = {
    # the embedded 135M GGUF teacher (18 s to load, seconds per training step) -> a tiny random Llama dir
    r"\bsmollm2-135m-instruct\b": "{teacher}",
    # no GPU in CI
    r"--device cuda\b": "--device cpu",
    # two processes in place of four GPUs; accelerate's multi-process launcher (torchrun) falls back to
    # gloo on a machine without CUDA, while `--cpu` would run ONE process whatever --num_processes says
    r"--num_processes 4\b": "--num_processes 2 --multi_gpu",
    # CPU-sized training, appended so it overrides the README's own budgets (which are still parsed)
    r"^(.*\btrain-expert\b.*)$": r"\1 --seq-len 64 --batch-size 2 --stage1-tokens 1024 --stage2-tokens 1024",
    # the targets `train-expert code` then reuses (same block length and token budget)
    r"^(.*\btargets build\b.*)$": r"\1 --seq-len 64 --tokens 1024",
    # each search evaluation is one quick eval of a merged model
    r"--budget 12\b": "--budget 2",
}
# README commands this test does not run, with the reason; each must still appear in the README.
NOT_RUN = {
    "make demo": "the main job (sets up .venv, then the demo on the real teacher); it is run on its own",
    "make test": "runs this suite",
}
# Exit code 2 (rejected by the quick-eval gate) is a documented outcome only for these commands.
REJECTABLE = {"patch", "replace"}
REJECTABLE_DOC = "A rejected patch/replace exits with code 2"


def readme_steps(text: str) -> list[tuple[str, str]]:
    """("bash", one command without its comment) or ("python", a snippet), in README order."""
    steps = []
    for lang, block in re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.S | re.M):
        if lang == "bash":
            for line in block.replace("\\\n", " ").splitlines():
                if words := shlex.split(line, comments=True):
                    steps.append(("bash", shlex.join(words)))
        elif lang == "python":
            steps.append(("python", block))
        else:  # only the pipeline picture is untagged: a command there would escape this test
            assert lang == "" and not re.search(r"^\s*(xmerge|accelerate|make|python)\b", block, flags=re.M), \
                f"README code block ```{lang} is neither bash, python nor a picture:\n{block}"
    return steps


def substitute(command: str, teacher: Path) -> str:
    for pattern, replacement in SUBSTITUTIONS.items():
        command = re.sub(pattern, replacement.replace("{teacher}", str(teacher)), command)
    return command


def xmerge_args(words: list[str]) -> list[str] | None:
    """The xmerge arguments of `xmerge ARGS` or `accelerate launch ... -m xmerge.cli ARGS`."""
    if words[0] == "xmerge":
        return words[1:]
    if words[:2] == ["accelerate", "launch"] and "-m" in words and words[words.index("-m") + 1:][:1] == ["xmerge.cli"]:
        return words[words.index("-m") + 2:]
    return None


@dataclass
class Snapshot:
    seeds: list = field(default_factory=list)
    experts: list = field(default_factory=list)
    compositions: list = field(default_factory=list)
    operations: list = field(default_factory=list)
    targets: set = field(default_factory=set)


def snapshot(home: Path) -> Snapshot:
    if not (home / "registry.db").exists():
        return Snapshot()
    reg = Registry(home)
    try:
        return Snapshot(reg.list_seeds(), reg.list_experts(), reg.list_compositions(), reg.list_operations(),
                        {p.name for p in (home / "cache" / "targets").glob("*")})
    finally:
        reg.close()


@dataclass
class Run:
    params: dict  # the command's parsed arguments
    result: subprocess.CompletedProcess
    before: Snapshot
    after: Snapshot
    cwd: Path
    home: Path
    processes: int  # accelerate's --num_processes, 1 without accelerate

    def new(self, table: str) -> list:
        return getattr(self.after, table)[len(getattr(self.before, table)):]


def _init(run: Run):
    assert (run.home / "registry.db").is_file()


def _convert(run: Run):
    out = run.cwd / run.params["out"]
    assert json.loads((out / "config.json").read_text())["model_type"] == "xlstm_student"
    assert (out / "model.safetensors").is_file()


def _seed_create(run: Run):
    assert [s.name for s in run.new("seeds")] == [run.params["name"]]


def _train_expert(run: Run):
    (expert,) = run.new("experts")
    assert (expert.domain, expert.status) == (run.params["domain"], "ready")
    assert expert.recipe["world_size"] == run.processes  # every launched process took part


def _targets_build(run: Run):
    assert run.after.targets > run.before.targets


def _experts_list(run: Run):
    assert run.after.experts and all(e.ref in run.result.stdout for e in run.after.experts), run.result.stdout


def _gated(kind: str):
    def check(run: Run):
        (op,) = run.new("operations")
        assert op.kind == kind
        if run.result.returncode == 0:
            (comp,) = run.new("compositions")
            assert op.decision == "accepted" and op.result_composition_id == comp.id
        else:  # a documented rejection: recorded, nothing registered
            assert op.decision == "rejected" and not run.new("compositions")
    return check


def _eval(run: Run):
    reg = Registry(run.home)
    out = run.params["out"] or report_dir(reg, run.params["ref"], run.params["suite"])
    reg.close()
    report = json.loads((run.cwd / out / "report.json").read_text())
    newest = run.after.compositions[-1]
    assert report["model"] == f"comp:{newest.ref}" and report["metrics"]
    assert (run.cwd / out / "recovery.png").is_file()


def _lineage(run: Run):
    for kind in ("composition", "operation", "expert", "seed", "teacher"):
        assert kind in run.result.stdout, run.result.stdout


# What each README command must leave behind, by its path in the CLI.
EFFECTS = {
    "init": _init, "convert": _convert, "seed create": _seed_create, "train-expert": _train_expert,
    "targets build": _targets_build, "experts list": _experts_list, "compose": _gated("compose"),
    "replace": _gated("replace"), "patch": _gated("patch"), "eval": _eval, "lineage": _lineage,
}


def test_tables_are_live():
    """Every substitution, skipped command and allowed rejection still refers to the README."""
    text = README.read_text()
    commands = [c for kind, c in readme_steps(text) if kind == "bash"]
    for pattern in SUBSTITUTIONS:
        assert any(re.search(pattern, c) for c in commands), f"substitution {pattern!r} matches no README command"
    for command in NOT_RUN:
        assert command in commands, f"NOT_RUN entry {command!r} is no longer in the README"
        target = command.split()[1]
        assert re.search(rf"^{target}:", (ROOT / "Makefile").read_text(), flags=re.M), f"no `{target}` in Makefile"
    assert REJECTABLE_DOC in " ".join(text.split())


def test_readme_inline_commands_parse():
    """`xmerge ...` in the prose names a real command with real options (not run: placeholders, ids)."""
    prose = re.sub(r"^```.*?^```", "", README.read_text(), flags=re.S | re.M)
    spans = re.findall(r"`(xmerge(?:-lm-eval)? [^`]*)`", prose)
    assert len(spans) >= 5, spans
    for span in spans:
        words = shlex.split(span)
        if words[0] == "xmerge-lm-eval":
            assert (BIN / "xmerge-lm-eval").is_file()
            continue
        command, _, _ = parse(words[1:])
        assert not getattr(command, "commands", None), f"`{span}` stops at a command group"


def test_readme_commands_run_in_order(tmp_path):
    teacher = tmp_path / "tiny-teacher"
    tiny_teacher("llama").save_pretrained(teacher)
    tiny_tokenizer().save_pretrained(teacher)
    cwd, home = tmp_path / "work", tmp_path / "home"
    cwd.mkdir()
    env = {**os.environ, "XMERGE_HOME": str(home), "COLUMNS": "200", "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_OFFLINE": "1"}
    env.pop("XMERGE_DB_URL", None)
    timings = []
    for kind, text in readme_steps(README.read_text()):
        started = time.monotonic()
        if kind == "python":
            result = subprocess.run([sys.executable, "-c", text + "\nprint(model.config.model_type)"], cwd=cwd,
                                    env=env, capture_output=True, text=True, timeout=300)
            assert result.returncode == 0 and "xlstm_student" in result.stdout, f"{text}\n{result.stderr}"
            timings.append((time.monotonic() - started, "python snippet"))
            continue
        if text in NOT_RUN:
            continue
        command = substitute(text, teacher)
        words = shlex.split(command)
        args = xmerge_args(words)
        assert args is not None, f"README command {text!r} is not `xmerge ...` or `accelerate launch -m xmerge.cli`:" \
                                 " run it here or list it in NOT_RUN with the reason"
        try:
            cli, path, context = parse(args)
        except Exception as error:  # click's usage errors: unknown option, missing argument, bad value
            pytest.fail(f"README command {text!r} does not parse: {error}")
        key = " ".join(path)
        assert not getattr(cli, "commands", None), f"README command {text!r}: `xmerge {key}` has no such subcommand"
        assert key in EFFECTS, f"README command {text!r}: no effect check for `xmerge {key}`; add one to EFFECTS"
        before = snapshot(home)
        result = subprocess.run([str(BIN / words[0]), *words[1:]], cwd=cwd, env=env, capture_output=True,
                                text=True, timeout=600)
        allowed = (0, 2) if key in REJECTABLE else (0,)
        assert result.returncode in allowed, \
            f"{text!r} ran as {command!r}, exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        processes = int(re.search(r"--num_processes[ =](\d+)|$", command).group(1) or 1)
        EFFECTS[key](Run(context.params, result, before, snapshot(home), cwd, home, processes))
        timings.append((time.monotonic() - started, f"{command}  (exit {result.returncode})"))
    ran = {cmd.split()[0] for _, cmd in timings}
    assert {"xmerge", "accelerate", "python"} <= ran, ran
    print("\n".join(f"{seconds:6.1f}s  {cmd}" for seconds, cmd in timings))
