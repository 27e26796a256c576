"""A run directory's lifecycle: check that it may take a run (or holds the same run, to resume),
clear it for ``--overwrite``, read back the config and progress of a run it holds. The file names
are :mod:`fedcsg.runs.layout`'s; the command line that asks for this is :mod:`fedcsg.cli.runs`."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from fedcsg.io import read_json_object, writable_dir
from fedcsg.runs.checkpoint import load_checkpoint, read_state
from fedcsg.runs.layout import (
    ARMS_DIR,
    REPORT_FILES,
    STATE_DIR,
    absent_settings,
    arm_record_path,
    differing_settings,
    holds_arms,
    run_files,
    seed_dir,
    seed_dirs_in,
    shown_differences,
)
from fedcsg.spec.arms import arm_of_stem
from fedcsg.spec.config import PLACEMENT_KEYS, RunConfig, fedcsg_version, with_added_settings
from fedcsg.spec.experiments import load_experiment
from fedcsg.wire.payload import PayloadLayout


def canonical(cfg: RunConfig) -> RunConfig:
    """A several-seed config with ``seed`` set to its first seed, so that it reads the same
    whichever seed's directory it is recovered from."""
    return cfg.replace(seed=cfg.seed_list[0]) if cfg.seeds else cfg


def default_out(config: str | Path) -> Path:
    """runs/<experiment name> in the current directory: the run directory of an experiment named
    by ``config`` (a shipped name or a TOML file) when none is given."""
    return Path("runs") / Path(str(config)).name.removesuffix(".toml")


def seed_runs(cfg: RunConfig, out_dir: Path) -> list[tuple[RunConfig, Path]]:
    """Each run of ``cfg`` with the directory it writes to: one run in ``out_dir`` itself, or with
    ``seeds`` one run per seed in ``out_dir/seed-N`` (``seed`` = N: partitions, initial models,
    client sampling and augmentation all follow it)."""
    if not cfg.seeds:
        return [(cfg, out_dir)]
    return [(cfg.replace(seed=seed), seed_dir(out_dir, seed)) for seed in cfg.seed_list]


def prepare_out_dir(out_dir: Path, cfg: RunConfig, arms: list[str], overwrite: bool, make: bool = True) -> None:
    """Refuse a directory that already holds results of these arms or of another config, unless
    ``overwrite`` (which deletes them, its seed directories' included); nothing is written before
    this check passes. With ``make``, the directory is then made (and must be writable)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"output path {str(out_dir)!r} exists and is not a directory")
    existing = run_files(out_dir) if out_dir.is_dir() else []
    if existing and not overwrite:
        clash = sorted({arm_of_stem(p.stem) for p in existing if arm_of_stem(p.stem) in arms})
        if clash:
            raise FileExistsError(
                f"output directory {str(out_dir)!r} already holds results of {', '.join(clash)}: "
                "pass --resume DIR to continue it, --overwrite to replace it, or choose another --out"
            )
        other = read_json_object(existing[0]).get("config", {})
        if differing_settings(cfg.identity(), other):
            raise FileExistsError(
                f"output directory {str(out_dir)!r} holds a run with another config "
                f"({shown_differences(cfg.identity(), other)} differ): pass --overwrite or choose another --out"
            )
    if overwrite:
        for path in existing:
            path.unlink()
        for directory in (out_dir, *seed_dirs_in(out_dir).values()):
            state = directory / STATE_DIR
            if state.is_dir():
                for path in [*state.glob("*.safetensors"), *state.glob(".*.tmp")]:
                    path.unlink()
            for name in REPORT_FILES:
                (directory / name).unlink(missing_ok=True)
    if make:
        writable_dir(out_dir)


def check_layout(out_dir: Path, cfg: RunConfig) -> None:
    """Refuse a directory that holds a one-seed run when several seeds are asked for, or the other
    way round."""
    held = seed_dirs_in(out_dir)
    if cfg.seeds and holds_arms(out_dir):
        raise FileExistsError(
            f"output directory {str(out_dir)!r} holds a one-seed run: pass --overwrite or choose another --out"
        )
    if not cfg.seeds and held:
        raise FileExistsError(
            f"output directory {str(out_dir)!r} holds a run over seeds {', '.join(map(str, held))}: "
            "pass --overwrite or choose another --out"
        )


def check_run_dirs(cfg: RunConfig, arms: list[str], out_dir: Path, overwrite: bool) -> None:
    """Refuse an output directory that holds results in the way (nothing is written): with
    ``overwrite`` only a non-directory in its place."""
    if overwrite:
        if out_dir.exists() and not out_dir.is_dir():
            raise FileExistsError(f"output path {str(out_dir)!r} exists and is not a directory")
        return
    check_layout(out_dir, cfg)
    for run_cfg, run_dir in seed_runs(cfg, out_dir):  # every seed's directory checked before any is made
        prepare_out_dir(run_dir, run_cfg, arms, overwrite=False, make=False)


def saved_config(out_dir: Path) -> RunConfig:
    """The config of the run in ``out_dir``, from its first checkpoint or arm record."""
    files = run_files(out_dir)
    if not files:
        raise ValueError(
            f"resume directory {str(out_dir)!r} holds no fedcsg run: accepted is the --out of an earlier "
            "fedcsg run or compare (with state/*.json or arms/*.json, or seed-N/ directories holding them)"
        )
    recorded = read_json_object(files[0]).get("config")
    if not isinstance(recorded, dict):
        raise ValueError(f"{str(files[0])!r} records no config: it is not a fedcsg record")
    older = absent_settings(RunConfig().identity(), recorded)
    if older:
        raise ValueError(
            f"{str(files[0])!r} was written by an older fedcsg (it lacks {', '.join(older[:5])}): accepted are "
            f"runs of fedcsg {fedcsg_version()}; rerun it with --overwrite"
        )
    try:
        return canonical(
            RunConfig.from_mapping({k: v for k, v in with_added_settings(recorded).items() if k != "resume"})
        )
    except ValueError as error:
        raise ValueError(f"{files[0]}: recorded config: {error}") from None


def resume_config(out_dir: Path, config: str | None = None, overrides: Mapping[str, Any] | None = None) -> RunConfig:
    """The saved config, or the one given by ``config`` (an experiment) and ``overrides`` (settings)
    when it has the same identity; its placement (:data:`~fedcsg.spec.config.PLACEMENT_KEYS`) from them
    or the defaults, for the machine it resumes on, never the resolved one of the machine it started on."""
    saved = saved_config(out_dir)
    defaults = RunConfig().to_flower()
    saved = RunConfig.from_mapping({key: defaults[key] for key in PLACEMENT_KEYS}, saved)
    cfg = saved
    if config or overrides:
        base = load_experiment(config) if config else saved
        cfg = canonical(RunConfig.from_mapping(overrides, base) if overrides else base)
        if (cfg.seeds or saved.seeds) and cfg.seed_list != saved.seed_list:  # one seed: the identity check says it
            raise ValueError(
                f"seeds {','.join(map(str, cfg.seed_list))} differ from the run in {str(out_dir)!r} "
                f"(seeds {','.join(map(str, saved.seed_list))}); accepted is the saved config"
            )
        differing = differing_settings(cfg.identity(), saved.identity())
        if differing:
            shown = ", ".join(f"{k} = {cfg.identity()[k]!r} (saved {saved.identity()[k]!r})" for k in differing[:4])
            raise ValueError(
                f"the config differs from the run in {str(out_dir)!r}: {shown}; accepted is the saved config "
                "(leave out --config and --set to use it)"
            )
    return cfg.replace(resume=True)


def arm_progress(
    out_dir: Path, cfg: RunConfig, arm: str, layout_of: Callable[[RunConfig], PayloadLayout]
) -> int | None:
    """The last complete round of ``arm`` in ``out_dir`` (verified), or None if it has not started.

    A checkpoint is loaded and checked in full (size, sha256, safetensors, shapes against the
    payload layout of the arm's model, ``layout_of(arm's config)``, config hash); an arm record
    without a checkpoint counts only when it is complete.
    """
    arm_cfg = cfg.replace(arm=arm)
    if read_state(out_dir, arm) is not None:
        checkpoint = load_checkpoint(out_dir, arm, layout_of(arm_cfg))
        assert checkpoint is not None
        checkpoint.check_written_under(arm_cfg.identity(), out_dir)
        return checkpoint.round
    record = arm_record_path(out_dir, arm)
    if not record.is_file():
        return None
    document = read_json_object(record)
    rounds = document.get("rounds", [])
    if len(rounds) == cfg.num_rounds + 1:
        return cfg.num_rounds
    recorded = document.get("config", {})
    if differing_settings(arm_cfg.identity(), recorded):
        raise ValueError(
            f"arm {arm!r} in {str(out_dir)!r} was recorded under another config "
            f"({shown_differences(arm_cfg.identity(), recorded)} differ) and has no checkpoint: accepted is --overwrite"
        )
    if len(rounds) <= 1:
        return None  # killed before round 0's checkpoint was committed: the arm starts again
    raise ValueError(
        f"arm {arm!r} in {str(out_dir)!r} has {max(len(rounds) - 1, 0)} of {cfg.num_rounds} rounds and no "
        "checkpoint to resume from: accepted is --overwrite"
    )


def remove_torn_writes(run_dir: Path) -> list[Path]:
    """Delete the temporary files that a kill in the middle of an atomic write left in ``run_dir``,
    its ``arms/`` and its ``state/`` (:func:`fedcsg.io.atomic_write_bytes`); returns them."""
    torn = [path for folder in ("", ARMS_DIR, STATE_DIR) for path in (run_dir / folder).glob(".*.tmp")]
    for path in torn:
        path.unlink(missing_ok=True)
    return torn


def arms_in(out_dir: Path) -> list[str]:
    """The arms that the run in ``out_dir`` holds records or checkpoints of, by name."""
    return sorted({arm_of_stem(p.stem) for p in run_files(out_dir)})
