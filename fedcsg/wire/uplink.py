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
from flwr.app import Array, ArrayRecord

from fedcsg.spec.codecs import ArraySpecs, Codec, encode_with_feedback
from fedcsg.wire.payload import PayloadLayout, assemble, check_specs, flat_floats

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
    def segments(self) -> list[int]:
        """Lengths of the floating entries the delta concatenates."""
        return [e.numel for e in self.layout.floating]

    def _plain_keys(self) -> list[str]:
        floating = set(self.layout.floating_keys())
        return [k for k in self.layout.array_specs() if k not in floating]

    def specs(self) -> ArraySpecs:
        """``{key: (shape, dtype)}`` of the ArrayRecord a client replies with."""
        plain = self.layout.array_specs()
        if self.codec is None:
            return plain
        encoded = self.codec.specs(sum(self.segments), self.segments)
        return {
            **{k: plain[k] for k in self._plain_keys()},
            **{DELTA_PREFIX + part: spec for part, spec in encoded.items()},
        }

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
        encoded, residual = encode_with_feedback(self.codec, delta, self.segments, residual, rng)
        arrays = {k: local[k] for k in self._plain_keys()}
        arrays.update({DELTA_PREFIX + part: Array(np.ascontiguousarray(a)) for part, a in encoded.items()})
        return ArrayRecord(arrays), residual

    def decode(self, reply: ArrayRecord, sent: ArrayRecord) -> ArrayRecord:
        """The payload a reply stands for: ``sent`` plus the decoded delta (integer entries from the reply).

        Raises ValueError if the reply does not fit :meth:`specs` or cannot be decoded.
        """
        check_specs(reply, self.specs())
        if self.codec is None:
            return reply
        size, segments = sum(self.segments), self.segments
        parts = {k.removeprefix(DELTA_PREFIX): a.numpy() for k, a in reply.items() if k.startswith(DELTA_PREFIX)}
        delta = self.codec.decode(parts, size, segments)
        plain = ArrayRecord({k: reply[k] for k in self._plain_keys()})
        return assemble(self.layout, plain, self.flat_floats(sent) + delta)
