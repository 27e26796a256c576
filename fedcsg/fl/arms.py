"""The arms of a comparison, defined once: ``MODEL[+CODEC]``.

The model part says how the network is parameterised and what its payload is
(:mod:`fedcsg.fl.payload`); the codec part, if any, says how a client's update travels up
(:mod:`fedcsg.fl.codecs`, :mod:`fedcsg.fl.uplink`).

Models
------
``fedavg``
    The plain model; the payload is its whole ``state_dict``.
``fedpara``
    Every conv but the stem as FedPara's low-rank Hadamard product (:mod:`fedcsg.nn.fedpara`),
    rank from ``fedpara-ratio``; the payload is its ``state_dict`` (the factors, never a weight).
``csg``
    The CSG model: the generator once, the codes and the ordinary layers.
``csg-frozen``
    The CSG model with the seeded random binary generator, which is never sent.

Codecs (uplink only): ``fp16``, ``int8`` (stochastic rounding) and ``topk`` (with error feedback).
``csg+int8`` is the CSG model whose clients send an int8-coded update.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedcsg.fl.codecs import CODECS

MODELS = ("fedavg", "fedpara", "csg", "csg-frozen")
SEPARATOR = "+"


@dataclass(frozen=True)
class Arm:
    """One arm: a model part (one of :data:`MODELS`) and an optional uplink codec (one of :data:`CODECS`)."""

    model: str
    codec: str = ""

    @property
    def name(self) -> str:
        return f"{self.model}{SEPARATOR}{self.codec}" if self.codec else self.model

    @classmethod
    def parse(cls, name: str) -> Arm:
        """The arm ``name`` spells.

        Raises
        ------
        ValueError
            One line naming the bad arm and what is accepted.
        """
        model, _, codec = str(name).strip().partition(SEPARATOR)
        if model not in MODELS or (SEPARATOR in str(name) and codec not in CODECS):
            raise ValueError(
                f"unknown arm {name!r}: accepted are MODEL or MODEL+CODEC with MODEL one of "
                f"{', '.join(MODELS)} and CODEC one of {', '.join(CODECS)} (e.g. csg+int8)"
            )
        return cls(model, codec)

    @property
    def sort_key(self) -> tuple[int, int]:
        return MODELS.index(self.model), (CODECS.index(self.codec) + 1) if self.codec else 0


def check_arm(name: str) -> str:
    """``name`` if it is an arm (see :meth:`Arm.parse`), else ValueError."""
    return Arm.parse(name).name


def model_part(name: str) -> str:
    """The model part of an arm name: ``csg`` for ``csg+int8``."""
    return Arm.parse(name).model


def all_arms() -> list[str]:
    """Every arm: each model alone, then with each codec."""
    return [Arm(m, c).name for m in MODELS for c in ("", *CODECS)]


def arm_order(names: list[str]) -> list[str]:
    """``names`` in the report's order (models as in :data:`MODELS`, each without codec first);
    names that are not arms (an older run's) come last, sorted."""
    known = sorted((n for n in names if _is_arm(n)), key=lambda n: Arm.parse(n).sort_key)
    return known + sorted(n for n in names if not _is_arm(n))


def _is_arm(name: str) -> bool:
    try:
        Arm.parse(name)
    except ValueError:
        return False
    return True
