"""The code sandbox as real subprocesses, and HumanEval checks of hand-written completions."""

from __future__ import annotations

import os
import time

import pytest

from xmerge.evals.humaneval import STOP, check_completion, load_problems, score_completions
from xmerge.evals.generation import cut_at_stop
from xmerge.evals.sandbox import SandboxLimits, run_python

FAST = SandboxLimits(wall_seconds=4, cpu_seconds=2)


def test_correct_program_passes_and_wrong_one_fails():
    assert run_python("assert sorted([3, 1, 2]) == [1, 2, 3]\n", FAST).status == "passed"
    r = run_python("assert 1 + 1 == 3, 'bad arithmetic'\n", FAST)
    assert (r.status, r.reason) == ("failed", "AssertionError: bad arithmetic")


def test_infinite_loop_is_stopped_by_the_cpu_limit():
    # a generous wall limit, so that a loaded machine still hits the 1 s CPU limit first
    r = run_python("while True:\n    pass\n", SandboxLimits(wall_seconds=60, cpu_seconds=1))
    assert (r.status, r.reason) == ("timeout", "CPU time limit of 1 s")


def test_sleeping_program_is_stopped_by_the_wall_limit_with_its_children():
    # the child leaves the process group; it must still die with the jail
    src = ("import os, time\n"
           "if os.fork() == 0:\n    os.setsid()\n"
           "time.sleep(60)\n")
    r = run_python(src, SandboxLimits(wall_seconds=1.5, cpu_seconds=2))
    assert r.status == "timeout" and "wall" in r.reason
    time.sleep(0.3)
    assert not [p for p in os.listdir("/proc") if p.isdigit() and _is_sleeper(p)]


def _is_sleeper(pid: str) -> bool:
    try:
        return b"/work/program.py" in open(f"/proc/{pid}/cmdline", "rb").read()
    except OSError:
        return False


def test_ten_gigabyte_allocation_fails():
    r = run_python("x = bytearray(10 * 1024**3)\nprint(len(x))\n", FAST)
    assert (r.status, r.reason) == ("failed", "MemoryError")


def test_writes_outside_the_jail_do_not_land(tmp_path):
    target = tmp_path / "escaped.txt"
    sibling = "/tmp/xmerge-sandbox-escape-probe.txt"
    for path in (str(target), sibling, "/usr/xmerge-escape-probe.txt"):
        r = run_python(f"open({path!r}, 'w').write('pwned')\n"
                       f"assert open({path!r}).read() == 'pwned'\n"
                       f"import os; assert os.stat({path!r}).st_size == 5\n"
                       f"raise SystemExit('wrote ' + {path!r})\n", FAST)
        assert r.status == "failed", r
    # inside the jail /tmp is its own tmpfs: the write to "/tmp/..." may succeed there, but never here
    assert not target.exists() and not os.path.exists(sibling)
    assert not os.path.exists("/usr/xmerge-escape-probe.txt")


def test_jail_sees_no_project_no_env_and_runs_as_nobody(tmp_path, monkeypatch):
    secret = tmp_path / "registry.db"
    secret.write_text("secret")
    secret.chmod(0o644)
    monkeypatch.setenv("XMERGE_HOME", str(tmp_path))
    src = ("import os, sys\n"
           f"assert not os.path.exists({str(secret)!r})\n"
           "assert not os.path.exists('/work/main') or os.listdir('/work') == []\n"
           "assert not any(k.startswith('XMERGE') for k in os.environ), os.environ\n"
           "assert os.getuid() == 65534 and os.getgid() == 65534, os.getuid()\n"
           "assert os.getcwd() == '/work' and os.environ['HOME'] == '/work'\n"
           "open('scratch.txt', 'w').write('ok')\n"
           "import socket\n"
           "try:\n    socket.create_connection(('1.1.1.1', 80), timeout=1)\n"
           "except OSError:\n    pass\n"
           "else:\n    sys.exit('network reachable')\n")
    r = run_python(src, FAST)
    assert r.status == "passed", r


def test_humaneval_checks_of_real_problems():
    problems = {p["task_id"]: p for p in load_problems(3)}
    he0 = problems["HumanEval/0"]  # has_close_elements
    right = ("    return any(abs(a - b) < threshold\n"
             "               for i, a in enumerate(numbers) for j, b in enumerate(numbers) if i != j)\n")
    wrong = "    return False\n"
    assert check_completion(he0, right).status == "passed"
    assert check_completion(he0, wrong).status == "failed"
    result = score_completions(list(problems.values()), [right, wrong, "    while True: pass\n"],
                               SandboxLimits(wall_seconds=4, cpu_seconds=2))
    assert result.pass_at_1 == pytest.approx(1 / 3)
    assert result.results["HumanEval/2"].status == "timeout"


def test_stop_sequences_cut_the_body():
    body = "    return x + 1\n\n\ndef other():\n    pass\n"
    assert cut_at_stop(body, STOP) == "    return x + 1\n\n"
