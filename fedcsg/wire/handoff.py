"""Arrays the server hands each node once, which the node keeps: the generator of a ``csg-warm`` arm
after it froze (:mod:`fedcsg.spec.arms`).

From round K+1 such an arm's payload leaves the generator out (:attr:`~fedcsg.wire.payload.PayloadLayout.held`).
Every train message then names the handed-off arrays by hash (train config
:data:`~fedcsg.wire.messages.HANDOFF_HASH`); a node the server does not know to hold them (its first
message since the freeze, a node that failed, any node of a resumed run: Flower gives a run fresh
Contexts) also gets the arrays themselves under the record :data:`~fedcsg.wire.messages.HANDOFF`, and
their bytes are counted in the round's downlink. The node keeps them in its ``Context.state`` and says
in its reply which hash it holds (metric ``HANDOFF_HASH``); the server counts
it as a holder only after such a reply. A node sent a hash it does not hold, without the arrays, raises
:class:`HandoffOutOfSync` and its round fails: it never trains with another generator than the server's.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from flwr.app import ArrayRecord, Message, RecordDict

from fedcsg.wire.downlink import model_hash
from fedcsg.wire.messages import HANDOFF, HANDOFF_HASH, acknowledged
from fedcsg.wire.payload import PayloadLayout, check_record

STATE_PREFIX = "handoff:"  # a node's Context.state record of the arrays, one per run (arm and seed)


class HandoffOutOfSync(RuntimeError):
    """A node was told to hold handed-off arrays that it does not hold and was not sent."""


@dataclass
class Handoff:
    """The server's side: the arrays (packed by ``layout``), their hash and the nodes known to hold them."""

    layout: PayloadLayout
    record: ArrayRecord
    holders: set[int] = field(default_factory=set)
    digest: int = field(init=False)

    def __post_init__(self) -> None:
        check_record(self.record, self.layout)
        self.digest = handoff_hash(self.record)

    def split(self, nodes: Sequence[int]) -> tuple[list[int], list[int]]:
        """(nodes that hold the arrays, nodes to hand them to), each in the order given."""
        return [n for n in nodes if n in self.holders], [n for n in nodes if n not in self.holders]

    def settle(self, sent: Iterable[int], replies: Iterable[Message]) -> None:
        """Holders after a round: the sent nodes whose reply names this hash; the other sent nodes
        (failed, silent, wrong) hold nothing the server knows of."""
        holding, lost = acknowledged(sent, replies, HANDOFF_HASH, self.digest)
        self.holders = (self.holders | holding) - lost


def handoff_hash(record: ArrayRecord) -> int:
    """The arrays' :func:`~fedcsg.wire.downlink.model_hash` as a non-negative int64 (its first 15 hex
    digits): a metric, which a reply's MetricRecord can hold and a string it cannot."""
    return int(model_hash(record)[:15], 16)


def received_handoff(content: RecordDict, digest: int | None, state: RecordDict, run: str) -> ArrayRecord | None:
    """A node's side: the handed-off arrays its train message names by ``digest`` (its
    :attr:`~fedcsg.wire.messages.TrainInstruction.handoff_hash`; None: it names none), taken from the
    message and kept in ``state`` (its ``Context.state``, one record per ``run``), or from ``state``.

    Raises
    ------
    HandoffOutOfSync
        The message names arrays by a hash that neither it nor ``state`` holds.
    """
    if digest is None:
        return None
    key = STATE_PREFIX + run
    if HANDOFF in content:
        record = content[HANDOFF]
        assert isinstance(record, ArrayRecord)
        if handoff_hash(record) != digest:
            raise HandoffOutOfSync(f"handed-off arrays have hash {handoff_hash(record)}, the server's {digest}")
        state[key] = record
        return record
    held = state[key] if key in state else None
    assert held is None or isinstance(held, ArrayRecord)
    if held is None or handoff_hash(held) != digest:
        what = "nothing" if held is None else f"hash {handoff_hash(held)}"
        raise HandoffOutOfSync(f"told to hold handed-off arrays {digest}, this node holds {what} and was not sent them")
    return held
