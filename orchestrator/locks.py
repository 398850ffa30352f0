"""One writer per run or sweep folder: an exclusive ``flock`` held for the life of the process.

``orchestrator.train`` locks ``<output_dir>/.softdimo.lock``, a sweep ``<output_dir>/.<name>.lock``
(beside its folder, so that ``--overwrite`` can delete the folder while holding the lock). The kernel
drops a lock when its process dies, however it dies: a lock file left by a dead run is no obstacle,
and there is nothing to clean up. flock works across processes on one machine (and on NFS v4 and
Lustre mounts with flock enabled); the file records the holder's host and pid for the message.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
from pathlib import Path

from orchestrator.config import UserError

_HELD: dict[str, int] = {}       # path -> open descriptor, kept for the life of the process


def writable_dir(path: Path, what: str) -> Path:
    """``path`` created if missing; UserError when it is a file or cannot be written."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise UserError(f"{what}: {path} is an existing file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"{what}: {path} cannot be created ({err.strerror})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"{what}: {path} is not writable")
    return path


def acquire(lock_file: Path, what: str) -> None:
    """Hold an exclusive lock on ``lock_file`` until this process exits; UserError (one line,
    naming the holder) when another process holds it."""
    lock_file = Path(lock_file).resolve()
    if str(lock_file) in _HELD:
        return
    try:
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise UserError(f"{what}: cannot create the lock file {lock_file} ({err.strerror})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        try:
            holder = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        except ValueError:
            holder = {}
        os.close(fd)
        who = f" (pid {holder.get('pid')} on {holder.get('host')})" if holder else ""
        raise UserError(f"{what}: another run is writing there{who}; wait for it to end or use "
                        f"another folder (lock {lock_file})") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode(), 0)
    _HELD[str(lock_file)] = fd


def release(lock_file: Path) -> None:
    fd = _HELD.pop(str(Path(lock_file).resolve()), None)
    if fd is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
