"""How a client's update travels up: as it is, or as a codec's encoded delta (the global payload's
way down is :mod:`fedcsg.wire.downlink`).

Uplink
------
Without a codec a client replies with its payload. With one it replies with its *update*
``delta = local payload - payload it received``: the floating entries, concatenated in payload
order, are encoded by the codec into arrays keyed ``delta.<part>`` (``delta.int8``,
``delta.scale``, ...); integer entries (BatchNorm's batch counters) travel unchanged under their
own keys. The server decodes against the payload it sent, so the result is again a payload of
the arm, and averages it as any other reply. Every encoded array's shape and dtype follow from the
layout and the codec (:meth:`Uplink.specs`): a reply that differs is rejected as a plain one is.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord

from fedcsg.spec.codecs import ArraySpecs, Codec, encode_with_feedback
from fedcsg.wire.payload import Framing, PayloadLayout, assemble, check_specs, flat_floats

DELTA_PREFIX = "delta."


@dataclass(frozen=True)
class Uplink:
    """What a client of an arm sends up: its payload (``codec`` None) or its encoded update.

    Parameters
    ----------
    layout
        The arm's payload.
    codec
        The uplink codec, or None for the payload as it is.
    """

    layout: PayloadLayout
    codec: Codec | None = None

    @property
    def framing(self) -> Framing:
        return Framing(self.layout, DELTA_PREFIX)

    def specs(self) -> ArraySpecs:
        """``{key: (shape, dtype)}`` of the ArrayRecord a client replies with."""
        if self.codec is None:
            return self.layout.array_specs()
        return self.framing.specs(self._codec_specs())

    def _codec_specs(self) -> ArraySpecs:
        assert self.codec is not None
        segments = self.layout.segments
        return self.codec.specs(sum(segments), segments)

    def flat_floats(self, record: ArrayRecord) -> np.ndarray:
        """The floating entries of a payload record, concatenated in payload order (float64)."""
        return flat_floats(record, self.layout)

    def encode(
        self,
        local: ArrayRecord,
        received: ArrayRecord,
        residual: np.ndarray | None,
        rng: np.random.Generator,
    ) -> tuple[ArrayRecord, np.ndarray | None]:
        """The reply record for the client's ``local`` payload, and the residual to carry.

        ``received`` is the global payload as the client got it (after :func:`fedcsg.wire.downlink.receive`);
        ``residual`` the carried error of an error-feedback codec (None at first).
        """
        if self.codec is None:
            return local, None
        delta = self.flat_floats(local) - self.flat_floats(received)
        encoded, residual = encode_with_feedback(self.codec, delta, self.layout.segments, residual, rng)
        return self.framing.pack(local, encoded), residual

    def decode(self, reply: ArrayRecord, sent: ArrayRecord) -> ArrayRecord:
        """The payload a reply stands for: ``sent`` plus the decoded delta (integer entries from the reply).

        Raises ValueError if the reply does not fit :meth:`specs` or cannot be decoded.
        """
        if self.codec is None:
            check_specs(reply, self.specs())
            return reply
        parts = self.framing.unpack(reply, self._codec_specs())
        segments = self.layout.segments
        delta = self.codec.decode(parts, sum(segments), segments)
        return assemble(self.layout, reply, self.flat_floats(sent) + delta)
