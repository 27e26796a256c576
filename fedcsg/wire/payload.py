"""What each arm sends, how it is packed into a Flower ArrayRecord, and how many bytes that is.

The arms and their models are defined in :mod:`fedcsg.spec.arms`; a frozen generator is never part of a
payload (every party rebuilds it from the seed), nor are the entries a layout says its receiver holds
already (``held``: a csg-warm arm's generator once it froze, handed to each node once, :mod:`fedcsg.wire.handoff`).

Packing
-------
``per-tensor`` puts one Array per payload entry in the ArrayRecord (keys = state_dict names).
``flat`` concatenates the entries of each dtype into one 1-D Array (keys = dtype names, in the
order of the layout), so a model with hundreds of small tensors pays Flower's per-Array header
a few times instead of hundreds. Both sides derive the layout from the same model, so the
round trip is exact.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from torch import nn

from fedcsg.nn.csg import frozen_generator_keys
from fedcsg.spec.codecs import ArraySpecs
from fedcsg.spec.config import PACKINGS


@dataclass(frozen=True)
class PayloadEntry:
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


@dataclass(frozen=True)
class PayloadLayout:
    """The ordered payload entries of one model and arm, and how they are packed; ``held``: the
    state entries left out because the receiver holds them already."""

    entries: tuple[PayloadEntry, ...]
    packing: str = "flat"
    held: tuple[str, ...] = ()

    @classmethod
    def for_model(cls, model: nn.Module, packing: str = "flat", held: tuple[str, ...] = ()) -> PayloadLayout:
        """The payload of ``model``: its state_dict minus any frozen generator and the ``held`` entries."""
        if packing not in PACKINGS:
            raise ValueError(f"unknown payload packing {packing!r}: accepted are {', '.join(PACKINGS)}")
        state = model.state_dict()
        unknown = [key for key in held if key not in state]
        if unknown:
            raise ValueError(f"held entries {unknown[:3]} are not in the model's state")
        left_out = frozen_generator_keys(model) | set(held)
        entries = tuple(
            PayloadEntry(key, tuple(value.shape), value.dtype) for key, value in state.items() if key not in left_out
        )
        return cls(entries, packing, tuple(held))

    def subset(self, keys: tuple[str, ...], packing: str = "per-tensor") -> PayloadLayout:
        """The layout of this layout's entries ``keys`` alone (e.g. the entries a later layout holds)."""
        return PayloadLayout(tuple(e for e in self.entries if e.key in keys), packing)

    @property
    def keys(self) -> list[str]:
        return [e.key for e in self.entries]

    @property
    def nbytes(self) -> int:
        """Raw tensor bytes of one payload."""
        return sum(e.numel * e.dtype.itemsize for e in self.entries)

    def _groups(self) -> OrderedDict[str, list[PayloadEntry]]:
        groups: OrderedDict[str, list[PayloadEntry]] = OrderedDict()
        for entry in self.entries:
            groups.setdefault(str(entry.dtype).removeprefix("torch."), []).append(entry)
        return groups

    def element_mask(self, selected: set[str]) -> dict[str, np.ndarray]:
        """Flat bool masks, per ArrayRecord key of a floating dtype, true on the elements of the
        ``selected`` state-dict entries (e.g. the parameters a server optimizer may move)."""
        if self.packing == "per-tensor":
            groups = {e.key: [e] for e in self.entries}
        else:
            groups = self._groups()
        masks = {}
        for name, group in groups.items():
            if not group[0].dtype.is_floating_point:
                continue
            masks[name] = np.concatenate([np.full(e.numel, e.key in selected, dtype=bool) for e in group])
        return masks

    def array_specs(self) -> ArraySpecs:
        """Expected ``{key: (shape, numpy dtype name)}`` of the ArrayRecord this layout produces."""
        if self.packing == "per-tensor":
            return {e.key: (e.shape, str(e.dtype).removeprefix("torch.")) for e in self.entries}
        return {name: ((sum(e.numel for e in group),), name) for name, group in self._groups().items()}

    @property
    def floating(self) -> tuple[PayloadEntry, ...]:
        """The floating-point entries, in payload order: what an uplink codec encodes."""
        return tuple(e for e in self.entries if e.dtype.is_floating_point)

    @property
    def segments(self) -> list[int]:
        """Lengths of the floating entries, in payload order: the segments of a codec's flat vector."""
        return [e.numel for e in self.floating]

    def floating_keys(self) -> list[str]:
        """The ArrayRecord keys that hold floating-point entries (the rest hold integer buffers)."""
        return [key for key, (_, dtype) in self.array_specs().items() if np.issubdtype(np.dtype(dtype), np.floating)]

    def pack(self, state: dict[str, torch.Tensor]) -> ArrayRecord:
        """Pack the payload entries of ``state`` (a state_dict) into an ArrayRecord."""
        tensors = {e.key: state[e.key].detach().to("cpu").contiguous() for e in self.entries}
        if self.packing == "per-tensor":
            return ArrayRecord({k: Array(t.numpy()) for k, t in tensors.items()})
        return ArrayRecord(
            {
                name: Array(torch.cat([tensors[e.key].reshape(-1) for e in group]).numpy())
                for name, group in self._groups().items()
            }
        )

    def unpack(self, record: ArrayRecord) -> dict[str, torch.Tensor]:
        """The state entries of a packed ArrayRecord (raises ValueError if it does not fit)."""
        check_record(record, self)
        if self.packing == "per-tensor":
            return {e.key: torch.from_numpy(record[e.key].numpy().copy()) for e in self.entries}
        state: dict[str, torch.Tensor] = {}
        for name, group in self._groups().items():
            flat = torch.from_numpy(record[name].numpy().copy())
            for entry, part in zip(group, flat.split([e.numel for e in group]), strict=True):
                state[entry.key] = part.view(entry.shape)
        return state


@dataclass(frozen=True)
class Framing:
    """How a compressed message carries a payload, up (an update) or down (the global model): the
    floating entries, concatenated in payload order (:attr:`PayloadLayout.segments`), as a codec's
    named arrays under ``prefix`` (``delta.int8``, ``down.scale``, ...); the other entries (BatchNorm's
    integer counters) unchanged under their own keys.

    Parameters
    ----------
    layout
        The arm's payload.
    prefix
        What the codec's array names are prefixed with in the message.
    """

    layout: PayloadLayout
    prefix: str

    def plain_keys(self) -> list[str]:
        """The ArrayRecord keys that travel unchanged (the integer entries)."""
        floating = set(self.layout.floating_keys())
        return [k for k in self.layout.array_specs() if k not in floating]

    def specs(self, parts: ArraySpecs) -> ArraySpecs:
        """``{key: (shape, dtype)}`` of a message whose codec arrays are ``parts`` (unprefixed)."""
        plain = self.layout.array_specs()
        return {**{k: plain[k] for k in self.plain_keys()}, **{self.prefix + p: spec for p, spec in parts.items()}}

    def pack(self, plain: ArrayRecord, parts: Mapping[str, np.ndarray]) -> ArrayRecord:
        """The message of the codec arrays ``parts`` and ``plain``'s integer entries."""
        arrays = {k: plain[k] for k in self.plain_keys()}
        arrays.update({self.prefix + p: Array(np.ascontiguousarray(a)) for p, a in parts.items()})
        return ArrayRecord(arrays)

    def unpack(self, record: ArrayRecord, parts: ArraySpecs) -> dict[str, np.ndarray]:
        """The codec arrays of a message (unprefixed), after checking it against :meth:`specs` of
        ``parts`` (ValueError naming the first difference)."""
        check_specs(record, self.specs(parts))
        return {k.removeprefix(self.prefix): a.numpy() for k, a in record.items() if k.startswith(self.prefix)}


def check_record(record: ArrayRecord, layout: PayloadLayout) -> None:
    """Raise ValueError naming the first difference between ``record`` and the layout's arrays."""
    check_specs(record, layout.array_specs())


def check_specs(record: ArrayRecord, expected: ArraySpecs) -> None:
    """Raise ValueError naming the first difference between ``record`` and ``{key: (shape, dtype)}``."""
    missing = [k for k in expected if k not in record]
    extra = [k for k in record if k not in expected]
    if missing or extra:
        raise ValueError(f"payload keys differ from the arm's: missing {missing[:5]}, unexpected {extra[:5]}")
    for key, (shape, dtype) in expected.items():
        array = record[key]
        if tuple(array.shape) != shape or array.dtype != dtype:
            raise ValueError(
                f"payload entry {key!r} is {array.dtype}{list(array.shape)}, expected {dtype}{list(shape)}"
            )


def flat_floats(record: ArrayRecord, layout: PayloadLayout) -> np.ndarray:
    """The floating entries of a payload record, concatenated in payload order (float64)."""
    state = layout.unpack(record)
    parts = [state[e.key].reshape(-1).to(torch.float64).numpy() for e in layout.floating]
    return np.concatenate(parts) if parts else np.zeros(0)


def assemble(layout: PayloadLayout, plain: ArrayRecord, floats: np.ndarray) -> ArrayRecord:
    """The payload whose floating entries are ``floats`` (float64, in payload order, cast to each
    entry's dtype) and whose other entries are ``plain``'s (a record holding at least those keys)."""
    specs = layout.array_specs()
    floating = set(layout.floating_keys())
    filler = {k: Array(np.zeros(shape, dtype=dtype)) for k, (shape, dtype) in specs.items() if k in floating}
    state = layout.unpack(ArrayRecord({k: filler[k] if k in floating else plain[k] for k in specs}))
    offset = 0
    for entry in layout.floating:
        part = torch.from_numpy(np.ascontiguousarray(floats[offset : offset + entry.numel]))
        state[entry.key] = part.view(entry.shape).to(entry.dtype)
        offset += entry.numel
    return layout.pack(state)


def model_payload(model: nn.Module, layout: PayloadLayout) -> ArrayRecord:
    return layout.pack(model.state_dict())


def load_payload(model: nn.Module, record: ArrayRecord, layout: PayloadLayout) -> None:
    """Load a payload into ``model``; entries outside the payload (a frozen generator, the layout's
    ``held`` entries) are kept."""
    state = layout.unpack(record)
    missing, unexpected = model.load_state_dict(state, strict=False)
    not_sent = frozen_generator_keys(model) | set(layout.held)
    if unexpected or set(missing) - not_sent:
        raise ValueError(f"payload does not fit the model: missing {sorted(set(missing) - not_sent)[:5]}")


def load_entries(model: nn.Module, record: ArrayRecord, layout: PayloadLayout) -> None:
    """Load the entries of ``record`` (packed by ``layout``, e.g. a :meth:`PayloadLayout.subset`) into
    ``model`` and leave every other entry as it is."""
    _, unexpected = model.load_state_dict(layout.unpack(record), strict=False)
    if unexpected:
        raise ValueError(f"entries {sorted(unexpected)[:3]} are not in the model's state")


def weighted_average(records: list[ArrayRecord], weights: list[float]) -> ArrayRecord:
    """Average ArrayRecords with the same keys, shapes and dtypes, weighted by ``weights``.

    Sums run in float64 and results are cast back to each array's dtype (integers rounded), so
    the global model keeps the payload's dtypes round after round.
    """
    if not records or len(records) != len(weights):
        raise ValueError(f"need one weight per record, got {len(records)} records and {len(weights)} weights")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"weights must sum to a positive number, got {total}")
    averaged = {}
    for key in records[0]:
        acc = sum(
            record[key].numpy().astype(np.float64) * (w / total) for record, w in zip(records, weights, strict=True)
        )
        dtype = records[0][key].numpy().dtype
        averaged[key] = Array(np.asarray(np.rint(acc) if np.issubdtype(dtype, np.integer) else acc, dtype=dtype))
    return ArrayRecord(averaged)
