"""fedcsg from Python (a notebook, a script): :func:`compare` and :func:`run` run exactly what
``fedcsg compare`` and ``fedcsg run`` run, and return the results instead of printing them.

>>> import fedcsg
>>> result = fedcsg.compare("quickstart", arms=["fedavg", "csg"], num_rounds=2)   # doctest: +SKIP
>>> result.summary["csg"].final_accuracy.mean, result.run_dir                     # doctest: +SKIP

Settings are the run settings of docs/configuration.md, as keyword arguments (``num_rounds=2``) or
in a mapping (``{"num-rounds": 2}``); ``model`` may be a registry name, an import path
(``"mypkg.nets:SmallNet"``) or the factory itself (a class or function defined in an importable
module: every Ray actor imports it by its module and name, so one defined in a notebook's own cells
is refused, with where to put it).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from fedcsg.cli.runs import run_arms
from fedcsg.runs.directory import canonical, default_out
from fedcsg.runs.summary import ArmSummary, seed_results, summarize
from fedcsg.spec.arms import check_arm
from fedcsg.spec.checks import kebab
from fedcsg.spec.config import RunConfig
from fedcsg.spec.experiments import DEFAULT_EXPERIMENT, load_experiment

Config = str | Path | Mapping[str, Any]
ModelFactory = Callable[[int, int], nn.Module]


@dataclass(frozen=True)
class Results:
    """What a run wrote: its directory and its ``results.json`` (the same records, read back)."""

    run_dir: Path
    results: dict[str, Any]

    @property
    def arms(self) -> dict[str, Any]:
        """A one-seed run's records of each arm (config, round records), by arm name (``results["arms"]``;
        a run over seeds has them per seed, ``results["per_seed"]``)."""
        return self.results["arms"]

    @property
    def summary(self) -> dict[str, ArmSummary]:
        """Each arm's figures over the run's seeds (one seed or several), by arm name: what the report's
        table shows (``summary["csg"].final_accuracy.mean``, ``.total_wire_bytes.values``)."""
        return summarize(self.results["config"], seed_results(self.results))


def compare(
    config: Config = DEFAULT_EXPERIMENT,
    *,
    arms: Sequence[str] | None = None,
    model: str | ModelFactory | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
    verbose: bool = False,
    **settings: Any,
) -> Results:
    """Run every arm of ``config`` (or ``arms``) on the same data, partitions and seeds, like
    ``fedcsg compare``.

    Parameters
    ----------
    config
        A shipped experiment's name (``fedcsg configs``), a TOML file, or a mapping of settings over
        the defaults.
    arms
        The arms to run (default: the config's ``arms``).
    model
        The model, overriding the config's: a name, an import path, or a factory
        ``(num_classes, in_channels) -> nn.Module`` defined in an importable module.
    out
        The run directory (default ``runs/<config name>``, ``runs/api`` for a mapping).
    overwrite, verbose
        As ``--overwrite`` and ``--verbose``.
    **settings
        Run settings over the config's, by their names in snake_case or kebab-case.

    Raises
    ------
    ValueError, FileExistsError, FileNotFoundError
        A bad setting, arm, model or directory, in one line, before anything is written.
    """
    cfg = _config(config, model, settings)
    names = [check_arm(arm) for arm in arms] if arms is not None else cfg.arm_list
    if not names:
        raise ValueError("no arms to compare: give arms=[...] or set arms in the config")
    cfg = cfg.replace(arms=",".join(names))
    return _run(cfg, names, _out(config, out), overwrite, verbose)


def run(
    config: Config = DEFAULT_EXPERIMENT,
    *,
    arm: str | None = None,
    model: str | ModelFactory | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
    verbose: bool = False,
    **settings: Any,
) -> Results:
    """Run one arm (default: the config's ``arm``), like ``fedcsg run``; see :func:`compare`."""
    cfg = _config(config, model, settings)
    name = check_arm(arm or cfg.arm)
    return _run(cfg.replace(arm=name), [name], _out(config, out), overwrite, verbose)


def _run(cfg: RunConfig, arms: list[str], out_dir: Path, overwrite: bool, verbose: bool) -> Results:
    run_arms(cfg, arms, out_dir, overwrite, verbose)
    return Results(out_dir, json.loads((out_dir / "results.json").read_text()))


def _config(config: Config, model: str | ModelFactory | None, settings: Mapping[str, Any]) -> RunConfig:
    """The run config of ``config`` with ``model`` and ``settings`` over it."""
    overrides = {kebab(key): value for key, value in settings.items()}
    if model is not None:
        overrides["model"] = model if isinstance(model, str) else import_path(model)
    if isinstance(config, Mapping):
        cfg = RunConfig.from_mapping({**{kebab(k): v for k, v in config.items()}, **overrides})
    else:
        cfg = RunConfig.from_mapping(overrides, load_experiment(config)) if overrides else load_experiment(config)
    return canonical(cfg)


def import_path(factory: ModelFactory) -> str:
    """``module:name`` of ``factory``, by which every party imports it; a one-line ValueError when it
    cannot be imported so (defined in ``__main__``, a notebook, or inside a function)."""
    module, name = getattr(factory, "__module__", None), getattr(factory, "__qualname__", "")
    if not callable(factory) or not module or module == "__main__" or not name.isidentifier():
        shown = getattr(factory, "__qualname__", repr(factory))
        raise ValueError(
            f"model factory {shown!r} is not accepted: the Ray actors import it by module and name, and it is "
            f"defined in {module or 'no module'!s}{'' if name.isidentifier() else ' inside a function'}; "
            "accepted is a class or function at the top of a .py file beside the notebook or in an installed package"
        )
    return f"{module}:{name}"


def _out(config: Config, out: str | Path | None) -> Path:
    if out is not None:
        return Path(out)
    return default_out("api" if isinstance(config, Mapping) else config)
