"""Shared pytest fixtures, and the suite's one setting of the environment: one torch thread a process.

The suite runs on two pytest-xdist workers (``addopts`` in pyproject.toml), and each Ray run it starts
has its own driver and client actors: with torch's default of a thread per core in every one of them,
their OpenMP threads fight for the same two cores (docs/performance.md, "Where the suite's time goes").
Set before torch is imported anywhere in the session; every process a test starts inherits it.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .strict import NonStrictJSON, loads_strict, results_files


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The data directory (``$FEDCSG_DATA_DIR``, else ``<repo>/../shared/data``); fails if absent.

    Missing data is a broken test environment, not a reason to skip: a skip would hide that the
    data tests never ran.
    """
    env = os.environ.get("FEDCSG_DATA_DIR")
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"
    if not (path / "cifar10" / "train.parquet").is_file() or not (path / "cifar10" / "test.parquet").is_file():
        source = "$FEDCSG_DATA_DIR" if env else "the repo-relative fallback ../shared/data"
        pytest.fail(
            f"no CIFAR-10 parquet files under {path}/cifar10 (from {source}); set FEDCSG_DATA_DIR", pytrace=False
        )
    return path


@pytest.fixture(scope="session", autouse=True)
def data_dir_for_every_test(data_dir: Path) -> Iterator[Path]:
    """``$FEDCSG_DATA_DIR`` for the whole session, this process and every one a test starts: the
    README's bare ``python3 -m pytest -q`` finds ../shared/data as CI's exported variable does."""
    before = os.environ.get("FEDCSG_DATA_DIR")
    os.environ["FEDCSG_DATA_DIR"] = str(data_dir)
    yield data_dir
    if before is None:
        os.environ.pop("FEDCSG_DATA_DIR", None)
    else:
        os.environ["FEDCSG_DATA_DIR"] = before


@pytest.fixture(scope="session", autouse=True)
def partition_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A partition cache of the session's own (``$FEDCSG_CACHE_DIR``), for this process and every
    process a test starts: the tests never read or fill the user's ``~/.cache/fedcsg``."""
    root = tmp_path_factory.mktemp("cache")
    before = os.environ.get("FEDCSG_CACHE_DIR")
    os.environ["FEDCSG_CACHE_DIR"] = str(root)
    yield root / "partitions"
    if before is None:
        os.environ.pop("FEDCSG_CACHE_DIR", None)
    else:
        os.environ["FEDCSG_CACHE_DIR"] = before


@pytest.fixture
def data_env(monkeypatch: pytest.MonkeyPatch, data_dir: Path) -> Path:
    """Point ``FEDCSG_DATA_DIR`` at the data directory for one test."""
    monkeypatch.setenv("FEDCSG_DATA_DIR", str(data_dir))
    return data_dir


@pytest.fixture(scope="session", autouse=True)
def results_files_are_strict_json(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """After the whole suite, every results file any test wrote (results.json, arms/*.json,
    state/*.json under pytest's temporary directories) must parse as strict JSON: no NaN or
    Infinity. Files that are not JSON at all are the damaged checkpoints some tests write on
    purpose; the checkpoint tests deal with those."""
    yield
    offenders = []
    for path in results_files(tmp_path_factory.getbasetemp()):
        try:
            loads_strict(path.read_text())
        except NonStrictJSON as error:
            offenders.append(f"{path}: {error}")
        except (ValueError, OSError):  # torn or damaged on purpose, or removed
            continue
    assert not offenders, "results files that are not strict JSON:\n" + "\n".join(offenders)


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str, str]]:
    """Run ``fedcsg ARGS`` in this process (``fedcsg.cli.main``; argparse's exits caught):
    returns (exit code, stdout, stderr). One interpreter for every bad-input case; the few tests
    that prove the console entry point itself run it in a subprocess."""
    from fedcsg.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        try:
            code = main(list(args))
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run
