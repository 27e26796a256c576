"""simulations/studies/frontier.py: the compares it plans (code dim as the run setting ``code-dim``, which
reaches the model), and the table, JSON and plot it makes from reported runs (no Ray here)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from fedcsg.runs.report import write_report
from fedcsg.spec.config import RunConfig
from fedcsg.spec.experiments import load_experiment
from simulations.studies import frontier

from .test_winner import write_arm


@pytest.mark.parametrize("code_dim", [72, 144, 288])
def test_code_dim_setting_sizes_the_csg_models_and_leaves_fedavg_alone(code_dim: int) -> None:
    cfg = RunConfig.from_mapping({"code-dim": code_dim}, load_experiment("cifar10-resnet20-peers"))
    # ResNet-20 at slice 12x12x3x3: a 1296 x code_dim generator and 273 codes of code_dim entries, beside
    # 2,458 ordinary parameters (stem 432, batch norms 1,376, classifier 650); csg-frozen trains the codes only.
    csg = cfg.model_settings("csg")
    assert csg.code_dim == code_dim
    assert sum(p.numel() for p in csg.build().parameters()) == 2_458 + code_dim * (1_296 + 273)
    frozen = cfg.model_settings("csg-frozen").build()
    assert sum(p.numel() for p in frozen.parameters() if p.requires_grad) == 2_458 + code_dim * 273
    assert sum(p.numel() for p in cfg.model_settings("fedavg").build().parameters()) == 269_722
    assert cfg.identity()["code-dim"] == code_dim  # a resumed compare keeps its code dim


def test_plan_runs_the_csg_arms_per_code_dim_and_the_reference_once(tmp_path: Path) -> None:

    runs = frontier.plan(tmp_path, [72, 144], seeds="0,1", sets=["num-rounds=2"], reference_arms=["fedavg"])
    prefix = [sys.executable, "-m", "fedcsg.cli", "compare", "--config", "cifar10-resnet20-peers"]
    assert runs == [
        (
            tmp_path / "code-dim-72",
            [*prefix, "--arms", "csg,csg-frozen", "--seeds", "0,1", "--out", str(tmp_path / "code-dim-72")]
            + ["--set", "num-rounds=2", "--set", "code-dim=72"],
        ),
        (
            tmp_path / "code-dim-144",
            [*prefix, "--arms", "csg,csg-frozen", "--seeds", "0,1", "--out", str(tmp_path / "code-dim-144")]
            + ["--set", "num-rounds=2", "--set", "code-dim=144"],
        ),
        (
            tmp_path / "reference",
            [*prefix, "--arms", "fedavg", "--seeds", "0,1", "--out", str(tmp_path / "reference")]
            + ["--set", "num-rounds=2"],
        ),
    ]
    # An existing directory is resumed; a reference run given is read, not run.
    (tmp_path / "code-dim-72").mkdir()
    again = frontier.plan(tmp_path, [72], reference=tmp_path / "elsewhere")
    assert again == [(tmp_path / "code-dim-72", [*prefix[:4], "--resume", str(tmp_path / "code-dim-72")])]


def test_report_only_tabulates_plots_and_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:

    mb = 1_000_000
    for seed, bump in ((0, 0.0), (1, 0.02)):
        for code_dim, acc, up in ((72, 0.30, mb), (144, 0.34, 2 * mb)):
            folder = tmp_path / f"code-dim-{code_dim}" / f"seed-{seed}"
            write_arm(folder, "csg", [0.1, 0.2, acc + bump], seed, up, up, code_dim=code_dim)
            write_arm(folder, "csg-frozen", [0.1, 0.2, acc - 0.05 + bump], seed, up // 4, up // 4, code_dim=code_dim)
        ref = tmp_path / "reference" / f"seed-{seed}"
        write_arm(ref, "fedavg", [0.1, 0.2, 0.40 + bump], seed, 10 * mb, 10 * mb)
        write_arm(ref, "csg", [0.1, 0.2, 0.5], seed, mb, mb)  # read from the code-dim run, not from here
        write_arm(ref, "csg+int8", [0.1, 0.2, 0.29 + bump], seed, mb // 4, mb)
    for folder in ("code-dim-72", "code-dim-144", "reference"):
        write_report(tmp_path / folder)
    assert frontier.main(["--out", str(tmp_path), "--code-dims", "72,144", "--seeds", "0,1", "--report-only"]) == 0
    document = json.loads((tmp_path / "frontier.json").read_text())
    got = {p["label"]: (round(p["final_accuracy"], 4), p["total_wire_bytes"], p["seeds"]) for p in document["points"]}
    # Two rounds of up + down: csg @72 sends 2 x 2 MB, @144 2 x 4 MB.
    assert got == {
        "csg @72": (0.31, 4 * mb, 2),
        "csg-frozen @72": (0.26, mb, 2),
        "csg @144": (0.35, 8 * mb, 2),
        "csg-frozen @144": (0.30, 2 * mb, 2),
        "fedavg": (0.41, 40 * mb, 2),
        "csg+int8 @72": (0.30, 2.5 * mb, 2),
    }
    assert (tmp_path / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = capsys.readouterr().out.splitlines()
    assert [line.strip().split("  ")[0] for line in lines[2:8]] == list(got)
    assert " ".join(lines[2 + list(got).index("csg @144")].split()) == "csg @144 0.3500 ± 0.0141 8.000 ± 0.000 2"


def test_a_reference_over_more_seeds_contributes_the_frontiers_seeds_only(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:

    mb = 1_000_000
    for seed in (0, 1):
        write_arm(tmp_path / "code-dim-72" / f"seed-{seed}", "csg", [0.1, 0.3], seed, mb, mb)
    write_report(tmp_path / "code-dim-72")
    headline = tmp_path / "headline"  # a three-seed run: seed 2's fedavg is far off and must not count
    for seed, acc in ((0, 0.40), (1, 0.42), (2, 0.90)):
        write_arm(headline / f"seed-{seed}", "fedavg", [0.1, acc], seed, 10 * mb, 10 * mb)
    write_report(headline)
    experiment = tmp_path / "experiment.toml"  # the settings write_arm records
    experiment.write_text("num-rounds = 1\ntarget-accuracy = 0.3\n")
    argv = ["--out", str(tmp_path), "--code-dims", "72", "--report-only", "--reference", str(headline)]
    argv += ["--config", str(experiment)]
    assert frontier.main([*argv, "--seeds", "0,1"]) == 0
    points = {p["label"]: p for p in json.loads((tmp_path / "frontier.json").read_text())["points"]}
    assert points["fedavg"]["seeds"] == 2
    assert points["fedavg"]["final_accuracy"] == pytest.approx(0.41)
    assert points["fedavg"]["final_accuracy_std"] == pytest.approx(0.02**0.5 / 10)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        frontier.main([*argv, "--seeds", "0,3"])
    assert exit_info.value.code == 2
    assert "lacks seeds 3: accepted is a run over seeds 0, 1, 2" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        frontier.main([*argv, "--seeds", "0,x"])
    assert exit_info.value.code == 2
    assert "--seeds: seeds = '0,x' is not accepted: at most 1000 comma-separated integers" in capsys.readouterr().err


def test_the_csg_arms_a_reference_holds_are_read_from_it_not_run_again(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:

    mb = 1_000_000
    headline = tmp_path / "headline"  # csg at code dim 72 beside fedavg, over three seeds
    for seed, acc in ((0, 0.30), (1, 0.32), (2, 0.90)):
        write_arm(headline / f"seed-{seed}", "csg", [0.1, acc], seed, mb, mb)
        write_arm(headline / f"seed-{seed}", "fedavg", [0.1, 0.4], seed, 10 * mb, 10 * mb)
    write_report(headline)
    results = json.loads((headline / "results.json").read_text())
    experiment = tmp_path / "experiment.toml"
    experiment.write_text("num-rounds = 1\ntarget-accuracy = 0.3\n")
    reused = frontier.reused_arms(results, str(experiment), [])
    assert reused == {72: ["csg"]}
    out = tmp_path / "frontier"
    runs = frontier.plan(out, [72, 144], config=str(experiment), seeds="0,1", reference=headline, reused=reused)
    assert [(run_dir.name, cmd[cmd.index("--arms") + 1]) for run_dir, cmd in runs] == [
        ("code-dim-72", "csg-frozen"),
        ("code-dim-144", "csg,csg-frozen"),
    ]
    for seed in (0, 1):  # what those two compares write
        write_arm(out / "code-dim-72" / f"seed-{seed}", "csg-frozen", [0.1, 0.25], seed, mb // 4, mb // 4)
        for arm in ("csg", "csg-frozen"):
            write_arm(out / "code-dim-144" / f"seed-{seed}", arm, [0.1, 0.35], seed, 2 * mb, 2 * mb, code_dim=144)
    write_report(out / "code-dim-72")
    write_report(out / "code-dim-144")
    argv = ["--out", str(out), "--code-dims", "72,144", "--seeds", "0,1", "--reference", str(headline)]
    assert frontier.main([*argv, "--config", str(experiment), "--report-only"]) == 0
    got = {
        p["label"]: (round(p["final_accuracy"], 4), p["seeds"], p["run_dir"])
        for p in json.loads((out / "frontier.json").read_text())["points"]
    }
    assert got == {  # seed 2's 0.90 does not count: the frontier's seeds are 0 and 1
        "csg @72": (0.31, 2, str(headline)),
        "csg-frozen @72": (0.25, 2, str(out / "code-dim-72")),
        "csg @144": (0.35, 2, str(out / "code-dim-144")),
        "csg-frozen @144": (0.35, 2, str(out / "code-dim-144")),
        "fedavg": (0.4, 2, str(headline)),
    }
    # A reference run under other settings would put its points on other axes: refused before any compare.
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        frontier.main([*argv, "--config", str(experiment), "--set", "num-rounds=5"])
    assert exit_info.value.code == 2
    assert "it was run under other settings: num-rounds = 1 (the frontier's 5)" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--reference-arms", "csg+zz"], "frontier.py: error: unknown arm 'csg+zz': accepted are MODEL"),
        (["--set", "bogus=1"], "frontier.py: error: unknown config key 'bogus'"),
        (["--set", "num-rounds=0"], "frontier.py: error: num-rounds = 0 is not accepted"),
        (["--config", "/no/such.toml"], "frontier.py: error: config file '/no/such.toml' does not exist"),
    ],
)
def test_bad_arms_and_settings_are_one_line_before_any_compare(
    argv: list[str], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:

    ran: list = []
    monkeypatch.setattr(frontier.subprocess, "run", lambda *a, **k: ran.append(a))
    with pytest.raises(SystemExit) as exit_info:
        frontier.main(["--out", str(tmp_path / "f"), "--code-dims", "72", "--seeds", "0", *argv])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and err.startswith(message), err
    assert ran == [] and not (tmp_path / "f").exists()


def test_a_set_that_differs_from_an_existing_out_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """An existing code-dim directory would be resumed under its saved config, dropping --set: refused."""
    from fedcsg.fl.server_app import recorded_config
    from fedcsg.runs.records import ArmRecorder
    from fedcsg.spec.experiments import load_experiment

    ran: list = []
    monkeypatch.setattr(frontier.subprocess, "run", lambda *a, **k: ran.append(a))
    cfg = load_experiment(frontier.CONFIG).replace(seeds="0", code_dim=72, num_rounds=2, arm="csg")
    run_dir = tmp_path / "code-dim-72" / "seed-0"
    ArmRecorder(run_dir, "csg", recorded_config(cfg.replace(out_dir=str(run_dir)))).save()
    argv = ["--out", str(tmp_path), "--code-dims", "72", "--seeds", "0", "--reference-arms", ""]
    with pytest.raises(SystemExit) as exit_info:
        frontier.main([*argv, "--set", "num-rounds=3"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and ran == []
    assert (
        f"frontier.py: error: {str(tmp_path / 'code-dim-72')!r} holds a run of other settings (num-rounds differ)"
        in err
    )
    with pytest.raises(SystemExit):
        frontier.main(argv)  # the experiment's own num-rounds differs from the saved 2 too
    with pytest.raises(SystemExit):
        frontier.main([*argv, "--seeds", "0,1", "--set", "num-rounds=2"])
    assert "(seeds differ)" in capsys.readouterr().err.splitlines()[-1]
    monkeypatch.setattr(frontier, "collect", lambda *a, **k: [])
    monkeypatch.setattr(frontier, "plot", lambda *a, **k: None)
    assert frontier.main([*argv, "--set", "num-rounds=2"]) == 0  # the saved settings: resumed
    assert ran[0][0][-2:] == ["--resume", str(tmp_path / "code-dim-72")]
