"""Shared pieces of the scripts under simulations/: run a command while timestamping its output
lines and sampling the memory of its whole process tree (Ray's raylet, GCS and worker processes
included), argument types, the app bundle's size, print a table, write JSON."""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fedcsg.io import strict_json
from fedcsg.nn.models import model_spec
from fedcsg.processes import process_table
from fedcsg.runs.layout import arm_record_path

ROOT = Path(__file__).resolve().parents[1]  # the fedcsg checkout
RESULTS = Path(__file__).resolve().parent / "results"  # default home of the scripts' JSON (git-ignored)


def tree_rss(root: int) -> int:
    """Resident memory of ``root``, its descendants, and every process of its session (Ray starts
    some daemons in new sessions of their own, which keep the root's session as their parent's)."""
    table = process_table()
    members = {root}
    changed = True
    while changed:
        changed = False
        for pid, info in table.items():
            if pid not in members and (info.ppid in members or info.session == root):
                members.add(pid)
                changed = True
    return sum(table[pid].rss_bytes for pid in members if pid in table)


@dataclass
class LoggedRun:
    returncode: int
    seconds: float
    peak_rss: int
    lines: list[tuple[float, str]] = field(default_factory=list)

    def first_time(self, needle: str) -> float | None:
        return next((t for t, line in self.lines if needle in line), None)


def run_logged(
    cmd: Sequence[str], env: dict[str, str] | None = None, timeout: float = 3600, poll: float = 0.25
) -> LoggedRun:
    """Run ``cmd`` in a new session; timestamp every output line (seconds since launch) and sample
    the process tree's RSS every ``poll`` seconds. The whole session is killed at the end."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True
    )
    lines: list[tuple[float, str]] = []
    peak = 0
    done = threading.Event()

    def reader() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append((time.perf_counter() - start, line.rstrip("\n")))

    def sampler() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, tree_rss(proc.pid))
            done.wait(poll)

    threads = [threading.Thread(target=reader, daemon=True), threading.Thread(target=sampler, daemon=True)]
    for thread in threads:
        thread.start()
    try:
        proc.wait(timeout=timeout)
    finally:
        done.set()
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for thread in threads:
            thread.join(timeout=5)
    return LoggedRun(proc.returncode, time.perf_counter() - start, peak, lines)


# The experiment a benchmark's unnamed settings come from (``--config``): ResNet-20 on CIFAR-10.
BENCH_CONFIG = "cifar10-resnet20-dirichlet"


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    """``--config``: the experiment of every setting the benchmark does not name (default :data:`BENCH_CONFIG`)."""
    parser.add_argument(
        "--config",
        default=BENCH_CONFIG,
        help="experiment every setting the benchmark does not name comes from (slice, code size, lr schedule, ...)",
    )


def run_command(arm: str, sets: dict[str, object], out: Path, config: str) -> list[str]:
    """The ``fedcsg run`` command line of :func:`run_fedcsg` (values as JSON, so ``0.1`` stays a float)."""
    cmd = [sys.executable, "-m", "fedcsg.cli", "run", "--config", config, "--arm", arm, "--out", str(out)]
    for key, value in sets.items():
        cmd += ["--set", f"{key}={json.dumps(value)}"]
    return cmd


def run_fedcsg(arm: str, sets: dict[str, object], timeout: float, config: str) -> tuple[LoggedRun, list[dict]]:
    """Run ``fedcsg run --config CONFIG --arm ARM --set KEY=VALUE...`` in a fresh process (as a user
    would) into a temporary directory; return the logged run and the arm's round records.

    Every setting not in ``sets`` comes from ``config``: a required experiment, since fedcsg's
    default one is the quick start's small CNN on Fashion-MNIST."""
    with tempfile.TemporaryDirectory(prefix="fedcsg-bench-") as tmp:
        out = Path(tmp) / "run"
        cmd = run_command(arm, sets, out, config)
        run = run_logged(cmd, env=dict(os.environ), timeout=timeout)
        if run.returncode != 0:
            tail = "\n".join(line for _, line in run.lines[-30:])
            raise RuntimeError(f"fedcsg run {' '.join(cmd[5:])} failed ({run.returncode}):\n{tail}")
        rounds = json.loads((arm_record_path(out, arm)).read_text())["rounds"]
    return run, rounds


def parse_models(text: str) -> list[str]:
    """argparse type: comma-separated registry model names (each checked against the registry)."""
    names = [m.strip() for m in text.split(",") if m.strip()]
    if not names:
        raise argparse.ArgumentTypeError("no model given")
    for name in names:
        try:
            model_spec(name)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
    return names


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a number > 0."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def fab_bytes() -> int:
    """Size of the app bundle (FAB) that ``flwr build`` makes of this checkout: what each SuperNode
    downloads once per run."""
    from flwr.cli.build import build_fab_from_disk

    return len(build_fab_from_disk(ROOT))


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    return f"{platform.machine()} {cpu_name()}, {os.cpu_count()} CPUs"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [[str(h) for h in headers]] + [[f"{c:,.3f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for n, row in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
        if n == 0:
            print("  ".join("-" * w for w in widths))


def write_json(path: str | Path, document: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(strict_json({"machine": machine(), **document}, indent=2) + "\n")
    print(f"wrote {path}")
