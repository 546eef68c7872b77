"""One training run at a time per registry: an exclusive `fcntl.flock` on REGISTRY/run.lock.

The kernel drops the lock when its holder exits, however it exits (SIGKILL included), so a crashed run never
leaves a lock behind that a later run must clean up. The file keeps the holder's host and pid for messages.
"""
from __future__ import annotations

import fcntl
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class RunInProgress(RuntimeError):
    pass


def lock_holder(registry_root: str | Path) -> str | None:
    """Who holds the run lock now (host and pid), or None when nobody does."""
    try:
        with run_lock(registry_root):
            return None
    except RunInProgress as exc:
        return str(exc)


@contextmanager
def run_lock(registry_root: str | Path) -> Iterator[None]:
    """Hold the registry's run lock for the block; RunInProgress at once if another run holds it."""
    root = Path(registry_root)
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / "run.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise RunInProgress(f"another training run holds {root / 'run.lock'} ({holder})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"host {socket.gethostname()} pid {os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
