"""The checks of single run settings, each a one-line ValueError naming the key, the bad value and
what is accepted, and the kebab-case spelling of a setting's key (``code-dim`` for ``code_dim``)."""

from __future__ import annotations

import argparse
from dataclasses import fields
from typing import Any

SEED_LIMIT = 2**32  # seeds are in [0, 2**32): NumPy's legacy seeding (fedcsg.nn.training.set_seed) accepts no more
MAX_SEEDS = 1000  # seeds of one run: a run per seed and arm, far more than any study needs
SHOWN_CHARS = 80  # of a bad value in a message (shown)
ACCEPTED_ADDRESSES = '"" (a private Ray), "auto" (the cluster on this machine) or HOST:PORT of a head node'


def shown(value: Any) -> str:
    """``repr(value)`` for a message, cut to :data:`SHOWN_CHARS` characters (saying how long it was)."""
    text = repr(value)
    if len(text) <= SHOWN_CHARS:
        return text
    return f"{text[:SHOWN_CHARS]}... ({len(str(value)):,} characters)"


def parse_seeds(text: str) -> list[int]:
    """The seeds of ``seeds`` = ``text`` (comma-separated, ASCII digits, at most :data:`MAX_SEEDS`, no
    repeats), in linear time; a one-line ValueError otherwise."""
    accepted = f"at most {MAX_SEEDS} comma-separated integers in 0..{SEED_LIMIT - 1} without repeats, e.g. 0,1,2"
    parts = text.split(",", MAX_SEEDS)
    if len(parts) > MAX_SEEDS or not all(part.strip().isascii() and part.strip().isdigit() for part in parts):
        raise ValueError(f"seeds = {shown(text)} is not accepted: {accepted} are")
    values = [int(part) for part in parts]
    if any(v >= SEED_LIMIT for v in values) or len(set(values)) != len(values):
        raise ValueError(f"seeds = {shown(text)} is not accepted: {accepted} are")
    return values


def kebab(name: str) -> str:
    """The config key of field ``name``."""
    return name.replace("_", "-")


def names(cls: type) -> list[str]:
    """The field names of dataclass ``cls``."""
    return [f.name for f in fields(cls)]


def check_seed(value: int) -> int:
    """``value`` if it is an accepted ``seed``, else a one-line ValueError."""
    if not 0 <= value < SEED_LIMIT:
        raise ValueError(f"seed = {value!r} is not accepted: an integer in 0..{SEED_LIMIT - 1} is")
    return value


def check_ray_address(value: str) -> str:
    """``value`` if it is an accepted ``ray-address``, else a one-line ValueError."""
    if value in ("", "auto"):
        return value
    host, sep, port = value.rpartition(":")
    if sep and host and port.isdigit() and 0 < int(port) < 65536 and "/" not in value:
        return value
    raise ValueError(f"ray-address = {shown(value)} is not accepted: {ACCEPTED_ADDRESSES} is")


def one_of(key: str, value: str, accepted: tuple[str, ...]) -> None:
    """A one-line ValueError unless ``value`` is one of ``accepted``."""
    if value not in accepted:
        raise ValueError(f"{key} = {shown(value)} is not accepted: one of {', '.join(accepted)} is")


def fraction(key: str, value: float) -> float:
    """``value`` unless it is outside (0, 1]; else a one-line ValueError naming ``key``."""
    if not 0 < value <= 1:
        raise ValueError(f"{key} = {shown(value)} is not accepted: a number in (0, 1] is")
    return value


def coerce(key: str, value: Any, kind: type) -> Any:
    """``value`` (read from TOML) as the ``kind`` of its setting: an int is taken for a float, nothing
    else is converted; a one-line ValueError for a value of another type."""
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if key == "seeds" and isinstance(value, int) and not isinstance(value, bool):
        return str(value)  # `seeds = 3`, as `--seeds 3`
    if key == "seeds" and isinstance(value, list) and all(type(v) is int for v in value):
        return ",".join(map(str, value))  # `seeds = [0, 1, 2]`
    if kind is bool and not isinstance(value, bool):
        raise ValueError(f"{key} = {value!r} is not accepted: true or false is")
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"{key} = {shown(value)} ({type(value).__name__}) is not accepted: a {kind.__name__} is")
    return value


class OneLineParser(argparse.ArgumentParser):
    """Argument errors on one line (no usage dump), exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")
