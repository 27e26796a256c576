"""Codecs for a client's uplink update: how ``delta = local payload - global payload`` travels.

A codec turns one flat floating-point delta (a payload's floating entries, concatenated) into a
few named numpy arrays and back. It sees the delta's *segments* (the lengths of the state-dict
entries it concatenates) so that per-tensor statistics stay per tensor whatever the packing.

``fp16``
    The delta as float16 (2 bytes an element). Error at most half a float16 ulp of each element
    (relative 2^-11) for values inside float16's range.
``int8``
    Per-segment scale ``max|delta| / 127`` (float32) and int8 values with stochastic rounding,
    ``q = floor(delta / scale + u)``, ``u ~ U[0, 1)``, so ``E[q * scale] = delta``: the server's
    average is unbiased. Error at most one step ``scale`` per element. 1 byte an element plus
    4 bytes a segment.
``topk``
    The ``k = ceil(fraction * n)`` entries of largest magnitude, as int32 (int64 past 2^31)
    indices and float32 values; the rest are zero. Biased alone, so it runs with error
    feedback: the part not sent (the residual) is added to the next round's delta on the same
    client (:func:`encode_with_feedback`).

Every encoded array's shape and dtype follow from the delta's size and segments alone
(:meth:`Codec.specs`), so the server checks a decoded reply as strictly as a plain one: a
wrong key, shape or dtype, or a non-finite value, is a rejected reply.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

CODECS = ("fp16", "int8", "topk")
INT8_LEVELS = 127

ArraySpecs = dict[str, tuple[tuple[int, ...], str]]


@dataclass(frozen=True)
class Codec:
    """One uplink codec.

    Parameters
    ----------
    name
        One of :data:`CODECS`.
    topk_fraction
        Fraction of the delta's entries that ``topk`` sends, in (0, 1].
    """

    name: str
    topk_fraction: float = 0.01

    def __post_init__(self) -> None:
        if self.name not in CODECS:
            raise ValueError(f"unknown codec {self.name!r}: accepted are {', '.join(CODECS)}")
        if not 0.0 < self.topk_fraction <= 1.0:
            raise ValueError(f"topk-fraction {self.topk_fraction!r} is outside (0, 1]")

    @property
    def error_feedback(self) -> bool:
        """Whether the client keeps the residual and adds it to its next delta."""
        return self.name == "topk"

    def k(self, size: int) -> int:
        return max(1, math.ceil(self.topk_fraction * size)) if size else 0

    def specs(self, size: int, segments: Sequence[int]) -> ArraySpecs:
        """``{suffix: (shape, dtype)}`` of the arrays :meth:`encode` returns for a delta of ``size``."""
        if self.name == "fp16":
            return {"fp16": ((size,), "float16")}
        if self.name == "int8":
            return {"int8": ((size,), "int8"), "scale": ((len(segments),), "float32")}
        index = "int32" if size < 2**31 else "int64"
        return {"index": ((self.k(size),), index), "value": ((self.k(size),), "float32")}

    def encode(self, delta: np.ndarray, segments: Sequence[int], rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Encode a flat float delta; ``segments`` are the lengths of the entries it concatenates."""
        delta = np.asarray(delta, dtype=np.float64).reshape(-1)
        if sum(segments) != delta.size:
            raise ValueError(f"segments sum to {sum(segments)}, the delta has {delta.size} elements")
        if self.name == "fp16":
            return {"fp16": delta.astype(np.float16)}
        if self.name == "int8":
            return int8_quantize(delta, segments, rng)
        k = self.k(delta.size)
        index = np.sort(np.argpartition(-np.abs(delta), k - 1)[:k]) if k else np.zeros(0, dtype=np.int64)
        dtype = self.specs(delta.size, segments)["index"][1]
        return {"index": index.astype(dtype), "value": delta[index].astype(np.float32)}

    def decode(self, arrays: dict[str, np.ndarray], size: int, segments: Sequence[int]) -> np.ndarray:
        """The float64 delta that ``arrays`` (from :meth:`encode`) stand for."""
        if self.name == "fp16":
            return arrays["fp16"].astype(np.float64)
        if self.name == "int8":
            return int8_dequantize(arrays, segments)
        index = arrays["index"]
        if index.size and (index.min() < 0 or index.max() >= size or np.any(np.diff(index) <= 0)):
            raise ValueError("topk indices are not strictly increasing positions inside the delta")
        out = np.zeros(size, dtype=np.float64)
        out[index] = arrays["value"]
        return out


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
