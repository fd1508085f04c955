"""The `xmerge` command line: thin typer commands that call one function and render with rich."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="xmerge",
    help="Distill a Transformer teacher into a hybrid xLSTM student, train domain experts, "
    "and merge them with gated patch/replace.\n\nExample: xmerge convert --teacher smollm2-135m-instruct --out student/",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

# Each area adds its commands to `app` in its own module (one import line each).
from xmerge.cli import model_cmds  # noqa: E402,F401
from xmerge.cli import registry_cmds  # noqa: E402,F401
from xmerge.cli import train_cmds  # noqa: E402,F401
from xmerge.cli import demo_cmds  # noqa: E402,F401
from xmerge.cli import merge_cmds  # noqa: E402,F401
from xmerge.cli import eval_cmds  # noqa: E402,F401


def main() -> None:
    app()

