"""A SuperNode kept running on a device: ``fedcsg deploy node`` runs one ``flower-supernode`` and
restarts it whenever it exits, with an exponential backoff, until it has been restarted
``max-restarts`` times in a row without staying up.

Why a backoff that outlives the SuperLink's memory of the node
---------------------------------------------------------------
A SuperNode that is killed (power loss, OOM kill, SIGKILL) cannot say goodbye: the SuperLink keeps
it *online* until its last heartbeat expires, :data:`STALE_NODE_SECONDS` after it, and refuses to
activate the same key again until then (``[code: 2004] Failed to activate SuperNode``: Flower
activates only a node that is registered or offline). The refused SuperNode exits at once. The
supervisor restarts it after 1, 2, 4, 8, 15, 15, ... seconds (:class:`Backoff`), each wait cut by
a random part of at most ``jitter`` (20 %) of it, so that the nodes of a fleet that exited together
(one cause, one moment) do not all knock again in the same second. It refuses settings whose
shortest waits add up to less than the stale-node expiry: a node restarted at once gets in on the
first attempt after the expiry, at most ``cap`` seconds (plus its start-up) later. A SuperNode
stopped with SIGTERM deactivates itself and is accepted again at once.

The supervisor itself imports neither torch nor Flower (about 16 MB resident):
``python3 -m fedcsg.deploy.supervisor`` takes the same arguments as ``fedcsg deploy node`` and is
what ``fedcsg deploy up`` and a systemd unit run.
"""

from __future__ import annotations

import argparse
import math
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from fedcsg.processes import session_pids, stop_pids
from fedcsg.spec.checks import OneLineParser

# Flower 1.41 keeps a SuperNode online until HEARTBEAT_PATIENCE (2) x HEARTBEAT_DEFAULT_INTERVAL (30 s)
# after its last heartbeat (flwr/common/constant.py; a test keeps this equal to Flower's constants).
STALE_NODE_SECONDS = 60.0
PROG = "fedcsg deploy node"
POLL_SECONDS = 0.25  # how often the supervisor looks at its child and at a stop request


@dataclass(frozen=True)
class Backoff:
    """When the supervisor restarts its SuperNode, and when it gives up.

    Attributes
    ----------
    initial
        Seconds before the first restart.
    factor
        Each further restart waits ``factor`` times longer than the one before ...
    cap
        ... but never longer than ``cap`` seconds.
    max_restarts
        Restarts in a row without the SuperNode staying up ``healthy_after`` seconds; one more exit
        and the supervisor gives up (non-zero exit).
    healthy_after
        A SuperNode that ran this long was up: its next exit starts the count and the waits again.
    jitter
        Each wait is drawn uniformly from [(1 - ``jitter``) x its delay, its delay] (:meth:`wait`).
    """

    initial: float = 1.0
    factor: float = 2.0
    cap: float = 15.0
    max_restarts: int = 20
    healthy_after: float = 2 * STALE_NODE_SECONDS
    jitter: float = 0.2

    def __post_init__(self) -> None:
        checks = (
            ("restart-initial", self.initial, self.initial > 0, "a number > 0"),
            ("restart-factor", self.factor, self.factor >= 1, "a number >= 1"),
            ("restart-cap", self.cap, self.cap >= self.initial, f"a number >= restart-initial ({self.initial:g})"),
            ("max-restarts", self.max_restarts, self.max_restarts >= 1, "an integer >= 1"),
            ("healthy-after", self.healthy_after, self.healthy_after > 0, "a number > 0"),
            ("restart-jitter", self.jitter, 0 <= self.jitter < 1, "a number in [0, 1)"),
        )
        for name, value, ok, accepted in checks:
            if not ok or not math.isfinite(value):
                raise ValueError(f"{name} = {value!r} is not accepted: {accepted} (finite) is")

    def delay(self, restart: int) -> float:
        """Seconds before restart number ``restart`` (1 = the first after an exit)."""
        steps = restart - 1
        if self.factor > 1 and steps * math.log(self.factor) >= math.log(self.cap / self.initial):
            return self.cap
        return min(self.cap, self.initial * self.factor**steps)

    def wait(self, restart: int, rng: random.Random) -> float:
        """The seconds actually waited before restart number ``restart``: its :meth:`delay`, less a
        part drawn uniformly from [0, ``jitter``] of it."""
        return self.delay(restart) * (1 - self.jitter * rng.random())

    def schedule(self) -> list[float]:
        """The delay before each restart, up to giving up."""
        return [self.delay(k) for k in range(1, self.max_restarts + 1)]

    def check_outlives(self, seconds: float = STALE_NODE_SECONDS) -> None:
        """Refuse, in one line, a schedule whose shortest waits (every draw of the jitter at its
        largest) give up before ``seconds`` (the stale-node expiry): a SuperNode killed and refused
        until then would never get back in."""
        total = sum(self.schedule())
        shortest = total * (1 - self.jitter)
        if shortest < seconds:
            cut = f", {shortest:g} s at the shortest with restart-jitter {self.jitter:g}," if self.jitter else ""
            raise ValueError(
                f"max-restarts = {self.max_restarts} with restart-initial {self.initial:g} s, factor {self.factor:g} "
                f"and cap {self.cap:g} s waits {total:g} s in all{cut} before giving up, less than Flower's "
                f"stale-node expiry of {seconds:g} s: accepted are settings whose waits add up to at least "
                f"{seconds:g} s"
            )


def _exit_text(code: int) -> str:
    return f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"


class Supervisor:
    """Runs ``command`` and restarts it by :class:`Backoff` (see :func:`supervise`)."""

    def __init__(
        self,
        command: Sequence[str],
        backoff: Backoff,
        say: Callable[[str], None] | None = None,
        grace: float = 10.0,
        rng: random.Random | None = None,
    ) -> None:
        self.command = list(command)
        self.backoff = backoff
        self.rng = rng or random.Random()  # seeded from the system: each device draws its own waits
        self.say = say or _say
        self.grace = grace
        self.stopping: int | None = None  # the signal that asked us to stop

    @property
    def name(self) -> str:
        return Path(self.command[0]).name

    def request_stop(self, signum: int, _frame: FrameType | None = None) -> None:
        """Signal handler: stop the child and do not restart it."""
        self.stopping = signum

    def _wait(self, seconds: float) -> bool:
        """Sleep ``seconds`` unless asked to stop first; True when asked to stop."""
        deadline = time.monotonic() + seconds
        while self.stopping is None and time.monotonic() < deadline:
            time.sleep(min(POLL_SECONDS, max(0.0, deadline - time.monotonic())))
        return self.stopping is not None

    def _start(self) -> subprocess.Popen:
        # Its own session: a Ctrl-C reaches the supervisor alone, which stops the child once; what the
        # SuperNode starts (its SuperExec, the ClientApp processes) stays in that session.
        return subprocess.Popen(self.command, stdin=subprocess.DEVNULL, start_new_session=True)

    def _stop_session(self, child: subprocess.Popen) -> None:
        """Stop ``child`` (SIGTERM, SIGKILL after ``grace``) and whatever is left of its session: a
        killed SuperNode's SuperExec and ClientApp processes outlive it otherwise."""
        if child.poll() is None:
            child.terminate()
            try:
                child.wait(self.grace)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        stop_pids(session_pids(child.pid), self.grace)

    def run(self) -> int:
        """Supervise until stopped (0) or until it gives up (1)."""
        restarts = 0
        while True:
            child = self._start()
            started = time.monotonic()
            self.say(f"started {self.name} (pid {child.pid})" + (f", restart {restarts}" if restarts else ""))
            while child.poll() is None and not self._wait(POLL_SECONDS):
                pass
            if self.stopping is not None:
                self.say(f"{signal.Signals(self.stopping).name}: stopping {self.name} (pid {child.pid})")
                self._stop_session(child)
                self.say(f"stopped; {self.name} {_exit_text(child.returncode)}")
                return 0
            code, ran = child.returncode, time.monotonic() - started
            self._stop_session(child)
            if ran >= self.backoff.healthy_after:
                restarts = 0
            if restarts >= self.backoff.max_restarts:
                self.say(
                    f"{self.name} (pid {child.pid}) {_exit_text(code)} after {ran:.1f} s; giving up after "
                    f"{restarts} restarts in a row (max-restarts = {self.backoff.max_restarts})"
                )
                return 1
            restarts += 1
            delay = self.backoff.wait(restarts, self.rng)
            self.say(
                f"{self.name} (pid {child.pid}) {_exit_text(code)} after {ran:.1f} s; "
                f"restart {restarts} of {self.backoff.max_restarts} in {delay:.3g} s"
            )
            if self._wait(delay):
                self.say(f"{signal.Signals(self.stopping).name}: stopped before restart {restarts}")
                return 0


def _say(text: str) -> None:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
    print(f"{stamp} UTC {PROG}: {text}", file=sys.stderr, flush=True)


def supervise(command: Sequence[str], backoff: Backoff) -> int:
    """Run ``command`` (a ``flower-supernode`` command line) until SIGTERM or SIGINT, restarting it by
    ``backoff`` whenever it exits; each start, exit (its code or signal) and restart is one line on
    stderr. Returns 0 when stopped by a signal (the child stopped with SIGTERM, SIGKILL after 10 s),
    1 when it gave up. Call it from the main thread (it installs the signal handlers)."""
    supervisor = Supervisor(command, backoff)
    previous = {signum: signal.signal(signum, supervisor.request_stop) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        return supervisor.run()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


# ---------------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``fedcsg deploy node``'s arguments (also ``python3 -m fedcsg.deploy.supervisor``'s)."""
    node = parser.add_argument_group("the SuperNode: a federation's node, or flower-supernode's own arguments")
    node.add_argument("--dir", help="a federation directory of `fedcsg deploy up`: run its SuperNode --node")
    node.add_argument("--node", type=int, help="the SuperNode's index in --dir (0-based)")
    node.add_argument("--superlink", help="HOST:PORT of the SuperLink's Fleet API")
    node.add_argument("--root-certificates", help="the federation's CA certificate (ca.crt)")
    node.add_argument("--auth-supernode-private-key", help="this node's private key (its .pub is registered)")
    node.add_argument("--node-config", default="", help="e.g. 'data-dir=\"/home/pi/images\"'")
    node.add_argument("--port", type=int, default=9094, help="the SuperNode's own Runtime API port (default 9094)")
    defaults = Backoff()
    restart = parser.add_argument_group("restarts")
    restart.add_argument("--restart-initial", type=float, default=defaults.initial, help="seconds before restart 1")
    restart.add_argument("--restart-factor", type=float, default=defaults.factor, help="each wait x this")
    restart.add_argument("--restart-cap", type=float, default=defaults.cap, help="longest wait, seconds")
    restart.add_argument(
        "--max-restarts", type=int, default=defaults.max_restarts, help="restarts in a row before giving up"
    )
    restart.add_argument(
        "--healthy-after",
        type=float,
        default=defaults.healthy_after,
        help="a SuperNode up this long starts the count again",
    )
    restart.add_argument(
        "--restart-jitter",
        type=float,
        default=defaults.jitter,
        help="each wait is cut by a random part of at most this fraction (default 0.2)",
    )


def command_of(args: argparse.Namespace) -> list[str]:
    """The ``flower-supernode`` command line that ``args`` name: the federation's node ``--node``
    (as ``deploy up`` recorded it), or one built from the SuperLink address, certificate and key."""
    from fedcsg.deploy.federation import Federation

    if args.dir is not None:
        if args.superlink is not None:
            raise ValueError("--dir and --superlink are not accepted together: name a federation or a SuperLink")
        commands = Federation.load(args.dir).node_commands
        if not commands:
            raise ValueError(f"the federation in {args.dir!r} records no SuperNode commands: start it with `deploy up`")
        if args.node is None or not 0 <= args.node < len(commands):
            given = "missing" if args.node is None else f"{args.node} is not accepted"
            raise ValueError(f"--node {given}: the federation in {args.dir!r} has SuperNodes 0..{len(commands) - 1}")
        return commands[args.node]
    return explicit_command(args)


def explicit_command(args: argparse.Namespace) -> list[str]:
    """The ``flower-supernode`` command of ``--superlink``, ``--root-certificates``,
    ``--auth-supernode-private-key``, ``--node-config`` and ``--port``: TLS and node authentication."""
    from fedcsg.deploy.flwr_cli import supernode_args

    missing = [
        f"--{name.replace('_', '-')}"
        for name in ("superlink", "root_certificates", "auth_supernode_private_key")
        if getattr(args, name) is None
    ]
    if missing:
        raise ValueError(
            f"{', '.join(missing)} missing: accepted are --dir DIR --node I, or --superlink, --root-certificates "
            "and --auth-supernode-private-key (TLS and node authentication)"
        )
    for path in (args.root_certificates, args.auth_supernode_private_key):
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path!r} does not exist or is not a file")
    if not 0 < args.port < 65536:
        raise ValueError(f"--port {args.port} is not accepted: a port number 1..65535 is")
    return supernode_args(
        args.superlink, args.port, args.root_certificates, args.auth_supernode_private_key, args.node_config
    )


def supervisor_command(directory: str | Path, node: int) -> list[str]:
    """How ``fedcsg deploy up`` runs its SuperNode ``node`` under a supervisor: this module, which
    loads neither torch nor Flower, with the default :class:`Backoff`."""
    return [sys.executable, "-m", "fedcsg.deploy.supervisor", "--dir", str(directory), "--node", str(node)]


def backoff_of(args: argparse.Namespace) -> Backoff:
    """The restart settings of ``args``, refused in one line unless they outlive the stale-node expiry."""
    backoff = Backoff(
        args.restart_initial,
        args.restart_factor,
        args.restart_cap,
        args.max_restarts,
        args.healthy_after,
        args.restart_jitter,
    )
    backoff.check_outlives()
    return backoff


def run_node(args: argparse.Namespace) -> int:
    """``fedcsg deploy node``: check the arguments (one-line errors), then :func:`supervise`."""
    return supervise(command_of(args), backoff_of(args))


def main(argv: Sequence[str] | None = None) -> int:
    """``python3 -m fedcsg.deploy.supervisor``: ``fedcsg deploy node`` without loading the rest of the CLI."""
    parser = OneLineParser(prog=PROG, description="Run a SuperNode and restart it whenever it exits.")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_node(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
