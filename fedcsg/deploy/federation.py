"""A federation on this machine: a SuperLink and N SuperNodes started from a plan, recorded in
``DIR/federation.json``, and the fedcsg app run on it with ``flwr run``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedcsg.deploy.credentials import (
    NodeKey,
    TlsFiles,
    check_nodes,
    make_certificates,
    make_node_keys,
    node_keys_in,
    write_node_key,
)
from fedcsg.deploy.flwr_cli import (
    flwr_cli,
    flwr_env,
    json_tail,
    list_nodes,
    register_nodes,
    superlink_command,
    supernode_command,
    unregister_node,
    write_connection,
)
from fedcsg.deploy.supervisor import supervisor_command
from fedcsg.io import check_schema, read_json_object
from fedcsg.processes import ProcessRecord, children_of, free_port, start_process, stop_processes, wait_for_port

STATE_FILE = "federation.json"
FEDERATION_SCHEMA = {  # federation.json's fields and their JSON types (fedcsg.io.check_schema)
    "directory": str,
    "connection": str,
    "flwr_home": str,
    "address": str,
    "fleet_address": str,
    "secure": bool,
    "node_ids?": [int],
    "node_commands?": [[str]],
    "processes?": [{"role": str, "pid": int, "command": [str], "log": str}],
}
INSECURE_WARNING = (
    "WARNING: --insecure: TLS and SuperNode authentication are OFF. Model updates travel in clear text and "
    "ANY process that can reach the SuperLink can join the federation and send updates. Use it only on a "
    "trusted loopback for debugging."
)


# -------------------------------------------------------------------------------- federation


@dataclass
class Federation:
    """A SuperLink and its SuperNodes started by :func:`start_federation` (state in ``DIR/federation.json``).

    Attributes
    ----------
    directory
        Where certificates, keys, logs, the SuperLink database and the state file live.
    connection
        The ``flwr`` connection name (``flwr run . CONNECTION``), written to ``flwr_home``.
    flwr_home
        ``FLWR_HOME`` of the ``flwr`` CLI that talks to this SuperLink.
    address
        ``host:port`` of the SuperLink (Fleet, Control and Runtime APIs).
    fleet_address
        What the SuperNodes were told to connect to (``address``, or a relay in front of it).
    secure
        TLS and SuperNode authentication on.
    node_ids
        The node IDs the SuperLink assigned to the registered keys.
    node_commands
        Each SuperNode's ``flower-supernode`` command line (what its supervisor runs, or what was
        started itself when unsupervised).
    processes
        What was started, in start order.
    """

    directory: str
    connection: str
    flwr_home: str
    address: str
    fleet_address: str
    secure: bool
    node_ids: list[int] = field(default_factory=list)
    node_commands: list[list[str]] = field(default_factory=list)
    processes: list[ProcessRecord] = field(default_factory=list)

    @property
    def state_path(self) -> Path:
        return Path(self.directory) / STATE_FILE

    def save(self) -> Path:
        self.state_path.write_text(json.dumps(asdict(self), indent=1))
        return self.state_path

    @classmethod
    def load(cls, directory: str | Path) -> Federation:
        path = Path(directory) / STATE_FILE
        if not path.is_file():
            raise FileNotFoundError(f"no federation state {str(path)!r} (start one with `fedcsg deploy up`)")
        data = read_json_object(path)
        check_schema(data, FEDERATION_SCHEMA, f"federation state {str(path)!r}")
        known = {key.removesuffix("?") for key in FEDERATION_SCHEMA}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"federation state {str(path)!r} is not a fedcsg record: unknown key {unknown[0]!r}")
        processes = [
            ProcessRecord(**{k: p[k] for k in ("role", "pid", "command", "log")}) for p in data.get("processes", [])
        ]
        return cls(**{**data, "processes": processes})

    def stop(self) -> list[int]:
        """Stop every recorded process (and their children) by PID; the state file stays."""
        return stop_processes(list(reversed(self.processes)))

    def alive(self) -> dict[str, bool]:
        return {f"{p.role}[{p.pid}]": p.alive() for p in self.processes}


@dataclass(frozen=True)
class FederationPlan:
    """What :func:`start_federation` starts.

    Attributes
    ----------
    directory
        Working directory: ``certs/``, ``keys/``, ``logs/``, ``state.db``, ``federation.json``.
    nodes
        Number of SuperNodes; node ``i`` gets ``partition-id=i num-partitions=nodes`` (unless ``node_data``).
    data_dir
        The SuperNodes' ``data-dir`` node config (None: the ClientApp's $FEDCSG_DATA_DIR / run config).
    node_data
        Each SuperNode's own data, one folder per node (``nodes`` of them): node ``i`` gets
        ``data-dir`` ``node_data[i]`` and no partition, and trains on all of that folder; () = partitions
        of ``data_dir``.
    host, port
        Where the SuperLink listens (port 0: a free one).
    connection
        ``flwr`` connection name.
    flwr_home
        ``FLWR_HOME`` for the connection entry (None: ``directory/flwr-home``).
    insecure
        No TLS, no node authentication (loud warning).
    fleet_address
        Address the SuperNodes connect to instead of the SuperLink's (a relay in front of it).
    register
        Register the node keys before the SuperNodes start (False leaves them unregistered, to see
        them refused).
    runtime_tls
        Serve each SuperNode's own Runtime API over TLS too, with its node certificate.
    env
        Extra environment for every process (e.g. ``OMP_NUM_THREADS``); the ClientApp and ServerApp
        processes Flower starts inherit it.
    supervise
        Run each SuperNode under a supervisor (:mod:`~fedcsg.deploy.supervisor`) that restarts it
        whenever it exits, so that the federation survives a node's drop; False starts the bare
        ``flower-supernode`` processes (a benchmark that measures or caps exactly those).
    """

    directory: str | Path
    nodes: int = 2
    data_dir: str | Path | None = None
    node_data: tuple[str | Path, ...] = ()
    host: str = "127.0.0.1"
    port: int = 0
    connection: str = "fedcsg-deploy"
    flwr_home: str | Path | None = None
    insecure: bool = False
    fleet_address: str | None = None
    register: bool = True
    runtime_tls: bool = True
    env: Mapping[str, str] | None = None
    supervise: bool = True

    def __post_init__(self) -> None:
        if self.node_data and len(self.node_data) != self.nodes:
            raise ValueError(
                f"node data {', '.join(map(str, self.node_data))} names {len(self.node_data)} folder(s) for "
                f"{self.nodes} SuperNode(s); accepted is one folder per SuperNode"
            )
        missing = [str(d) for d in self.node_data if not Path(d).is_dir()]
        if missing:
            raise FileNotFoundError(f"node data folder {missing[0]!r} does not exist or is not a directory")


def ensure_credentials(directory: str | Path, nodes: int, hosts: Sequence[str]) -> tuple[TlsFiles, list[NodeKey]]:
    """The certificates and node keys under ``directory``; made when absent (a test federation)."""
    check_nodes(nodes, minimum=1)
    directory = Path(directory)
    tls = TlsFiles.in_dir(directory / "certs", nodes)
    if not tls.ca_cert.is_file():
        tls = make_certificates(directory / "certs", hosts=hosts, nodes=nodes)
    tls.check()
    keys = node_keys_in(directory / "keys", nodes)
    if not all(k.private.is_file() and k.public.is_file() for k in keys):
        keys = make_node_keys(directory / "keys", nodes, overwrite=True)
    return tls, keys


def start_federation(plan: FederationPlan, startup_timeout: float = 60.0) -> Federation:
    """Start a SuperLink and ``plan.nodes`` SuperNodes on this machine and write the state file.

    Secure unless ``plan.insecure``: TLS with certificates from ``DIR/certs`` and node
    authentication with keys from ``DIR/keys`` (both made when absent), the keys registered
    through ``flwr supernode register`` before the SuperNodes start. On any failure every process
    started so far is stopped before the error propagates.
    """
    if plan.nodes <= 0:
        raise ValueError(f"nodes = {plan.nodes} is not accepted: a positive integer is")
    directory = Path(plan.directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    if (directory / STATE_FILE).is_file():
        previous = Federation.load(directory)
        if any(previous.alive().values()):
            raise FileExistsError(f"a federation from {str(directory)!r} is still running: `fedcsg deploy down` first")
    if plan.insecure:
        print(INSECURE_WARNING, file=sys.stderr, flush=True)
    flwr_home = Path(plan.flwr_home or directory / "flwr-home").resolve()
    port = plan.port or free_port(plan.host)
    address = f"{plan.host}:{port}"
    tls, keys = (None, []) if plan.insecure else ensure_credentials(directory, plan.nodes, (plan.host, "localhost"))
    env = flwr_env(flwr_home, plan.env)
    federation = Federation(
        directory=str(directory),
        connection=plan.connection,
        flwr_home=str(flwr_home),
        address=address,
        fleet_address=plan.fleet_address or address,
        secure=not plan.insecure,
    )
    try:
        process, record = start_process(
            "superlink",
            superlink_command(plan.host, port, tls, database=directory / "state.db"),
            directory / "logs" / "superlink.log",
            env,
            cwd=directory,
        )
        federation.processes.append(record)
        federation.save()
        wait_for_port(plan.host, port, startup_timeout, process)
        write_connection(flwr_home, plan.connection, address, None if tls is None else tls.ca_cert, plan.insecure)
        if tls is not None and plan.register:
            federation.node_ids = register_nodes(flwr_home, plan.connection, keys)
        federation.node_commands = [
            plan_node_command(plan, federation.fleet_address, tls, keys, i) for i in range(plan.nodes)
        ]
        federation.save()
        for i, command in enumerate(federation.node_commands):
            started = supervisor_command(directory, i) if plan.supervise else command
            process, record = start_process(f"supernode-{i}", started, directory / "logs" / f"supernode-{i}.log", env)
            federation.processes.append(record)
            federation.save()
        return federation
    except BaseException:
        federation.stop()
        raise


def plan_node_command(
    plan: FederationPlan, fleet_address: str, tls: TlsFiles | None, keys: list[NodeKey], i: int
) -> list[str]:
    """The ``flower-supernode`` command of the plan's SuperNode ``i``: its partition or its own data,
    a free Runtime API port, TLS and its key unless insecure."""
    runtime_tls = None
    if tls is not None and plan.runtime_tls:
        runtime_tls = (*tls.node_certs[i], tls.ca_cert)
    return supernode_command(
        fleet_address,
        i if not plan.node_data else None,
        plan.nodes,
        free_port(),
        None if tls is None else tls.ca_cert,
        None if tls is None else keys[i].private,
        data_dir=plan.node_data[i] if plan.node_data else plan.data_dir,
        runtime_tls=runtime_tls,
    )


def wait_for_nodes(
    federation: Federation, count: int, timeout: float = 60.0, node_ids: set[int] | None = None
) -> list[dict[str, Any]]:
    """Wait until ``count`` SuperNodes (of ``node_ids``, when given) are online at the SuperLink;
    returns ``flwr supernode ls``."""
    deadline = time.monotonic() + timeout
    nodes: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        nodes = list_nodes(federation.flwr_home, federation.connection)
        online = [n for n in nodes if str(n.get("status", "")).lower() == "online"]
        if sum(1 for n in online if node_ids is None or int(n["node-id"]) in node_ids) >= count:
            return nodes
        time.sleep(1.0)
    raise RuntimeError(f"{count} SuperNode(s) not online within {timeout:.0f}s: {nodes}")


def rotate_key(federation: Federation, node: int, timeout: float = 120.0) -> tuple[int, int]:
    """Give SuperNode ``node`` a new key pair and revoke the old one; returns ``(old id, new id)``.

    The new public key is registered first (the SuperLink gives it a new node id), then replaces the
    node's key files; the node's flower-supernode is stopped with SIGTERM (it deactivates itself) and
    its supervisor starts it again, now with the new key; once the new node id is online the old one
    is unregistered. Raises ValueError for an insecure federation or a node without a supervisor.
    """
    if not federation.secure:
        raise ValueError(f"the federation in {federation.directory!r} is insecure: its SuperNodes have no keys")
    if not 0 <= node < len(federation.node_commands):
        raise ValueError(
            f"node {node} is not accepted: the federation in {federation.directory!r} has SuperNodes "
            f"0..{len(federation.node_commands) - 1}"
        )
    record = next(p for p in federation.processes if p.role == f"supernode-{node}")
    if record.command[1:] != supervisor_command(federation.directory, node)[1:] or not record.alive():
        raise ValueError(f"SuperNode {node} does not run under a supervisor (`deploy up` without --no-supervise)")
    command = federation.node_commands[node]
    private = Path(command[command.index("--auth-supernode-private-key") + 1])
    key = NodeKey(private, private.with_name(private.name + ".pub"))
    following = NodeKey(key.private.with_suffix(".next"), key.public.with_suffix(".next"))
    write_node_key(following, f"fedcsg-{private.stem}")
    old_id = federation.node_ids[node]
    new_id = register_nodes(federation.flwr_home, federation.connection, [following])[0]
    following.private.replace(key.private)
    following.public.replace(key.public)
    for pid in children_of(record.pid):  # the supervisor's one child: the flower-supernode
        os.kill(pid, signal.SIGTERM)
    wait_for_nodes(federation, 1, timeout, node_ids={new_id})
    unregister_node(federation.flwr_home, federation.connection, old_id)
    federation.node_ids[node] = new_id
    federation.save()
    return old_id, new_id


def run_config_text(values: Mapping[str, Any] | str) -> str:
    """``--run-config`` text for ``flwr run`` (TOML values: strings quoted, booleans lower-case);
    a string is passed through."""
    if isinstance(values, str):
        return values
    parts = []
    for key, value in values.items():
        if isinstance(value, bool):
            parts.append(f"{key}={str(value).lower()}")
        elif isinstance(value, str):
            parts.append(f"{key}={json.dumps(value)}")
        else:
            parts.append(f"{key}={value}")
    return " ".join(parts)


@dataclass(frozen=True)
class RunOutcome:
    """What ``flwr run`` and ``flwr ls`` said about a run."""

    run_id: int
    status: str
    sub_status: str
    seconds: float
    log: str


def run_app(
    federation: Federation,
    app_dir: str | Path,
    run_config: Mapping[str, Any] | str,
    timeout: float = 600.0,
) -> RunOutcome:
    """``flwr run APP CONNECTION --stream`` with ``run_config``; wait for it and read its status.

    ``flwr run --stream`` exits 0 even when the run failed, so the status comes from
    ``flwr ls --run-id``. Raises RuntimeError when the run does not finish within ``timeout``.
    """
    started = time.monotonic()
    args = ["run", str(app_dir), federation.connection, "--stream"]
    if run_config:
        args += ["--run-config", run_config_text(run_config)]
    log_path = Path(federation.directory) / "logs" / f"flwr-run-{int(time.time() * 1000)}.log"
    process, record = start_process("flwr-run", ["flwr", *args], log_path, flwr_env(federation.flwr_home), app_dir)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"flwr run did not finish within {timeout:.0f}s (log: {log_path})") from None
    finally:
        stop_processes([record])
    text = log_path.read_text(errors="replace")
    run_id = _run_id_from(text)
    if run_id is None:
        raise RuntimeError(f"flwr run did not start a run (exit {process.returncode}); log {log_path}: {text[-500:]}")
    status, sub_status = run_status(federation, run_id)
    return RunOutcome(run_id, status, sub_status, time.monotonic() - started, str(log_path))


def _run_id_from(text: str) -> int | None:
    import re

    # `flwr run` prints "Successfully started run <id>" before it streams the run's logs.
    match = re.search(r"started run (\d+)", text)
    return int(match.group(1)) if match else None


def run_status(federation: Federation, run_id: int) -> tuple[str, str]:
    """``(status, sub-status)`` of a run, e.g. ``("finished", "completed")``."""
    result = flwr_cli(["ls", federation.connection, "--run-id", str(run_id), "--format", "json"], federation.flwr_home)
    runs = json_tail(result.stdout).get("runs", [])
    if not runs:
        raise RuntimeError(f"flwr ls does not know run {run_id}")
    status = str(runs[0].get("status", ""))
    main, _, sub = status.partition(":")
    return main.strip(), sub.strip()
