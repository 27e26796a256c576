"""Flower's private surface, in one place: every name fedcsg uses that Flower 1.41 does not export as
public API, why no public one serves, and a check that the installed flwr still has them.

================================================  =================================================
private name (module)                             why fedcsg needs it
================================================  =================================================
``metadata_to_proto``, ``error_to_proto``         wire bytes with the random ids counted at full
(flwr.common.serde_utils), ``Message``            width (:func:`fedcsg.fl.traffic.accounted_wire_bytes`):
(flwr.proto.message_pb2), ``add_header_to_``      a message re-serialized as Flower serializes it;
``object_body``, ``get_all_nested_objects``       ``Message.deflate`` alone counts the random ids at
(flwr.supercore.inflatable.inflatable_object)     their varint length, which changes between reruns
``SUPERLINK_NODE_ID``,                            the ids of the run and messages of a simulation
``RUN_ID_NUM_BYTES``, ``TASK_ID_NUM_BYTES``       that fedcsg starts itself with a server Context
(flwr.common.constant),                           (Flower's public ``run_simulation`` takes no
``generate_rand_int_from_bytes``                  Context, so one simulation could not hold the
(flwr.server.superlink.linkstate.utils),          plan of every arm and seed of a compare),
``Run``, ``NOOP_FEDERATION_ID``                   and offline messages for ``fedcsg bytes``
(flwr.supercore.run / .constant), ``TaskIdentity``  (Flower stamps every Message with the running
(flwr.supercore.task_identity), ``EventType``     task's identity, a class attribute set here only)
(flwr.supercore.telemetry), ``_run_simulation``
(flwr.simulation.run_simulation)
``build_fab_from_disk`` (flwr.cli.build),         the bytes of the app bundle each SuperNode
``get_project_dir`` (flwr.common.config),         downloads (the GetFab reply), rebuilt from the
``Fab``, ``GetFabResponse`` (flwr.proto.fab_pb2)  installed app: the ServerApp never sees the FAB
``InMemoryGrid``                                  the grid of a simulation, whose nodes never restart:
(flwr.superlink.grid.inmemory_grid), ``NodeInfo``  on any other the ServerApp watches when each node
(flwr.proto.node_pb2), ``ErrorCode``              was activated (``Grid.get_nodes``' NodeInfo) and
(flwr.common.constant)                            fails a restarted one with NODE_UNAVAILABLE
                                                  (:mod:`fedcsg.fl.node_restarts`)
================================================  =================================================

``tests/test_flower_private.py`` fails, naming each missing name, if an installed flwr moves one.
"""

from __future__ import annotations

import importlib
from typing import Any

import flwr
from flwr.common.constant import RUN_ID_NUM_BYTES, SUPERLINK_NODE_ID, TASK_ID_NUM_BYTES, ErrorCode
from flwr.common.serde_utils import error_to_proto, metadata_to_proto
from flwr.proto.message_pb2 import Message as ProtoMessage  # pylint: disable=E0611
from flwr.proto.node_pb2 import NodeInfo  # pylint: disable=E0611
from flwr.supercore.constant import NOOP_FEDERATION_ID
from flwr.supercore.inflatable.inflatable_object import add_header_to_object_body, get_all_nested_objects
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.grid.inmemory_grid import InMemoryGrid

__all__ = [
    "ErrorCode",
    "InMemoryGrid",
    "NodeInfo",
    "ProtoMessage",
    "Run",
    "SUPERLINK_NODE_ID",
    "add_header_to_object_body",
    "error_to_proto",
    "fab_reply_bytes",
    "get_all_nested_objects",
    "metadata_to_proto",
    "missing_names",
    "offline_task_identity",
    "run_simulation",
    "simulation_run",
]

# Every private name, as (module, attribute): what missing_names checks.
PRIVATE_NAMES = (
    ("flwr.common.constant", "RUN_ID_NUM_BYTES"),
    ("flwr.common.constant", "SUPERLINK_NODE_ID"),
    ("flwr.common.constant", "TASK_ID_NUM_BYTES"),
    ("flwr.common.serde_utils", "error_to_proto"),
    ("flwr.common.serde_utils", "metadata_to_proto"),
    ("flwr.proto.message_pb2", "Message"),
    ("flwr.server.superlink.linkstate.utils", "generate_rand_int_from_bytes"),
    ("flwr.simulation.run_simulation", "_run_simulation"),
    ("flwr.supercore.constant", "NOOP_FEDERATION_ID"),
    ("flwr.supercore.inflatable.inflatable_object", "add_header_to_object_body"),
    ("flwr.supercore.inflatable.inflatable_object", "get_all_nested_objects"),
    ("flwr.supercore.run", "Run"),
    ("flwr.supercore.task_identity", "TaskIdentity"),
    ("flwr.supercore.telemetry", "EventType"),
    ("flwr.cli.build", "build_fab_from_disk"),
    ("flwr.common.config", "get_project_dir"),
    ("flwr.proto.fab_pb2", "Fab"),
    ("flwr.proto.fab_pb2", "GetFabResponse"),
    ("flwr.superlink.grid.inmemory_grid", "InMemoryGrid"),
    ("flwr.proto.node_pb2", "NodeInfo"),
    ("flwr.common.constant", "ErrorCode.NODE_UNAVAILABLE"),
)


def missing_names() -> list[str]:
    """The private names of :data:`PRIVATE_NAMES` that the installed flwr lacks (empty when it has all)."""
    missing = []
    for module, attribute in PRIVATE_NAMES:
        try:
            found: Any = importlib.import_module(module)
            for part in attribute.split("."):
                found = getattr(found, part)
        except (ImportError, AttributeError):
            missing.append(f"{module}.{attribute} (flwr {flwr.__version__})")
    return missing


def offline_task_identity() -> None:
    """Give Flower's task identity a value where no task runs (offline messages of ``fedcsg bytes``):
    Flower stamps every Message with it."""
    for name in ("run_id", "task_id", "node_id"):
        try:
            getattr(TaskIdentity, name)
        except RuntimeError:
            setattr(TaskIdentity, name, 1)


def simulation_run() -> Run:
    """A new run for a simulation that fedcsg starts with its own server Context: fresh random ids
    as the SuperLink draws them, and Flower's task identity set to its primary task."""
    from flwr.server.superlink.linkstate.utils import generate_rand_int_from_bytes

    run_id = generate_rand_int_from_bytes(RUN_ID_NUM_BYTES)
    run = Run.create_empty(run_id=run_id)
    run.primary_task_id = generate_rand_int_from_bytes(TASK_ID_NUM_BYTES)
    run.federation_id = NOOP_FEDERATION_ID
    TaskIdentity.task_id = run.primary_task_id
    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    return run


def run_simulation(**kwargs: Any) -> None:
    """Flower's simulation engine (``_run_simulation``, which takes the server Context that the public
    ``run_simulation`` does not), exiting with the Python API's telemetry event."""
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.telemetry import EventType

    _run_simulation(**kwargs, exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE)


def fab_reply_bytes(run: Run, sha256_of: Any) -> int | None:
    """Serialized size of the GetFab reply for ``run``'s app bundle, rebuilt from the app installed
    under FLWR_HOME; None when it cannot be rebuilt or its hash (``sha256_of(bytes)``) is not the run's."""
    from flwr.cli.build import build_fab_from_disk
    from flwr.common.config import get_project_dir
    from flwr.proto.fab_pb2 import Fab, GetFabResponse  # pylint: disable=E0611

    try:
        fab = build_fab_from_disk(get_project_dir(run.fab_id, run.fab_version, run.fab_hash))
    except (OSError, ValueError):
        return None
    if sha256_of(fab) != run.fab_hash:
        return None
    return GetFabResponse(fab=Fab(hash_str=run.fab_hash, content=fab)).ByteSize()
