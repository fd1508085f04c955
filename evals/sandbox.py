"""Run untrusted generated Python in a jail (see evals/jail.py) under time, memory and file limits.

Needs root (as here and in CI): the jail uses namespaces, a private root filesystem and drops to
`nobody`. Where that is impossible the result is status "error" with the reason, never a
silently weaker sandbox.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

JAIL = Path(__file__).with_name("jail.py")
Status = Literal["passed", "failed", "timeout", "error"]


@dataclass(frozen=True)
class SandboxLimits:
    wall_seconds: float = 10.0
    cpu_seconds: int = 10
    memory_bytes: int = 1 << 30  # RLIMIT_AS of the program
    file_bytes: int = 16 << 20  # largest file it may write (stdout/stderr included)
    tmpfs_bytes: int = 64 << 20  # all it may write in its /work and /tmp together


@dataclass(frozen=True)
class SandboxResult:
    status: Status  # "error": the jail could not be built; the program never ran
    reason: str  # short: the program's last stderr line, the limit hit, or the setup failure

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _readonly_paths() -> list[str]:
    """System dirs plus the interpreter's prefix, without paths already under another."""
    paths = ["/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", os.path.realpath(sys.base_prefix)]
    kept: list[str] = []
    for p in paths:
        if not any(p == k or p.startswith(k + "/") for k in kept):
            kept.append(p)
    return kept


def _tail(path: Path, limit: int = 4096) -> str:
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - limit))
        return f.read().decode(errors="replace")


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1][:200] if lines else ""


def run_python(source: str, limits: SandboxLimits = SandboxLimits()) -> SandboxResult:
    """Run `source` as a fresh Python program in the jail; passed iff it exits with status 0."""
    python = os.path.realpath(sys.executable)
    with tempfile.TemporaryDirectory(prefix="xmerge-sandbox-") as tmp:
        host = Path(tmp)
        (host / "program.py").write_text(source)
        (host / "root").mkdir()
        status_read, status_write = os.pipe()
        spec = {"root": str(host / "root"), "program": str(host / "program.py"), "python": python,
                "readonly": _readonly_paths(), "status_fd": status_write,
                "cpu_seconds": limits.cpu_seconds, "memory_bytes": limits.memory_bytes,
                "file_bytes": limits.file_bytes, "tmpfs_bytes": limits.tmpfs_bytes}
        with open(host / "stdout", "wb") as out, open(host / "stderr", "wb") as err:
            proc = subprocess.Popen([sys.executable, "-I", "-S", str(JAIL), json.dumps(spec)],
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=err, env={},
                                    pass_fds=(status_write,), start_new_session=True)
        os.close(status_write)
        try:
            code = proc.wait(timeout=limits.wall_seconds)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the program dies with the launcher (pdeathsig)
            proc.wait()
            code = None
        with os.fdopen(status_read, "rb") as status:
            setup_error = status.read().decode(errors="replace")
        stderr = _tail(host / "stderr")
    if setup_error:
        return SandboxResult("error", f"sandbox setup failed: {setup_error}"[:300])
    if code is None:
        return SandboxResult("timeout", f"wall time limit of {limits.wall_seconds:g} s")
    if code == 0:
        return SandboxResult("passed", "")
    if code in (128 + signal.SIGXCPU, 128 + signal.SIGKILL):
        return SandboxResult("timeout", f"CPU time limit of {limits.cpu_seconds} s")
    if code > 128:
        return SandboxResult("failed", f"killed by {signal.Signals(code - 128).name}")
    return SandboxResult("failed", _last_line(stderr) or f"exit status {code}")
