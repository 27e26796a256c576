"""fedcsg: federated learning with Convolutional Slice Generator (CSG) CNNs on Flower and Ray.

The folders are the design, lowest first (docs/architecture.md): ``io`` and ``processes`` (files and
processes, shared by every part), ``nn`` and ``data`` (networks and data sets, free of Flower),
``spec`` (what a run is), ``wire`` (what travels), ``runs`` (a run on disk), ``fl`` (a run in flight),
``deploy`` (real SuperNodes), ``cli`` and ``api`` (:func:`compare` and :func:`run` from Python). A module
imports only from its own folder or lower ones.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Results", "compare", "run"]


def __getattr__(name: str) -> Any:
    """``fedcsg.compare``, ``fedcsg.run`` and ``fedcsg.Results`` (:mod:`fedcsg.api`), imported when first
    used: ``import fedcsg`` alone starts neither torch nor Flower."""
    if name in __all__:
        from fedcsg import api

        return getattr(api, name)
    raise AttributeError(f"module 'fedcsg' has no attribute {name!r}")
