"""The run directory's layout, spelled here alone.

A run directory ``DIR`` holds, for a run of one seed::

    DIR/arms/<arm>.json                      round records of an arm (fedcsg.runs.records)
    DIR/state/<arm>.json                     the arm's last checkpoint (fedcsg.runs.checkpoint) ...
    DIR/state/<arm>-round-NNNN.safetensors   ... and the global payload it names
    DIR/model-<arm>.safetensors              the arm's final model file (fedcsg.runs.model_file)
    DIR/results.json, results.csv, report.md, accuracy_vs_bytes.png, accuracy_vs_round.png
    DIR/.fedcsg.lock                         held while a run writes into DIR (fedcsg.runs.lock)

and, for a run over several seeds, one such directory per seed, ``DIR/seed-N/``, with the report
over seeds in ``DIR`` itself. An arm's file stem is :func:`fedcsg.spec.arms.file_stem` (a ``/`` of
a two-way arm spelled ``~``). The identity check that decides whether a directory holds the same run
as a config (``--resume`` and a fresh ``--out`` alike) lives here too; what a run does with a
directory (check, clear, resume) is :mod:`fedcsg.runs.directory`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedcsg.spec.arms import file_stem

ARMS_DIR = "arms"
STATE_DIR = "state"
SEED_DIR_PREFIX = "seed-"
RESULTS_JSON = "results.json"
RESULTS_CSV = "results.csv"
REPORT_MD = "report.md"
PLOTS = ("accuracy_vs_bytes.png", "accuracy_vs_round.png")
REPORT_FILES = (RESULTS_JSON, RESULTS_CSV, REPORT_MD, *PLOTS)
LOCK_FILE = ".fedcsg.lock"  # held by the one run writing into the directory (fedcsg.runs.lock)


def arm_record_path(out_dir: Path, arm: str) -> Path:
    """``DIR/arms/<arm>.json``: the round records of ``arm``."""
    return Path(out_dir) / ARMS_DIR / f"{file_stem(arm)}.json"


def arm_record_files(out_dir: Path) -> list[Path]:
    """Every arm record of a one-seed run directory, by name."""
    return sorted((Path(out_dir) / ARMS_DIR).glob("*.json"))


def state_path(out_dir: Path, arm: str) -> Path:
    """``DIR/state/<arm>.json``: the last checkpoint of ``arm``."""
    return Path(out_dir) / STATE_DIR / f"{file_stem(arm)}.json"


def state_files(out_dir: Path) -> list[Path]:
    """Every checkpoint JSON of a one-seed run directory, by name."""
    return sorted((Path(out_dir) / STATE_DIR).glob("*.json"))


def weights_path(out_dir: Path, arm: str, server_round: int) -> Path:
    """``DIR/state/<arm>-round-NNNN.safetensors``: the global payload after ``server_round``."""
    return Path(out_dir) / STATE_DIR / f"{file_stem(arm)}-round-{server_round:04d}.safetensors"


def in_state_dir(out_dir: Path, name: str) -> Path:
    """The file ``name`` of ``DIR/state/`` (a bare name from a checkpoint JSON; checked by the caller)."""
    return Path(out_dir) / STATE_DIR / name


def model_file_path(out_dir: Path, arm: str) -> Path:
    """``DIR/model-<arm>.safetensors``: the final model of ``arm``."""
    return Path(out_dir) / f"model-{file_stem(arm)}.safetensors"


def seed_dir(out_dir: Path, seed: int) -> Path:
    """Where the run of one seed of a several-seed run lives."""
    return Path(out_dir) / f"{SEED_DIR_PREFIX}{seed}"


def seed_dirs_in(out_dir: Path) -> dict[int, Path]:
    """The seed directories ``DIR/seed-N`` that exist, by seed, in ascending order."""
    found = {}
    if Path(out_dir).is_dir():
        for path in Path(out_dir).glob(f"{SEED_DIR_PREFIX}*"):
            number = path.name.removeprefix(SEED_DIR_PREFIX)
            if path.is_dir() and number.isdigit():
                found[int(number)] = path
    return dict(sorted(found.items()))


def holds_arms(directory: Path) -> bool:
    """Whether ``directory`` holds arm records (``arms/*.json``) of a one-seed run."""
    return bool(arm_record_files(directory))


def run_files(out_dir: Path) -> list[Path]:
    """The files by which a directory holds a run: arm records and checkpoints, its seeds' too."""
    return [
        path
        for directory in (Path(out_dir), *seed_dirs_in(out_dir).values())
        for path in (*arm_record_files(directory), *state_files(directory))
    ]


def differing_settings(identity: Mapping[str, Any], recorded: Mapping[str, Any]) -> list[str]:
    """Settings (kebab-case, sorted) in which the identity of a recorded config differs from ``identity``,
    the arm aside, and a setting of one model (:data:`~fedcsg.spec.config.MODEL_SETTINGS`) aside unless
    both arms read it. A setting the record lacks is among them (:func:`absent_settings` names those)."""
    from fedcsg.spec.config import MODEL_SETTINGS, identity_of

    theirs = identity_of(recorded)
    shared = (set(identity) | set(theirs)) - {k for k in MODEL_SETTINGS if k not in identity or k not in theirs}
    return sorted(k for k in shared if k != "arm" and theirs.get(k) != identity.get(k))


def absent_settings(identity: Mapping[str, Any], recorded: Mapping[str, Any]) -> list[str]:
    """The :func:`differing_settings` that the recorded config lacks: an older fedcsg wrote it."""
    from fedcsg.spec.config import identity_of

    theirs = identity_of(recorded)
    return [k for k in differing_settings(identity, recorded) if k not in theirs]


def shown_differences(identity: Mapping[str, Any], recorded: Mapping[str, Any], limit: int = 5) -> str:
    """The first ``limit`` :func:`differing_settings` for a message, an absent one marked as such."""
    from fedcsg.spec.config import identity_of

    theirs = identity_of(recorded)
    return ", ".join(
        k if k in theirs else f"{k} (absent: an older fedcsg wrote it)"
        for k in differing_settings(identity, recorded)[:limit]
    )
