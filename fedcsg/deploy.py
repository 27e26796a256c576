"""Deployment on Flower's engine: TLS certificates, SuperNode keys, a SuperLink and N SuperNodes as
processes on this machine, the ``flwr`` connection entry, and running the fedcsg app on them.

Secure by default
-----------------
The SuperLink serves its Fleet, Control and Runtime APIs over HTTPS on one port (Flower 1.41) with
a server certificate signed by a CA made here, and accepts only the SuperNodes whose public keys
were registered with ``flwr supernode register`` (``--enable-supernode-auth``). Flower's SuperNode
does not present a TLS client certificate (no mTLS on the Fleet API): its identity is its EC P-384
key pair, and every Fleet request is signed with the private key. The per-node certificates made
here serve the SuperNode's *own* Runtime API, which the ClientApp processes on the device connect
to. ``insecure=True`` turns all of this off; it is never a default and always prints a loud warning.

Processes
---------
Every process is started with ``start_new_session=True`` (its own process group) and its PID,
command line and log file are written to ``DIR/federation.json``; :func:`stop_processes` stops exactly those processes
and the children Flower started under them (found through ``/proc`` by parent PID, never by
name), so other people's Flower jobs on the same machine are left alone.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

STATE_FILE = "federation.json"
INSECURE_WARNING = (
    "WARNING: --insecure: TLS and SuperNode authentication are OFF. Model updates travel in clear text and "
    "ANY process that can reach the SuperLink can join the federation and send updates. Use it only on a "
    "trusted loopback for debugging."
)


# --------------------------------------------------------------------------------------------- TLS


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of a test federation's public-key infrastructure.

    Attributes
    ----------
    ca_cert, ca_key
        The certificate authority. ``ca_cert`` is what every party trusts (``--ssl-ca-certfile`` on
        the SuperLink, ``--root-certificates`` on SuperNodes, ``root-certificates`` in ``flwr``'s
        connection entry); ``ca_key`` signs the other certificates and should leave this machine
        never.
    server_cert, server_key
        The SuperLink's certificate (serverAuth; SANs: the given hosts) and key.
    node_certs
        ``(cert, key)`` per SuperNode (serverAuth and clientAuth; SANs 127.0.0.1 and localhost),
        for the SuperNode's own Runtime API on the device.
    """

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    node_certs: tuple[tuple[Path, Path], ...] = ()

    @classmethod
    def in_dir(cls, directory: str | Path, nodes: int = 0) -> TlsFiles:
        d = Path(directory)
        return cls(
            d / "ca.crt",
            d / "ca.key",
            d / "server.crt",
            d / "server.key",
            tuple((d / f"node-{i}.crt", d / f"node-{i}.key") for i in range(nodes)),
        )

    def check(self) -> None:
        """Raise FileNotFoundError naming the first missing file."""
        for path in (self.ca_cert, self.server_cert, self.server_key, *(p for pair in self.node_certs for p in pair)):
            if not path.is_file():
                raise FileNotFoundError(f"TLS file {str(path)!r} does not exist (make it with `fedcsg deploy certs`)")


def _write_private(path: Path, data: bytes) -> None:
    # Private keys are created with mode 0600 from the start, never readable by others even briefly.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def _san(hosts: Iterable[str]) -> list:
    from cryptography import x509

    names: list = []
    for host in dict.fromkeys(hosts):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def make_certificates(
    out_dir: str | Path,
    hosts: Sequence[str] = ("127.0.0.1", "localhost"),
    nodes: int = 0,
    days: int = 365,
    overwrite: bool = False,
) -> TlsFiles:
    """Make a CA, a SuperLink certificate for ``hosts`` and ``nodes`` SuperNode certificates.

    Parameters
    ----------
    out_dir
        Directory for ``ca.crt``, ``ca.key``, ``server.crt``, ``server.key`` and
        ``node-I.crt`` / ``node-I.key``. Keys are written with mode 0600.
    hosts
        Names and IP addresses under which SuperNodes and ``flwr`` reach the SuperLink (the
        certificate's subject alternative names; TLS checks the address against them).
    nodes
        Number of SuperNode certificates.
    days
        Validity.
    overwrite
        Replace existing files (otherwise an existing ``ca.crt`` is an error: a new CA would
        silently invalidate every certificate already handed out).

    Returns
    -------
    TlsFiles
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if not hosts:
        raise ValueError("make_certificates needs at least one host name or IP address for the SuperLink")
    if nodes < 0 or days <= 0:
        raise ValueError(f"nodes = {nodes} and days = {days} are not accepted: nodes >= 0 and days > 0 are")
    files = TlsFiles.in_dir(out_dir, nodes)
    if files.ca_cert.exists() and not overwrite:
        raise FileExistsError(f"{str(files.ca_cert)!r} exists; pass overwrite (--overwrite) to make a new CA")
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    # Backdate a little: a device whose clock lags would otherwise reject a certificate made just now.
    not_before, not_after = now - datetime.timedelta(hours=1), now + datetime.timedelta(days=days)
    pem = serialization.Encoding.PEM
    key_format = (serialization.PrivateFormat.PKCS8, serialization.NoEncryption())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedcsg test federation CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )  # keyCertSign, cRLSign
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write_private(files.ca_key, ca_key.private_bytes(pem, *key_format))
    files.ca_cert.write_bytes(ca_cert.public_bytes(pem))

    def leaf(common_name: str, names: Sequence[str], usages: list, cert_path: Path, key_path: Path) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(True, False, False, False, True, False, False, False, False), critical=True
            )  # digitalSignature, keyAgreement (ECDHE)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(x509.SubjectAlternativeName(_san(names)), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        _write_private(key_path, key.private_bytes(pem, *key_format))
        cert_path.write_bytes(cert.public_bytes(pem))

    leaf("fedcsg superlink", hosts, [ExtendedKeyUsageOID.SERVER_AUTH], files.server_cert, files.server_key)
    for i, (cert_path, key_path) in enumerate(files.node_certs):
        usages = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
        leaf(f"fedcsg supernode {i}", ("127.0.0.1", "localhost"), usages, cert_path, key_path)
    return files


# --------------------------------------------------------------------------------- SuperNode keys


@dataclass(frozen=True)
class NodeKey:
    """One SuperNode's authentication key pair (EC P-384, OpenSSH format, as Flower 1.41 reads them)."""

    private: Path
    public: Path


def node_keys_in(directory: str | Path, count: int) -> list[NodeKey]:
    d = Path(directory)
    return [NodeKey(d / f"node-{i}.key", d / f"node-{i}.key.pub") for i in range(count)]


def make_node_keys(out_dir: str | Path, count: int, overwrite: bool = False) -> list[NodeKey]:
    """Write ``count`` SuperNode key pairs ``node-I.key`` (0600) / ``node-I.key.pub``.

    The SuperLink accepts a SuperNode only after its ``.pub`` file was registered
    (:func:`register_nodes`); the SuperNode signs its requests with the private key
    (``flower-supernode --auth-supernode-private-key``).
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    if count <= 0:
        raise ValueError(f"nodes = {count} is not accepted: a positive integer is")
    keys = node_keys_in(out_dir, count)
    existing = [k.private for k in keys if k.private.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{str(existing[0])!r} exists; pass overwrite (--overwrite) to replace the node keys")
    for i, key in enumerate(keys):
        private = ec.generate_private_key(ec.SECP384R1())
        _write_private(
            key.private,
            private.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
            ),
        )
        public = private.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        key.public.write_bytes(public + f" fedcsg-node-{i}\n".encode())
    return keys


# ------------------------------------------------------------------------------ flwr connection


def flwr_env(flwr_home: str | Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for Flower processes: ``FLWR_HOME`` set, no runtime ``uv sync``."""
    env = dict(os.environ)
    env["FLWR_HOME"] = str(flwr_home)
    # The dependencies are installed already; without this the SuperLink runs `uv sync` per run.
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env.update(extra or {})
    return env


def write_connection(
    flwr_home: str | Path,
    name: str,
    address: str,
    root_certificates: str | Path | None = None,
    insecure: bool = False,
) -> Path:
    """Add (or replace) ``[superlink.NAME]`` in ``FLWR_HOME/config.toml``, keeping other entries.

    ``address`` is the SuperLink's ``host:port`` (Control API; in Flower 1.41 the same port as the
    Fleet API). Returns the config file.
    """
    import tomli_w

    if not insecure and root_certificates is None:
        raise ValueError(f"connection {name!r} needs root_certificates (the CA certificate) unless insecure")
    path = Path(flwr_home) / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    document: dict[str, Any] = tomllib.loads(path.read_text()) if path.is_file() else {}
    entry: dict[str, Any] = {"address": address}
    if insecure:
        entry["insecure"] = True
    else:
        entry["root-certificates"] = str(Path(root_certificates).resolve())
    document.setdefault("superlink", {})[name] = entry
    path.write_text(tomli_w.dumps(document))
    return path


def flwr_cli(
    args: Sequence[str],
    flwr_home: str | Path,
    timeout: float = 60.0,
    cwd: str | Path | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run the ``flwr`` CLI with ``FLWR_HOME``; raise RuntimeError with its output when it fails."""
    command = ["flwr", *args]
    result = subprocess.run(
        command,
        env=flwr_env(flwr_home),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check and result.returncode != 0:
        tail = (result.stdout + result.stderr).strip().splitlines()[-5:]
        raise RuntimeError(f"`{shlex.join(command)}` exited {result.returncode}: {' | '.join(tail)}")
    return result


def _json_tail(text: str) -> Any:
    # `flwr ... --format json` prints the JSON document last; anything before it is decoration.
    start = text.find("{")
    if start < 0:
        raise ValueError(f"no JSON object in flwr output: {text.strip()[:200]!r}")
    return json.loads(text[start:])


def register_nodes(flwr_home: str | Path, connection: str, keys: Sequence[NodeKey]) -> list[int]:
    """Register each key's public half with the SuperLink; returns the node IDs it assigned."""
    ids = []
    for key in keys:
        result = flwr_cli(["supernode", "register", str(key.public), connection, "--format", "json"], flwr_home)
        ids.append(int(_json_tail(result.stdout)["node-id"]))
    return ids


def list_nodes(flwr_home: str | Path, connection: str) -> list[dict[str, Any]]:
    """The SuperNodes the SuperLink knows (``flwr supernode ls --format json``)."""
    result = flwr_cli(["supernode", "ls", connection, "--format", "json"], flwr_home)
    return list(_json_tail(result.stdout).get("nodes", []))


# ---------------------------------------------------------------------------------- commands


def superlink_command(
    host: str,
    port: int,
    tls: TlsFiles | None,
    database: str | Path = ":flwr-in-memory:",
    enable_supernode_auth: bool = True,
) -> list[str]:
    """``flower-superlink`` arguments; ``tls=None`` means insecure (and no node authentication)."""
    command = ["flower-superlink", "--host", host, "--port", str(port), "--database", str(database)]
    if tls is None:
        return [*command, "--insecure"]
    command += [
        "--ssl-ca-certfile",
        str(tls.ca_cert),
        "--ssl-certfile",
        str(tls.server_cert),
        "--ssl-keyfile",
        str(tls.server_key),
    ]
    return [*command, "--enable-supernode-auth"] if enable_supernode_auth else command


def node_config_text(partition_id: int, num_partitions: int, data_dir: str | Path | None = None) -> str:
    """The ``--node-config`` string the fedcsg ClientApp reads."""
    text = f"partition-id={partition_id} num-partitions={num_partitions}"
    return text + (f' data-dir="{Path(data_dir).resolve()}"' if data_dir else "")


def supernode_command(
    superlink: str,
    partition_id: int,
    num_partitions: int,
    runtime_port: int,
    root_certificates: str | Path | None,
    private_key: str | Path | None,
    data_dir: str | Path | None = None,
    runtime_tls: tuple[str | Path, str | Path, str | Path] | None = None,
    max_wait_time: float | None = None,
) -> list[str]:
    """``flower-supernode`` arguments for partition ``partition_id`` of ``num_partitions``.

    Parameters
    ----------
    superlink
        ``host:port`` of the SuperLink's Fleet API (or of a relay in front of it).
    runtime_port
        Port of the SuperNode's own Runtime API on 127.0.0.1 (the ClientApp processes connect to it);
        each SuperNode on one machine needs its own.
    root_certificates, private_key
        The CA certificate and the node's auth private key; both None means insecure.
    runtime_tls
        ``(cert, key, ca)`` to serve the Runtime API over TLS as well (optional: it is a loopback
        connection inside the device).
    max_wait_time
        Give up connecting to the SuperLink after this many seconds (None: retry for ever).
    """
    command = ["flower-supernode", "--superlink", superlink, "--host", "127.0.0.1", "--port", str(runtime_port)]
    command += ["--node-config", node_config_text(partition_id, num_partitions, data_dir)]
    if root_certificates is None:
        if private_key is not None:
            raise ValueError("an auth key without TLS is refused by Flower: give root_certificates too")
        command.append("--insecure")
    else:
        command += ["--root-certificates", str(root_certificates)]
        if private_key is not None:
            command += ["--auth-supernode-private-key", str(private_key)]
    if runtime_tls is not None:
        cert, key, ca = runtime_tls
        command += ["--ssl-certfile", str(cert), "--ssl-keyfile", str(key), "--ssl-ca-certfile", str(ca)]
    if max_wait_time is not None:
        command += ["--max-wait-time", str(max_wait_time)]
    return command


# --------------------------------------------------------------------------------- processes


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


def _children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name in field 2 may contain spaces and parentheses: split after the last ')'.
        fields = stat[stat.rindex(")") + 2 :].split()
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    return children


def descendants(pid: int) -> list[int]:
    """PIDs of every live process below ``pid`` (children first found through ``/proc/*/stat``)."""
    tree, out, stack = _children(), [], [pid]
    while stack:
        for child in tree.get(stack.pop(), []):
            out.append(child)
            stack.append(child)
    return out


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
    targets = list(dict.fromkeys(targets))
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
    for pid in targets:
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
        data = json.loads(path.read_text())
        data["processes"] = [ProcessRecord(**p) for p in data.get("processes", [])]
        return cls(**data)

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
        Number of SuperNodes; node ``i`` gets ``partition-id=i num-partitions=nodes``.
    data_dir
        The SuperNodes' ``data-dir`` node config (None: the ClientApp's $FEDCSG_DATA_DIR / run config).
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
    """

    directory: str | Path
    nodes: int = 2
    data_dir: str | Path | None = None
    host: str = "127.0.0.1"
    port: int = 0
    connection: str = "fedcsg-deploy"
    flwr_home: str | Path | None = None
    insecure: bool = False
    fleet_address: str | None = None
    register: bool = True
    runtime_tls: bool = True
    env: Mapping[str, str] | None = None


def ensure_credentials(directory: str | Path, nodes: int, hosts: Sequence[str]) -> tuple[TlsFiles, list[NodeKey]]:
    """The certificates and node keys under ``directory``; made when absent (a test federation)."""
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
    popen: list[subprocess.Popen] = []
    try:
        process, record = start_process(
            "superlink",
            superlink_command(plan.host, port, tls, database=directory / "state.db"),
            directory / "logs" / "superlink.log",
            env,
            cwd=directory,
        )
        popen.append(process)
        federation.processes.append(record)
        federation.save()
        wait_for_port(plan.host, port, startup_timeout, process)
        write_connection(flwr_home, plan.connection, address, None if tls is None else tls.ca_cert, plan.insecure)
        if tls is not None and plan.register:
            federation.node_ids = register_nodes(flwr_home, plan.connection, keys)
        for i in range(plan.nodes):
            runtime_tls = None
            if tls is not None and plan.runtime_tls:
                runtime_tls = (*tls.node_certs[i], tls.ca_cert)
            command = supernode_command(
                federation.fleet_address,
                i,
                plan.nodes,
                free_port(),
                None if tls is None else tls.ca_cert,
                None if tls is None else keys[i].private,
                data_dir=plan.data_dir,
                runtime_tls=runtime_tls,
            )
            process, record = start_process(f"supernode-{i}", command, directory / "logs" / f"supernode-{i}.log", env)
            popen.append(process)
            federation.processes.append(record)
            federation.save()
        return federation
    except BaseException:
        federation.stop()
        raise


def wait_for_nodes(federation: Federation, count: int, timeout: float = 60.0) -> list[dict[str, Any]]:
    """Wait until ``count`` SuperNodes are online at the SuperLink; returns ``flwr supernode ls``."""
    deadline = time.monotonic() + timeout
    nodes: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        nodes = list_nodes(federation.flwr_home, federation.connection)
        if sum(1 for n in nodes if str(n.get("status", "")).lower() == "online") >= count:
            return nodes
        time.sleep(1.0)
    raise RuntimeError(f"{count} SuperNode(s) not online within {timeout:.0f}s: {nodes}")


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
    runs = _json_tail(result.stdout).get("runs", [])
    if not runs:
        raise RuntimeError(f"flwr ls does not know run {run_id}")
    status = str(runs[0].get("status", ""))
    main, _, sub = status.partition(":")
    return main.strip(), sub.strip()
