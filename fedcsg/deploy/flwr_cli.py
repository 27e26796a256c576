"""The ``flwr`` CLI (connection entries, node registration and listing) and the command lines of a
SuperLink and a SuperNode."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedcsg.deploy.credentials import NodeKey, TlsFiles


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


def json_tail(text: str) -> Any:
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
        ids.append(int(json_tail(result.stdout)["node-id"]))
    return ids


def unregister_node(flwr_home: str | Path, connection: str, node_id: int) -> None:
    """Revoke a SuperNode: the SuperLink forgets its public key and refuses it from now on
    (``flwr supernode unregister``)."""
    flwr_cli(["supernode", "unregister", str(node_id), connection, "--format", "json"], flwr_home)


def list_nodes(flwr_home: str | Path, connection: str) -> list[dict[str, Any]]:
    """The SuperNodes the SuperLink knows (``flwr supernode ls --format json``)."""
    result = flwr_cli(["supernode", "ls", connection, "--format", "json"], flwr_home)
    return list(json_tail(result.stdout).get("nodes", []))


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


def node_config_text(partition_id: int | None, num_partitions: int, data_dir: str | Path | None = None) -> str:
    """The ``--node-config`` string the fedcsg ClientApp reads; ``partition_id`` None: a device that
    trains on all of its own ``data_dir`` (no partition numbers)."""
    parts = [] if partition_id is None else [f"partition-id={partition_id} num-partitions={num_partitions}"]
    parts += [f'data-dir="{Path(data_dir).resolve()}"'] if data_dir else []
    return " ".join(parts)


def supernode_command(
    superlink: str,
    partition_id: int | None,
    num_partitions: int,
    runtime_port: int,
    root_certificates: str | Path | None,
    private_key: str | Path | None,
    data_dir: str | Path | None = None,
    runtime_tls: tuple[str | Path, str | Path, str | Path] | None = None,
    max_wait_time: float | None = None,
) -> list[str]:
    """``flower-supernode`` arguments for partition ``partition_id`` of ``num_partitions`` (None: a
    device that trains on all of its own ``data_dir``); the rest as :func:`supernode_args`."""
    node_config = node_config_text(partition_id, num_partitions, data_dir)
    return supernode_args(
        superlink, runtime_port, root_certificates, private_key, node_config, runtime_tls, max_wait_time
    )


def supernode_args(
    superlink: str,
    runtime_port: int,
    root_certificates: str | Path | None,
    private_key: str | Path | None,
    node_config: str = "",
    runtime_tls: tuple[str | Path, str | Path, str | Path] | None = None,
    max_wait_time: float | None = None,
) -> list[str]:
    """A ``flower-supernode`` command line.

    Parameters
    ----------
    superlink
        ``host:port`` of the SuperLink's Fleet API (or of a relay in front of it).
    runtime_port
        Port of the SuperNode's own Runtime API on 127.0.0.1 (the ClientApp processes connect to it);
        each SuperNode on one machine needs its own.
    root_certificates, private_key
        The CA certificate and the node's auth private key; both None means insecure.
    node_config
        ``--node-config`` text, e.g. ``data-dir="/home/pi/images"`` (:func:`node_config_text`).
    runtime_tls
        ``(cert, key, ca)`` to serve the Runtime API over TLS as well (optional: it is a loopback
        connection inside the device).
    max_wait_time
        Give up connecting to the SuperLink after this many seconds (None: retry for ever).
    """
    command = ["flower-supernode", "--superlink", superlink, "--host", "127.0.0.1", "--port", str(runtime_port)]
    command += ["--node-config", node_config]
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
