"""Content-addressed blob files under <home>/blobs/sha256/ab/<sha>: atomic writes, streaming verification.

A blob is written to <home>/tmp/<host>-<pid>-<random>.tmp, fsynced, then renamed into place, so a
reader never sees a partial blob. A writer killed mid-copy leaves only its temp file, which
`clean_temp` removes once that process is gone (or the file is older than the grace period).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from xmerge.registry.errors import CorruptBlobError, RegistryError

CHUNK = 1 << 20
HOST = socket.gethostname().replace("-", "_")


class BlobStore:
    def __init__(self, home: Path) -> None:
        self.root = home / "blobs" / "sha256"
        self.tmp = home / "tmp"

    def relpath(self, sha: str) -> str:
        return f"blobs/sha256/{sha[:2]}/{sha}"

    def path(self, sha: str) -> Path:
        return self.root / sha[:2] / sha

    def temp_file(self, suffix: str = ".tmp") -> tuple[int, Path]:
        """An open (fd, path) temp file whose name says which process owns it."""
        self.tmp.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f"{HOST}-{os.getpid()}-", suffix=suffix, dir=self.tmp)
        return fd, Path(name)

    def put(self, source: Path) -> tuple[str, int]:
        """Copy `source` into the store (hashing while copying); return (sha256, size)."""
        fd, tmp = self.temp_file()
        digest, size = hashlib.sha256(), 0
        try:
            with os.fdopen(fd, "wb") as out, open(source, "rb") as src:
                while chunk := src.read(CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
                out.flush()
                os.fsync(out.fileno())
            sha = digest.hexdigest()
            final = self.path(sha)
            final.parent.mkdir(parents=True, exist_ok=True)
            # Replacing an existing blob is harmless (same bytes), repairs a corrupted one, and
            # refreshes its mtime so a concurrent gc's grace period protects it until its row exists.
            os.replace(tmp, final)
            _fsync_dir(final.parent)
            return sha, size
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def verify(self, sha: str) -> Path:
        """The blob's path after checking that its content still hashes to `sha`."""
        path = self.path(sha)
        if not path.is_file():
            raise CorruptBlobError(f"blob {sha} is missing: {path} does not exist; re-register the object "
                                   "or restore the file")
        if file_sha256(path) != sha:
            raise CorruptBlobError(f"blob {path} is corrupted (its sha256 no longer matches {sha}); "
                                   "restore it from a backup or re-register the object")
        return path

    def copy_verified(self, sha: str, dest: Path) -> None:
        """Copy blob `sha` to `dest`, hashing the bytes as they are copied; raise if they differ."""
        src = self.path(sha)
        if not src.is_file():
            raise CorruptBlobError(f"blob {sha} is missing: {src} does not exist")
        digest = hashlib.sha256()
        with open(src, "rb") as fin, open(dest, "wb") as fout:
            while chunk := fin.read(CHUNK):
                digest.update(chunk)
                fout.write(chunk)
        if digest.hexdigest() != sha:
            dest.unlink(missing_ok=True)
            raise CorruptBlobError(f"blob {src} is corrupted (its sha256 no longer matches {sha}); "
                                   "restore it from a backup or re-register the object")

    def iter_blobs(self) -> Iterator[tuple[str, Path]]:
        if self.root.is_dir():
            for path in self.root.glob("??/*"):
                if path.is_file():
                    yield path.name, path

    def clean_temp(self, grace_s: float) -> list[Path]:
        """Remove temp files of dead local processes, and any temp file older than `grace_s`."""
        removed = []
        if not self.tmp.is_dir():
            return removed
        now = time.time()
        for path in self.tmp.iterdir():
            try:
                age = now - path.lstat().st_mtime
            except FileNotFoundError:
                continue
            host, _, rest = path.name.partition("-")
            pid = rest.partition("-")[0]
            writer_gone = host == HOST and pid.isdigit() and not _alive(int(pid))
            if writer_gone or age > grace_s:
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
                removed.append(path)
        return removed


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def check_sha(sha: str) -> str:
    if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise RegistryError(f"'{sha}' is not a sha256 hex digest (64 lowercase hex characters)")
    return sha


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
