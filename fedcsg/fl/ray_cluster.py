"""Where a simulation's Ray runs, and how fedcsg leaves it.

The run setting ``ray-address`` chooses the Ray that Flower's Ray backend uses:

``""`` (default)
    A private Ray started for the run and shut down after it. It is passed to ``ray.init`` as
    Ray's own address ``"local"``, so a cluster that happens to run on this machine (``ray start``,
    ``RAY_ADDRESS``) is never attached by accident.
``"auto"``
    The cluster started with ``ray start`` on this machine.
``"HOST:PORT"``
    The cluster whose head node (its GCS) listens there, e.g. ``10.0.0.5:6379``.

An attached cluster is left running when the run ends (fedcsg did not start it): ``ray.shutdown``
only disconnects this driver, and Ray removes the driver's actors with it. Every client reply names
the Ray node that ran it (:func:`current_node_id`), the device it trained on and the
``CUDA_VISIBLE_DEVICES`` it saw (:func:`placement_record`), and :class:`~fedcsg.runs.records.RoundRecord`
keeps them (``ray_nodes``, ``devices``, ``visible_devices``), so the spread of the work over the
cluster and its GPUs is in the records.

GPUs: :func:`resolve_resources` turns ``client-num-gpus = "auto"`` and ``server-device = "auto"`` into
numbers and devices from what the cluster offers (the rule is :mod:`fedcsg.spec.resources`'), before
the first round. Ray is told explicitly how to treat a client with no GPU share
(:data:`ACCELERATOR_ENV`): it leaves its ``CUDA_VISIBLE_DEVICES`` alone, and the client itself hides
the GPUs (:func:`hide_gpus_without_share`), so that no client computes on a GPU outside Ray's shares.

:func:`interruptible` turns SIGTERM into the KeyboardInterrupt that Ctrl-C raises (and so does the
``sys.exit(SIGTERM)`` of the handler that ``ray.init`` installs), so that Flower's simulation engine
runs its own shutdown (actors terminated, ``ray.shutdown()``); whatever this process started below
it and is still alive a moment later is then stopped by PID. Ray workers outlive their raylet for a
while on a busy machine; the run adopts them (Linux's child subreaper) so that they are found too.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from fedcsg.spec.config import RunConfig
from fedcsg.spec.resources import client_gpu_share, server_device

# Ray's switch for actors that ask for no GPU: "0" = Ray leaves their CUDA_VISIBLE_DEVICES alone (Ray's
# announced future default; the client hides the GPUs itself), set explicitly rather than Ray's warning silenced.
ACCELERATOR_ENV = ("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
RESOURCES_ENV = "RAY_OVERRIDE_RESOURCES"  # Ray's own: JSON resources a Ray started on this machine declares
CONNECT_TIMEOUT = 10.0  # seconds to reach a head node's port before the run is refused
PROBE_TIMEOUT = 120.0  # seconds for a node to answer the pre-run probe (it may have to start a worker)
PRIVATE_RAY = "local"  # ray.init's address for "start a new local Ray, attach to nothing"
SHIPPED_EXCLUDES = ("__pycache__",)  # what the shipped code leaves behind (Ray's gitignore-style runtime_env excludes)


def init_args(address: str) -> dict[str, Any]:
    """``ray.init`` arguments (as Flower's Ray backend takes them, its ``init_args``) to reach ``address``."""
    return {
        "address": address or PRIVATE_RAY,
        "logging_level": "ERROR",
        "log_to_driver": True,
        "include_dashboard": False,
    }


def worker_env(code: Sequence[str] = ()) -> dict[str, Any]:
    """The ``runtime_env`` of every Ray worker this process starts, as Flower's Ray backend gives its
    actors theirs: PYTHONPATH is this process's ``sys.path`` followed by its ``$PYTHONPATH``, and
    ``code`` (:func:`init_ray`) travels as ``py_modules``."""
    pythonpath = os.pathsep.join(sys.path)
    if os.environ.get("PYTHONPATH"):
        pythonpath = f"{pythonpath}{os.pathsep}{os.environ['PYTHONPATH']}"
    env: dict[str, Any] = {"env_vars": {"PYTHONPATH": pythonpath}}
    if code:
        env |= {"py_modules": list(code), "excludes": list(SHIPPED_EXCLUDES)}
    return env


def init_ray(address: str, code: Sequence[str] = ()) -> None:
    """Start the private Ray or reach the cluster that ``address`` names (:func:`init_args`) as Flower's
    Ray backend does, with ``code`` (directories of packages, module files:
    :func:`~fedcsg.nn.imported_models.code_to_ship`) shipped to every worker by Ray's ``runtime_env``
    ``py_modules``: Ray zips each, stores it in the cluster's GCS, and every node unpacks it and puts it
    first on its workers' PYTHONPATH. Flower's backend then finds Ray initialized and runs on it.

    Flower's own ``RayBackend.init_ray`` (flwr 1.41, server/superlink/fleet/vce/backend/raybackend.py)
    cannot ship code: it calls ``ray.init(runtime_env={"env_vars": {"PYTHONPATH": ...}}, **init_args)``,
    so ``init_args`` holding a ``runtime_env`` is a TypeError, and it initializes nothing when Ray is
    initialized already. What it does is done here as it does it (:func:`worker_env`), and the
    workers' PYTHONPATH is exported in this process too.

    Code that Ray cannot ship (its zip over the GCS's 512 MiB, an upload that fails) is a one-line
    ValueError with Ray's reason.
    """
    import ray
    from ray.exceptions import RuntimeEnvSetupError

    runtime_env = worker_env(code)
    os.environ["PYTHONPATH"] = runtime_env["env_vars"]["PYTHONPATH"]
    try:
        ray.init(runtime_env=runtime_env, **init_args(address))
    except RuntimeEnvSetupError as error:
        reason = " ".join(str(error.error_message or error).split())
        raise ValueError(
            f"the model's code ({', '.join(code)}) is not accepted: Ray could not ship it to its workers ({reason}); "
            "accepted is a package Ray can zip and store (under 512 MiB; a .rayignore in it leaves files out)"
        ) from None


@contextlib.contextmanager
def started_ray(address: str, code: Sequence[str] = ()) -> Iterator[None]:
    """Run the block on the Ray that :func:`init_ray` starts or reaches, shut down (a cluster: left)
    after it; Flower's engine shuts Ray down itself when it ends, but not when it fails before its
    backend starts."""
    import ray

    try:
        init_ray(address, code)
        yield
    finally:
        ray.shutdown()


def set_accelerator_env() -> None:
    """Set :data:`ACCELERATOR_ENV` in this process, before it starts or reaches a Ray: a private Ray's
    workers inherit it."""
    name, value = ACCELERATOR_ENV
    os.environ[name] = value


def local_resources() -> dict[str, float]:
    """What a private Ray on this machine offers: its usable CPUs and CUDA devices, or what Ray's
    :data:`RESOURCES_ENV` declares instead (as Ray itself takes it: a Ray with GPUs it does not have)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        import torch

        gpus = torch.cuda.device_count()
    except ImportError:
        gpus = 0
    declared = json.loads(os.environ.get(RESOURCES_ENV) or "{}")
    return {"CPU": float(declared.get("CPU", cpus)), "GPU": float(declared.get("GPU", gpus))}


def cluster_resources(address: str, probe: Callable[[], str] | None = None) -> list[dict[str, float]]:
    """The resources of every live node of the cluster at ``address`` ("auto" or HOST:PORT), read
    through a short connection of this driver (closed again before the run starts).

    With ``probe``, it also runs on every live node that has a CPU (a Ray task pinned to the node,
    asking for no resources, with this driver's ``sys.path`` as Flower's backend gives its actors),
    and the first node on which it returns a non-empty problem fails the check in one line.
    """
    import ray

    if address != "auto":  # Ray itself retries an unreachable head for minutes
        host, _, port = address.rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT).close()
        except OSError as error:
            raise ConnectionError(
                f"ray-address = {address!r}: no Ray head answers there ({error.strerror or error}); "
                "start one with `ray start --head --port PORT` or pass the address it printed"
            ) from None
    set_accelerator_env()
    try:
        ray.init(runtime_env=worker_env(), **{**init_args(address), "log_to_driver": False})
    except (ConnectionError, RuntimeError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConnectionError(f"ray-address = {address!r}: no Ray cluster could be reached there ({first})") from None
    try:
        nodes = [node for node in ray.nodes() if node.get("Alive") and node.get("Resources")]
        if probe is not None:
            _probe_nodes(ray, [node for node in nodes if node["Resources"].get("CPU", 0) > 0], probe)
        return [dict(node["Resources"]) for node in nodes]
    finally:
        ray.shutdown()


def _call(probe: Callable[[], str]) -> str:
    return probe()


def _probe_nodes(ray: Any, nodes: list[dict[str, Any]], probe: Callable[[], str]) -> None:
    """Run ``probe`` on each of ``nodes`` at once; a one-line ValueError names the first that fails."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(num_cpus=0, max_retries=0)(_call)
    futures = {
        node["NodeID"]: task.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
        ).remote(probe)
        for node in nodes
    }
    for node in nodes:
        where = f"Ray node {node['NodeID'][:12]} ({node.get('NodeManagerAddress', '?')})"
        try:
            problem = ray.get(futures[node["NodeID"]], timeout=PROBE_TIMEOUT)
        except Exception as error:  # noqa: BLE001 - any failure of the probe is the node's problem
            problem = " ".join(str(error).split())[-300:] or type(error).__name__
        if problem:
            raise ValueError(f"{where} cannot host this run's clients: {problem}")


def most_on_a_node(nodes: list[dict[str, float]], resource: str) -> float:
    """The most of ``resource`` ("CPU", "GPU") that one of the Ray nodes ``nodes`` has (0 for none)."""
    return max((node.get(resource, 0.0) for node in nodes), default=0.0)


def check_client_resources(num_cpus: float, num_gpus: float, nodes: list[dict[str, float]]) -> None:
    """Fail in one line unless at least one node can host a client asking for ``num_cpus`` CPUs and
    ``num_gpus`` GPUs (Flower's actor pool would otherwise be empty and the run would wait forever)."""

    def fits(node: dict[str, float]) -> bool:
        return node.get("CPU", 0.0) >= num_cpus and (num_gpus == 0 or node.get("GPU", 0.0) >= num_gpus)

    if any(fits(node) for node in nodes):
        return
    most_cpus, most_gpus = most_on_a_node(nodes, "CPU"), most_on_a_node(nodes, "GPU")
    raise ValueError(
        f"client-num-cpus = {num_cpus:g} with client-num-gpus = {num_gpus:g} fits on no Ray node "
        f"({len(nodes)} node(s), at most {most_cpus:g} CPUs and {most_gpus:g} GPUs on one): "
        "accepted are resources that one node has"
    )


def ray_nodes(address: str, probe: Callable[[], str] | None = None) -> list[dict[str, float]]:
    """The resources of the nodes of the Ray that ``address`` names: this machine's for a private
    Ray; an attached cluster's live nodes, each also running ``probe`` (:func:`cluster_resources`)."""
    return [local_resources()] if not address else cluster_resources(address, probe)


def resolve_resources(cfg: RunConfig, nodes: list[dict[str, float]], cuda_here: bool) -> RunConfig:
    """``cfg`` with ``client-num-gpus`` a number and ``server-device`` ``cpu`` or ``cuda`` for the
    Ray nodes ``nodes`` and a server machine with (``cuda_here``) or without a CUDA device
    (:mod:`fedcsg.spec.resources`); a one-line ValueError for ``device = "cuda"`` with no GPU share,
    ``server-device = "cuda"`` without a CUDA device here, or a client that no node can host
    (:func:`check_client_resources`)."""
    gpus = most_on_a_node(nodes, "GPU")
    server = server_device(cfg.server_device, cuda_here)
    share = client_gpu_share(cfg.client_num_gpus, cfg.clients_per_gpu, gpus, server == "cuda")
    if cfg.device == "cuda" and share == 0:
        raise ValueError(
            f"device = 'cuda' is not accepted here: client-num-gpus = {cfg.client_num_gpus!r} gives the clients "
            f'no GPU share (the Ray cluster has {gpus:g} GPUs); accepted is device = "auto" or "cpu", or a '
            "cluster with GPUs"
        )
    if server == "cuda" and not cuda_here:
        raise ValueError(
            "server-device = 'cuda' is not accepted here: this machine has no CUDA device for the server; "
            'accepted is server-device = "auto" or "cpu"'
        )
    check_client_resources(cfg.client_num_cpus, share, nodes)
    return cfg.replace(client_num_gpus=share, server_device=server)


PLACEMENT = "placement"  # the ConfigRecord of a train reply that names where the client ran
NODE_ID_KEY = "ray-node-id"
DEVICE_KEY = "device"  # the device the client trained on (fedcsg.nn.devices.describe)
VISIBLE_KEY = "cuda-visible-devices"  # the client's CUDA_VISIBLE_DEVICES, UNSET where it has none
UNSET = "unset"
NODE_ID_HEX_LENGTH = 56  # Ray's NodeID is 28 bytes, written in hex


def placement_record(device: str) -> dict[str, str]:
    """The content of a train reply's :data:`PLACEMENT` record: the Ray node that ran the client, the
    ``device`` it trained on (described) and the CUDA devices it was shown."""
    return {
        NODE_ID_KEY: current_node_id(),
        DEVICE_KEY: device,
        VISIBLE_KEY: os.environ.get("CUDA_VISIBLE_DEVICES", UNSET),
    }


def reported_placement(content: Any, key: str = NODE_ID_KEY) -> str:
    """The ``key`` entry (default: the Ray node id) of a reply's RecordDict ``content``'s placement; "" if
    it names none."""
    if PLACEMENT not in content.config_records:
        return ""
    value = content.config_records[PLACEMENT].get(key, "")
    return value if isinstance(value, str) else ""


def hide_gpus_without_share(cfg: RunConfig) -> None:
    """Hide the GPUs from this client process when the run gives clients no GPU share
    (``client-num-gpus`` 0): with :data:`ACCELERATOR_ENV` Ray no longer does it. Before CUDA starts
    in the process, this keeps it on the CPU; "auto" (a run not resolved by fedcsg, as under
    ``flwr run``) leaves the devices as they are."""
    if cfg.client_num_gpus == 0:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""


def current_node_id() -> str:
    """The id (hex) of the Ray node this code runs on; "" outside Ray (a deployed SuperNode)."""
    import sys

    if "ray" not in sys.modules:
        return ""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""


@contextlib.contextmanager
def ray_out_of_our_process_group() -> Iterator[None]:
    """Start the processes of a private Ray (GCS, raylet, and through the raylet its workers) each in a
    process group of its own, not in this one. A signal to this whole process group (``timeout``, a
    job controller) then reaches this process alone, which stops Ray in order (:func:`interruptible`);
    otherwise the raylet died with it, Ray's driver exited at once, its temporary app directory stayed
    and client actors lived on under init. Ctrl-C is unchanged: Ray's processes block SIGINT anyway."""
    try:
        from ray._private import services
    except ImportError:  # no Ray here: nothing to start
        yield
        return
    original = services.ConsolePopen

    class OwnGroupPopen(original):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("process_group", 0)
            super().__init__(*args, **kwargs)

    services.ConsolePopen = OwnGroupPopen
    try:
        yield
    finally:
        services.ConsolePopen = original


@contextlib.contextmanager
def dying_with_us(address: str) -> Iterator[None]:
    """Run the block with a watchdog (:func:`fedcsg.processes.watchdog`) that kills, should this process
    die without cleaning up (SIGKILL, the OOM killer), every process it started: a private Ray
    (``address`` "") leaves nothing behind. An attached cluster is not ours: nothing is watched."""
    if address:
        yield
        return
    from fedcsg.processes import start_watchdog

    watchdog = start_watchdog()
    try:
        yield
    finally:
        watchdog.kill()
        watchdog.wait()


class Interrupted(KeyboardInterrupt):
    """Raised in the main thread by SIGTERM (``signum`` says which signal), as Ctrl-C raises
    KeyboardInterrupt, so that ``finally`` blocks and Flower's shutdown run."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


@contextlib.contextmanager
def interruptible(grace: float = 5.0) -> Iterator[None]:
    """Run the block with SIGTERM raising :class:`Interrupted`; if the block is interrupted, stop
    every process this one started below it (a private Ray's GCS, raylet and actors) that Flower's
    own shutdown left alive, SIGTERM first and SIGKILL after ``grace`` seconds, then re-raise.

    Outside the main thread (where Python cannot install signal handlers) the block runs as is.
    """
    from fedcsg.processes import adopting_orphans, descendants, stop_pids

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(signum: int, _frame: object) -> None:
        raise Interrupted(signum)

    def clean_up() -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the clean-up short
        below = descendants(os.getpid())
        with contextlib.suppress(Exception):
            import ray

            ray.shutdown()
        stop_pids(below + descendants(os.getpid()), grace)  # and the workers adopted meanwhile

    previous = signal.signal(signal.SIGTERM, on_term)
    # Flower shuts Ray down before the interruption reaches us: its raylet is gone by then, and the
    # workers it started are found below this process only because this process adopts them.
    with adopting_orphans(), ray_out_of_our_process_group():
        try:
            yield
        except KeyboardInterrupt:
            clean_up()
            raise
        except SystemExit as stop:
            # ray.init replaces the SIGTERM handler with one that calls sys.exit(SIGTERM).
            if stop.code != signal.SIGTERM:
                raise
            clean_up()
            raise Interrupted(signal.SIGTERM) from None
        finally:
            signal.signal(signal.SIGTERM, previous)
