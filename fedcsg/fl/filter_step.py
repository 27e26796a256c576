"""The filter step of a round measured on the server: the payloads the strategy holds (the
global one before and after the round, what the clients started from, each client's decoded reply)
turned into conv filters by loading them into a copy of the arm's model, and measured with
:func:`fedcsg.nn.step.round_step`."""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from flwr.app import ArrayRecord
from torch import nn

from fedcsg.nn.step import RoundStep, conv_filters, round_step
from fedcsg.wire.payload import PayloadLayout, load_payload


class PayloadFilters:
    """Conv filters of an arm's payloads, from a private CPU copy of its model.

    Parameters
    ----------
    model
        The arm's model (copied: loading payloads never touches it). A frozen generator, not in
        the payload, stays the copy's, which every party draws from the same seed.
    layout
        The arm's payload layout.
    """

    def __init__(self, model: nn.Module, layout: PayloadLayout) -> None:
        self.model = copy.deepcopy(model).to("cpu")
        self.layout = layout

    @torch.no_grad()
    def __call__(self, record: ArrayRecord) -> dict[str, torch.Tensor]:
        """Layer name -> conv filters of the model whose payload is ``record``."""
        load_payload(self.model, record, self.layout)
        return conv_filters(self.model)

    def measure(
        self, before: ArrayRecord, after: ArrayRecord, start: ArrayRecord, clients: Iterable[ArrayRecord]
    ) -> RoundStep:
        """The round's :class:`~fedcsg.nn.step.RoundStep` from payloads: the global one ``before``
        and ``after`` the round, the one the clients ``start`` from and their decoded replies."""
        before_filters = self(before)
        start_filters = before_filters if start is before else self(start)
        return round_step(before_filters, self(after), start_filters, (self(c) for c in clients))
