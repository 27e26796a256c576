"""End to end: `fedcsg compare` through Flower's simulation engine on Ray, on real CIFAR-10."""

from __future__ import annotations

import contextlib
import csv
import functools
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from subprocess import PIPE, Popen

import pytest

from fedcsg.runs.layout import arm_record_path
from fedcsg.runs.records import comparable
from fedcsg.spec.config import identity_of

from .processes import kill_session
from .test_folders import EXAMPLE, write_shapes
from .test_tracking import tensorboard_scalars

ROOT = Path(__file__).resolve().parents[1]

# The quick-start file as it ships (Fashion-MNIST's small CNN), 2 clients, 2 rounds, 2,000 images.
SMALL_RUN = ["num-clients=2", "num-rounds=2", "train-limit=2000", "test-limit=500", "batch-size=32"]
# The runs that check bytes take ResNet-20 on CIFAR-10 instead: the counts they assert are its.
RESNET20 = ["model='resnet20'", "dataset='cifar10'", "slice='12x12x3x3'", "code-dim=72", "target-accuracy=0.15"]
# The same two-round, two-client compare at a size where only exactness is asserted (identical
# records on a rerun, mean and std over seeds), not learning: 256 images, one local epoch.
TINY_RUN = [*RESNET20, "num-clients=2", "num-rounds=2", "train-limit=256", "test-limit=128", "batch-size=32"]
TINY_RUN += ["freeze-generator-after=1"]  # csg-warm: round 1 like csg, round 2 with its generator handed off
PEER_ARMS = ("fedavg+int8", "fedpara", "csg+topk", "csg+int8/delta-int8", "csg-warm")
# Made twice (``tiny`` and seed 0 of ``seeds``) and compared digit for digit; csg-frozen's rebuild from
# the seed is checked bit for bit in test_csg.py, and it runs (and learns) in ``compare``.
RERUN_ARMS = ("fedavg", "csg")
TINY_ARMS = (*RERUN_ARMS, *PEER_ARMS)
# A CNN of the user's own (tests/user_cnn.py, outside fedcsg), named by import path, on a folder of the user's own
# images (the example's ImageFolder, which compare_runs writes: 3 classes, PNG and JPEG of 24 to 64 pixels a side)
# at 16x16, every image of it.
OWN_MODEL = "tests.user_cnn:SmallCNN"
OWN_RUN = [
    f"model='{OWN_MODEL}'",
    "dataset='imagefolder'",
    "image-size=16",
    "slice='8x8x3x3'",
    "code-dim=32",
    "num-clients=2",
    "num-rounds=2",
]
OWN_RUN += ["train-limit=0", "test-limit=0", "batch-size=32", "tracker='tensorboard'"]
OWN_ARMS = ("fedavg", "csg", "csg-frozen")
IMAGES_PER_CLASS = (16, 8)  # train, test


def _fedcsg(*args: str, data_dir: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FEDCSG_DATA_DIR": str(data_dir)}
    return subprocess.run(
        [sys.executable, "-m", "fedcsg.cli", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=900
    )


@pytest.fixture(scope="module")
def compare_runs(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[Path, Popen]]]:
    """The module's end-to-end runs, started at once (each leaves cores idle while it imports,
    starts Ray or evaluates on one thread; together they fill them):

    * ``compare``: `fedcsg compare` of the quick-start file named by its path, with SMALL_RUN: every
      arm learns;
    * ``tiny``: the same command with TINY_RUN, the arms RERUN_ARMS followed by the peer arms
      PEER_ARMS (a codec on fedavg, FedPara, topk with error feedback on csg, csg compressed both
      ways with a delta downlink whose x̂ lives in the virtual nodes' Context.state, and csg-warm,
      whose generator freezes after round 1 and is handed to each node once);
    * ``seeds``: `fedcsg compare --seeds 0,1 --arms` RERUN_ARMS with the shipped default
      experiment, from a directory outside the checkout, with TINY_RUN: its seed 0 is ``tiny``'s
      first arms made a second time;
    * ``own``: OWN_ARMS of a CNN defined in a test module (OWN_MODEL), which the Ray actors import,
      on an ImageFolder of the user's images, from a directory outside the checkout: the module is on
      the driver's sys.path through PYTHONPATH alone (Ray puts the driver's current directory first on
      every worker's sys.path), so an actor imports the copy fedcsg ships, as a cluster's node would;
    * ``api``: the same run through the Python API, ``fedcsg.compare(...)`` with the factory itself,
      from the same directory;
    * ``example``: examples/own-model/compare.py on the same images at a tiny size, from its folder.
    """
    root = tmp_path_factory.mktemp("compare")
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    outside = tmp_path_factory.mktemp("outside")
    quickstart = str(ROOT / "configs" / "quickstart.toml")
    images = write_shapes(tmp_path_factory.mktemp("images"), *IMAGES_PER_CLASS)
    own = [*OWN_RUN, f"data-dir='{images}'"]
    env = {**os.environ, "FEDCSG_DATA_DIR": str(data_dir)}
    on_path = {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))}
    launches = {
        "compare": (["--config", quickstart, "--out", str(root / "run"), *_sets(SMALL_RUN)], ROOT),
        "tiny": (
            ["--config", quickstart, "--out", str(root / "tiny"), "--arms", ",".join(TINY_ARMS), *_sets(TINY_RUN)],
            ROOT,
        ),
        "seeds": (["--seeds", "0,1", "--arms", ",".join(RERUN_ARMS), *_sets(TINY_RUN)], elsewhere),
        "own": (
            ["--config", quickstart, "--out", str(root / "own"), "--arms", ",".join(OWN_ARMS), *_sets(own)],
            outside,
        ),
    }
    outs = {
        "compare": root / "run",
        "tiny": root / "tiny",
        "seeds": elsewhere / "runs" / "quickstart",
        "own": root / "own",
        "api": root / "api",
        "example": root / "example",
    }
    commands = {
        name: ([sys.executable, "-m", "fedcsg.cli", "compare", *args], cwd) for name, (args, cwd) in launches.items()
    }
    settings = dict(pair.split("=", 1) for pair in own if not pair.startswith("model="))
    api = (
        "import fedcsg, tomllib\n"
        "from tests.user_cnn import SmallCNN\n"
        f"settings = tomllib.loads({chr(10).join(f'{k} = {v}' for k, v in settings.items())!r})\n"
        f"result = fedcsg.compare({quickstart!r}, arms={list(OWN_ARMS)!r}, model=SmallCNN, out={str(root / 'api')!r}, "
        "**settings)\n"
        "print(sorted(result.arms))\n"
        "print([s.final_accuracy.values for s in result.summary.values()])\n"
    )
    commands["api"] = ([sys.executable, "-c", api], outside)
    example = ["--images", str(images), "--out", str(outs["example"]), "--num-rounds", "1", "--image-size", "16"]
    commands["example"] = ([sys.executable, "compare.py", *example], EXAMPLE)
    procs = {
        name: Popen(command, stdout=PIPE, stderr=PIPE, text=True, env=on_path if cwd == outside else env, cwd=cwd)
        for name, (command, cwd) in commands.items()
    }
    yield {name: (outs[name], proc) for name, proc in procs.items()}
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def _sets(pairs: list[str]) -> list[str]:
    return [item for pair in pairs for item in ("--set", pair)]


@functools.cache
def _finished(out: Path, proc: Popen) -> tuple[Path, subprocess.CompletedProcess]:
    """Wait for a run of ``compare_runs`` (once: later calls get the same result)."""
    stdout, stderr = proc.communicate(timeout=900)
    return out, subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def compare_run(compare_runs: dict[str, tuple[Path, Popen]]) -> tuple[Path, subprocess.CompletedProcess]:
    return _finished(*compare_runs["compare"])


@pytest.fixture(scope="module")
def tiny_run(compare_runs: dict[str, tuple[Path, Popen]]) -> tuple[Path, subprocess.CompletedProcess]:
    return _finished(*compare_runs["tiny"])


@pytest.fixture(scope="module")
def seeds_run(compare_runs: dict[str, tuple[Path, Popen]]) -> tuple[Path, subprocess.CompletedProcess]:
    return _finished(*compare_runs["seeds"])


@pytest.fixture(scope="module")
def api_run(compare_runs: dict[str, tuple[Path, Popen]]) -> tuple[Path, subprocess.CompletedProcess]:
    return _finished(*compare_runs["api"])


@pytest.fixture(scope="module")
def example_run(compare_runs: dict[str, tuple[Path, Popen]]) -> tuple[Path, subprocess.CompletedProcess]:
    return _finished(*compare_runs["example"])


@pytest.fixture(scope="module")
def own_run(compare_runs: dict[str, tuple[Path, Popen]]) -> tuple[Path, subprocess.CompletedProcess]:
    return _finished(*compare_runs["own"])


def test_compare_runs_all_arms_through_ray(compare_run: tuple[Path, subprocess.CompletedProcess]) -> None:
    out, proc = compare_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert list(results["arms"]) == ["fedavg", "csg", "csg-frozen"]
    assert results["seed"] == 0 and results["versions"]["flwr"].startswith("1.41")
    for arm, data in results["arms"].items():
        rounds = data["rounds"]
        assert [r["round"] for r in rounds] == [0, 1, 2]
        final = rounds[-1]
        assert final["test_accuracy"] > 0.25, (arm, final)  # chance is 0.10
        assert final["sampled"] == final["replied"] == 2 and final["partitions"] == [0, 1]
        assert final["cum_wire_up"] == sum(r["wire_up"] for r in rounds)
        # Same payload to each client; bytes are sums over clients, never weighted averages.
        assert final["payload_down"] == 2 * data["payload_bytes"] == final["payload_up"]
        assert final["payload_up"] < final["wire_up"] < final["payload_up"] + 2 * 4096  # framing: < 4 kB a message
    # `fedcsg bytes` builds the same messages offline; only the ids a message gets when it is sent
    # (group id, reply-to id, task ids) are missing there: less than 100 bytes per message.
    from fedcsg.fl.traffic import arm_traffic
    from fedcsg.spec.config import RunConfig

    cfg = RunConfig.from_mapping({k: v for k, v in results["config"].items() if k in RunConfig().to_flower()})
    for arm, data in results["arms"].items():
        offline = arm_traffic(cfg.replace(arm=arm), 2)
        for direction in ("wire_down", "wire_up"):
            assert 0 <= data["rounds"][1][direction] - offline[direction] < 2 * 100
    up = {arm: data["rounds"][-1]["wire_up"] for arm, data in results["arms"].items()}
    assert up["csg"] < 0.5 * up["fedavg"]
    assert up["csg-frozen"] < up["csg"]
    # Same partitions and seed for every arm: identical round-0 accuracy would not prove it,
    # but identical per-round client counts and partition ids do.
    assert len({json.dumps([r["partitions"] for r in d["rounds"]]) for d in results["arms"].values()}) == 1


def test_a_rerun_on_this_machine_gives_identical_records_for_every_arm(
    tiny_run: tuple[Path, subprocess.CompletedProcess], seeds_run: tuple[Path, subprocess.CompletedProcess]
) -> None:
    """The two-round, two-client compare of ``tiny_run`` made a second time (as seed 0 of the
    seeds run, in another process and directory, at the same time, without the peer arms): every
    arm's round records are identical, to the last digit, apart from the seconds they took and the
    Ray node's id."""
    first, proc = tiny_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    second, proc = seeds_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    for arm in RERUN_ARMS:
        a = json.loads((first / "arms" / f"{arm}.json").read_text())
        b = json.loads((second / "seed-0" / "arms" / f"{arm}.json").read_text())
        assert len(a["rounds"]) == 3
        assert comparable(a["rounds"]) == comparable(b["rounds"]), arm
        assert identity_of(a["config"]) == identity_of(b["config"])
        assert (a["config"]["arms"], b["config"]["arms"]) == (",".join(TINY_ARMS), ",".join(RERUN_ARMS))


def test_compare_over_seeds_reports_mean_and_std(seeds_run: tuple[Path, subprocess.CompletedProcess]) -> None:
    out, proc = seeds_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "seed 1" in proc.stdout and "2 seeds" in proc.stdout  # progress, then the report's head
    results = json.loads((out / "results.json").read_text())
    assert results["seeds"] == [0, 1] and list(results["summary"]) == list(RERUN_ARMS)
    for arm, figures in results["summary"].items():
        finals = [
            json.loads((out / f"seed-{seed}" / "arms" / f"{arm}.json").read_text())["rounds"][-1]["test_accuracy"]
            for seed in (0, 1)
        ]
        spread = figures["final_accuracy"]
        assert spread["values"] == finals
        assert spread["mean"] == pytest.approx(sum(finals) / 2)
        assert spread["std"] == pytest.approx(abs(finals[0] - finals[1]) / 2**0.5)
    # Seeds change partitions, models and sampling: the two seeds do not give the same run (at this
    # size the accuracies may both sit at chance; the initial models' losses differ).
    for arm in RERUN_ARMS:
        losses = [results["per_seed"][seed]["arms"][arm]["rounds"][0]["test_loss"] for seed in ("0", "1")]
        assert losses[0] != losses[1], arm
    report = (out / "report.md").read_text()
    assert "mean ± sample standard deviation" in report and "| csg | " in report and " ± " in report
    for name in ("accuracy_vs_bytes.png", "accuracy_vs_round.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (out / "seed-1" / name).is_file()


def test_compare_writes_report_csv_and_plots(compare_run: tuple[Path, subprocess.CompletedProcess]) -> None:
    out, proc = compare_run
    assert proc.returncode == 0
    assert "round 2/2" in proc.stderr  # progress lines
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 3 * 3 and {r["arm"] for r in rows} == {"fedavg", "csg", "csg-frozen"}
    report = (out / "report.md").read_text()
    assert "| csg-frozen |" in report and "upload ratio vs fedavg" in report
    for name in ("accuracy_vs_bytes.png", "accuracy_vs_round.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_existing_output_is_not_overwritten(
    compare_run: tuple[Path, subprocess.CompletedProcess], data_dir: Path
) -> None:
    out, _ = compare_run
    before = (out / "results.json").read_bytes()
    proc = _fedcsg("run", "--arm", "csg", "--out", str(out), data_dir=data_dir, cwd=ROOT)
    assert proc.returncode == 2
    assert "already holds results of csg" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert (out / "results.json").read_bytes() == before


def test_report_rebuilds_from_arm_records(
    compare_run: tuple[Path, subprocess.CompletedProcess], data_dir: Path
) -> None:
    out, _ = compare_run
    (out / "report.md").unlink()
    (out / "results.json").unlink()
    proc = _fedcsg("report", str(out), data_dir=data_dir, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "results.json").read_text())["summary"]["csg"]["upload_ratio_vs_fedavg"] > 2.0
    assert (out / "report.md").is_file()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "--config", "configs/nope.toml"], "config file 'configs/nope.toml' does not exist; accepted:"),
        (["run", "--set", "num-rounds=0"], "num-rounds = 0 is not accepted"),
        (["run", "--set", "colour=blue"], "unknown config key 'colour'"),
        (["run", "--arm", "fedprox"], "unknown arm 'fedprox'"),
        (["run", "--set", "data-dir='/no/such/dir'", "--set", "num-rounds=1"], "/no/such/dir"),
        (["report", "/no/such/results"], "results directory '/no/such/results' does not exist"),
    ],
)
def test_bad_input_one_line_exit_2(
    args: list[str], message: str, data_env: Path, tmp_path: Path, cli: Callable[..., tuple[int, str, str]]
) -> None:
    out = tmp_path / "out"
    extra = ["--out", str(out)] if args[0] == "run" else []
    code, _, err = cli(*args, *extra)
    assert code == 2, err[-2000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], err[-2000:]
    assert not out.exists()  # nothing written before the input is validated


def test_bad_input_through_the_console_entry_point(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = _fedcsg("run", "--set", "num-rounds=0", "--out", str(out), data_dir=data_dir, cwd=ROOT)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "num-rounds = 0 is not accepted" in lines[0]
    assert not out.exists()


def test_peer_arms_run_through_ray_with_honest_bytes(tiny_run: tuple[Path, subprocess.CompletedProcess]) -> None:
    """fedavg+int8, fedpara and csg+topk through Flower's simulation engine on Ray, in the same
    compare as fedavg and csg: every encoded reply accepted, its bytes the encoded arrays' real
    size (the offline messages of `fedcsg bytes`, to the byte), the downlink the full payload."""
    from fedcsg.fl.traffic import arm_traffic
    from fedcsg.spec.config import RunConfig

    out, proc = tiny_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert sorted(results["arms"]) == sorted(TINY_ARMS) and results["config"]["arms"] == ",".join(TINY_ARMS)
    base = {arm: json.loads((out / "arms" / f"{arm}.json").read_text()) for arm in RERUN_ARMS}
    for arm in RERUN_ARMS:
        del results["arms"][arm]
    cfg = RunConfig.from_mapping({k: v for k, v in results["config"].items() if k in RunConfig().to_flower()})
    for arm, data in results["arms"].items():
        rounds = data["rounds"]
        assert [r["round"] for r in rounds] == [0, 1, 2]
        for r in rounds[1:]:
            assert (r["replied"], r["rejected"], r["partitions"]) == (2, 0, [0, 1]), (arm, r)
        offline = arm_traffic(cfg.replace(arm=arm), 2)
        assert rounds[1]["payload_up"] == offline["payload_up"]  # encoded sizes follow from the layout alone
        # A delta downlink resyncs both nodes in full in round 1 and sends both the delta in round 2.
        delta = arm.endswith("/delta-int8")
        assert [r["resynced"] for r in rounds[1:]] == ([2, 0] if delta else [0, 0])
        assert rounds[2 if delta else 1]["payload_down"] == offline["payload_down"]
        assert rounds[1]["wire_down_resync"] == (rounds[1]["wire_down"] if delta else 0)
        assert 0 <= rounds[1]["wire_up"] - offline["wire_up"] < 2 * 100
    int8, fedavg = results["arms"]["fedavg+int8"]["rounds"], base["fedavg"]["rounds"]
    assert [r["partitions"] for r in int8] == [r["partitions"] for r in fedavg]
    assert int8[1]["payload_down"] == fedavg[1]["payload_down"]  # downlink stays the full payload
    # int8: one byte an element and a float32 scale a tensor, BatchNorm counters as they are
    floats = base["fedavg"]["payload_bytes"] - 8 * 19  # ResNet-20's 19 int64 counters
    assert int8[1]["payload_up"] == 2 * (floats // 4 + 4 * (len(base["fedavg"]["payload_keys"]) - 19) + 8 * 19)
    assert int8[0]["test_loss"] == fedavg[0]["test_loss"] and int8[2]["test_loss"] != fedavg[2]["test_loss"]
    topk = results["arms"]["csg+topk"]["rounds"]
    assert topk[1]["payload_up"] < 0.05 * base["csg"]["rounds"][1]["payload_up"]
    sendable = {arm: d["parameters"]["sendable"] for arm, d in {**base, **results["arms"]}.items()}
    assert abs(sendable["fedpara"] / sendable["csg"] - 1) < 0.10
    report = (out / "report.md").read_text()
    assert "| fedavg+int8 |" in report and "| csg+topk |" in report and "| csg+int8/delta-int8 |" in report
    two_way = results["arms"]["csg+int8/delta-int8"]["rounds"]
    assert two_way[2]["payload_down"] < 0.3 * base["csg"]["rounds"][2]["payload_down"]
    assert two_way[0]["test_loss"] == base["csg"]["rounds"][0]["test_loss"]
    assert "Fewest wire bytes to the target accuracy" in report or "No arm reached the target accuracy" in report


def test_warm_arm_hands_its_frozen_generator_to_each_node_once(
    tiny_run: tuple[Path, subprocess.CompletedProcess],
) -> None:
    """csg-warm with K = 1 through Ray: round 1 trains and sends what csg does; round 2 leaves the
    generator out both ways and hands it to each of the two nodes once; the generator the run ends
    with is the one it froze after round 1 (by hash), which round 1 trained away from its start."""
    from flwr.app import Array, ArrayRecord
    from safetensors.numpy import load_file

    from fedcsg.fl.task import build_arm_model
    from fedcsg.nn.csg_factors import factor_keys
    from fedcsg.spec.config import RunConfig
    from fedcsg.wire.handoff import handoff_hash

    out, proc = tiny_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    warm = json.loads((out / "arms" / "csg-warm.json").read_text())
    csg = json.loads((out / "arms" / "csg.json").read_text())
    handoff = warm["handoff"]
    (generator,) = [k for k in warm["payload_keys"] if k.startswith("csg_generators.")]
    assert handoff["after_round"] == 1 and handoff["bytes"] == 1296 * 72 * 4  # 12x12x3x3 slices, code dim 72
    assert warm["payload_bytes"] == csg["payload_bytes"]
    r1, r2 = warm["rounds"][1], warm["rounds"][2]
    for key in ("payload_up", "payload_down", "test_loss"):
        assert r1[key] == csg["rounds"][1][key], key
    assert r2["payload_up"] == 2 * (csg["payload_bytes"] - handoff["bytes"])
    assert r2["payload_down"] == 2 * csg["payload_bytes"]  # the payload without the generator, plus it once each
    assert r2["wire_up"] < 0.25 * r1["wire_up"] and r2["resynced"] == 0
    final = load_file(out / "model-csg-warm.safetensors")
    assert handoff_hash(ArrayRecord({generator: Array(final[generator])})) == handoff["hash"]
    cfg = RunConfig.from_mapping({k: v for k, v in warm["config"].items() if k in RunConfig().to_flower()})
    start = build_arm_model(cfg).state_dict()[generator].numpy()
    assert factor_keys(build_arm_model(cfg))["generator"] == [generator]
    assert handoff_hash(ArrayRecord({generator: Array(start)})) != handoff["hash"]


def test_a_cnn_of_the_users_own_runs_every_arm_through_ray_with_the_bytes_fedcsg_bytes_counts(
    own_run: tuple[Path, subprocess.CompletedProcess], capsys: pytest.CaptureFixture[str]
) -> None:
    """`model = "tests.user_cnn:SmallCNN"`: a CNN fedcsg has never seen, imported by the driver and by
    every Ray actor from the copy of the `tests` package that fedcsg shipped with Ray's runtime_env
    (py_modules; the run starts outside the checkout, and tests/user_cnn.py refuses to be imported by an
    actor from the checkout, which a cluster's nodes would not have), converted by the run's slice
    settings, on an ImageFolder of PNG and JPEG images of several sizes (3 classes found from its
    folders), partitioned, trained and evaluated, every client of every round; each arm's bytes per
    round are the ones `fedcsg bytes --model tests.user_cnn:SmallCNN --num-classes 3` counts
    without training (the payload to the byte, the wire within the offline messages' framing, as for
    the registry's models)."""
    from fedcsg.cli import main

    out, proc = own_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (
        main(
            [
                "bytes",
                "--model",
                OWN_MODEL,
                "--slice",
                "8x8x3x3",
                "--code-dim",
                "32",
                "--clients-per-round",
                "2",
                "--num-classes",
                "3",
                "--json",
            ]
        )
        == 0
    )
    counted = {row["arm"]: row for row in json.loads(capsys.readouterr().out)["arms"]}
    for arm in OWN_ARMS:
        record = json.loads(arm_record_path(out, arm).read_text())
        assert record["config"]["model"] == OWN_MODEL and record["config"]["dataset"] == "imagefolder"
        # Evaluated on the whole test folder (3 classes x 8 images): every accuracy is a count of its 24 images.
        test = 3 * IMAGES_PER_CLASS[1]
        for r in record["rounds"]:
            assert r["test_accuracy"] * test == pytest.approx(round(r["test_accuracy"] * test)), (arm, r["round"])
        for r in record["rounds"][1:]:
            assert (r["failed"], r["partitions"]) == (0, [0, 1]), (arm, r["round"])  # every actor built the model
            assert (r["payload_up"], r["payload_down"]) == (counted[arm]["payload_up"], counted[arm]["payload_down"])
            for way in ("wire_up", "wire_down"):  # the train config's few keys differ offline: < 100 B a message
                assert 0 <= r[way] - counted[arm][way] < 2 * 100, (arm, way)
        # tracker = "tensorboard": the ServerApp logged every round of the arm as it recorded it.
        logged = tensorboard_scalars(out / "tensorboard" / arm)["test/accuracy"]
        assert logged == [(r["round"], pytest.approx(r["test_accuracy"])) for r in record["rounds"]]
    # The generator of 8x8x3x3 slices with 32-dimensional codes travels with csg alone (576 x 32 float32).
    assert counted["csg"]["payload_up"] - counted["csg-frozen"]["payload_up"] == 2 * 576 * 32 * 4


def test_the_python_api_runs_what_the_cli_runs(
    own_run: tuple[Path, subprocess.CompletedProcess], api_run: tuple[Path, subprocess.CompletedProcess]
) -> None:
    """`fedcsg.compare(quickstart, arms=..., model=SmallCNN, **settings)` from Python, the factory passed
    as itself: the same records as `fedcsg compare` of the same config and seed, and its results returned."""
    (cli_out, cli), (api_out, api) = own_run, api_run
    assert cli.returncode == 0 and api.returncode == 0, api.stderr[-3000:]
    *_, arms, finals = api.stdout.strip().splitlines()
    assert arms == str(sorted(OWN_ARMS))
    for arm in OWN_ARMS:
        a, b = (json.loads(arm_record_path(out, arm).read_text()) for out in (cli_out, api_out))
        assert identity_of(a["config"]) == identity_of(b["config"]), arm  # the same run, in another out-dir
        assert comparable(a["rounds"]) == comparable(b["rounds"]), arm
    results = json.loads((api_out / "results.json").read_text())
    assert list(results["arms"]) == list(OWN_ARMS)
    # Results.summary: each arm's typed figures, one seed's here (fedcsg.runs.summary.ArmSummary)
    assert finals == str([(record["rounds"][-1]["test_accuracy"],) for record in results["arms"].values()])


def test_the_own_model_example_runs_as_its_readme_says(example_run: tuple[Path, subprocess.CompletedProcess]) -> None:
    """examples/own-model/compare.py from its folder, at a tiny size: its ShapeNet (a module beside the
    script, which the Ray actors import) on the ImageFolder, every arm of shapes.toml, the lines it prints."""
    out, proc = example_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert list(results["arms"]) == ["fedavg", "csg", "csg-frozen"]
    assert results["config"]["model"] == "shapenet:ShapeNet" and results["config"]["dataset"] == "imagefolder"
    printed = proc.stdout.strip().splitlines()
    for line, (arm, record) in zip(printed[-4:-1], results["arms"].items(), strict=True):  # after the report
        final = record["rounds"][-1]
        assert [r["round"] for r in record["rounds"]] == [0, 1] and final["partitions"] == [0, 1, 2, 3]
        assert line == f"{arm}: accuracy {final['test_accuracy']:.3f}, {final['cum_wire_up']:,} bytes up in all"
    assert printed[-1] == f"records and report in {out}" and (out / "report.md").is_file()


# -- an attached Ray cluster (last in the module: the compares above have finished by now) ------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _start_raylet(command: list[str], log: Path, env: dict[str, str]) -> Popen:
    """`ray start --block` in a session of its own; returns once the node says it started."""
    with log.open("w") as handle:
        node = Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.monotonic() + 180
    while "Ray runtime started" not in log.read_text():
        assert node.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"Ray node {log.stem} did not start in 180 s"
        time.sleep(0.5)
    return node


@contextlib.contextmanager
def ray_cluster(data_dir: Path, nodes: int = 2) -> Iterator[tuple[str, list[Popen], Callable[[dict], Popen]]]:
    """A real Ray cluster on loopback: a head and ``nodes - 1`` raylets joined to it, one CPU each,
    each `ray start --block` in a session of its own, with ``FEDCSG_DATA_DIR`` in its environment
    (the clients' actors inherit the raylet's, not the driver's); always killed by session in the
    end. Yields the address, the nodes and ``join(env)``, which starts one more raylet with the
    environment ``env``. Its files go to a short directory of its own: a Unix socket path holds at
    most 107 bytes."""
    port = _free_port()
    address = f"127.0.0.1:{port}"
    env = {**os.environ, "FEDCSG_DATA_DIR": str(data_dir)}
    start = [sys.executable, "-m", "ray.scripts.scripts", "start", "--block", "--num-cpus=1", "--num-gpus=0"]
    start += ["--node-ip-address=127.0.0.1", "--disable-usage-stats"]
    procs: list[Popen] = []
    with tempfile.TemporaryDirectory(prefix="fedcsg-ray-", dir="/tmp") as tmp:

        def join(node_env: dict[str, str]) -> Popen:
            procs.append(
                _start_raylet([*start, f"--address={address}"], Path(tmp) / f"node-{len(procs)}.log", node_env)
            )
            return procs[-1]

        head = [*start, "--head", f"--port={port}", "--include-dashboard=false", f"--temp-dir={tmp}/ray"]
        try:
            procs.append(_start_raylet(head, Path(tmp) / "node-0.log", env))
            for _ in range(nodes - 1):
                join(env)
            yield address, procs, join
        finally:
            for proc in reversed(procs):
                kill_session(proc)


def test_run_on_an_attached_two_node_cluster_spreads_clients_and_matches_a_private_ray(
    tiny_run: tuple[Path, subprocess.CompletedProcess], data_dir: Path, tmp_path: Path
) -> None:
    """`fedcsg run --set ray-address=HEAD` on a two-node cluster: the records name both nodes, equal
    the same arm of ``tiny_run`` (a private Ray) in everything but where and how long, and the
    cluster is still running after the run (fedcsg did not start it). Then a third node joins
    without the data: the next run fails before its first round, in one line naming that node."""
    private, proc = tiny_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    quickstart = str(ROOT / "configs" / "quickstart.toml")
    out = tmp_path / "cluster-run"
    with ray_cluster(data_dir) as (address, nodes, join):
        args = ["run", "--config", quickstart, "--arm", "csg", "--out", str(out), *_sets(TINY_RUN)]
        run = _fedcsg(*args, "--set", f"ray-address={address}", data_dir=data_dir, cwd=ROOT)
        assert run.returncode == 0, run.stderr[-3000:]
        assert all(node.poll() is None for node in nodes)
        # No FEDCSG_DATA_DIR on this node, and no hub to fall back on.
        bare = {k: v for k, v in os.environ.items() if k != "FEDCSG_DATA_DIR"}
        join({**bare, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
        refused = tmp_path / "refused"
        args = ["run", "--config", quickstart, "--arm", "csg", "--out", str(refused), *_sets(TINY_RUN)]
        started = time.monotonic()
        run = _fedcsg(*args, "--set", f"ray-address={address}", data_dir=data_dir, cwd=ROOT)
        lines = run.stderr.strip().splitlines()
        assert run.returncode == 2 and len(lines) == 1, run.stderr[-3000:]
        assert lines[0].startswith("fedcsg run: error: Ray node ") and "cannot host this run's clients" in lines[0]
        assert "cifar10" in lines[0] and time.monotonic() - started < 120
        assert not (refused / "arms").exists()
    attached = json.loads((out / "arms" / "csg.json").read_text())
    reference = json.loads((private / "arms" / "csg.json").read_text())
    ran_on = {node for r in attached["rounds"] for node in r["ray_nodes"]}
    assert len(ran_on) == 2 and all(len(node) == 56 for node in ran_on)
    assert all(len(r["ray_nodes"]) == len(r["partitions"]) for r in attached["rounds"])
    assert comparable(attached["rounds"]) == comparable(reference["rounds"])
    assert attached["config"]["ray-address"] == address


def test_every_arms_records_and_report_carry_the_filter_step(
    compare_run: tuple[Path, subprocess.CompletedProcess], tiny_run: tuple[Path, subprocess.CompletedProcess]
) -> None:
    """Plain, CSG (trainable and frozen), FedPara and codec arms all record a filter step per
    aggregated round (none for round 0), in results.json, the arm records and the report."""
    for out, proc in (compare_run, tiny_run):
        assert proc.returncode == 0, proc.stderr[-3000:]
        results = json.loads((out / "results.json").read_text())
        for arm, data in results["arms"].items():
            rounds = data["rounds"]
            assert (rounds[0]["filter_step"], rounds[0]["client_filter_step"]) == (None, None)
            for r in rounds[1:]:
                assert 0 < r["filter_step"] < 10 and 0 < r["client_filter_step"] < 10, (arm, r)
            recorded = json.loads(arm_record_path(out, arm).read_text())["rounds"]
            assert [r["filter_step"] for r in recorded] == [r["filter_step"] for r in rounds]
        # Plain FedAvg over two equal partitions: the global change is the mean of the clients'
        # changes, never longer than their mean length (the triangle inequality).
        for r in results["arms"]["fedavg"]["rounds"][1:]:
            assert r["filter_step"] <= r["client_filter_step"] + 1e-12
        table = (out / "report.md").read_text().split("## Filter step")[1]
        assert all(f"\n| {arm} | " in table for arm in results["arms"])
