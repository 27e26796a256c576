"""A round on real SuperNodes that does not wait for a node that went away and came back.

A SuperNode killed while it trains takes the message it was sent with it: Flower delivers a message
once, so its restarted process never sees it. While the node is gone, the SuperLink answers for it
(``Node Unavailable``, once its heartbeat has expired); but a supervisor that brings it back
between two of the ServerApp's polls (every 3 s) leaves the SuperLink nothing to answer for, and
Flower's ``send_and_receive`` waits for the lost reply until ``round-timeout``.

:class:`RestartAwareGrid` is that same wait with one more look per poll: the ``last_activated_at``
of each node still owing a reply (Flower's ``NodeInfo``). A node activated again since it was sent
its message was offline in between, and its reply will not come (or not for sure: a node that was
only cut off might still answer; the SuperLink's own reply fails such a node too, when a poll falls
while it is offline): the round stops waiting for it
and counts it failed, with an error reply that says so (Flower's ``NODE_UNAVAILABLE`` code, as the
SuperLink's own reply for a node gone silent). The ServerApp of a
deployment waits through it (``fedcsg.fl.server_app.main``); a simulation's nodes never restart.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from flwr.app import Error, Message
from flwr.serverapp import Grid

from fedcsg.fl.flower_private import ErrorCode, NodeInfo, Run

POLL_SECONDS = 3.0  # as Flower's own send_and_receive on a SuperLink


class RestartAwareGrid(Grid):
    """``grid`` (a deployment's), whose :meth:`send_and_receive` stops waiting for a node that was
    activated again after it was sent its message. Everything else is ``grid``'s."""

    def __init__(self, grid: Grid, poll_seconds: float = POLL_SECONDS) -> None:
        self.grid = grid
        self.poll_seconds = poll_seconds

    def set_run(self, run: Run) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Run:
        return self.grid.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        return self.grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def get_nodes(self) -> Iterable[NodeInfo]:
        return self.grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def activations(self) -> dict[int, str]:
        """When each online node was last activated (Flower's ``NodeInfo.last_activated_at``)."""
        return {int(info.node_id): str(info.last_activated_at) for info in self.grid.get_nodes()}

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push ``messages`` and pull their replies until all came, ``timeout`` passed, or the nodes
        still owing one were activated again since (each gets an error reply naming why)."""
        messages = list(messages)
        if not messages:
            return []
        sent_at = self.activations()
        owed = {mid: msg for mid, msg in zip(self.grid.push_messages(messages), messages, strict=True) if mid}
        replies: list[Message] = []
        deadline = None if timeout is None else time.monotonic() + timeout
        while owed and (deadline is None or time.monotonic() < deadline):
            for reply in self.grid.pull_messages(list(owed)):
                replies.append(reply)
                owed.pop(reply.metadata.reply_to_message_id, None)
            if not owed:
                break
            now = self.activations()
            for mid, msg in list(owed.items()):
                node = msg.metadata.dst_node_id
                if node in now and node in sent_at and now[node] != sent_at[node]:
                    replies.append(reactivated_reply(msg, now[node]))
                    del owed[mid]
            if owed:
                time.sleep(self.poll_seconds)
        return replies


def reactivated_reply(message: Message, activated_at: str) -> Message:
    """The error reply for ``message``, whose node was activated again (at ``activated_at``) after it
    was sent: its process restarted, or it was offline, and the message is lost to it."""
    reason = (
        f"node {message.metadata.dst_node_id} was activated again at {activated_at}, after it was sent this "
        "round's message: it restarted or was offline, and its reply will not come"
    )
    return Message(Error(code=ErrorCode.NODE_UNAVAILABLE, reason=reason), reply_to=message)
