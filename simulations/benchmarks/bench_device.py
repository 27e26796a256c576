"""One real SuperNode under a device's limits: one CPU core and a memory cap, per model.

For each model this starts a SuperLink and one SuperNode on 127.0.0.1 (insecure, loopback), puts
the SuperNode in a memory cgroup of its own (cgroup v1, ``/sys/fs/cgroup/memory``; root needed)
with ``memory.limit_in_bytes`` set to the cap, pins it and everything it starts to CPU 0
(``taskset -a``), and runs a two-round csg run of the model with ``flwr run`` (one client, every
round). The ClientApp process that Flower starts for the run is the SuperNode's child: same cgroup,
same core. Measured per run:

``cgroup peak``
    ``memory.max_usage_in_bytes`` of the group (RSS and page cache of every process in it);
``tree RSS peak``
    the largest sum of the resident memory of the SuperNode and every process below it, sampled
    every 0.1 s (pages shared between the processes, such as torch's libraries, are counted in each);
``supernode / superexec / clientapp peak RSS``
    the kernel's own peak RSS (``VmHWM``) of the SuperNode, of the SuperExec it starts, and of the
    ClientApp process the SuperExec starts for the run (all three in the group, on the one core);
``round s``
    the rounds' wall time from the run's records (one local epoch of the client, the exchange, and
    the server's evaluation, which runs outside the cap);
``up/round, down/round``
    fedcsg's wire bytes of a round (one client);
``bundle``
    the app bundle each SuperNode downloads once per run (Flower's builder on this repository).

The caps are tried from ``--caps`` (largest first) until a run fails; the smallest cap at which the
run completed is reported per model. The group is removed in a ``finally`` block.

Usage (root, cgroup v1 memory controller mounted)::

    FEDCSG_DATA_DIR=/work/shared/data python3 -m simulations.benchmarks.bench_device
    python3 -m simulations.benchmarks.bench_device --models resnet20 --caps 768,512 --train-limit 1000
    # the node in a device's environment: a venv with torch's CPU build (and flwr, fedcsg)
    python3 -m simulations.benchmarks.bench_device --node-bin /path/to/device-venv/bin --json device-cpu.json

Writes ``simulations/results/bench_device.json`` (``--json`` to change).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from fedcsg.deploy.federation import FederationPlan, run_app, start_federation, wait_for_nodes
from fedcsg.processes import descendants
from fedcsg.runs.layout import arm_record_path
from simulations.benchlib import RESULTS, ROOT, fab_bytes, print_table, write_json

CGROUP_ROOT = Path("/sys/fs/cgroup/memory")
MIB = 1024 * 1024
# The node's processes: the SuperNode, the SuperExec it starts, and the ClientApp process the SuperExec
# starts for the run.
ROLES = ("supernode", "superexec", "clientapp")
MEMORY = ("VmRSS", "VmHWM")  # the fields of /proc/PID/status read, in kB
# The model and the data set it trains on.
MODELS = {"resnet20": "cifar10", "fmnist-cnn": "fashion-mnist"}


class MemoryGroup:
    """A cgroup v1 memory group of its own with a limit; removed (after its processes are gone) on exit."""

    def __init__(self, name: str, limit_bytes: int) -> None:
        self.path = CGROUP_ROOT / name
        self.limit_bytes = limit_bytes

    def __enter__(self) -> MemoryGroup:
        self.path.mkdir()
        (self.path / "memory.limit_in_bytes").write_text(str(self.limit_bytes))
        return self

    def add(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(str(pid))

    def read(self, name: str) -> int:
        return int((self.path / name).read_text().split()[0])

    def oom_kills(self) -> int:
        for line in (self.path / "memory.oom_control").read_text().splitlines():
            if line.startswith("oom_kill "):
                return int(line.split()[1])
        return 0

    def __exit__(self, *exc: object) -> None:
        deadline = time.monotonic() + 30
        while (self.path / "cgroup.procs").read_text().strip() and time.monotonic() < deadline:
            time.sleep(0.2)
        self.path.rmdir()


def _role(pid: int) -> str:
    """``supernode``, ``superexec``, ``clientapp`` or the program's name, from a process's command line."""
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    text = b" ".join(argv).decode(errors="replace")
    for role in ROLES:
        if role in text:
            return role
    return Path(argv[0].decode(errors="replace")).name


def sample_tree(root: int) -> tuple[int, dict[str, int]]:
    """One look at ``root`` and every process below it: the sum of their resident memory now
    (``VmRSS``), and the kernel's peak RSS (``VmHWM``) of each, by role."""
    rss, peaks = 0, {}
    for pid in [root, *descendants(root)]:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            role = _role(pid)
        except OSError:
            continue  # gone since the walk
        kib = {k: int(v.split()[0]) for k, _, v in (line.partition(":") for line in status.splitlines()) if k in MEMORY}
        rss += kib.get("VmRSS", 0) * 1024
        if kib.get("VmHWM"):  # a zombie has no memory and no command line
            peaks[role] = max(peaks.get(role, 0), kib["VmHWM"] * 1024)
    return rss, peaks


def _sample_peak(pid: int, stop: threading.Event, peak: list[int], by_role: dict[str, int]) -> None:
    while not stop.is_set():
        rss, peaks = sample_tree(pid)
        peak[0] = max(peak[0], rss)
        for role, hwm in peaks.items():
            by_role[role] = max(by_role.get(role, 0), hwm)
        stop.wait(0.1)


def node_env(node_bin: str | None) -> dict[str, str]:
    """The SuperNode's environment: one thread per op, and ``node_bin`` (the bin directory of the
    device's Python environment) first on PATH, so that the SuperNode, the SuperExec it starts and
    the ClientApp process are that environment's ``flower-supernode``, ``flower-superexec`` and
    ``flwr-clientapp``."""
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    if node_bin:
        env["PATH"] = f"{Path(node_bin).resolve()}{os.pathsep}{os.environ.get('PATH', '')}"
    return env


def node_torch(node_bin: str | None) -> str:
    """The torch version the node's Python environment imports."""
    python = str(Path(node_bin) / "python") if node_bin else sys.executable
    run = subprocess.run([python, "-c", "import torch; print(torch.__version__)"], capture_output=True, text=True)
    return run.stdout.strip() or f"none ({run.stderr.strip().splitlines()[-1] if run.stderr.strip() else 'no output'})"


def run_capped(model: str, cap_mib: int, args: argparse.Namespace, work: Path) -> dict:
    """One two-round csg run of ``model`` with the SuperNode held to CPU 0 and ``cap_mib``."""
    directory = work / f"{model}-{cap_mib}"
    plan = FederationPlan(
        directory=directory,
        nodes=1,
        data_dir=args.data_dir,
        insecure=True,
        connection=f"device-{model}-{cap_mib}",
        env=node_env(args.node_bin),
        supervise=False,  # the capped process is the SuperNode itself, and an OOM kill must end the run
    )
    out_dir = directory / "out"
    run_config = {
        "arm": "csg",
        "model": model,
        "dataset": MODELS[model],
        "num-rounds": 2,
        "num-clients": 1,
        "min-train-nodes": 1,
        "min-available-nodes": 1,
        "train-limit": args.train_limit,
        "test-limit": args.test_limit,
        "batch-size": 32,
        "device": "cpu",
        "out-dir": str(out_dir),
        "round-timeout": float(args.round_timeout),
    }
    row = {"model": model, "cap_mib": cap_mib, "completed": False}
    federation = None
    with MemoryGroup(f"fedcsg-bench-{os.getpid()}-{model}-{cap_mib}", cap_mib * MIB) as group:
        try:
            federation = start_federation(plan)
            supernode = next(p for p in federation.processes if p.role.startswith("supernode"))
            group.add(supernode.pid)
            subprocess.run(["taskset", "-a", "-p", "-c", "0", str(supernode.pid)], check=True, capture_output=True)
            wait_for_nodes(federation, 1, timeout=120)
            peak, by_role, stop = [0], {}, threading.Event()
            sampler = threading.Thread(target=_sample_peak, args=(supernode.pid, stop, peak, by_role), daemon=True)
            sampler.start()
            started = time.monotonic()
            try:
                outcome = run_app(federation, ROOT, run_config, timeout=args.timeout)
            finally:
                stop.set()
                sampler.join()
            row.update(
                seconds=time.monotonic() - started,
                status=f"{outcome.status}:{outcome.sub_status}",
                cgroup_peak_mib=group.read("memory.max_usage_in_bytes") / MIB,
                tree_rss_peak_mib=peak[0] / MIB,
                process_peak_rss_mib={role: hwm / MIB for role, hwm in sorted(by_role.items())},
                oom_kills=group.oom_kills(),
                failcnt=group.read("memory.failcnt"),
            )
            record = arm_record_path(out_dir, "csg")
            rounds = json.loads(record.read_text())["rounds"][1:] if record.is_file() else []
            trained = [r for r in rounds if r["status"] == "ok" and r["replied"] == 1]
            row["completed"] = row["status"] == "finished:completed" and len(trained) == 2 and row["oom_kills"] == 0
            if trained:
                row.update(
                    round_seconds=[r["seconds"] for r in trained],
                    wire_up_per_round=trained[-1]["wire_up"],
                    wire_down_per_round=trained[-1]["wire_down"],
                    test_accuracy=trained[-1]["test_accuracy"],
                )
        except Exception as error:  # a run that fails under the cap is a result, not a crash
            row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
        finally:
            if federation is not None:
                federation.stop()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="resnet20,fmnist-cnn", help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--caps", default="1024,768,512,384,320,256", help="memory caps in MiB, tried largest first")
    parser.add_argument("--train-limit", type=int, default=2000, help="images of the one client")
    parser.add_argument("--test-limit", type=int, default=500)
    parser.add_argument("--data-dir", default=os.environ.get("FEDCSG_DATA_DIR"))
    parser.add_argument("--round-timeout", type=float, default=300.0)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds for one run")
    parser.add_argument(
        "--node-bin",
        help="bin directory of the device's Python environment (its flower-supernode, flower-superexec "
        "and flwr-clientapp start the node; e.g. a venv with the CPU build of torch); default: this one's",
    )
    parser.add_argument("--json", default=str(RESULTS / "bench_device.json"))
    args = parser.parse_args()
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        parser.error(f"unknown model {unknown[0]!r}: accepted are {', '.join(MODELS)}")
    try:
        caps = sorted({int(c) for c in args.caps.split(",")}, reverse=True)
    except ValueError:
        parser.error(f"--caps {args.caps!r} is not accepted: comma-separated MiB, e.g. 1024,768,512")
    if not (CGROUP_ROOT / "cgroup.procs").is_file() or os.geteuid() != 0:
        parser.error(f"needs root and the cgroup v1 memory controller at {CGROUP_ROOT}")
    if args.node_bin and not (Path(args.node_bin) / "flower-supernode").is_file():
        parser.error(
            f"--node-bin {args.node_bin!r} has no flower-supernode: give the bin directory of an environment with flwr"
        )
    bundle = fab_bytes()
    torch_version = node_torch(args.node_bin)
    rows, smallest = [], {}
    with tempfile.TemporaryDirectory(prefix="fedcsg-device-") as tmp:
        for model in models:
            for cap in caps:
                row = run_capped(model, cap, args, Path(tmp))
                rows.append(row)
                print(json.dumps(row), flush=True)
                if not row["completed"]:
                    break
                smallest[model] = cap
    headers = [
        "model",
        "cap MiB",
        "done",
        "cgroup peak MiB",
        "tree RSS peak MiB",
        "supernode / superexec / clientapp peak RSS MiB",
        "round s",
        "up/round",
        "down/round",
    ]
    table = [
        [
            r["model"],
            r["cap_mib"],
            "yes" if r["completed"] else "no",
            f"{r.get('cgroup_peak_mib', 0):.0f}",
            f"{r.get('tree_rss_peak_mib', 0):.0f}",
            " / ".join(f"{r.get('process_peak_rss_mib', {}).get(role, 0):.0f}" for role in ROLES),
            " / ".join(f"{s:.1f}" for s in r.get("round_seconds", [])) or "-",
            f"{r.get('wire_up_per_round', 0):,}",
            f"{r.get('wire_down_per_round', 0):,}",
        ]
        for r in rows
    ]
    print_table(headers, table)
    print(f"node's torch: {torch_version}; app bundle downloaded once per run by each SuperNode: {bundle:,} bytes")
    for model in models:
        print(f"{model}: smallest cap that completed: {smallest.get(model, 'none of ' + args.caps)} MiB")
    write_json(
        args.json,
        {
            "bundle_bytes": bundle,
            "node_torch": torch_version,
            "runs": rows,
            "smallest_cap_mib": smallest,
            "args": vars(args),
        },
    )


if __name__ == "__main__":
    main()
