"""Experiment files: TOML files of flat kebab-case run settings, only those that differ from the
defaults. They ship with the package (fedcsg/configs/NAME.toml, reachable from a checkout as
configs/NAME.toml), so ``fedcsg run --config NAME`` finds them from any directory; ``flwr run .
--run-config configs/NAME.toml`` and ``fedcsg run --config path/to/file.toml`` read the same files."""

from __future__ import annotations

import tomllib
from importlib import resources
from pathlib import Path

from fedcsg.spec.config import RunConfig

DEFAULT_EXPERIMENT = "quickstart"


def shipped_experiments() -> dict[str, Path]:
    """The experiment files that ship with the package, by name (file name without ``.toml``)."""
    folder = resources.files("fedcsg") / "configs"
    return {
        entry.name.removesuffix(".toml"): Path(str(entry))
        for entry in sorted(folder.iterdir(), key=lambda e: e.name)
        if entry.name.endswith(".toml")
    }


def find_experiment(name_or_path: str | Path) -> Path:
    """The experiment file ``name_or_path`` names: an existing file, else a shipped experiment
    (``quickstart`` or ``quickstart.toml``).

    Raises
    ------
    FileNotFoundError
        If it is neither, naming the shipped experiments.
    """
    path = Path(name_or_path)
    if path.is_file():
        return path
    if path.exists():
        what = "a directory" if path.is_dir() else "not a regular file"
        raise FileNotFoundError(
            f"config file {str(name_or_path)!r} is {what}; accepted: a TOML file or a shipped experiment"
        )
    shipped = shipped_experiments()
    name = path.name.removesuffix(".toml")
    if path.parent == Path(".") and name in shipped:
        return shipped[name]
    raise FileNotFoundError(
        f"config file {str(name_or_path)!r} does not exist; accepted: a TOML file or a shipped experiment "
        f"({', '.join(shipped)})"
    )


def load_experiment(name_or_path: str | Path, base: RunConfig | None = None) -> RunConfig:
    """Read an experiment TOML file (flat kebab-case keys) over ``base`` (default: the defaults);
    ``name_or_path`` is a file or the name of a shipped experiment (see :func:`find_experiment`)."""
    path = find_experiment(name_or_path)
    try:
        values = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"config file {str(path)!r} is not valid TOML (UTF-8 text): {error}") from None
    nested = [k for k, v in values.items() if isinstance(v, dict)]
    if nested:
        raise ValueError(f"config file {str(path)!r} has table(s) {nested}: only flat kebab-case keys are accepted")
    try:
        return RunConfig.from_mapping(values, base)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
