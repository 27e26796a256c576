"""The arms of a comparison, defined once: ``MODEL[+UPCODEC][/DOWNLINK]``.

The model part says how the network is parameterised and what its payload is
(:mod:`fedcsg.wire.payload`); the codec part, if any, says how a client's update travels up
(:mod:`fedcsg.spec.codecs`, :mod:`fedcsg.wire.uplink`); the downlink part, if any, says how the global
model travels down (:mod:`fedcsg.wire.downlink`). An arm that names no downlink uses the run-wide
``downlink`` setting (default ``full``).

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
``csg-warm``
    The CSG model whose generator trains and travels for the first ``freeze-generator-after`` = K
    rounds and is then frozen: from round K+1 only the codes and the ordinary layers travel, both
    ways, and each node is handed the frozen generator once (:mod:`fedcsg.wire.handoff`).

Uplink codecs: the names in :data:`fedcsg.spec.codecs.CODECS`, each described by its class there.
Downlinks: ``full``, ``fp16``, ``int8`` (blockwise, stateless), ``delta-int8`` and ``delta-topk``
(compressed change of the model the clients hold, with error feedback on the server).

``csg+int8`` is the CSG model whose clients send an int8-coded update (and receive the run-wide
downlink); ``csg+int8/int8`` the same arm with a blockwise int8 downlink; ``fedavg/delta-int8`` the
plain model with a full uplink and a delta downlink.

Arm names are also file names (``arms/<arm>.json``, ``state/<arm>.json``): :func:`file_stem` spells
the ``/`` as ``~`` there (``csg+int8~int8.json``) and :func:`arm_of_stem` reads it back.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedcsg.spec.checks import shown
from fedcsg.spec.codecs import CODECS

MODELS = ("fedavg", "fedpara", "csg", "csg-frozen", "csg-warm")
PHASED = ("csg-warm",)  # models whose payload changes during a run (not one row of bytes per round)
# The downlinks an arm may name (fedcsg.wire.downlink holds their code and imports this tuple).
DOWNLINKS = ("full", "fp16", "int8", "delta-int8", "delta-topk")
SEPARATOR = "+"
DOWN_SEPARATOR = "/"
STEM_DOWN_SEPARATOR = "~"  # how a file name spells DOWN_SEPARATOR


@dataclass(frozen=True)
class Arm:
    """One arm: a model part (one of :data:`MODELS`), an optional uplink codec (a name in
    :data:`~fedcsg.spec.codecs.CODECS`) and an optional downlink (one of :data:`DOWNLINKS`; "" = the run's default)."""

    model: str
    codec: str = ""
    downlink: str = ""

    @property
    def name(self) -> str:
        name = f"{self.model}{SEPARATOR}{self.codec}" if self.codec else self.model
        return f"{name}{DOWN_SEPARATOR}{self.downlink}" if self.downlink else name

    @classmethod
    def parse(cls, name: str) -> Arm:
        """The arm ``name`` spells.

        Raises
        ------
        ValueError
            One line naming the bad arm and what is accepted.
        """
        text = str(name).strip()
        head, down_sep, downlink = text.partition(DOWN_SEPARATOR)
        model, up_sep, codec = head.partition(SEPARATOR)
        if model not in MODELS or (up_sep and codec not in CODECS) or (down_sep and downlink not in DOWNLINKS):
            raise ValueError(
                f"unknown arm {shown(name)}: accepted are MODEL[+UPCODEC][/DOWNLINK] with MODEL one of "
                f"{', '.join(MODELS)}, UPCODEC one of {', '.join(CODECS)} and DOWNLINK one of "
                f"{', '.join(DOWNLINKS)} (e.g. csg+int8/int8, fedavg/delta-int8)"
            )
        return cls(model, codec, downlink)

    def downlink_or(self, default: str) -> str:
        """The downlink this arm uses when the run-wide setting is ``default``."""
        return self.downlink or default

    @property
    def sort_key(self) -> tuple[int, int, int]:
        return (
            MODELS.index(self.model),
            (list(CODECS).index(self.codec) + 1) if self.codec else 0,
            (DOWNLINKS.index(self.downlink) + 1) if self.downlink else 0,
        )


def check_arm(name: str) -> str:
    """``name`` if it is an arm (see :meth:`Arm.parse`), else ValueError."""
    return Arm.parse(name).name


def model_part(name: str) -> str:
    """The model part of an arm name: ``csg`` for ``csg+int8``."""
    return Arm.parse(name).model


def all_arms() -> list[str]:
    """Every one-way arm whose payload is the same every round: each such model alone, then with each
    uplink codec (downlink: the run's)."""
    return [Arm(m, c).name for m in MODELS if m not in PHASED for c in ("", *CODECS)]


TWO_WAY = (("int8", "int8"), ("int8", "delta-int8"), ("topk", "delta-topk"))  # what `fedcsg bytes` lists


def two_way_arms() -> list[str]:
    """The arms compressed both ways that ``fedcsg bytes`` lists: each model of :func:`all_arms` with
    :data:`TWO_WAY`."""
    return [Arm(m, up, down).name for m in MODELS if m not in PHASED for up, down in TWO_WAY]


def file_stem(name: str) -> str:
    """The file-name form of an arm (``csg+int8/int8`` -> ``csg+int8~int8``)."""
    return str(name).replace(DOWN_SEPARATOR, STEM_DOWN_SEPARATOR)


def arm_of_stem(stem: str) -> str:
    """The arm a file name's stem spells (inverse of :func:`file_stem`)."""
    return str(stem).replace(STEM_DOWN_SEPARATOR, DOWN_SEPARATOR)


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
