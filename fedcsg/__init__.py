"""fedcsg: federated learning with Convolutional Slice Generator (CSG) CNNs on Flower and Ray.

The package's folders are its design (README, "How the code is organised"). The flat modules of
earlier versions moved; importing one by its old name (a Flower component such as
``fedcsg.server_app:app`` in an older pyproject.toml, or ``python3 -m fedcsg.deploy_cli``) fails
with an error that names the new place, from the one table :data:`MOVED`.
"""

from __future__ import annotations

import importlib.abc
import sys

MOVED = {
    "fedcsg.checkpoint": "fedcsg.fl.checkpoint",
    "fedcsg.client_app": "fedcsg.fl.client_app",
    "fedcsg.commands": "fedcsg.cli.runs",
    "fedcsg.config": "fedcsg.fl.config",
    "fedcsg.csg": "fedcsg.nn.csg",
    "fedcsg.deploy_cli": "fedcsg.cli.deploy (run it as `fedcsg deploy` or `python3 -m fedcsg.cli deploy`)",
    "fedcsg.export": "fedcsg.deploy.export",
    "fedcsg.models": "fedcsg.nn.models",
    "fedcsg.params": "fedcsg.nn.params",
    "fedcsg.payload": "fedcsg.fl.payload",
    "fedcsg.relay": "simulations/relay.py (a benchmark helper, no longer part of the package)",
    "fedcsg.results": "fedcsg.fl.records (round records), fedcsg.fl.report (reports) and fedcsg.io (files)",
    "fedcsg.runtime": "fedcsg.nn.training",
    "fedcsg.server_app": "fedcsg.fl.server_app",
    "fedcsg.server_opt": "fedcsg.fl.server_opt",
    "fedcsg.simulation": "fedcsg.fl.simulation",
    "fedcsg.strategy": "fedcsg.fl.strategy",
    "fedcsg.task": "fedcsg.fl.task",
    "fedcsg.traffic": "fedcsg.fl.traffic",
    "fedcsg.training": "fedcsg.nn.training",
}


class _MovedModules(importlib.abc.MetaPathFinder):
    """Last on ``sys.meta_path``: asked only for names no other finder found."""

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> None:
        if fullname in MOVED:
            raise ModuleNotFoundError(f"{fullname} has moved: use {MOVED[fullname]}", name=fullname)
        return None


if not any(isinstance(finder, _MovedModules) for finder in sys.meta_path):
    sys.meta_path.append(_MovedModules())
