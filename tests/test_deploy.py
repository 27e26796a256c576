"""Deployment on Flower's engine: a real SuperLink with TLS and SuperNode authentication, two
SuperNodes on 127.0.0.1, two rounds of the csg arm, a SuperNode killed mid-round and restarted by its
supervisor, a key rotated (an unregistered SuperNode is refused in tests/test_deploy_guide.py); plus the
certificate, key, command, relay and process helpers behind them.

Every process is started on free ports with a temporary FLWR_HOME and stopped by its own PID
(and the children Flower started under it) in ``finally`` blocks, pass or fail.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import math
import os
import re
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
from flwr.app import Context, Message, MessageType, RecordDict
from flwr.cli.build import build_fab_from_disk
from PIL import Image

from fedcsg.cli import deploy as deploy_cli
from fedcsg.deploy.credentials import make_certificates, make_node_keys
from fedcsg.deploy.federation import (
    INSECURE_WARNING,
    Federation,
    FederationPlan,
    RunOutcome,
    run_app,
    run_config_text,
    start_federation,
    wait_for_nodes,
)
from fedcsg.deploy.flwr_cli import list_nodes, superlink_command, supernode_command, write_connection
from fedcsg.deploy.supervisor import STALE_NODE_SECONDS, Backoff, supervisor_command
from fedcsg.fl.task import build_arm_model, payload_layout
from fedcsg.processes import (
    ProcessRecord,
    adopting_orphans,
    children_of,
    descendants,
    session_pids,
    start_process,
    stop_pids,
    stop_processes,
)
from fedcsg.runs.summary import load_results, summarize
from fedcsg.spec.config import RunConfig, fedcsg_version
from fedcsg.wire.messages import TrainInstruction
from fedcsg.wire.payload import model_payload
from simulations.tools.relay import ByteCountingRelay
from tests.test_folders import write_shapes

ROOT = Path(__file__).resolve().parents[1]
# Bounds of the integration tests: generous for a loaded 2-core machine, far from "hangs for ever".
STARTUP_TIMEOUT = 120.0
RUN_TIMEOUT = 300.0


def _cli(argv: list[str]) -> int:
    from fedcsg.cli.args import OneLineParser

    parser = OneLineParser(prog="fedcsg")
    deploy_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.handler(args)


# ------------------------------------------------------------------------ the real federation


# Each SuperNode's own ImageFolder (3 classes; train images per class, drawn from its seed) and the
# server's test folder: different images everywhere.
# Two rounds of csg on the ImageFolders, on the CPU: the runs of the module's federation.
TWO_ROUNDS_OF_CSG = {"arm": "csg", "dataset": "imagefolder", "image-size": 16, "num-rounds": 2, "num-clients": 2}
TWO_ROUNDS_OF_CSG |= {"test-limit": 0, "batch-size": 8, "device": "cpu"}
NODE_IMAGES = ((4, 1), (6, 2))  # (train images per class, seed) of SuperNode 0 and 1
SERVER_IMAGES = (1, 4, 3)  # train and test images per class, seed


@pytest.fixture(scope="module")
def secure_federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    """A SuperLink (TLS, --enable-supernode-auth) and two registered SuperNodes, stopped at the end;
    each SuperNode trains on its own ImageFolder (``FEDERATION/images/node-I``, no partition)."""
    directory = tmp_path_factory.mktemp("federation")
    folders = [write_shapes(directory / "images" / f"node-{i}", n, 1, seed) for i, (n, seed) in enumerate(NODE_IMAGES)]
    write_shapes(directory / "images" / "server", *SERVER_IMAGES)
    plan = FederationPlan(
        directory=directory,
        nodes=2,
        node_data=tuple(folders),
        connection="fedcsg-test",
        # Two ClientApps train at once: one thread each on a shared 2-core machine.
        env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
    )
    federation = start_federation(plan, startup_timeout=STARTUP_TIMEOUT)
    try:
        wait_for_nodes(federation, 2, timeout=STARTUP_TIMEOUT)
        yield federation
    finally:
        stopped = federation.stop()
        assert stopped, "the federation's processes were already gone before the end of the tests"
        time.sleep(0.5)
        assert not any(federation.alive().values()), federation.alive()


def test_the_app_bundle_holds_the_settings_and_entry_points_only() -> None:
    """The FAB that `flwr run .` builds from the repository (Flower's own builder, with the
    pyproject's ``fab-include``): the run settings and the two components, no file of tests/,
    simulations/, docs/, the README or the package's sources; far under 100 kB. The two
    components it names load from the fedcsg installed beside Flower (as on every node)."""
    from flwr.supercore.object_ref import load_app

    fab = build_fab_from_disk(ROOT)
    names = zipfile.ZipFile(io.BytesIO(fab)).namelist()
    assert sorted(names) == [".info/CONTENT", "pyproject.toml"]
    assert len(fab) < 10_000
    config = tomllib.loads(zipfile.ZipFile(io.BytesIO(fab)).read("pyproject.toml").decode())
    components = config["tool"]["flwr"]["app"]["components"]
    assert components == {"serverapp": "fedcsg.fl.server_app:app", "clientapp": "fedcsg.fl.client_app:app"}
    assert set(config["tool"]["flwr"]["app"]["config"]) == set(RunConfig().to_flower())
    for reference in components.values():
        assert load_app(reference, ValueError) is not None
    print(f"app bundle: {len(fab):,} bytes, {len(names)} files")


# A user's CNN that travels in the app bundle: written beside a copy of the repository's pyproject.toml
# whose fab-include names it. It refuses to be imported from where the test wrote it (outside this test's
# own process), so the SuperNodes' ClientApps and the SuperLink's ServerApp can only have it from the
# bundle each installed.
BUNDLED_MODULE = "bundled_cnn"
BUNDLED_SOURCE = """\
import os
from pathlib import Path

from torch import nn

if Path(__file__).parent == Path({written!r}) and not os.environ.get("FEDCSG_TEST_ANY_COPY"):
    raise ImportError(f"{{__file__}} was imported from where the test wrote it, not from the app bundle")


def Net(num_classes, in_channels):
    def block(cin, cout, stride):
        return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    features = [*block(in_channels, 16, 1), *block(16, 16, 1), *block(16, 32, 2)]
    return nn.Sequential(*features, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, num_classes))
"""
BUNDLED_RUN = {"model": f"{BUNDLED_MODULE}:Net", "slice": "8x8x3x3", "code-dim": 32}


def _app_with_bundled_model(directory: Path) -> Path:
    """The app directory `flwr run` builds its bundle from: the repository's pyproject.toml with
    ``fab-include`` extended by the user's module, and that module."""
    import tomli_w

    app = directory / "app"
    app.mkdir()
    (app / f"{BUNDLED_MODULE}.py").write_text(BUNDLED_SOURCE.format(written=str(app)))
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pyproject["tool"]["flwr"]["app"]["fab-include"] = ["pyproject.toml", f"{BUNDLED_MODULE}.py"]
    (app / "pyproject.toml").write_text(tomli_w.dumps(pyproject))
    return app


def test_secure_federation_runs_two_rounds_of_csg_of_a_model_in_the_bundle(
    secure_federation: Federation, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two rounds of csg of a user's CNN that travels in the app bundle, on an ImageFolder: each
    SuperNode trains on all of its own folder (its reply's num-examples is its folder's image
    count), the ServerApp evaluates on the server's."""
    federation = secure_federation
    assert federation.secure and len(federation.node_ids) == 2
    superlink = federation.processes[0]
    assert "--enable-supernode-auth" in superlink.command and "--insecure" not in superlink.command
    assert all("--auth-supernode-private-key" in command for command in federation.node_commands)
    # Each SuperNode runs under its supervisor (`fedcsg deploy node --dir DIR --node I`).
    supervisors = [p.command for p in federation.processes[1:]]
    assert supervisors == [supervisor_command(federation.directory, i) for i in range(2)]
    assert {int(n["node-id"]) for n in list_nodes(federation.flwr_home, federation.connection)} == set(
        federation.node_ids
    )
    _assert_tls_only(federation)

    out_dir = Path(federation.directory) / "run"
    server = Path(federation.directory) / "images" / "server"
    app = _app_with_bundled_model(Path(federation.directory))
    run_config = {
        **TWO_ROUNDS_OF_CSG,
        **BUNDLED_RUN,
        "data-dir": str(server),
        "out-dir": str(out_dir),
        "round-timeout": RUN_TIMEOUT,
    }
    outcome = run_app(federation, app, run_config, timeout=RUN_TIMEOUT)
    log = Path(outcome.log).read_text(errors="replace")
    assert (outcome.status, outcome.sub_status) == ("finished", "completed"), log[-2000:]

    record = json.loads((out_dir / "arms" / "csg.json").read_text())
    monkeypatch.syspath_prepend(str(app))
    monkeypatch.setenv("FEDCSG_TEST_ANY_COPY", "1")  # this process builds the model from the written copy
    cfg = RunConfig.from_mapping({**TWO_ROUNDS_OF_CSG, **BUNDLED_RUN, "data-dir": str(server)})
    payload = payload_layout(cfg, build_arm_model(cfg)).nbytes
    assert record["arm"] == "csg" and record["payload_bytes"] == payload
    assert [r["round"] for r in record["rounds"]] == [0, 1, 2]
    test_images = 3 * SERVER_IMAGES[1]
    for entry in record["rounds"][1:]:
        assert (entry["sampled"], entry["replied"], entry["failed"], entry["rejected"]) == (2, 2, 0, 0), entry
        assert entry["partitions"] == []  # no partitions: each SuperNode trained on its own folder
        assert entry["payload_down"] == entry["payload_up"] == 2 * payload
        assert entry["wire_up"] > entry["payload_up"] and entry["wire_down"] > entry["payload_down"]
        # Evaluated on the server's test folder: the accuracy is a count of its images.
        assert entry["test_accuracy"] * test_images == pytest.approx(round(entry["test_accuracy"] * test_images))
        assert math.isfinite(entry["train_loss"])
        trained = sorted(
            int(line.rsplit(": ", 1)[1].split()[0])
            for line in log.splitlines()
            if f"round {entry['round']}: node " in line and "trained on its own data" in line
        )
        assert trained == sorted(3 * n for n, _ in NODE_IMAGES), log[-2000:]
    assert (out_dir / "results.json").is_file() and (out_dir / "report.md").is_file()
    # Each node downloaded the bundle `flwr run` built from the app once (the settings and the user's
    # module): the report counts it beside the rounds' downlink, a node's share of each round (both
    # nodes got the same message).
    fab = build_fab_from_disk(app)
    assert sorted(zipfile.ZipFile(io.BytesIO(fab)).namelist()) == [
        ".info/CONTENT",
        f"{BUNDLED_MODULE}.py",
        "pyproject.toml",
    ]
    bundle = _get_fab_reply_bytes(fab)
    print(f"app bundle with the user's module: {len(fab):,} bytes, {bundle:,} B on the wire to each node")
    assert record["bundle_bytes"] == bundle
    node_total = bundle + sum(r["wire_down"] // 2 for r in record["rounds"][1:])
    assert all(r["wire_down"] % 2 == 0 for r in record["rounds"][1:])
    results = load_results(out_dir)
    assert summarize(results["config"], {0: results})["csg"].node_download_bytes.values == (node_total,)
    assert f"| csg | {bundle:,} B |" in (out_dir / "report.md").read_text()
    assert f"{node_total:,} B" in (out_dir / "report.md").read_text()
    superlink_log = Path(superlink.log).read_text(errors="replace")
    for node_id in federation.node_ids:
        assert f"Activated node_id={node_id}" in superlink_log


def test_deploy_run_of_a_run_that_trained_nothing_exits_non_zero(
    secure_federation: Federation, data_dir: Path, tmp_path: Path, cli
) -> None:
    """`fedcsg deploy run` reads the run's final status from `flwr ls` (`flwr run --stream` exits 0
    even for a failed run): every client of the one round fails, the ServerApp raises RunFailed
    after writing the records, Flower marks the run failed, and the command exits 1 saying so."""
    out_dir = tmp_path / "failed-run"
    run_config = {
        "arm": "fedavg",
        "num-rounds": 1,
        "num-clients": 2,
        "train-limit": 64,
        "test-limit": 50,
        "fault-probability": 1.0,
        "device": "cpu",
        "data-dir": str(data_dir),
        "out-dir": str(out_dir),
        "round-timeout": RUN_TIMEOUT,
    }
    args = ["deploy", "run", "--dir", str(secure_federation.directory), "--app", str(ROOT)]
    code, stdout, _ = cli(*args, "--run-config", run_config_text(run_config), "--timeout", str(RUN_TIMEOUT))
    assert code == 1 and ": finished:failed in " in stdout, stdout
    rounds = json.loads((out_dir / "arms" / "fedavg.json").read_text())["rounds"]
    assert [(r["round"], r["status"], r["failed"]) for r in rounds] == [(0, "initial", 0), (1, "failed", 2)]
    assert "injected fault" in rounds[1]["first_error"]
    assert (out_dir / "report.md").is_file()


def _get_fab_reply_bytes(fab: bytes) -> int:
    """The serialized size of the SuperLink's reply to a SuperNode's GetFab request for ``fab``."""
    from flwr.proto.fab_pb2 import Fab, GetFabResponse  # pylint: disable=E0611

    return GetFabResponse(fab=Fab(hash_str=hashlib.sha256(fab).hexdigest(), content=fab)).ByteSize()


def _assert_tls_only(federation: Federation) -> None:
    """The SuperLink's port speaks TLS with a certificate our CA signed, and not plain HTTP."""
    host, port = federation.address.rsplit(":", 1)
    context = ssl.create_default_context(cafile=str(Path(federation.directory) / "certs" / "ca.crt"))
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=host) as tls:
            assert tls.version() in ("TLSv1.2", "TLSv1.3")
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        raw.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        raw.settimeout(10)
        try:
            reply = raw.recv(64)
        except (ConnectionResetError, TimeoutError):
            reply = b""
    assert not reply.startswith(b"HTTP/"), reply


# The stale-node expiry, the longest wait, and 60 s for the refused SuperNodes' start-ups on a loaded machine.
REJOIN_BOUND = STALE_NODE_SECONDS + Backoff().cap + 60.0


def test_a_supernode_killed_mid_round_rejoins_under_its_supervisor(secure_federation: Federation) -> None:
    """SuperNode 0's flower-supernode (not its supervisor) is SIGKILLed while its ClientApp trains
    round 1. The supervisor logs the kill and restarts it with backoff; the SuperLink refuses it
    until the stale entry expires, then activates it again, within REJOIN_BOUND seconds of the kill.
    Round 1 goes on with the node that answers (min-train-nodes 1) without waiting for round-timeout,
    round 2 waits for two nodes (min-available-nodes 2) and trains both: the run completes all its
    rounds."""
    federation = secure_federation
    supervisor, node_id = federation.processes[1], federation.node_ids[0]
    superlink_log = Path(federation.processes[0].log)
    activations = superlink_log.read_text(errors="replace").count(f"Activated node_id={node_id}")
    out_dir = Path(federation.directory) / "drop-run"
    run_config = {
        **TWO_ROUNDS_OF_CSG,
        "min-train-nodes": 1,
        "min-available-nodes": 2,
        "data-dir": str(Path(federation.directory) / "images" / "server"),
        "out-dir": str(out_dir),
        # Far longer than the rejoin: round 1 ends without waiting for it (the test checks).
        "round-timeout": RUN_TIMEOUT,
    }
    outcome: list[RunOutcome | BaseException] = []

    def run() -> None:
        try:
            outcome.append(run_app(federation, ROOT, run_config, timeout=RUN_TIMEOUT + REJOIN_BOUND))
        except BaseException as error:  # noqa: BLE001 - handed to the test's thread
            outcome.append(error)

    runner = threading.Thread(target=run, daemon=True)
    runner.start()
    supernode = _wait_for_training(supervisor.pid)
    os.kill(supernode, signal.SIGKILL)
    killed = time.monotonic()
    while superlink_log.read_text(errors="replace").count(f"Activated node_id={node_id}") == activations:
        assert time.monotonic() - killed < REJOIN_BOUND, Path(supervisor.log).read_text(errors="replace")[-2000:]
        time.sleep(0.5)
    rejoined = time.monotonic() - killed
    print(f"SuperNode 0 rejoined {rejoined:.1f} s after its SIGKILL")
    supervision = Path(supervisor.log).read_text(errors="replace")
    assert f"flower-supernode (pid {supernode}) killed by SIGKILL after " in supervision
    assert re.search(r"; restart 1 of 20 in (0\.[89]\d*|1) s", supervision)  # 1 s less up to 20 % jitter
    assert not session_pids(supernode)  # what the killed SuperNode started is gone too
    runner.join(timeout=RUN_TIMEOUT + REJOIN_BOUND)
    assert outcome and isinstance(outcome[0], RunOutcome), outcome
    log = Path(outcome[0].log).read_text(errors="replace")
    assert (outcome[0].status, outcome[0].sub_status) == ("finished", "completed"), log[-2000:]
    rounds = json.loads((out_dir / "arms" / "csg.json").read_text())["rounds"]
    first, second = rounds[1], rounds[2]
    assert (first["sampled"], first["replied"], first["failed"], first["status"]) == (2, 1, 1, "ok"), first
    # The SuperLink answered for the node while it was offline, or the ServerApp saw it activated again.
    assert f"client node {node_id} " in first["first_error"]
    assert any(reason in first["first_error"] for reason in ("Node Unavailable", f"node {node_id} was activated again"))
    assert first["seconds"] < REJOIN_BOUND + 30 < RUN_TIMEOUT  # not held until round-timeout
    print(f"round 1: {first['seconds']:.1f} s, {first['first_error']}")
    assert (second["sampled"], second["replied"], second["failed"], second["status"]) == (2, 2, 0, "ok"), second


def test_rotate_key_gives_a_supernode_a_new_key_and_revokes_the_old(secure_federation: Federation, cli) -> None:
    """`fedcsg deploy rotate-key`: the new public key is registered (a new node id), the node's
    flower-supernode restarts with it under its supervisor and comes online, and the old node id is
    unregistered (the SuperLink forgets the old key); federation.json names the new id."""
    federation = secure_federation
    key = Path(federation.directory) / "keys" / "node-1.key"
    before, old_id = key.read_bytes(), federation.node_ids[1]
    code, out, err = cli("deploy", "rotate-key", "--dir", federation.directory, "--node", "1")
    assert code == 0, err
    new_id = Federation.load(federation.directory).node_ids[1]
    federation.node_ids[1] = new_id  # the fixture's view, for the tests after this one
    assert out == f"SuperNode 1: new key registered as node {new_id}, online; old node {old_id} unregistered\n"
    assert new_id != old_id and key.read_bytes() != before and stat.S_IMODE(key.stat().st_mode) == 0o600
    assert not list(key.parent.glob("*.next"))
    statuses = {int(n["node-id"]): str(n["status"]) for n in list_nodes(federation.flwr_home, federation.connection)}
    assert statuses[new_id] == "online" and statuses.get(old_id, "unregistered") == "unregistered", statuses
    supervision = Path(federation.processes[2].log).read_text(errors="replace")
    assert ") exited with code 0 after " in supervision
    assert re.search(r"; restart 1 of 20 in (0\.[89]\d*|1) s", supervision)  # 1 s less up to 20 % jitter
    code, _, err = cli("deploy", "rotate-key", "--dir", federation.directory, "--node", "2")
    assert code == 2 and err.count("\n") == 1 and "node 2 is not accepted: the federation in " in err


def _wait_for_training(supervisor: int, timeout: float = STARTUP_TIMEOUT) -> int:
    """The PID of the flower-supernode below ``supervisor`` once a ClientApp process runs below it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any("flwr-clientapp" in " ".join(_cmdline(pid)) for pid in descendants(supervisor)):
            return children_of(supervisor)[0]  # the supervisor's one child
        time.sleep(0.2)
    raise AssertionError(f"no ClientApp started below supervisor {supervisor} within {timeout:.0f}s")


def _cmdline(pid: int) -> list[str]:
    try:
        return [p.decode(errors="replace") for p in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if p]
    except OSError:
        return []


# --------------------------------------------------------------------- certificates and keys


def test_certificates_chain_to_the_ca(tmp_path: Path) -> None:
    files = make_certificates(tmp_path / "certs", hosts=("127.0.0.1", "localhost", "link.example"), nodes=2)
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "link.example" in sans.get_values_for_type(x509.DNSName)
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for cert, key in files.node_certs:
        x509.load_pem_x509_certificate(cert.read_bytes()).verify_directly_issued_by(ca)
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    for key in (files.ca_key, files.server_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    # Python's own TLS stack accepts the pair: a server context loads it, a client trusts the CA.
    ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(files.server_cert, files.server_key)
    ssl.create_default_context(cafile=str(files.ca_cert))
    with pytest.raises(FileExistsError):
        make_certificates(tmp_path / "certs")
    with pytest.raises(ValueError):
        make_certificates(tmp_path / "other", hosts=())


def test_node_keys_are_what_flower_reads(tmp_path: Path) -> None:
    keys = make_node_keys(tmp_path, 3)
    publics = set()
    for key in keys:
        private = load_ssh_private_key(key.private.read_bytes(), None)
        public = load_ssh_public_key(key.public.read_bytes())
        assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
        assert public.public_numbers() == private.public_key().public_numbers()
        assert stat.S_IMODE(key.private.stat().st_mode) == 0o600
        publics.add(key.public.read_bytes())
    assert len(publics) == 3
    with pytest.raises(FileExistsError):
        make_node_keys(tmp_path, 1)


def test_commands_are_secure_unless_asked(tmp_path: Path) -> None:
    files = make_certificates(tmp_path / "certs")
    secure = superlink_command("127.0.0.1", 9999, files)
    assert "--enable-supernode-auth" in secure and "--insecure" not in secure
    assert secure[secure.index("--ssl-ca-certfile") + 1] == str(files.ca_cert)
    assert "--insecure" in superlink_command("127.0.0.1", 9999, None)
    node = supernode_command("127.0.0.1:9999", 1, 4, 9100, files.ca_cert, tmp_path / "k", data_dir=tmp_path)
    assert "--insecure" not in node and "--auth-supernode-private-key" in node
    assert node[node.index("--node-config") + 1] == f'partition-id=1 num-partitions=4 data-dir="{tmp_path}"'
    with pytest.raises(ValueError, match="without TLS"):
        supernode_command("127.0.0.1:9999", 0, 2, 9100, None, tmp_path / "k")
    with pytest.raises(ValueError, match="root_certificates"):
        write_connection(tmp_path / "home", "x", "127.0.0.1:9999")


def test_connection_entries_keep_the_others(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.toml").write_text('[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n')
    write_connection(home, "edge", "10.0.0.5:9093", root_certificates=tmp_path / "ca.crt")
    write_connection(home, "debug", "127.0.0.1:9093", insecure=True)
    config = tomllib.loads((home / "config.toml").read_text())["superlink"]
    assert config["default"] == "local" and config["local"]["address"] == ":local:"
    assert config["edge"] == {"address": "10.0.0.5:9093", "root-certificates": str((tmp_path / "ca.crt").resolve())}
    assert config["debug"] == {"address": "127.0.0.1:9093", "insecure": True}


def test_cli_certs_keys_and_loud_insecure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert _cli(["deploy", "certs", "--out", str(tmp_path / "c"), "--nodes", "1"]) == 0
    assert (tmp_path / "c" / "node-0.crt").is_file()
    with pytest.raises(FileExistsError):
        _cli(["deploy", "certs", "--out", str(tmp_path / "c")])
    assert _cli(["deploy", "keys", "--out", str(tmp_path / "k"), "--nodes", "2"]) == 0
    assert (tmp_path / "k" / "node-1.key.pub").is_file()
    with pytest.raises(FileNotFoundError, match="deploy up"):
        _cli(["deploy", "down", "--dir", str(tmp_path / "nothing")])
    capsys.readouterr()

    import fedcsg.deploy.federation

    def refuse(plan: FederationPlan, **_: object) -> Federation:
        assert plan.insecure
        raise RuntimeError("not starting processes in this test")

    monkeypatch.setattr(fedcsg.deploy.federation, "start_federation", refuse)
    with pytest.raises(RuntimeError, match="not starting"):
        _cli(["deploy", "up", "--dir", str(tmp_path / "f"), "--insecure", "--data-dir", str(tmp_path)])
    assert INSECURE_WARNING in capsys.readouterr().err
    with pytest.raises(SystemExit) as error:
        _cli(["deploy", "up", "--dir", str(tmp_path / "f"), "--nodes", "0"])
    assert error.value.code == 2


# ------------------------------------------------------------------ a device's own data, its version

DEVICE_RUN = dict(model="tests.user_cnn:SmallCNN", slice="8x8x3x3", code_dim=32, arm="csg", dataset="imagefolder")
DEVICE_RUN |= dict(image_size=16, batch_size=8, device="cpu")


def _device_train(cfg: RunConfig, node_data: Path) -> Message:
    """The ClientApp's round 1 on a device whose node config names its own ``node_data`` (node 7)."""
    from fedcsg.fl.client_app import train
    from fedcsg.fl.flower_private import offline_task_identity

    offline_task_identity()
    model = build_arm_model(cfg)
    config = TrainInstruction(cfg.local_epochs, cfg.batch_size, server_round=1, lr=0.05).record()
    content = RecordDict({"arrays": model_payload(model, payload_layout(cfg, model)), "config": config})
    context = Context(1, 7, {"data-dir": str(node_data)}, RecordDict(), cfg.to_flower())
    return train(Message(content, dst_node_id=7, message_type=MessageType.TRAIN), context)


def test_a_device_trains_on_all_its_own_images_and_refuses_other_classes_or_another_fedcsg(tmp_path: Path) -> None:
    """In this process: a node config with a data-dir and no partition trains on every image of that
    folder's train split; a folder of other classes or channels, or a server on another fedcsg
    version, is refused in one line before training."""
    from fedcsg.fl.client_app import DataMismatch, node_partition
    from fedcsg.wire.messages import VersionMismatch

    cfg = RunConfig(**DEVICE_RUN, data_dir=str(write_shapes(tmp_path / "server", 2, 2, seed=3)))
    own = write_shapes(tmp_path / "own", 5, 1, seed=1)
    metrics = _device_train(cfg, own).content["metrics"]
    assert metrics["num-examples"] == 3 * 5 and "partition-id" not in metrics
    with pytest.raises(ValueError, match=r"^node config \{'partition-id': 0\} is not accepted: accepted are data-dir"):
        node_partition(Context(1, 7, {"partition-id": 0}, RecordDict(), {}))
    other = cfg.replace(fedcsg_version="0.0.1")
    with pytest.raises(VersionMismatch) as version:
        _device_train(other, own)
    assert str(version.value) == (
        f"fedcsg version mismatch: this node runs fedcsg {fedcsg_version()}, the server fedcsg 0.0.1; "
        "install fedcsg 0.0.1 on this node"
    )
    two = shutil.copytree(own, tmp_path / "two-classes")
    for split in ("train", "test"):
        shutil.rmtree(two / split / "triangle")
    with pytest.raises(DataMismatch) as classes:
        _device_train(cfg, two)
    text = str(classes.value)
    assert "\n" not in text and text.startswith(f"this node's data-dir {str(two)!r} holds 2 classes of 3-channel")
    assert text.endswith("accepted are images of the run's classes and channels")
    gray = shutil.copytree(own, tmp_path / "gray")
    for path in gray.rglob("*.*"):
        Image.open(path).convert("L").save(path)
    with pytest.raises(DataMismatch, match=f"^this node's data-dir {str(gray)!r} holds 3 classes of 1-channel images"):
        _device_train(cfg, gray)


def test_deploy_up_gives_each_supernode_its_own_data(tmp_path: Path, cli, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--node-data DIR1,DIR2`: one SuperNode per folder, each with that data-dir and no partition;
    a count that differs from --nodes, or a missing folder, is one line, exit 2."""
    import fedcsg.deploy.federation

    plans: list[FederationPlan] = []

    def refuse(plan: FederationPlan, **_: object) -> Federation:
        plans.append(plan)
        raise RuntimeError("not starting processes in this test")

    monkeypatch.setattr(fedcsg.deploy.federation, "start_federation", refuse)
    folders = [tmp_path / "a", tmp_path / "b"]
    for folder in folders:
        folder.mkdir()
    up = ["deploy", "up", "--dir", str(tmp_path / "f"), "--node-data", f"{folders[0]},{folders[1]}"]
    with pytest.raises(RuntimeError, match="not starting"):
        _cli(up)
    assert plans[0].nodes == 2 and plans[0].node_data == tuple(map(str, folders))
    assert plans[0].supervise  # each SuperNode under `deploy node`, unless --no-supervise
    with pytest.raises(RuntimeError, match="not starting"):
        _cli([*up, "--no-supervise"])
    assert not plans[1].supervise
    node = supernode_command("127.0.0.1:9999", None, 2, 9100, None, None, data_dir=folders[1])
    assert node[node.index("--node-config") + 1] == f'data-dir="{folders[1]}"'
    code, _, err = cli(*up, "--nodes", "3")
    assert code == 2 and err.count("\n") == 1
    assert f"node data {folders[0]}, {folders[1]} names 2 folder(s) for 3 SuperNode(s)" in err
    code, _, err = cli("deploy", "up", "--dir", str(tmp_path / "f"), "--node-data", f"{folders[0]},{tmp_path / 'c'}")
    assert code == 2 and f"node data folder {str(tmp_path / 'c')!r} does not exist" in err


# ------------------------------------------------------------------------------ relay, processes


def test_relay_counts_every_byte_each_way() -> None:

    received: list[int] = []

    async def echo_twice(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(1 << 16):
            received.append(len(data))
            writer.write(data + data)
            await writer.drain()
        writer.close()

    loop = asyncio.new_event_loop()
    server = loop.run_until_complete(asyncio.start_server(echo_twice, "127.0.0.1", 0))
    port = server.sockets[0].getsockname()[1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        with ByteCountingRelay("127.0.0.1", port) as relay:
            start = relay.now()
            sent = 0
            with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as client:
                for size in (1, 1000, 300_000):
                    client.sendall(b"x" * size)
                    sent += size
                    expected, got = 2 * size, 0
                    while got < expected:
                        got += len(client.recv(1 << 20))
            time.sleep(0.2)
            traffic = relay.traffic(start, relay.now())
            assert (traffic.up, traffic.down, traffic.connections) == (sent, 2 * sent, 1)
            assert relay.traffic(relay.now(), None).total == 0
    finally:
        server.close()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)


def test_orphans_below_an_adopting_process_stay_its_descendants() -> None:
    """A grandchild whose parent exits (a Ray worker whose raylet was shut down) is still found below
    this process inside :func:`adopting_orphans`, is stopped by PID and reaped at the block's end;
    without it, the orphan goes to init and is lost to ``descendants``."""
    script = (
        "import subprocess, sys\n"
        "quiet = {'stdout': subprocess.DEVNULL, 'stderr': subprocess.DEVNULL}\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], **quiet)\n"
        "print(child.pid, flush=True)\n"
    )

    def orphan() -> int:
        parent = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
        return int(parent.stdout.split()[0])

    lost = orphan()
    try:
        assert lost not in descendants(os.getpid())
    finally:
        stop_pids([lost], grace=5)
    with adopting_orphans():
        kept = orphan()
        try:
            assert kept in descendants(os.getpid())
        finally:
            assert stop_pids([kept], grace=5) == [kept]
    assert not Path(f"/proc/{kept}").exists()  # reaped: not even a zombie is left


def test_stop_processes_reaches_detached_children(tmp_path: Path) -> None:
    # A parent that detaches a child into its own session, as flower-superlink does with SuperExec.
    script = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], start_new_session=True)\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    process, record = start_process("parent", [sys.executable, "-c", script], tmp_path / "p.log", dict(os.environ))
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "p.log").read_text().strip() and time.monotonic() < deadline:
            time.sleep(0.1)
        child = int((tmp_path / "p.log").read_text().split()[0])
        assert child in descendants(process.pid)
    finally:
        stopped = stop_processes([record], grace=5)
    assert process.pid in stopped and child in stopped
    assert process.poll() is not None
    assert not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split(")")[1][:3]
    # A recorded PID whose program is not the recorded one is left alone (PID reuse).
    assert not ProcessRecord("other", os.getpid(), ["flower-superlink"], "").alive()
