"""One run at a time in a run directory: an advisory lock (flock(2)) on ``DIR/.fedcsg.lock``.

The lock belongs to the open file, so the kernel releases it when the process that holds it ends,
however it ends (SIGKILL and power loss included): a lock file left by a dead run is stale and the
next run takes it over. The file names its holder (pid, host, start time) for the message that
refuses a second run. It is opened close-on-exec, so the processes a run starts (Ray's) never hold it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from fedcsg.runs.layout import LOCK_FILE

HOLDER_LIMIT = 200  # characters of the lock file read to name its holder


def holder(path: Path) -> str:
    """Who the lock file at ``path`` says holds it, in words."""
    try:
        with open(path, "rb") as handle:
            document = json.loads(handle.read(HOLDER_LIMIT))
        return f"fedcsg pid {int(document['pid'])} on host {str(document['host'])[:64]!r} (since {document['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another fedcsg run"


def _try_lock(path: Path) -> int | None:
    """An open descriptor of ``path`` holding its lock, or None if another process holds it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:  # a holder that just ended unlinked the file we opened: lock the one now at the path
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


@contextlib.contextmanager
def run_lock(out_dir: Path) -> Iterator[Path]:
    """Hold the lock of the run directory ``out_dir`` (which must exist) for the block; a
    FileExistsError (one line naming the holder) if another run holds it. The lock file is removed
    at the end of the block."""
    path = Path(out_dir) / LOCK_FILE
    fd = _try_lock(path)
    if fd is None:
        raise FileExistsError(
            f"output directory {str(out_dir)!r} is in use by {holder(path)}: "
            "accepted is one run at a time in a directory (wait for it to end, or choose another --out)"
        )
    try:
        since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": since}).encode())
        yield path
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(fd)
