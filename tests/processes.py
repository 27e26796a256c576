"""Processes of a test's subprocess runs: found by session (fedcsg.processes.session_pids), killed by PID.

A run started with ``start_new_session=True`` leads a session of its own; Ray's GCS, raylet and
workers stay in it (Ray moves them into process groups of their own, not out of the session), so
the session id finds all of them and nothing of anyone else's.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

from fedcsg.processes import session_pids


def kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL the process group of ``proc`` (started in a session of its own), then any process of
    its session that is left, by pid; never anything outside it (other people's Ray runs live here)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=60)
    deadline = time.monotonic() + 60
    while (left := session_pids(proc.pid)) and time.monotonic() < deadline:
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)
    assert not session_pids(proc.pid), "processes of the killed run are still alive"
