"""The checks of single run settings, each a one-line ValueError naming the key, the bad value and
what is accepted, and the kebab-case spelling of a setting's key (``code-dim`` for ``code_dim``)."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

SEED_LIMIT = 2**32  # seeds are in [0, 2**32): NumPy's legacy seeding (fedcsg.nn.training.set_seed) accepts no more
ACCEPTED_ADDRESSES = '"" (a private Ray), "auto" (the cluster on this machine) or HOST:PORT of a head node'


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
    raise ValueError(f"ray-address = {value!r} is not accepted: {ACCEPTED_ADDRESSES} is")


def one_of(key: str, value: str, accepted: tuple[str, ...]) -> None:
    """A one-line ValueError unless ``value`` is one of ``accepted``."""
    if value not in accepted:
        raise ValueError(f"{key} = {value!r} is not accepted: one of {', '.join(accepted)} is")


def coerce(key: str, value: Any, kind: type) -> Any:
    """``value`` (read from TOML) as the ``kind`` of its setting: an int is taken for a float, nothing
    else is converted; a one-line ValueError for a value of another type."""
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is bool and not isinstance(value, bool):
        raise ValueError(f"{key} = {value!r} is not accepted: true or false is")
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"{key} = {value!r} ({type(value).__name__}) is not accepted: a {kind.__name__} is")
    return value
