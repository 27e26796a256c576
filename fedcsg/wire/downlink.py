"""How the global payload travels down, per arm (``MODEL[+UPCODEC][/DOWNLINK]``, :mod:`fedcsg.spec.arms`).

Stateless downlinks (a client decodes the message alone, whatever it received before):

``full``
    The global payload as it is.
``fp16``
    Its floating entries as float16 (same keys); the client casts them back.
``int8``
    Its floating entries, concatenated in payload order, quantized in blocks of :data:`BLOCK`
    values (blocks never straddle two state-dict entries): one float32 scale ``max|x| / 127`` per
    block and int8 values rounded to the nearest level (error at most half a step, ``max|x| / 254``
    of the block), keys ``down.int8`` and ``down.scale``; integer entries travel unchanged.

Delta downlinks with error feedback on the server (DoubleSqueeze, EF21-P):

``delta-int8``, ``delta-topk``
    The server keeps x̂, the model its in-sync clients hold. Each broadcast sends
    ``c = C(x - x̂)`` (blockwise int8 as above, or the ``downlink-topk-fraction`` largest entries as
    int32 indices and float32 values) and sets ``x̂ += c``; what was not sent stays in ``x - x̂`` and
    goes out in later rounds. Clients train from x̂. The first broadcast, and every node the server
    does not know to hold the previous x̂ (never sampled, failed, resumed run: :class:`Broadcaster`),
    is sent x̂ itself in full, and those bytes are counted as *resync* bytes.

Version protocol of the delta downlinks: every broadcast has a version (1, 2, ...) and the sha256
(first 16 hex digits) of its x̂. The train config carries them
(:class:`~fedcsg.wire.messages.DownlinkSync`): ``downlink-kind`` (``delta`` or ``full``),
``downlink-base`` (the version a delta applies to), ``downlink-version`` and ``downlink-hash``. A
client keeps x̂ and its version in ``Context.state``; sent a delta against a version it does not
hold, or ending with an x̂ whose hash is not the server's, it raises :class:`DownlinkOutOfSync` and
its round fails (it never trains from a wrong model). Its reply reports the version it now holds
(metric ``downlink-version``); the server counts a node as in sync only after such a reply.

Whatever the downlink, the server keeps its own full-precision model: the clients' updates are
decoded against what they received, and the server moves its model by their average
(:meth:`Broadcaster.server_update`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from fedcsg.spec.codecs import ArraySpecs, TopK, block_lengths, int8_dequantize, int8_quantize
from fedcsg.wire.messages import DOWNLINK_KIND, DOWNLINK_VERSION, DownlinkSync, acknowledged
from fedcsg.wire.payload import Framing, PayloadLayout, assemble, check_specs, flat_floats

BLOCK = 256  # values per int8 scale (docs/downlink.md: error and bytes against per-tensor scales)
STATELESS = ("full", "fp16", "int8")
DOWN_PREFIX = "down."
STATE_MODEL, STATE_HELD = "downlink-model", "downlink-held"  # a client's Context.state records


class DownlinkOutOfSync(RuntimeError):
    """A client was sent a delta against a model it does not hold, or decoded a model that is not the server's."""


def model_hash(record: ArrayRecord) -> str:
    """First 16 hex digits of the sha256 over a record's keys, dtypes, shapes and bytes, in order."""
    digest = hashlib.sha256()
    for key, array in record.items():
        values = np.ascontiguousarray(array.numpy())
        digest.update(f"{key}|{values.dtype.str}|{values.shape}|".encode())
        digest.update(values.tobytes())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class Downlink:
    """How one arm's global payload is sent and received.

    Parameters
    ----------
    layout
        The arm's payload.
    mode
        One of :data:`~fedcsg.spec.arms.DOWNLINKS` (a run's, checked by its
        :class:`~fedcsg.spec.config.RunConfig`).
    topk_fraction
        Fraction of the entries ``delta-topk`` sends, in (0, 1].
    block
        Values per int8 scale.
    """

    layout: PayloadLayout
    mode: str = "full"
    topk_fraction: float = 0.05
    block: int = BLOCK

    @classmethod
    def of_config(cls, cfg: Any, layout: PayloadLayout) -> Downlink:
        """The downlink of ``cfg``'s arm (a :class:`~fedcsg.spec.config.RunConfig`)."""
        return cls(layout, cfg.downlink_mode, cfg.downlink_topk_fraction)

    @property
    def is_delta(self) -> bool:
        return self.mode not in STATELESS

    @property
    def blocks(self) -> list[int]:
        return block_lengths(self.layout.segments, self.block)

    @property
    def framing(self) -> Framing:
        return Framing(self.layout, DOWN_PREFIX)

    def _compress(self, values: np.ndarray) -> dict[str, np.ndarray]:
        if self.mode in ("int8", "delta-int8"):
            return int8_quantize(values, self.blocks)
        return TopK(self.topk_fraction).encode(values, self.layout.segments, np.random.default_rng(0))

    def _expand(self, parts: dict[str, np.ndarray]) -> np.ndarray:
        segments = self.layout.segments
        if self.mode in ("int8", "delta-int8"):
            return int8_dequantize(parts, self.blocks)
        return TopK(self.topk_fraction).decode(parts, sum(segments), segments)

    def _part_specs(self) -> ArraySpecs:
        segments = self.layout.segments
        if self.mode in ("int8", "delta-int8"):
            return {"int8": ((sum(segments),), "int8"), "scale": ((len(self.blocks),), "float32")}
        return TopK(self.topk_fraction).specs(sum(segments), segments)

    def compressed_specs(self) -> ArraySpecs:
        """``{key: (shape, dtype)}`` of a compressed message (``int8``, or a delta's)."""
        return self.framing.specs(self._part_specs())

    def _compressed_record(self, plain: ArrayRecord, values: np.ndarray) -> ArrayRecord:
        return self.framing.pack(plain, self._compress(values))

    def _parts(self, record: ArrayRecord) -> dict[str, np.ndarray]:
        return self.framing.unpack(record, self._part_specs())

    # -- stateless ----------------------------------------------------------------------------

    def encode(self, arrays: ArrayRecord) -> ArrayRecord:
        """The message record of a stateless downlink for the global payload ``arrays``."""
        if self.mode == "full":
            return arrays
        if self.mode == "fp16":
            return ArrayRecord(
                {
                    k: Array(a.numpy().astype(np.float16)) if np.issubdtype(a.numpy().dtype, np.floating) else a
                    for k, a in arrays.items()
                }
            )
        if self.mode == "int8":
            return self._compressed_record(arrays, flat_floats(arrays, self.layout))
        raise ValueError(f"downlink {self.mode!r} is not stateless")

    def decode(self, record: ArrayRecord) -> ArrayRecord:
        """The payload (in the layout's dtypes) a stateless downlink message stands for.

        Raises ValueError if the record does not fit the downlink.
        """
        if self.mode == "int8":
            return assemble(self.layout, record, self._expand(self._parts(record)))
        if self.mode not in ("full", "fp16"):
            raise ValueError(f"downlink {self.mode!r} is not stateless")
        expected = self.layout.array_specs()
        floating = set(self.layout.floating_keys())
        restored = {
            k: Array(a.numpy().astype(expected[k][1])) if k in floating and a.dtype == "float16" else a
            for k, a in record.items()
        }
        out = ArrayRecord(restored)
        check_specs(out, expected)
        return out

    # -- delta --------------------------------------------------------------------------------

    def delta_record(self, target: ArrayRecord, held: ArrayRecord) -> ArrayRecord:
        """The delta message ``C(target - held)`` (integer entries: ``target``'s)."""
        return self._compressed_record(target, flat_floats(target, self.layout) - flat_floats(held, self.layout))

    def apply(self, held: ArrayRecord, record: ArrayRecord) -> ArrayRecord:
        """``held + decoded delta``: the same arithmetic on the server and on every client, so their
        x̂ agree bit for bit. Raises ValueError if ``record`` is not a delta of this downlink."""
        change = self._expand(self._parts(record))
        return assemble(self.layout, record, flat_floats(held, self.layout) + change)


# -- the client's side ----------------------------------------------------------------------------


def state_keys(run: str = "") -> tuple[str, str]:
    """The ``Context.state`` records of x̂ and its version for ``run`` (one per arm and seed: one
    node serves every run of a simulation in turn)."""
    return (f"{STATE_MODEL}:{run}", f"{STATE_HELD}:{run}") if run else (STATE_MODEL, STATE_HELD)


def held_version(state: RecordDict, run: str = "") -> tuple[int, str] | None:
    """(version, hash) of the x̂ a client's ``Context.state`` holds for ``run``, or None."""
    model_key, held_key = state_keys(run)
    if held_key not in state or model_key not in state:
        return None
    held = state[held_key]
    assert isinstance(held, ConfigRecord)
    return int(held["version"]), str(held["hash"])


def receive(
    downlink: Downlink, record: ArrayRecord, sync: DownlinkSync | None, state: RecordDict, run: str = ""
) -> ArrayRecord:
    """The payload a client trains from: the decoded message (stateless), or its new x̂ (delta, as
    ``sync``, the message's versions, says), which it keeps in ``state`` (its ``Context.state``, under
    :func:`state_keys` of ``run``) with the version and hash.

    Raises
    ------
    DownlinkOutOfSync
        A delta against a version the client does not hold, or an x̂ whose hash is not the server's.
    ValueError
        A message that does not fit the downlink.
    """
    if not downlink.is_delta:
        return downlink.decode(record)
    if sync is None:
        raise ValueError(f"{downlink.mode} downlink: the train message names no version")
    kind, version, digest = sync.kind, sync.version, sync.digest
    if kind == "full":
        check_specs(record, downlink.layout.array_specs())
        model = record
    elif kind == "delta":
        base, held = sync.base, held_version(state, run)
        if held is None or held[0] != base:
            what = "no model" if held is None else f"version {held[0]}"
            raise DownlinkOutOfSync(
                f"{downlink.mode} downlink: sent a delta against version {base}, this client holds {what}"
            )
        previous = state[state_keys(run)[0]]
        assert isinstance(previous, ArrayRecord)
        model = downlink.apply(previous, record)
    else:
        raise ValueError(f"{DOWNLINK_KIND} = {kind!r} is not accepted: delta or full is")
    if model_hash(model) != digest:
        raise DownlinkOutOfSync(
            f"{downlink.mode} downlink: decoded version {version} has hash {model_hash(model)}, the server's {digest}"
        )
    model_key, held_key = state_keys(run)
    state[model_key] = model
    state[held_key] = ConfigRecord({"version": version, "hash": digest})
    return model


# -- the server's side ----------------------------------------------------------------------------


@dataclass
class Group:
    """Sampled nodes that get the same downlink message."""

    nodes: list[int]
    record: ArrayRecord
    sync: DownlinkSync | None = None  # a delta downlink's versions, which the train message carries
    resync: bool = False


@dataclass
class Broadcaster:
    """The server's side of a downlink: what each sampled node is sent, the x̂ of a delta downlink,
    its version and which node holds which version.

    Call :meth:`prepare` once per broadcast (each attempt of a round), then :meth:`groups` for the
    sampled nodes, :meth:`settle` with the replies, and :meth:`server_update` on their average.
    """

    downlink: Downlink
    x_hat: ArrayRecord | None = None
    version: int = 0
    digest: str = ""
    held: dict[int, int] = field(default_factory=dict)  # node id -> version acknowledged in its reply
    _sync: ArrayRecord | None = field(default=None, repr=False)
    _base: int = 0
    _received: ArrayRecord | None = field(default=None, repr=False)

    def prepare(self, arrays: ArrayRecord) -> ArrayRecord:
        """Start a broadcast of the global payload ``arrays``; returns what its clients train from."""
        if not self.downlink.is_delta:
            sent = self.downlink.encode(arrays)
            self._sync = sent
            self._received = arrays if sent is arrays else self.downlink.decode(sent)
            return self._received
        self._base = self.version
        if self.x_hat is None:
            self._sync, new = None, ArrayRecord({k: Array(a.numpy().copy()) for k, a in arrays.items()})
        else:
            self._sync = self.downlink.delta_record(arrays, self.x_hat)
            new = self.downlink.apply(self.x_hat, self._sync)
        self.x_hat, self.version, self.digest = new, self.version + 1, model_hash(new)
        self._received = new
        return new

    def groups(self, node_ids: Sequence[int]) -> list[Group]:
        """The messages of this broadcast: one group (stateless), or the in-sync nodes' delta and
        the others' full x̂ (delta)."""
        assert self._received is not None, "prepare() comes first"
        if not self.downlink.is_delta:
            assert self._sync is not None
            return [Group(list(node_ids), self._sync)]
        in_sync = [n for n in node_ids if self._sync is not None and self.held.get(n) == self._base]
        behind = [n for n in node_ids if n not in in_sync]
        out = []
        if in_sync:
            assert self._sync is not None
            out.append(Group(in_sync, self._sync, DownlinkSync("delta", self._base, self.version, self.digest)))
        if behind:
            sync = DownlinkSync("full", self._base, self.version, self.digest)
            out.append(Group(behind, self._received, sync, resync=True))
        return out

    def settle(self, sent: Iterable[int], replies: Iterable[Message]) -> None:
        """Record which sampled node now holds this broadcast's x̂: those whose reply says so; the
        others (failed, silent, wrong) hold nothing the server knows of."""
        if not self.downlink.is_delta:
            return
        holding, lost = acknowledged(sent, replies, DOWNLINK_VERSION, self.version)
        for node in holding:
            self.held[node] = self.version
        for node in lost:
            self.held.pop(node, None)

    def server_update(self, server_arrays: ArrayRecord, average: ArrayRecord) -> ArrayRecord:
        """The new global payload: the average itself when clients received ``server_arrays``
        unchanged (``full``), else ``server_arrays`` moved by the average update, ``average -
        received``, on the floating entries (integer entries: the average's), so the server's
        model stays at full precision and, for a delta downlink, ``x - x̂`` is carried forward."""
        received = self._received
        if received is None or received is server_arrays:
            return average
        layout = self.downlink.layout
        moved = flat_floats(server_arrays, layout) + (flat_floats(average, layout) - flat_floats(received, layout))
        return assemble(layout, average, moved)

    # -- checkpoints -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Version and hash of x̂ (x̂ itself travels as arrays: :meth:`state_arrays`). Which node
        holds what is not kept: Flower gives every run fresh Contexts, so after a resume no node
        holds anything and the first round resyncs every sampled node in full."""
        return {"version": self.version, "hash": self.digest} if self.downlink.is_delta else {}

    def state_arrays(self) -> ArrayRecord | None:
        return self.x_hat if self.downlink.is_delta else None

    def load_state(self, state: dict[str, Any], x_hat: ArrayRecord | None) -> None:
        """Continue from a checkpoint's :meth:`state_dict` and x̂ (ValueError if they do not agree)."""
        if not self.downlink.is_delta or not state.get("version"):
            return
        if x_hat is None:
            raise ValueError(f"the checkpoint has no x̂ of the {self.downlink.mode} downlink: it cannot be resumed")
        check_specs(x_hat, self.downlink.layout.array_specs())
        if model_hash(x_hat) != state["hash"]:
            raise ValueError(f"the checkpoint's x̂ has hash {model_hash(x_hat)}, recorded {state['hash']}")
        self.x_hat, self.version, self.digest, self.held = x_hat, int(state["version"]), str(state["hash"]), {}
