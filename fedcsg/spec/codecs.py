"""Codecs for a client's uplink update: how ``delta = local payload - global payload`` travels.

A codec turns one flat floating-point delta (a payload's floating entries, concatenated) into a
few named numpy arrays and back. It sees the delta's *segments* (the lengths of the state-dict
entries it concatenates) so that per-tensor statistics stay per tensor whatever the packing.

:data:`CODECS` is the one table of codecs (``fp16``, ``int8``, ``topk``, each described by its
class): the arm grammar (``csg+int8``), ``fedcsg bytes``, the report's plots and the tests read it.
Adding a codec is one :class:`Codec` subclass under :func:`register_codec`, and its test.

Every encoded array's shape and dtype follow from the delta's size and segments alone
(:meth:`Codec.specs`), so the server checks a decoded reply as strictly as a plain one: a
wrong key, shape or dtype, or a non-finite value, is a rejected reply.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, TypeVar

import numpy as np

from fedcsg.spec.checks import fraction

if TYPE_CHECKING:
    from fedcsg.spec.config import RunConfig

INT8_LEVELS = 127

ArraySpecs = dict[str, tuple[tuple[int, ...], str]]


LineStyle = str | tuple[int, tuple[int, ...]]  # a matplotlib line style: "--", or (offset, (on, off, ...))


class Codec(ABC):
    """One uplink codec: a frozen dataclass registered in :data:`CODECS` under its :attr:`name`.

    A new codec is a subclass, decorated with :func:`register_codec`, with a ``name`` (the arm
    grammar's ``MODEL+name``), a ``linestyle`` of its own for the report's plots,
    ``error_feedback = True`` if the client should carry what it did not send to its next delta
    (:func:`encode_with_feedback`), and :meth:`specs`, :meth:`_encode` and :meth:`decode`. A codec
    with a setting reads it from the run in :meth:`of_run` (a new run setting: RunConfig, pyproject
    and docs/configuration.md). Its arms then run, are counted by ``fedcsg bytes`` and are plotted.
    """

    name: ClassVar[str]
    linestyle: ClassVar[LineStyle]  # matplotlib line style of its arms in the report's plots
    error_feedback: ClassVar[bool] = False  # whether the client carries the residual to its next delta

    @classmethod
    def of_run(cls, cfg: RunConfig) -> Codec:
        """This codec with the settings of run ``cfg``."""
        return cls()

    @abstractmethod
    def specs(self, size: int, segments: Sequence[int]) -> ArraySpecs:
        """``{suffix: (shape, dtype)}`` of the arrays :meth:`encode` returns for a delta of ``size``."""

    def encode(self, delta: np.ndarray, segments: Sequence[int], rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Encode a flat float delta; ``segments`` are the lengths of the entries it concatenates."""
        delta = np.asarray(delta, dtype=np.float64).reshape(-1)
        if sum(segments) != delta.size:
            raise ValueError(f"segments sum to {sum(segments)}, the delta has {delta.size} elements")
        return self._encode(delta, segments, rng)

    @abstractmethod
    def _encode(self, delta: np.ndarray, segments: Sequence[int], rng: np.random.Generator) -> dict[str, np.ndarray]:
        """:meth:`encode` of a flat float64 ``delta`` whose ``segments`` are checked."""

    @abstractmethod
    def decode(self, arrays: dict[str, np.ndarray], size: int, segments: Sequence[int]) -> np.ndarray:
        """The float64 delta that ``arrays`` (from :meth:`encode`, of the shapes :meth:`specs` gives) stand for."""


# The one table of codecs, in the report's order (registration order), filled by register_codec.
CODECS: dict[str, type[Codec]] = {}
NO_CODEC_LINESTYLE: LineStyle = "-"  # the line style of an arm whose update travels as it is

C = TypeVar("C", bound=type[Codec])


def register_codec(codec: C) -> C:
    """Class decorator: add ``codec`` to :data:`CODECS` under its name.

    Raises
    ------
    ValueError
        If its name or line style is another codec's (or the plain arms' line style).
    """
    taken = {c.linestyle: c.name for c in CODECS.values()} | {NO_CODEC_LINESTYLE: "the arms without a codec"}
    if codec.name in CODECS:
        raise ValueError(f"codec {codec.name!r} is registered already ({CODECS[codec.name].__name__})")
    if codec.linestyle in taken:
        raise ValueError(f"codec {codec.name!r}: line style {codec.linestyle!r} is {taken[codec.linestyle]}'s")
    CODECS[codec.name] = codec
    return codec


@register_codec
@dataclass(frozen=True)
class Fp16(Codec):
    """The delta as float16 (2 bytes an element). Error at most half a float16 ulp of each element
    (relative 2^-11) for values inside float16's range."""

    name: ClassVar[str] = "fp16"
    linestyle: ClassVar[str] = "--"

    def specs(self, size: int, segments: Sequence[int]) -> ArraySpecs:
        return {"fp16": ((size,), "float16")}

    def _encode(self, delta: np.ndarray, segments: Sequence[int], rng: np.random.Generator) -> dict[str, np.ndarray]:
        return {"fp16": delta.astype(np.float16)}

    def decode(self, arrays: dict[str, np.ndarray], size: int, segments: Sequence[int]) -> np.ndarray:
        return arrays["fp16"].astype(np.float64)


@register_codec
@dataclass(frozen=True)
class Int8(Codec):
    """Per segment a float32 scale ``max|delta| / 127`` and int8 values with stochastic rounding,
    ``q = floor(delta / scale + u)``, ``u ~ U[0, 1)``, so ``E[q * scale] = delta``: the server's
    average is unbiased (:func:`int8_quantize`). Error at most one step ``scale`` per element.
    1 byte an element plus 4 bytes a segment."""

    name: ClassVar[str] = "int8"
    linestyle: ClassVar[str] = ":"

    def specs(self, size: int, segments: Sequence[int]) -> ArraySpecs:
        return {"int8": ((size,), "int8"), "scale": ((len(segments),), "float32")}

    def _encode(self, delta: np.ndarray, segments: Sequence[int], rng: np.random.Generator) -> dict[str, np.ndarray]:
        return int8_quantize(delta, segments, rng)

    def decode(self, arrays: dict[str, np.ndarray], size: int, segments: Sequence[int]) -> np.ndarray:
        return int8_dequantize(arrays, segments)


@register_codec
@dataclass(frozen=True)
class TopK(Codec):
    """The ``k = ceil(fraction * n)`` entries of largest magnitude, as int32 (int64 past 2^31)
    indices and float32 values; the rest are zero. Biased alone, so it runs with error feedback:
    the part not sent (the residual) is added to the next round's delta on the same client.

    Parameters
    ----------
    fraction
        Fraction of the delta's entries sent, in (0, 1] (the run's ``topk-fraction``).
    """

    name: ClassVar[str] = "topk"
    linestyle: ClassVar[str] = "-."
    error_feedback: ClassVar[bool] = True
    fraction: float = 0.01

    def __post_init__(self) -> None:
        fraction("topk-fraction", self.fraction)

    @classmethod
    def of_run(cls, cfg: RunConfig) -> TopK:
        return cls(cfg.topk_fraction)

    def k(self, size: int) -> int:
        return max(1, math.ceil(self.fraction * size)) if size else 0

    def specs(self, size: int, segments: Sequence[int]) -> ArraySpecs:
        index = "int32" if size < 2**31 else "int64"
        return {"index": ((self.k(size),), index), "value": ((self.k(size),), "float32")}

    def _encode(self, delta: np.ndarray, segments: Sequence[int], rng: np.random.Generator) -> dict[str, np.ndarray]:
        k = self.k(delta.size)
        index = np.sort(np.argpartition(-np.abs(delta), k - 1)[:k]) if k else np.zeros(0, dtype=np.int64)
        dtype = self.specs(delta.size, segments)["index"][1]
        return {"index": index.astype(dtype), "value": delta[index].astype(np.float32)}

    def decode(self, arrays: dict[str, np.ndarray], size: int, segments: Sequence[int]) -> np.ndarray:
        index = arrays["index"]
        if index.size and (index.min() < 0 or index.max() >= size or np.any(np.diff(index) <= 0)):
            raise ValueError("topk indices are not strictly increasing positions inside the delta")
        out = np.zeros(size, dtype=np.float64)
        out[index] = arrays["value"]
        return out


def codec_type(name: str) -> type[Codec]:
    """The codec registered as ``name``, else a one-line ValueError naming what is accepted."""
    if name not in CODECS:
        raise ValueError(f"unknown codec {name!r}: accepted are {', '.join(CODECS)}")
    return CODECS[name]


def block_lengths(segments: Sequence[int], block: int = 0) -> list[int]:
    """The lengths of the quantization blocks of values made of ``segments``: each segment cut into
    blocks of ``block`` values (its last block shorter), or whole (``block`` 0: one block a segment).
    Blocks never straddle two segments (two state-dict entries)."""
    if block <= 0:
        return list(segments)
    lengths: list[int] = []
    for n in segments:
        lengths += [block] * (n // block) + ([n % block] if n % block else [])
    return lengths


def int8_quantize(
    values: np.ndarray, blocks: Sequence[int], rng: np.random.Generator | None = None
) -> dict[str, np.ndarray]:
    """Absolute int8 quantization of flat ``values`` in ``blocks`` (lengths): per block a float32
    scale ``max|v| / 127`` and int8 ``q``, rounded stochastically with ``rng`` (unbiased:
    ``E[q * scale] = v``, error below one step) or to the nearest level without (error at most half
    a step). Decoded by :func:`int8_dequantize`."""
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    bounds = np.cumsum([0, *blocks])
    peaks = np.array([np.abs(values[a:b]).max(initial=0.0) for a, b in zip(bounds[:-1], bounds[1:], strict=True)])
    scales = (peaks / INT8_LEVELS).astype(np.float32)
    step = np.repeat(scales.astype(np.float64), blocks)
    scaled = np.divide(values, step, out=np.zeros_like(values), where=step > 0)
    q = np.floor(scaled + rng.random(values.size)) if rng is not None else np.rint(scaled)
    return {"int8": np.clip(q, -INT8_LEVELS, INT8_LEVELS).astype(np.int8), "scale": scales}


def int8_dequantize(arrays: dict[str, np.ndarray], blocks: Sequence[int]) -> np.ndarray:
    """The float64 values :func:`int8_quantize` encoded in ``blocks``."""
    return arrays["int8"].astype(np.float64) * np.repeat(arrays["scale"].astype(np.float64), blocks)


def encode_with_feedback(
    codec: Codec,
    delta: np.ndarray,
    segments: Sequence[int],
    residual: np.ndarray | None,
    rng: np.random.Generator,
) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Encode ``delta`` (plus the carried ``residual`` if the codec uses error feedback).

    Returns the encoded arrays and the residual to carry to the next round (``None`` for codecs
    without error feedback): what was meant minus what the server will decode.
    """
    if not codec.error_feedback:
        return codec.encode(delta, segments, rng), None
    meant = np.asarray(delta, dtype=np.float64).reshape(-1)
    if residual is not None:
        if residual.shape != meant.shape:
            raise ValueError(f"carried residual has shape {residual.shape}, the delta {meant.shape}")
        meant = meant + residual
    encoded = codec.encode(meant, segments, rng)
    return encoded, meant - codec.decode(encoded, meant.size, segments)
