"""Launcher run as root by evals/sandbox.py: builds a jail and execs one Python program inside it.

Run as a script (`python -I -S jail.py SPEC_JSON`), stdlib only, so it starts in a fresh
single-threaded process (no fork-with-threads hazards of a preexec_fn). Steps:
new mount, PID, network, IPC and UTS namespaces; a private tmpfs as the new root holding
read-only binds of /usr and the interpreter's prefix, a few device nodes, a writable
/work (cwd and HOME, owned by `nobody`) and /tmp; chroot; resource limits; drop to `nobody`
with no_new_privs; exec. Nothing of the host tree outside those binds is visible, so the
program can neither write outside its jail nor read the project or the registry.
The program runs as the only child of the namespace's PID 1: when it exits or is killed, PID 1
exits and every process the program started dies with it. Exit status: the program's code or
128 + signal. Setup failures are written to the spec's `status_fd` (closed before exec, so the
program cannot forge one).
"""

from __future__ import annotations

import ctypes
import json
import os
import pwd
import resource
import signal
import sys

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND = 1, 2, 4, 32, 4096
MS_REC, MS_PRIVATE = 16384, 1 << 18
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
DEVICES = ("null", "zero", "random", "urandom")

libc = ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(src: str | None, dst: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    _check(libc.mount(enc(src), enc(dst), enc(fstype), flags, enc(data)), f"mount {src} on {dst}")


def _bind_readonly(root: str, path: str) -> None:
    """Show host `path` at the same place inside `root`, read-only (symlinks copied as links)."""
    inside = root + path
    os.makedirs(os.path.dirname(inside), exist_ok=True)
    if os.path.islink(path):
        os.symlink(os.readlink(path), inside)
        return
    os.makedirs(inside, exist_ok=True)
    _mount(path, inside, None, MS_BIND)
    _mount(None, inside, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)


def _build_root(spec: dict, nobody: pwd.struct_passwd) -> None:
    root = spec["root"]
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, f"size={spec['tmpfs_bytes']},mode=755")
    for path in spec["readonly"]:
        if os.path.lexists(path):
            _bind_readonly(root, path)
    os.makedirs(root + "/dev")
    for dev in DEVICES:
        open(f"{root}/dev/{dev}", "w").close()
        _mount(f"/dev/{dev}", f"{root}/dev/{dev}", None, MS_BIND)
    os.mkdir(root + "/tmp")
    os.chmod(root + "/tmp", 0o1777)
    os.mkdir(root + "/work", 0o700)
    os.chown(root + "/work", nobody.pw_uid, nobody.pw_gid)
    with open(spec["program"], "rb") as src, open(root + "/work/program.py", "wb") as dst:
        dst.write(src.read())
    os.chmod(root + "/work/program.py", 0o644)


def _limit(spec: dict) -> None:
    cpu = spec["cpu_seconds"]
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_AS, (spec["memory_bytes"],) * 2)
    resource.setrlimit(resource.RLIMIT_FSIZE, (spec["file_bytes"],) * 2)
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _enter_and_exec(spec: dict) -> None:
    nobody = pwd.getpwnam("nobody")
    _build_root(spec, nobody)
    os.chroot(spec["root"])
    os.chdir("/work")
    _limit(spec)
    os.setgroups([])
    os.setgid(nobody.pw_gid)
    os.setuid(nobody.pw_uid)
    _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl no_new_privs")
    # set after setuid: a credential change clears the parent-death signal
    _check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl pdeathsig")
    env = {"HOME": "/work", "TMPDIR": "/tmp", "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
    python = spec["python"]
    os.set_inheritable(spec["status_fd"], False)
    # PID 1 of a namespace ignores kernel signals such as SIGXCPU, so the program runs as its child
    pid = os.fork()
    if pid == 0:
        os.execve(python, [python, "-I", "-S", "-B", "/work/program.py"], env)
    os._exit(_exit_status(os.waitpid(pid, 0)[1]))


def _exit_status(status: int) -> int:
    return os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)


def main() -> None:
    spec = json.loads(sys.argv[1])
    try:
        if os.geteuid() != 0:
            raise PermissionError("the jail needs root to create namespaces and drop to 'nobody'")
        _check(libc.unshare(CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS),
               "unshare namespaces")
        pid = os.fork()
    except OSError as exc:
        os.write(spec["status_fd"], str(exc).encode())
        sys.exit(1)
    if pid == 0:
        try:
            _enter_and_exec(spec)
        except BaseException as exc:  # anything before exec is a setup failure, never the program's
            os.write(spec["status_fd"], f"{type(exc).__name__}: {exc}".encode())
        os._exit(1)
    sys.exit(_exit_status(os.waitpid(pid, 0)[1]))


if __name__ == "__main__":
    main()
