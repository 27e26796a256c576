"""``fedcsg export`` and ``fedcsg deploy``: model files for devices, and a federation on real processes.

Handlers return an exit code; bad input raises ValueError / FileNotFoundError / FileExistsError
with a one-line message (``fedcsg`` prints it and exits 2).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import sys
from pathlib import Path

from fedcsg.cli.args import integer, port, positive_int
from fedcsg.deploy import supervisor
from fedcsg.deploy.credentials import MAX_NODES

EXPORT_CHOICES = ("compact", "torchscript", "onnx", "all")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``export`` and ``deploy`` subcommands to the ``fedcsg`` parser's subparsers."""
    export = sub.add_parser("export", help="write a checkpoint as a compact, TorchScript or ONNX file for devices")
    export.add_argument(
        "--checkpoint",
        required=True,
        help="safetensors checkpoint (fedcsg metadata, or a payload in a run directory), or a run directory",
    )
    export.add_argument("--format", required=True, choices=EXPORT_CHOICES, dest="export_format")
    export.add_argument("--out", help="output file (default: beside the checkpoint); a directory with --format all")
    export.add_argument("--arm", help="the arm, when the checkpoint's run directory holds several")
    export.add_argument("--run-dir", help="run directory whose arms/ARM.json describes a bare payload checkpoint")
    export.add_argument("--json", action="store_true", help="print one JSON object")
    export.set_defaults(handler=cmd_export)

    deploy = sub.add_parser("deploy", help="TLS certificates, SuperNode keys, and a SuperLink with SuperNodes")
    actions = deploy.add_subparsers(
        dest="deploy_action", required=True, metavar="{certs,keys,up,down,status,run,node,rotate-key}"
    )

    certs = actions.add_parser("certs", help="make a CA, a SuperLink certificate and SuperNode certificates")
    certs.add_argument("--out", required=True, help="directory for ca.crt, server.crt/.key, node-I.crt/.key")
    certs.add_argument(
        "--host",
        action="append",
        help="name or IP the SuperLink is reached under (repeatable; default 127.0.0.1 and localhost)",
    )
    certs.add_argument(
        "--nodes", type=integer, default=0, help=f"SuperNode certificates to make (default 0, at most {MAX_NODES:,})"
    )
    certs.add_argument("--days", type=positive_int, default=365)
    certs.add_argument("--overwrite", action="store_true", help="replace an existing CA (invalidates old certificates)")
    certs.set_defaults(handler=cmd_certs)

    keys = actions.add_parser("keys", help="make SuperNode authentication key pairs (EC P-384, OpenSSH format)")
    keys.add_argument("--out", required=True, help="directory for node-I.key and node-I.key.pub")
    keys.add_argument("--nodes", type=positive_int, required=True, help=f"key pairs to make (at most {MAX_NODES:,})")
    keys.add_argument("--overwrite", action="store_true")
    keys.set_defaults(handler=cmd_keys)

    up = actions.add_parser("up", help="start a SuperLink and N SuperNodes on this machine (TLS + node auth)")
    up.add_argument("--dir", required=True, help="working directory: certs/, keys/, logs/, federation.json")
    up.add_argument(
        "--nodes", type=positive_int, help=f"SuperNodes (default 2, or one per --node-data DIR; at most {MAX_NODES:,})"
    )
    up.add_argument("--data-dir", help="the SuperNodes' data-dir node config (default: $FEDCSG_DATA_DIR)")
    up.add_argument(
        "--node-data",
        type=lambda text: tuple(part.strip() for part in text.split(",") if part.strip()),
        default=(),
        metavar="DIR1,DIR2,...",
        help="each SuperNode's own data (ImageFolder or parquet folder), one per node: it trains on all of it, "
        "no partitions",
    )
    up.add_argument("--host", default="127.0.0.1", help="SuperLink host (default 127.0.0.1)")
    up.add_argument("--port", type=port, default=0, help="SuperLink port (default: a free one)")
    up.add_argument("--connection", default="fedcsg-deploy", help="flwr connection name (flwr run . NAME)")
    up.add_argument("--flwr-home", help="FLWR_HOME for the connection entry (default: DIR/flwr-home)")
    up.add_argument("--wait", type=float, default=120.0, help="seconds to wait for the SuperNodes to come online")
    up.add_argument(
        "--insecure",
        action="store_true",
        help="NO TLS and NO SuperNode authentication (debugging on a trusted loopback only)",
    )
    up.add_argument(
        "--no-supervise",
        dest="supervise",
        action="store_false",
        help="start bare SuperNodes, not each under `deploy node` (which restarts it whenever it exits)",
    )
    up.set_defaults(handler=cmd_up)

    down = actions.add_parser("down", help="stop the processes `deploy up` started (by PID)")
    down.add_argument("--dir", required=True)
    down.set_defaults(handler=cmd_down)

    status = actions.add_parser("status", help="which of the started processes live, and the SuperNodes online")
    status.add_argument("--dir", required=True)
    status.set_defaults(handler=cmd_status)

    run = actions.add_parser("run", help="flwr run the fedcsg app on the federation and report its final status")
    run.add_argument("--dir", required=True)
    run.add_argument("--app", default=".", help="Flower app directory (default: .)")
    run.add_argument("--run-config", default="", help="run config overrides, e.g. \"arm='csg' num-rounds=2\"")
    run.add_argument("--timeout", type=float, default=3600.0)
    run.set_defaults(handler=cmd_run)

    node = actions.add_parser(
        "node",
        help="run one SuperNode and restart it whenever it exits (exponential backoff; a device's supervisor)",
    )
    supervisor.add_arguments(node)
    node.set_defaults(handler=cmd_node)

    rotate = actions.add_parser(
        "rotate-key", help="give a running SuperNode a new key pair: register it, restart the node, revoke the old"
    )
    rotate.add_argument("--dir", required=True)
    rotate.add_argument("--node", type=integer, required=True, help="the SuperNode's index (0-based)")
    rotate.add_argument("--wait", type=float, default=120.0, help="seconds to wait for the node to come back")
    rotate.set_defaults(handler=cmd_rotate_key)


# ------------------------------------------------------------------------------------- export


def cmd_export(args: argparse.Namespace) -> int:
    from fedcsg.deploy.export import EXPORT_FORMATS, export_checkpoint, recorded_run_config

    checkpoint = Path(args.checkpoint)
    run_config = None
    if args.run_dir:
        run_config = recorded_run_config(Path(args.run_dir), args.arm)
        if run_config is None:
            raise FileNotFoundError(f"no arms/{args.arm or '*'}.json under {args.run_dir!r}")
    formats = EXPORT_FORMATS if args.export_format == "all" else (args.export_format,)
    info, paths = export_checkpoint(checkpoint, formats, args.out, run_config=run_config, arm=args.arm)
    rows = [
        {"format": fmt, "path": str(path), "bytes": path.stat().st_size, "sha256": file_sha256(path)}
        for fmt, path in zip(formats, paths, strict=True)
    ]
    result = {"checkpoint": str(checkpoint), "model": info.model, "arm": info.arm, "files": rows}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{info.model} ({info.arm}) from {checkpoint}")
        for row in rows:
            print(f"  {row['format']:<12}{row['bytes']:>12,} bytes  {row['path']}  sha256 {row['sha256']}")
    return 0


# ------------------------------------------------------------------------------------- deploy


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, as ``sha256sum`` prints it: what a device checks a copied model file against."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def cmd_certs(args: argparse.Namespace) -> int:
    from fedcsg.deploy.credentials import make_certificates

    hosts = args.host or ["127.0.0.1", "localhost"]
    files = make_certificates(args.out, hosts=hosts, nodes=args.nodes, days=args.days, overwrite=args.overwrite)
    print(f"CA:        {files.ca_cert}  (give this to every SuperNode and flwr; keep {files.ca_key.name} private)")
    print(f"SuperLink: {files.server_cert} / {files.server_key}  (hosts: {', '.join(hosts)})")
    for cert, key in files.node_certs:
        print(f"SuperNode: {cert} / {key}  (its own Runtime API)")
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    from fedcsg.deploy.credentials import make_node_keys

    keys = make_node_keys(args.out, args.nodes, overwrite=args.overwrite)
    for key in keys:
        print(f"{key.private}  (SuperNode: --auth-supernode-private-key)   {key.public}  (flwr supernode register)")
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from fedcsg.deploy.federation import INSECURE_WARNING, FederationPlan, start_federation, wait_for_nodes

    if args.insecure:
        # Said here as well as in start_federation: the CLI user must not miss it.
        print(INSECURE_WARNING, file=sys.stderr, flush=True)
    data_dir = args.data_dir or os.environ.get("FEDCSG_DATA_DIR")
    if data_dir and not Path(data_dir).is_dir():
        raise FileNotFoundError(f"data directory {data_dir!r} does not exist")
    nodes = args.nodes or len(args.node_data) or 2
    plan = FederationPlan(
        directory=args.dir,
        nodes=nodes,
        data_dir=data_dir,
        node_data=args.node_data,
        host=args.host,
        port=args.port,
        connection=args.connection,
        flwr_home=args.flwr_home,
        insecure=args.insecure,
        supervise=args.supervise,
    )
    federation = start_federation(plan)
    try:
        wait_for_nodes(federation, nodes, timeout=args.wait)
    except BaseException:
        federation.stop()
        raise
    security = "TLS + SuperNode authentication" if federation.secure else "INSECURE (no TLS, no node auth)"
    supervised = ", each under `fedcsg deploy node` (restarted whenever it exits)" if args.supervise else ""
    print(f"SuperLink {federation.address} ({security}); {nodes} SuperNode(s) online{supervised}")
    for record in federation.processes:
        print(f"  {record.role:<12} pid {record.pid:<8} log {record.log}")
    print(f"state: {federation.state_path}")
    print(f"run:   FLWR_HOME={shlex.quote(federation.flwr_home)} flwr run . {federation.connection} --stream")
    print(f"stop:  fedcsg deploy down --dir {shlex.quote(str(args.dir))}")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    from fedcsg.deploy.federation import Federation

    federation = Federation.load(args.dir)
    stopped = federation.stop()
    print(f"stopped {len(stopped)} process(es): {' '.join(map(str, stopped)) or 'none were running'}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from fedcsg.deploy.federation import Federation
    from fedcsg.deploy.flwr_cli import list_nodes

    federation = Federation.load(args.dir)
    alive = federation.alive()
    for name, up in alive.items():
        print(f"  {name:<24}{'running' if up else 'stopped'}")
    if alive and next(iter(alive.values())):
        nodes = list_nodes(federation.flwr_home, federation.connection)
        online = [n for n in nodes if str(n.get("status")) == "online"]
        print(f"SuperLink {federation.address}: {len(online)} of {len(nodes)} registered SuperNode(s) online")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from fedcsg.deploy.federation import Federation, run_app

    federation = Federation.load(args.dir)
    outcome = run_app(federation, Path(args.app).resolve(), args.run_config, timeout=args.timeout)
    print(f"run {outcome.run_id}: {outcome.status}:{outcome.sub_status} in {outcome.seconds:.0f}s (log {outcome.log})")
    return 0 if (outcome.status, outcome.sub_status) == ("finished", "completed") else 1


def cmd_node(args: argparse.Namespace) -> int:
    return supervisor.run_node(args)


def cmd_rotate_key(args: argparse.Namespace) -> int:
    from fedcsg.deploy.federation import Federation, rotate_key

    old_id, new_id = rotate_key(Federation.load(args.dir), args.node, timeout=args.wait)
    print(f"SuperNode {args.node}: new key registered as node {new_id}, online; old node {old_id} unregistered")
    return 0
