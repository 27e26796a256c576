"""Drops and restarts of SuperNodes, without starting one: the supervisor (``fedcsg deploy node``) with
trivial children (its backoff schedule, giving up, the count starting again after a SuperNode that
stayed up, a clean stop on SIGTERM and SIGINT with its child and what the child started, its command
line), and the ServerApp's wait that gives up on a node activated again mid-round
(:class:`~fedcsg.fl.node_restarts.RestartAwareGrid`, on a scripted grid). The drop of a real
SuperNode mid-round is ``tests/test_deploy.py::test_a_supernode_killed_mid_round_rejoins_under_its_supervisor``."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from flwr.app import Message, MessageType, RecordDict

from fedcsg.deploy import supervisor
from fedcsg.deploy.federation import Federation
from fedcsg.deploy.flwr_cli import supernode_args
from fedcsg.deploy.supervisor import STALE_NODE_SECONDS, Backoff, Supervisor, supervisor_command
from fedcsg.fl.flower_private import ErrorCode, NodeInfo, offline_task_identity
from fedcsg.fl.node_restarts import RestartAwareGrid
from tests.test_reliability import ScriptedGrid

PYTHON = sys.executable
FAST = dict(initial=0.01, factor=2.0, cap=0.04, jitter=0.0)  # a schedule of hundredths: the tests do not wait


def test_the_stale_node_expiry_is_flowers() -> None:
    """Flower keeps a killed SuperNode online HEARTBEAT_PATIENCE x HEARTBEAT_DEFAULT_INTERVAL after its
    last heartbeat; the supervisor's default schedule waits longer than that before giving up."""
    from flwr.common.constant import HEARTBEAT_DEFAULT_INTERVAL, HEARTBEAT_PATIENCE

    assert STALE_NODE_SECONDS == HEARTBEAT_PATIENCE * HEARTBEAT_DEFAULT_INTERVAL == 60
    schedule = Backoff().schedule()
    assert schedule == [1, 2, 4, 8] + [15] * 16
    assert sum(schedule) == 255 and sum(schedule[:6]) == 45 < STALE_NODE_SECONDS <= sum(schedule[:7])
    Backoff().check_outlives()
    assert Backoff(initial=3, factor=10, cap=1000, max_restarts=400).delay(400) == 1000  # no float overflow


def test_a_schedule_that_gives_up_too_soon_or_a_bad_setting_is_refused_in_one_line() -> None:
    with pytest.raises(ValueError) as short:
        Backoff(max_restarts=5).check_outlives()
    assert str(short.value) == (
        "max-restarts = 5 with restart-initial 1 s, factor 2 and cap 15 s waits 30 s in all, 24 s at the shortest "
        "with restart-jitter 0.2, before giving up, less than Flower's stale-node expiry of 60 s: accepted are "
        "settings whose waits add up to at least 60 s"
    )
    # 1+2+4+8+15+15+15 = 60 s outlives the expiry only without jitter: its shortest draws wait 48 s
    Backoff(max_restarts=7, jitter=0).check_outlives()
    with pytest.raises(ValueError, match="waits 60 s in all, 48 s at the shortest with restart-jitter 0.2, before"):
        Backoff(max_restarts=7).check_outlives()
    for bad, text in (
        (dict(initial=0), "restart-initial = 0 is not accepted: a number > 0 (finite) is"),
        (dict(factor=0.5), "restart-factor = 0.5 is not accepted: a number >= 1 (finite) is"),
        (dict(cap=0.5), "restart-cap = 0.5 is not accepted: a number >= restart-initial (1) (finite) is"),
        (dict(max_restarts=0), "max-restarts = 0 is not accepted: an integer >= 1 (finite) is"),
        (dict(healthy_after=float("nan")), "healthy-after = nan is not accepted: a number > 0 (finite) is"),
        (dict(jitter=1.0), "restart-jitter = 1.0 is not accepted: a number in [0, 1) (finite) is"),
    ):
        with pytest.raises(ValueError) as error:
            Backoff(**bad)
        assert str(error.value) == text


def test_each_wait_is_cut_by_a_random_part_of_at_most_the_jitter() -> None:
    """Waits lie in [(1 - jitter) x delay, delay]; two devices (two generators) draw different waits,
    so a fleet that exited at one moment comes back spread out; jitter 0 waits the delays exactly."""
    backoff = Backoff(jitter=0.5)
    devices = {seed: random.Random(seed) for seed in (1, 2)}
    draws = {seed: [backoff.wait(k, rng) for k in range(1, 21)] for seed, rng in devices.items()}
    for waits in draws.values():
        assert all(0.5 * d <= w <= d for w, d in zip(waits, backoff.schedule(), strict=True))
    assert draws[1] != draws[2] and min(w / d for w, d in zip(draws[1], backoff.schedule(), strict=True)) < 0.9
    assert [Backoff(jitter=0).wait(k, random.Random(1)) for k in range(1, 21)] == Backoff().schedule()
    lines: list[str] = []
    Supervisor([PYTHON, "-c", "pass"], Backoff(initial=0.02, cap=0.02, max_restarts=1), lines.append).run()
    waited = float(lines[1].split(" in ")[-1].removesuffix(" s"))
    assert 0.016 <= waited <= 0.02, lines


def test_it_restarts_an_exiting_child_with_backoff_and_gives_up_after_max_restarts() -> None:
    lines: list[str] = []
    child = [PYTHON, "-c", "import sys; sys.exit(3)"]
    started = time.monotonic()
    code = Supervisor(child, Backoff(**FAST, max_restarts=3), say=lines.append).run()
    assert code == 1 and time.monotonic() - started < 20
    name = Path(PYTHON).name
    assert [line.split(" (pid")[0] for line in lines[::2]] == [f"started {name}"] * 4
    assert [line.split(") ", 1)[1].split(" after ")[0] for line in lines[1::2]] == ["exited with code 3"] * 4
    assert [line.split("; ", 1)[1] for line in lines[1::2]] == [
        "restart 1 of 3 in 0.01 s",
        "restart 2 of 3 in 0.02 s",
        "restart 3 of 3 in 0.04 s",
        "giving up after 3 restarts in a row (max-restarts = 3)",
    ]
    assert lines[2].endswith(", restart 1") and "\n" not in "".join(lines)


def test_a_child_that_stayed_up_starts_the_count_again(tmp_path: Path) -> None:
    """Runs 1-3 stay up longer than healthy-after, run 4 exits at once: with max-restarts 1 the
    supervisor restarts after each of the first three (each count starting again) and gives up after
    the fourth, its first restart in a row that did not stay up."""
    runs = tmp_path / "runs"
    script = (
        "import pathlib, sys, time\n"
        f"runs = pathlib.Path({str(runs)!r})\n"
        "count = len(runs.read_text()) if runs.exists() else 0\n"
        "runs.write_text('x' * (count + 1))\n"
        "time.sleep(0.4 if count < 3 else 0)\n"
        "sys.exit(5)\n"
    )
    lines: list[str] = []
    code = Supervisor(
        [PYTHON, "-c", script], Backoff(**FAST, max_restarts=1, healthy_after=0.3), say=lines.append
    ).run()
    assert code == 1 and runs.read_text() == "x" * 4
    assert [line.split("; ", 1)[1] for line in lines if "exited" in line] == [
        *["restart 1 of 1 in 0.01 s"] * 3,
        "giving up after 1 restarts in a row (max-restarts = 1)",
    ]


def _wait_for(path: Path, text: str, count: int = 1, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        content = path.read_text() if path.exists() else ""
        if content.count(text) >= count:
            return content
        time.sleep(0.05)
    raise AssertionError(f"{text!r} x{count} not in {path} within {timeout:.0f}s: {content!r}")


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_the_supervisor_its_child_and_what_the_child_started(tmp_path: Path, signum: int) -> None:
    """A child killed with SIGKILL is restarted; then SIGTERM (or SIGINT) stops the supervisor with
    exit 0 and no restart, after stopping its child and the grandchild the child started."""
    grandchild = tmp_path / "grandchild"
    child = (
        "import pathlib, subprocess, sys, time\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        f"pathlib.Path({str(grandchild)!r}).write_text(str(p.pid))\n"
        "time.sleep(120)\n"
    )
    code = (
        "import sys\n"
        "from fedcsg.deploy.supervisor import Backoff, supervise\n"
        f"sys.exit(supervise([sys.executable, '-c', {child!r}], Backoff(initial=0.1, jitter=0)))\n"
    )
    log = tmp_path / "supervisor.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([PYTHON, "-c", code], stderr=out, env=dict(os.environ), start_new_session=True)
    try:
        first = int(_wait_for(log, "started").split("(pid ")[1].split(")")[0])
        os.kill(first, signal.SIGKILL)
        text = _wait_for(log, "started", count=2)
        assert "killed by SIGKILL after" in text and "; restart 1 of 20 in 0.1 s" in text
        second = int(text.rsplit("(pid ", 1)[1].split(")")[0])
        deadline = time.monotonic() + 30
        while not grandchild.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.1)  # the grandchild's pid is written whole
        orphan = int(grandchild.read_text())
        assert _alive(second) and _alive(orphan)
        process.send_signal(signum)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    text = log.read_text()
    name = signal.Signals(signum).name
    assert f"{name}: stopping {Path(PYTHON).name} (pid {second})" in text
    assert f"stopped; {Path(PYTHON).name} killed by SIGTERM" in text
    assert text.count("started") == 2 and not _alive(second) and not _alive(orphan)


def test_deploy_node_runs_the_named_supernode_and_refuses_bad_arguments_in_one_line(
    tmp_path: Path, cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`fedcsg deploy node` hands `supervise` flower-supernode's command: built from --superlink,
    --root-certificates, --auth-supernode-private-key, --node-config and --port, or a federation's
    recorded node; missing or bad arguments, and a schedule shorter than the stale-node expiry, are
    one line and exit 2 (nothing started)."""
    started: list[tuple[list[str], Backoff]] = []
    monkeypatch.setattr(supervisor, "supervise", lambda command, backoff: started.append((command, backoff)) or 0)
    ca, key = tmp_path / "ca.crt", tmp_path / "node.key"
    ca.write_text("ca")
    key.write_text("key")
    explicit = ["--superlink", "link:9093", "--root-certificates", str(ca), "--auth-supernode-private-key", str(key)]
    assert cli("deploy", "node", *explicit, "--node-config", 'data-dir="/d"', "--port", "9200")[0] == 0
    assert started[-1] == (supernode_args("link:9093", 9200, ca, key, 'data-dir="/d"'), Backoff())

    recorded = [["flower-supernode", "--superlink", "127.0.0.1:1"], ["flower-supernode", "--port", "2"]]
    Federation(str(tmp_path), "c", str(tmp_path), "a", "a", True, node_commands=recorded).save()
    assert cli("deploy", "node", "--dir", str(tmp_path), "--node", "1", "--max-restarts", "9")[0] == 0
    assert started[-1] == (recorded[1], Backoff(max_restarts=9))
    assert supervisor_command(tmp_path, 1)[1:] == [
        "-m",
        "fedcsg.deploy.supervisor",
        "--dir",
        str(tmp_path),
        "--node",
        "1",
    ]

    for args, error in (
        ([], "--superlink, --root-certificates, --auth-supernode-private-key missing: accepted are --dir DIR"),
        (["--dir", str(tmp_path), "--node", "2"], f"--node 2 is not accepted: the federation in {str(tmp_path)!r}"),
        (["--dir", str(tmp_path)], "--node missing: the federation in"),
        ([*explicit, "--max-restarts", "5"], "max-restarts = 5 with restart-initial 1 s, factor 2 and cap 15 s"),
        ([*explicit[:4], "--auth-supernode-private-key", str(tmp_path / "no.key")], "no.key' does not exist"),
        ([*explicit, "--port", "0"], "--port 0 is not accepted: a port number 1..65535 is"),
        ([*explicit, "--restart-factor", "0.5"], "restart-factor = 0.5 is not accepted"),
    ):
        code, _, err = cli("deploy", "node", *args)
        assert code == 2 and err.count("\n") == 1 and error in err, (args, err)
    assert len(started) == 2


class ScriptedLink(ScriptedGrid):
    """A SuperLink's grid, scripted per poll: ``replies[k]`` are the node ids that reply at pull ``k``,
    ``activations[k]`` the online nodes and when each was last activated, as ``get_nodes`` says then."""

    def __init__(self, replies: list[set[int]], activations: list[dict[int, str]]) -> None:
        super().__init__(list(activations[0]), lambda *_: None)
        self.replies, self.activations = replies, activations
        self.pulls, self.looks, self.pushed = 0, 0, []

    def get_nodes(self) -> list[NodeInfo]:
        now = self.activations[min(self.looks, len(self.activations) - 1)]
        self.looks += 1
        return [NodeInfo(node_id=node, last_activated_at=stamp) for node, stamp in now.items()]

    def push_messages(self, messages) -> list[str]:  # noqa: ANN001
        for i, message in enumerate(messages):
            message.metadata.__dict__["_message_id"] = f"m{len(self.pushed) + i}"  # as Flower's grids do
        self.pushed += list(messages)
        return [m.metadata.message_id for m in messages]

    def pull_messages(self, message_ids) -> list[Message]:  # noqa: ANN001
        ready = self.replies[min(self.pulls, len(self.replies) - 1)]
        self.pulls += 1
        wanted = set(message_ids)
        return [
            Message(RecordDict(), reply_to=m)
            for m in self.pushed
            if m.metadata.dst_node_id in ready and m.metadata.message_id in wanted
        ]

    def send_and_receive(self, messages, *, timeout=None) -> list[Message]:  # noqa: ANN001
        raise NotImplementedError  # RestartAwareGrid waits itself, through push, pull and get_nodes


def test_the_serverapp_stops_waiting_for_a_node_activated_again_mid_round() -> None:
    """Node 1 replies; node 2 is activated again (restarted) before it replied: its message is lost, so
    the wait gives it an error reply at once; node 3 is offline (gone from get_nodes) and owes its reply
    until the SuperLink answers for it or the timeout ends the wait; node 4, offline when its message
    was pushed, comes online and replies (its message waited for it at the SuperLink)."""
    offline_task_identity()
    first = {1: "t0", 2: "t0", 3: "t0"}
    later = {1: "t0", 2: "t9", 4: "t5"}
    link = ScriptedLink(replies=[set(), {1}, set(), {4}, set()], activations=[first, first, later])
    grid = RestartAwareGrid(link, poll_seconds=0.01)
    messages = [Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN) for node in (1, 2, 3, 4)]
    started = time.monotonic()
    replies = list(grid.send_and_receive(messages, timeout=0.5))
    assert time.monotonic() - started >= 0.5  # node 3 was waited for to the end
    assert [(r.metadata.src_node_id, r.has_error()) for r in replies] == [(1, False), (2, True), (4, False)]
    assert replies[1].error.code == ErrorCode.NODE_UNAVAILABLE
    assert replies[1].error.reason == (
        "node 2 was activated again at t9, after it was sent this round's message: it restarted or was "
        "offline, and its reply will not come"
    )
    assert list(grid.send_and_receive([], timeout=5)) == [] and len(link.pushed) == 4
    link = ScriptedLink(replies=[{1, 2, 3, 4}], activations=[first])
    assert len(list(RestartAwareGrid(link, poll_seconds=10).send_and_receive(messages, timeout=60))) == 4  # no sleep
