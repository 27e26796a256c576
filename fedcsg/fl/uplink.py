"""How payloads travel: a client's update up (as it is, or as a codec's encoded delta) and the
global payload down (as it is, or as float16).

Uplink
------
Without a codec a client replies with its payload. With one it replies with its *update*
``delta = local payload - payload it received``: the floating entries, concatenated in payload
order, are encoded by the codec into arrays keyed ``delta.<part>`` (``delta.int8``,
``delta.scale``, ...); integer entries (BatchNorm's batch counters) travel unchanged under their
own keys. The server decodes against the payload it sent, so the result is again a payload of
the arm, and averages it as any other reply. Every encoded array's shape and dtype follow from the
layout and the codec (:meth:`Uplink.specs`): a reply that differs is rejected as a plain one is.

Downlink
--------
``full`` sends the global payload as it is. ``fp16`` sends its floating entries as float16 and the
client casts them back to the layout's dtype; the server keeps its own payload in full precision
and decodes updates against what the clients actually received.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from fedcsg.fl.codecs import ArraySpecs, Codec, encode_with_feedback
from fedcsg.fl.payload import PayloadLayout, check_specs

DOWNLINKS = ("full", "fp16")
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
        state = self.layout.unpack(record)
        parts = [state[e.key].reshape(-1).to(torch.float64).numpy() for e in self.layout.floating]
        return np.concatenate(parts) if parts else np.zeros(0)

    def encode(
        self,
        local: ArrayRecord,
        received: ArrayRecord,
        residual: np.ndarray | None,
        rng: np.random.Generator,
    ) -> tuple[ArrayRecord, np.ndarray | None]:
        """The reply record for the client's ``local`` payload, and the residual to carry.

        ``received`` is the global payload as the client got it (after :func:`restore_downlink`);
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
        merged = ArrayRecord(
            {**{k: sent[k] for k in self.layout.floating_keys()}, **{k: reply[k] for k in self._plain_keys()}}
        )
        state = self.layout.unpack(merged)
        offset = 0
        for entry in self.layout.floating:
            base = state[entry.key].to(torch.float64)
            change = torch.from_numpy(delta[offset : offset + entry.numel]).view(entry.shape)
            state[entry.key] = (base + change).to(entry.dtype)
            offset += entry.numel
        return self.layout.pack(state)


def check_downlink(mode: str) -> str:
    if mode not in DOWNLINKS:
        raise ValueError(f"downlink = {mode!r} is not accepted: one of {', '.join(DOWNLINKS)} is")
    return mode


def downlink_record(arrays: ArrayRecord, mode: str) -> ArrayRecord:
    """The global payload as it is sent: unchanged (``full``) or with float entries as float16 (``fp16``)."""
    if check_downlink(mode) == "full":
        return arrays
    return ArrayRecord(
        {
            key: Array(array.numpy().astype(np.float16)) if np.issubdtype(array.numpy().dtype, np.floating) else array
            for key, array in arrays.items()
        }
    )


def restore_downlink(record: ArrayRecord, layout: PayloadLayout) -> ArrayRecord:
    """A received global payload in the layout's dtypes (float16 entries cast back).

    Raises ValueError if a key or shape differs from the layout, or a dtype is neither the
    layout's nor float16 for a floating entry.
    """
    expected = layout.array_specs()
    floating = set(layout.floating_keys())
    restored = {}
    for key, array in record.items():
        if key in floating and array.dtype == "float16":
            restored[key] = Array(array.numpy().astype(expected[key][1]))
        else:
            restored[key] = array
    out = ArrayRecord(restored)
    check_specs(out, expected)
    return out
