"""Results files: strict JSON, reports over several seeds, shipped experiment files (no Ray here)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from fedcsg.cli import main
from fedcsg.io import strict_json
from fedcsg.runs.layout import absent_settings, differing_settings, shown_differences
from fedcsg.runs.records import ArmRecorder
from fedcsg.runs.report import write_report
from fedcsg.spec.config import ADDED_SETTINGS, RunConfig, identity_of
from fedcsg.spec.experiments import find_experiment, load_experiment, shipped_experiments

from .records import round_record
from .sources import lines_matching
from .strict import NonStrictJSON, loads_strict

# -- strict JSON ----------------------------------------------------------------------------------


def test_strict_json_writes_null_and_says_why() -> None:
    text = strict_json({"round": 0, "test_loss": float("nan"), "rows": [{"a": float("inf"), "b": 1.5}]})
    document = loads_strict(text)
    assert document == {
        "round": 0,
        "test_loss": None,
        "non_finite": {"test_loss": "nan"},
        "rows": [{"a": None, "b": 1.5, "non_finite": {"a": "inf"}}],
    }
    with pytest.raises(NonStrictJSON, match="NaN"):
        loads_strict(json.dumps({"x": float("nan")}))


def _write_arm(
    out: Path, arm: str, accuracies: list[float], seed: int = 0, loss0: float = 1.0, seeds: str = ""
) -> None:
    cfg = RunConfig(seed=seed, seeds=seeds, num_rounds=len(accuracies) - 1, target_accuracy=0.3)
    config = {**cfg.to_flower(), "arm": arm}
    recorder = ArmRecorder(out, arm, config)
    for rnd, accuracy in enumerate(accuracies):
        recorder.add(round_record(rnd, accuracy, loss=loss0 if rnd == 0 else 1.0), save=False)
    recorder.save()


def test_a_nan_loss_is_written_as_null_in_every_results_file(tmp_path: Path) -> None:
    _write_arm(tmp_path, "csg", [0.1, 0.2, 0.35], loss0=float("nan"))
    write_report(tmp_path)
    for name in ("arms/csg.json", "results.json"):
        document = loads_strict((tmp_path / name).read_text())
        rounds = document["rounds"] if "rounds" in document else document["arms"]["csg"]["rounds"]
        assert rounds[0]["test_loss"] is None and rounds[0]["non_finite"] == {"test_loss": "nan"}
        assert rounds[1]["test_loss"] == 1.0 and "non_finite" not in rounds[1]


# -- several seeds --------------------------------------------------------------------------------


def test_report_over_seeds_gives_mean_and_std(tmp_path: Path) -> None:
    finals = {"fedavg": [0.40, 0.50], "csg": [0.30, 0.36]}
    for seed in (0, 1):
        for arm, values in finals.items():
            _write_arm(tmp_path / f"seed-{seed}", arm, [0.1, 0.2, values[seed]], seed=seed)
    results = write_report(tmp_path)
    assert results["seeds"] == [0, 1]
    fedavg = results["summary"]["fedavg"]["final_accuracy"]
    assert fedavg["mean"] == pytest.approx(0.45) and fedavg["std"] == pytest.approx(math.sqrt(0.005))
    assert fedavg["values"] == [0.40, 0.50] and fedavg["n"] == 2
    csg = results["summary"]["csg"]
    assert csg["final_accuracy"]["mean"] == pytest.approx(0.33)
    assert csg["final_accuracy"]["std"] == pytest.approx(math.sqrt(((0.03**2) * 2) / 1))
    # Target 0.3 is reached in round 2 by both seeds of both arms: 2 rounds of 300 bytes.
    assert csg["wire_bytes_to_target"]["mean"] == 600 and csg["wire_bytes_to_target"]["std"] == 0.0
    written = loads_strict((tmp_path / "results.json").read_text())
    assert written["summary"] == json.loads(strict_json(results))["summary"]
    report = (tmp_path / "report.md").read_text()
    assert "2 seeds" in report and "| fedavg | full | full | 0.4500 ± 0.0707 |" in report
    assert "| csg | full | full | 0.3300 ± 0.0424 |" in report
    rows = (tmp_path / "results.csv").read_text().splitlines()
    assert rows[0].startswith("arm,seed,round") and len(rows) == 1 + 2 * 2 * 3
    for name in ("accuracy_vs_bytes.png", "accuracy_vs_round.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Each seed keeps its own full report.
    assert (tmp_path / "seed-1" / "report.md").is_file()


def test_a_run_over_one_seed_reports_as_one_over_seeds_and_a_one_seed_run_as_itself(tmp_path: Path) -> None:
    """The report files of a one-seed run and of a run over seeds come from one writer: `--seeds 0`
    still reports over its one seed (a seed column, mean ± std), a plain run its accuracy as it is."""
    for out in (tmp_path / "over-seeds" / "seed-0", tmp_path / "plain"):
        _write_arm(out, "fedavg", [0.1, 0.2, 0.4], seed=0)
    write_report(tmp_path / "over-seeds")
    write_report(tmp_path / "plain")
    over = (tmp_path / "over-seeds" / "report.md").read_text().splitlines()
    plain = (tmp_path / "plain" / "report.md").read_text().splitlines()
    assert "## Test accuracy per round (mean ± std over the seeds)" in over and "| 2 | 0.4000 ± 0.0000 |" in over
    assert "## Test accuracy per round" in plain and "| 2 | 0.4000 |" in plain
    assert (tmp_path / "over-seeds" / "results.csv").read_text().startswith("arm,seed,round,")
    assert (tmp_path / "plain" / "results.csv").read_text().startswith("arm,round,")


def test_seeds_setting_is_validated() -> None:
    assert RunConfig(seeds="0, 1,2").seed_list == [0, 1, 2]
    assert RunConfig(seed=7).seed_list == [7]
    for bad in ("0,0", "a,1", "-1", "1,,2"):
        with pytest.raises(ValueError, match=f"seeds = {bad!r} is not accepted"):
            RunConfig(seeds=bad)
    # `seeds` says how many runs to make, not what one run computes.
    assert RunConfig(seeds="0,1").identity() == RunConfig().identity()


def test_every_computing_setting_enters_the_identity() -> None:
    """A run's identity holds every setting that decides what it computes, whatever its value; a
    config record's identity is that of the config that wrote it (out-dir, arms and seeds aside)."""
    identity = RunConfig().identity()
    assert {"downlink", "topk-fraction", "fedpara-ratio", "csg-init", "seed"} <= set(identity)
    assert not {"out-dir", "arms", "resume", "seeds", "ray-address"} & set(identity)
    assert RunConfig(downlink="fp16").identity() == {**identity, "downlink": "fp16"}
    record = RunConfig(out_dir="elsewhere", arms="fedavg,csg").to_flower()
    assert identity_of(record) == identity


def test_bad_seeds_on_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(["compare", "--seeds", "0,x", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "seeds = '0,x' is not accepted" in err[0]
    assert not out.exists()


def test_resume_of_a_run_over_seeds(tmp_path: Path, data_env: Path, cli) -> None:
    """--resume DIR of a several-seed run: complete arms of every seed are skipped and DIR's report
    over the seeds is rebuilt; other seeds than the saved ones are refused, nothing written."""
    out = tmp_path / "run"
    for seed in (0, 1):
        for arm in ("fedavg", "csg", "csg-frozen"):
            _write_arm(out / f"seed-{seed}", arm, [0.1, 0.2, 0.3 + 0.01 * seed], seed=seed, seeds="0,1")
    code, stdout, err = cli("compare", "--resume", str(out))
    assert code == 0, err
    assert stdout.count("complete (2 rounds), skipped") == 6 and "(seed 1)" in stdout
    assert loads_strict((out / "results.json").read_text())["seeds"] == [0, 1]
    before = (out / "results.json").read_bytes()
    code, _, err = cli("compare", "--resume", str(out), "--seeds", "0,1,2")
    assert code == 2 and "seeds 0,1,2 differ from the run in" in err and len(err.strip().splitlines()) == 1
    # A one-seed run into a directory of several seeds is refused, not mixed in.
    code, _, err = cli("run", "--out", str(out), "--set", "num-rounds=2", "--set", "target-accuracy=0.3")
    assert code == 2 and "holds a run over seeds 0, 1" in err
    assert (out / "results.json").read_bytes() == before


# -- shipped experiment files ---------------------------------------------------------------------


def test_experiments_ship_with_the_package() -> None:
    shipped = shipped_experiments()
    assert {"quickstart", "cifar10-resnet20-dirichlet", "cifar10-resnet56-paper", "fmnist-cnn"} <= set(shipped)
    for name, path in shipped.items():
        assert path.parent.name == "configs" and path.parent.parent.name == "fedcsg"
        load_experiment(name)  # every shipped file is valid
    assert find_experiment("quickstart") == find_experiment("quickstart.toml") == shipped["quickstart"]
    # The checkout's configs/ is the package's folder, not a copy.
    repo_configs = Path(__file__).resolve().parents[1] / "configs"
    assert repo_configs.resolve() == shipped["quickstart"].parent.resolve()


def test_bare_name_is_found_from_any_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert load_experiment("fmnist-cnn").model == "fmnist-cnn"
    with pytest.raises(FileNotFoundError, match="config file 'nope' does not exist; accepted: .*quickstart"):
        find_experiment("nope")
    # A file of the same name in the current directory wins over the shipped one.
    (tmp_path / "quickstart.toml").write_text("num-rounds = 9\n")
    assert load_experiment("quickstart.toml").num_rounds == 9


def test_configs_command_lists_the_shipped_files(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["configs"]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = [line.split()[0] for line in lines if line.strip()]
    assert names == list(shipped_experiments())
    assert any(line.startswith("quickstart") and "Fashion-MNIST" in line for line in lines)


def test_report_says_how_the_run_was_made(tmp_path: Path) -> None:
    _write_arm(tmp_path / "new", "csg", [0.1, 0.2])
    write_report(tmp_path / "new")
    assert (
        "csg-init kaiming, server-optimizer fedavg, csg-aggregation factors"
        in (tmp_path / "new" / "report.md").read_text()
    )


def test_a_run_of_an_older_fedcsg_is_refused_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A record lacking a setting this fedcsg has was written by an older version: --resume names the
    missing setting and the accepted version, exits 2, and leaves the directory as it was."""
    _write_arm(tmp_path, "csg", [0.1, 0.2])
    record = tmp_path / "arms" / "csg.json"
    document = json.loads(record.read_text())
    del document["config"]["downlink"]
    record.write_text(json.dumps(document))
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert main(["run", "--resume", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "written by an older fedcsg (it lacks downlink)" in err[0]
    assert "accepted are runs of fedcsg 0.1.0" in err[0]
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_differences_between_configs_are_setting_names_with_the_absent_ones_apart() -> None:
    """The identity check names settings, not messages: a changed setting and one the record lacks are
    both differing, the lacking one is also absent, and only the message marks it."""
    identity = RunConfig(lr=0.05).identity()
    recorded = {**RunConfig(lr=0.1).to_flower()}
    del recorded["downlink"]
    assert differing_settings(identity, recorded) == ["downlink", "lr"]
    assert absent_settings(identity, recorded) == ["downlink"]
    assert shown_differences(identity, recorded) == "downlink (absent: an older fedcsg wrote it), lr"
    assert differing_settings(identity, RunConfig(lr=0.05).to_flower()) == []


def test_a_resumed_run_goes_on_under_the_installed_fedcsg(tmp_path: Path) -> None:
    """`fedcsg-version` (what nodes are checked against) is not what a run computes: a run recorded
    under another fedcsg, or before the setting existed, resumes under the fedcsg installed now."""
    from fedcsg.runs.directory import resume_config
    from fedcsg.spec.config import fedcsg_version

    for recorded in ("0.0.9", None):
        _write_arm(tmp_path, "csg", [0.1, 0.2])
        record = tmp_path / "arms" / "csg.json"
        document = json.loads(record.read_text())
        if recorded is None:
            del document["config"]["fedcsg-version"]
        else:
            document["config"]["fedcsg-version"] = recorded
        record.write_text(json.dumps(document))
        assert resume_config(tmp_path).fedcsg_version == fedcsg_version()


def test_a_run_of_a_fedcsg_that_only_lacked_added_settings_resumes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A record lacking only settings added since (ADDED_SETTINGS, whose recorded meaning is the old
    behaviour) is the same run: --resume continues it (here: nothing left to train, the report is
    rebuilt) instead of refusing it as an older fedcsg's."""
    _write_arm(tmp_path, "csg", [0.1, 0.2])
    record = tmp_path / "arms" / "csg.json"
    document = json.loads(record.read_text())
    for key in [*ADDED_SETTINGS, "compile", "channels-last"]:  # identity settings, and two that only say how
        del document["config"][key]
    record.write_text(json.dumps(document))
    assert main(["run", "--resume", str(tmp_path)]) == 0, capsys.readouterr().err
    assert (tmp_path / "report.md").is_file()


def test_the_run_directory_layout_is_spelled_in_one_module() -> None:
    """Outside fedcsg/runs/layout.py no module of fedcsg spells the run directory's folder names."""
    spelled = r"""["'](arms|state)["']\s*\)|/\s*["'](arms|state)["']|f?["']seed-"""
    assert lines_matching(spelled, except_in="layout.py") == []
