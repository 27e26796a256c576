"""Processes of a federation: free ports, starting a process in its own session, and stopping
exactly the processes started here.

Processes
---------
Every process is started with ``start_new_session=True`` (its own process group) and its PID,
command line and log file are written to ``DIR/federation.json``; :func:`stop_processes` stops exactly those processes
and the children Flower started under them (found through ``/proc`` by parent PID, never by
name), so other people's Flower jobs on the same machine are left alone.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path


def free_port(host: str = "127.0.0.1") -> int:
    """A port that is free now (bound to 0 and released; the caller binds it soon after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float, process: subprocess.Popen | None = None) -> None:
    """Wait until ``host:port`` accepts TCP connections; raise RuntimeError on timeout or if ``process`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process {process.pid} exited with {process.returncode} before {host}:{port} opened")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.2)
    raise RuntimeError(f"{host}:{port} did not open within {timeout:.0f}s")


@dataclass
class ProcessRecord:
    """A process this module started: enough to find and stop it later, and nothing else."""

    role: str
    pid: int
    command: list[str]
    log: str

    def alive(self) -> bool:
        return _same_process(self.pid, self.command)


def _cmdline(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _same_process(pid: int, command: Sequence[str]) -> bool:
    # A recorded PID is trusted only while /proc shows the recorded program under it: after a reboot
    # or a long pause the number may belong to someone else's process.
    cmdline = _cmdline(pid)
    if not cmdline:
        return False
    program = Path(command[0]).name
    return any(Path(part).name == program for part in cmdline[:2])


@dataclass(frozen=True)
class ProcInfo:
    """What ``/proc/PID/stat`` and ``statm`` say of a process: its parent, session, state and RSS."""

    ppid: int
    session: int
    state: str  # "R", "S", ..., "Z" for a zombie
    rss_bytes: int


PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def process_table() -> dict[int, ProcInfo]:
    """Every process this user can read, by PID: the one walk of ``/proc`` that fedcsg, its
    benchmarks and its tests share."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            statm = (entry / "statm").read_text().split()
        except OSError:
            continue
        # The command name in field 2 may contain spaces and parentheses: split after the last ')'.
        fields = stat[stat.rindex(")") + 2 :].split()
        table[int(entry.name)] = ProcInfo(int(fields[1]), int(fields[3]), fields[0], int(statm[1]) * PAGE_SIZE)
    return table


def session_pids(session: int) -> list[int]:
    """Live processes (zombies aside) of the session led by ``session``: a run started with
    ``start_new_session=True`` and everything it started, Ray's GCS, raylet and workers included."""
    return [pid for pid, info in process_table().items() if info.session == session and info.state != "Z"]


def children_of(pid: int) -> list[int]:
    """PIDs of the live children of ``pid``."""
    return [child for child, info in process_table().items() if info.ppid == pid]


def descendants(pid: int) -> list[int]:
    """PIDs of every live process below ``pid`` (children found by their parent PID)."""
    tree: dict[int, list[int]] = {}
    for child, info in process_table().items():
        tree.setdefault(info.ppid, []).append(child)
    out, stack = [], [pid]
    while stack:
        for child in tree.get(stack.pop(), []):
            out.append(child)
            stack.append(child)
    return out


PR_SET_CHILD_SUBREAPER, PR_GET_CHILD_SUBREAPER = 36, 37  # prctl(2) options, <linux/prctl.h>


@contextlib.contextmanager
def adopting_orphans() -> Iterator[None]:
    """Make this process the child subreaper (prctl(2)) for the block: a process below it whose
    parent dies, such as a Ray worker whose raylet has just been shut down, becomes this process's
    child instead of init's, so :func:`descendants` still finds it. Children that died in the block
    and were adopted are reaped at its end (children this process had before are left to their
    owners). Off Linux the block runs as is."""
    if not sys.platform.startswith("linux"):
        yield
        return
    libc = ctypes.CDLL(None, use_errno=True)
    before, was = set(children_of(os.getpid())), ctypes.c_int(0)
    libc.prctl(PR_GET_CHILD_SUBREAPER, ctypes.byref(was), 0, 0, 0)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    try:
        yield
    finally:
        libc.prctl(PR_SET_CHILD_SUBREAPER, was.value, 0, 0, 0)
        for pid in children_of(os.getpid()):
            if pid not in before and not _pid_alive(pid):
                with contextlib.suppress(ChildProcessError, OSError):
                    os.waitpid(pid, os.WNOHANG)


def start_process(
    role: str, command: Sequence[str], log_path: str | Path, env: Mapping[str, str], cwd: str | Path | None = None
) -> tuple[subprocess.Popen, ProcessRecord]:
    """Start ``command`` in its own session with stdout and stderr to ``log_path``."""
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            list(command),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(env),
            cwd=cwd,
            start_new_session=True,
        )
    return process, ProcessRecord(role, process.pid, list(command), str(log_path))


def stop_processes(records: Sequence[ProcessRecord], grace: float = 5.0) -> list[int]:
    """Stop the recorded processes and everything Flower started below them, by PID.

    SIGTERM first (Flower deregisters nodes and stops its servers on it), SIGKILL after ``grace``
    seconds. Processes Flower detached into their own session (the SuperLink's SuperExec) are
    still found: they are collected by parent PID before the parents are signalled. Returns the
    PIDs signalled.
    """
    targets: list[int] = []
    for record in records:
        if record.alive():
            targets += [record.pid, *descendants(record.pid)]
    return stop_pids(targets, grace)


def stop_pids(pids: Sequence[int], grace: float = 5.0) -> list[int]:
    """SIGTERM each live process of ``pids``, SIGKILL those still alive after ``grace`` seconds, and
    reap those that are our children; returns the PIDs signalled."""
    targets = [pid for pid in dict.fromkeys(pids) if _pid_alive(pid)]
    for pid in targets:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_pid_alive(pid) for pid in targets):
        time.sleep(0.1)
    for pid in targets:
        if _pid_alive(pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
    for pid in dict.fromkeys(pids):
        # Reap our own children so they do not linger as zombies in a long-lived test process.
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)
    return targets


def _pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return state[state.rindex(")") + 2] != "Z"


def _start_time(pid: int) -> str | None:
    """When ``pid`` started (``/proc/PID/stat`` field 22, clock ticks since boot), or None when it is
    gone or a zombie: with the PID, it names one process, never a later one that reuses the number."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return None if fields[0] == "Z" else fields[19]


WATCH_INTERVAL = 0.5  # seconds between the watchdog's looks at the watched process's descendants


def watchdog(parent: int, interval: float = WATCH_INTERVAL) -> list[int]:
    """Remember every descendant of ``parent`` while it lives; once it has died (however: SIGKILL
    included), SIGKILL those still alive and whatever they started since. Returns the PIDs killed.

    What a dead process started is otherwise left running: a private Ray's raylet outlives its driver
    for a while, and the agents the raylet started (DashboardAgent, RuntimeEnvAgent) outlive the
    raylet. Run it in a process of its own (:func:`start_watchdog`)."""
    me, born = os.getpid(), _start_time(parent)
    seen: dict[int, str] = {}
    while born is not None and _start_time(parent) == born:
        for pid in descendants(parent):
            started = _start_time(pid)
            if pid != me and started is not None:
                seen.setdefault(pid, started)
        time.sleep(interval)
    left = [pid for pid, started in seen.items() if _start_time(pid) == started]
    targets = list(dict.fromkeys([*left, *(child for pid in left for child in descendants(pid))]))
    for pid in targets:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    return targets


def start_watchdog(parent: int | None = None) -> subprocess.Popen:
    """Start :func:`watchdog` over ``parent`` (default: this process) in a process of its own session,
    so that a signal to the watched process's group does not reach it; stop it (``.kill()``) when
    what it guards has ended in order."""
    code = f"from fedcsg.processes import watchdog; watchdog({parent or os.getpid()})"
    return subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.DEVNULL, start_new_session=True, env=dict(os.environ)
    )
