"""One way for every command to fail: a single red line on stderr and a non-zero exit."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import typer
from rich.console import Console

from xmerge.errors import XmergeError

console = Console()
err_console = Console(stderr=True)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn XmergeError / FileNotFoundError into one line on stderr and exit code 1."""
    try:
        yield
    except (XmergeError, FileNotFoundError) as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
