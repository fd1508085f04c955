"""Every `xmerge` command and command group answers --help with a description and an example that parses."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import typer.main
from typer.testing import CliRunner

from xmerge.cli.app import app

ROOT = typer.main.get_command(app)


def walk(command, path: tuple[str, ...] = ()):
    """(path, command) for the root, every group and every command below it."""
    yield path, command
    for name, sub in sorted(getattr(command, "commands", {}).items()):
        yield from walk(sub, (*path, name))


COMMANDS = dict(walk(ROOT))


def parse(argv: list[str]):
    """Resolve `xmerge ARGV` to its command and parse its arguments without running it (click raises on
    an unknown command or option, a missing argument or a value of the wrong type)."""
    command, path, rest = ROOT, [], list(argv)
    while rest and rest[0] in getattr(command, "commands", {}):
        path.append(rest[0])
        command = command.commands[rest.pop(0)]
    return command, path, command.make_context(" ".join(["xmerge", *path]), rest)


def test_the_walk_sees_every_area():
    assert {"convert", "seed create", "targets build", "train-expert", "compose", "patch", "replace", "eval",
            "experts export", "experts import", "lineage", "demo", "init"} <= {" ".join(p) for p in COMMANDS}


@pytest.mark.parametrize("path", list(COMMANDS), ids=lambda p: " ".join(p) or "xmerge")
def test_help_has_description_and_example(path):
    result = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    assert (COMMANDS[path].help or "").strip(), f"`xmerge {' '.join(path)}` has no description"
    examples = re.findall(r"Example: (xmerge [^\n]+)", COMMANDS[path].help)
    assert examples and "Example" in result.output, f"`xmerge {' '.join(path)} --help` shows no example"
    for example in examples:
        # the example must name this command (or one below a group) and parse against the real options
        command, example_path, _ = parse(shlex.split(example)[1:])
        assert tuple(example_path[:len(path)]) == path, f"example {example!r} is not of `{' '.join(path)}`"
        assert not getattr(command, "commands", None), f"example {example!r} stops at a group"


def test_entry_point_help():
    """The installed console script (not only the typer object) lists the commands."""
    result = subprocess.run([str(Path(sys.executable).parent / "xmerge"), "--help"], capture_output=True,
                            text=True, env={"COLUMNS": "160", "PATH": "/usr/bin:/bin"}, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Example" in result.stdout
    for name in ROOT.commands:
        assert name in result.stdout
