"""Models named by where their code lives rather than by registry name (:mod:`fedcsg.nn.models`):

``package.module:factory``
    The user's own code: ``factory(num_classes, in_channels)`` returns an ``nn.Module`` (a class whose
    constructor takes those two works). The module is imported from the current directory or any
    installed package, as ``python -m`` would. A simulation ships the code that is not installed
    (:func:`code_to_ship`) to every Ray worker, on this machine or a cluster, with Ray's
    ``runtime_env`` (:func:`fedcsg.fl.ray_cluster.init_ray`), so virtual clients import it too.
``torchvision:NAME``
    A torchvision classification model, untrained (``torchvision.models.get_model``), for RGB images.
``timm:NAME``
    A timm model, untrained, where timm is installed (``timm.create_model``).

Each is converted by the run's slice settings like a registry model. A factory that returns a bare
container (``nn.Sequential``, which calls every child in turn) gets it inside a :class:`Holder`, so
that the converters can add their modules beside it.
"""

from __future__ import annotations

import importlib
import os
import re
import site
import sys
import sysconfig
from collections.abc import Callable
from pathlib import Path

from torch import Tensor, nn

ACCEPTED = (
    "package.module:factory (factory(num_classes, in_channels) returns an nn.Module; the module importable from "
    "the current directory or an installed package), torchvision:NAME or timm:NAME"
)
_SPELLING = re.compile(r"^(?P<module>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*):(?P<name>[A-Za-z_][\w.\-]*)$")

Builder = Callable[[int, int], nn.Module]


def is_imported(name: str) -> bool:
    """Whether ``name`` names a model by import path (it holds a ``:``), not by registry name."""
    return ":" in str(name)


def imported_builder(name: str) -> Builder:
    """``(num_classes, in_channels) -> nn.Module`` for the model ``name`` spells (see the module
    docstring); a one-line ValueError naming ``name`` and what is wrong with it otherwise."""
    match = _SPELLING.match(name)
    if match is None:
        raise ValueError(f"model = {name!r} is not accepted: accepted are a registry model or {ACCEPTED}")
    module, attr = match["module"], match["name"]
    if module == "torchvision":
        return _torchvision(name, attr)
    if module == "timm":
        return _timm(name, attr)
    factory = getattr(_import(name, module), attr, None)
    if factory is None or not callable(factory):
        found = "nothing" if factory is None else f"an object of type {type(factory).__name__}, not a callable"
        raise ValueError(f"model = {name!r} is not accepted: module {module!r} holds {found} under {attr!r}")

    def build(num_classes: int, in_channels: int) -> nn.Module:
        try:
            model = factory(num_classes, in_channels)
        except Exception as error:  # the user's code: any failure is theirs to read, in one line
            raise ValueError(
                f"model = {name!r}: {attr}({num_classes}, {in_channels}) raised {type(error).__name__}: {error}"
            ) from None
        if not isinstance(model, nn.Module):
            raise ValueError(
                f"model = {name!r} is not accepted: {attr}({num_classes}, {in_channels}) returned an "
                f"object of type {type(model).__name__}, not a torch.nn.Module"
            )
        return Holder(model) if isinstance(model, nn.Sequential) else model

    return build


class Holder(nn.Module):
    """A user's ``nn.Sequential`` as the one child ``body`` of a module whose forward is the body's:
    CSG's generators (``csg_generators``) are then the body's neighbours, not a step of it."""

    def __init__(self, body: nn.Sequential) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


def code_to_ship(name: str) -> list[str]:
    """The local code a process on another machine needs in order to import the model ``name``: the
    directory of the top-level package of the module it names (each portion of a namespace package),
    or the file of a top-level module. Empty for a registry model, ``torchvision:``/``timm:``, fedcsg's
    own modules and a package installed in this Python (its site-packages or standard library): every
    node installs those. A module that does not import is a one-line ValueError (:func:`imported_builder`'s).
    """
    match = _SPELLING.match(str(name))
    if match is None or match["module"] in ("torchvision", "timm"):
        return []
    top = match["module"].partition(".")[0]
    if top == __name__.partition(".")[0]:
        return []
    _import(name, match["module"])
    package = sys.modules[top]
    paths = list(getattr(package, "__path__", None) or [getattr(package, "__file__", None) or ""])
    if not all(paths) or any(_installed(Path(path)) for path in paths):
        return []
    return [str(Path(path).resolve()) for path in paths]


def _installed(path: Path) -> bool:
    """Whether ``path`` lies in this Python's standard library or one of its site-packages."""
    homes = {sysconfig.get_paths()[key] for key in ("stdlib", "platstdlib", "purelib", "platlib")}
    homes |= {*site.getsitepackages(), site.getusersitepackages()}
    return any(path.resolve().is_relative_to(Path(home).resolve()) for home in homes)


def _import(name: str, module: str) -> object:
    """``module``, imported from ``sys.path`` or else from the current directory (where ``python -m``
    looks first). A Ray worker finds the shipped copy of the user's code first on its ``sys.path``
    (:func:`code_to_ship`), never a stale one in the directory its node was started from."""
    try:
        try:
            return importlib.import_module(module)
        except ModuleNotFoundError as error:
            if error.name != module.partition(".")[0] or os.getcwd() in sys.path:
                raise
            sys.path.insert(0, os.getcwd())
            return importlib.import_module(module)
    except Exception as error:  # an import error, or any exception the module raises while it runs
        raise ValueError(
            f"model = {name!r} is not accepted: module {module!r} does not import ({type(error).__name__}: {error}); "
            f"accepted is {ACCEPTED}"
        ) from None


def _torchvision(name: str, model: str) -> Builder:
    import torchvision

    known = torchvision.models.list_models(module=torchvision.models)
    if model not in known:
        raise ValueError(
            f"model = {name!r} is not accepted: torchvision has no classification model {model!r}; accepted are "
            f"torchvision:NAME with NAME one of {', '.join(sorted(known)[:8])}, ... ({len(known)} in all)"
        )

    def build(num_classes: int, in_channels: int) -> nn.Module:
        if in_channels != 3:
            raise ValueError(
                f"model = {name!r} is not accepted for images of {in_channels} channel(s): torchvision's models "
                "take 3 (RGB); accepted is an RGB data set or a model of your own (package.module:factory)"
            )
        return torchvision.models.get_model(model, weights=None, num_classes=num_classes)

    return build


def _timm(name: str, model: str) -> Builder:
    try:
        timm = importlib.import_module("timm")
    except ImportError:
        raise ValueError(
            f"model = {name!r} is not accepted: timm is not installed here (pip install timm); accepted are "
            "a registry model, package.module:factory or torchvision:NAME"
        ) from None
    if not timm.is_model(model):
        raise ValueError(f"model = {name!r} is not accepted: timm has no model {model!r} (see timm.list_models())")
    return lambda num_classes, in_channels: timm.create_model(
        model, pretrained=False, num_classes=num_classes, in_chans=in_channels
    )
