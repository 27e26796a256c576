"""The run directory under kills, a second run and a full disk (issue 42): a run killed before its
first checkpoint resumes, two runs never write into one directory, and a refused write is one line.
Everything runs in this process through ``fedcsg.cli.main`` with the simulation replaced (no Ray)."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from fedcsg.cli import main
from fedcsg.cli import runs as commands
from fedcsg.runs.layout import LOCK_FILE, arm_record_path, seed_dir, state_path
from fedcsg.runs.lock import run_lock

from .test_reliability import _checkpointed, _tiny_cfg


def _tree(path: Path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def simulated(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, str]]:
    """(seed, arm) of every run the CLI hands to the simulation, which is not started."""
    calls: list[tuple[int, str]] = []
    monkeypatch.setattr(commands, "_simulate", lambda runs, o, v: calls.extend((c.seed, c.arm) for c in runs))
    monkeypatch.setattr(commands, "_finish", lambda out_dir, runs, placement: 0)
    return calls


def _killed_before_round_0_checkpoint(run_dir: Path, cfg: object) -> Path:
    """What a SIGKILL while round 0's weights are written leaves: the arm record of round 0, and in
    state/ only the temporary file of the interrupted write."""
    _checkpointed(run_dir, cfg)
    state_path(run_dir, cfg.arm).unlink()
    weights = next((run_dir / "state").glob("*.safetensors"))
    torn = weights.with_name(f".{weights.name}.k1ll3d.tmp")
    torn.write_bytes(weights.read_bytes()[:100])
    weights.unlink()
    return torn


def test_a_kill_before_the_first_checkpoint_restarts_round_0_and_keeps_the_finished_seed(
    tmp_path: Path, data_env: Path, simulated: list, capsys: pytest.CaptureFixture[str]
) -> None:
    """The issue's case: `compare --arms csg,fedavg --seeds 5,6` killed when seed-6/state appeared."""
    out = tmp_path / "run"
    cfg = _tiny_cfg(out).replace(seeds="5,6", arms="csg,fedavg", seed=5)
    for arm in ("csg", "fedavg"):
        _checkpointed(seed_dir(out, 5), cfg.replace(arm=arm), last_round=cfg.num_rounds)
    torn = _killed_before_round_0_checkpoint(seed_dir(out, 6), cfg.replace(arm="csg", seed=6))
    finished = _tree(seed_dir(out, 5))
    report_tmp = out / ".results.json.x1y2.tmp"  # a kill while the report over the seeds was written
    report_tmp.write_text("{")
    assert main(["compare", "--resume", str(out)]) == 0
    assert not report_tmp.exists()
    assert simulated == [(6, "csg"), (6, "fedavg")]  # seed 6 from round 0; seed 5 kept
    printed = capsys.readouterr().out
    assert "== arm csg (seed 6): stopped before its first checkpoint, starting again" in printed
    assert "== arm fedavg (seed 5): complete (4 rounds), skipped" in printed
    assert not torn.exists() and _tree(seed_dir(out, 5)) == finished
    assert not (out / LOCK_FILE).exists()


def test_a_one_seed_run_killed_before_its_first_checkpoint_resumes(
    tmp_path: Path, data_env: Path, simulated: list
) -> None:
    cfg = _tiny_cfg(tmp_path)
    torn = _killed_before_round_0_checkpoint(tmp_path, cfg)
    assert main(["run", "--resume", str(tmp_path)]) == 0
    assert simulated == [(cfg.seed, "csg")] and not torn.exists()


def test_a_record_of_round_0_under_another_config_is_not_restarted(
    tmp_path: Path, data_env: Path, simulated: list, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _tiny_cfg(tmp_path)
    _killed_before_round_0_checkpoint(tmp_path, cfg)
    document = json.loads(arm_record_path(tmp_path, "csg").read_text())
    document["config"]["lr"] = 0.5
    arm_record_path(tmp_path, "fedavg").write_text(json.dumps({**document, "arm": "fedavg"}))
    assert main(["compare", "--resume", str(tmp_path), "--arms", "fedavg,csg"]) == 2
    assert capsys.readouterr().err == (
        f"fedcsg compare: error: arm 'fedavg' in {str(tmp_path)!r} was recorded under another config (lr differ) "
        "and has no checkpoint: accepted is --overwrite\n"
    )
    assert simulated == []


# -- one run at a time in a directory -------------------------------------------------------------


def test_a_second_run_into_a_directory_in_use_is_refused_naming_the_holder(
    tmp_path: Path, data_env: Path, simulated: list, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cc"
    out.mkdir()
    args = ["compare", "--arms", "csg,fedavg", "--out", str(out), "--set", "num-clients=2"]
    with run_lock(out):
        before = _tree(out)
        assert main(args) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert lines == [
            f"fedcsg compare: error: output directory {str(out)!r} is in use by fedcsg pid {os.getpid()} on host "
            f"{socket.gethostname()!r} (since {json.loads((out / LOCK_FILE).read_text())['since']}): accepted is "
            "one run at a time in a directory (wait for it to end, or choose another --out)"
        ]
        assert main([*args, "--overwrite"]) == 2  # nothing of the running one is deleted
        assert main(["report", str(out)]) == 2
        assert _tree(out) == before and simulated == []
    assert not (out / LOCK_FILE).exists()  # released at the end of the holder's block
    assert main(args) == 0 and simulated == [(0, "csg"), (0, "fedavg")]
    assert not (out / LOCK_FILE).exists()


def test_the_stale_lock_of_a_dead_run_is_taken_over(tmp_path: Path, data_env: Path, simulated: list) -> None:
    """A SIGKILLed run leaves its lock file, but the kernel released its lock with the process."""
    out = tmp_path / "cc"
    out.mkdir()
    script = f"from fedcsg.runs.lock import run_lock\nwith run_lock({str(out)!r}):\n    import os; os._exit(9)"
    subprocess.run([sys.executable, "-c", script], check=False, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert json.loads((out / LOCK_FILE).read_text())["pid"] != os.getpid()  # left behind, not held
    assert main(["run", "--arm", "csg", "--out", str(out), "--set", "num-clients=2"]) == 0
    assert simulated == [(0, "csg")] and not (out / LOCK_FILE).exists()


# -- a full disk -----------------------------------------------------------------------------------


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EROFS])
def test_a_full_disk_is_one_line_naming_the_path(
    code: int, tmp_path: Path, data_env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A write refused by the machine, as the ServerApp's first record write meets it: exit 1, one
    line naming the file, no traceback, and the earlier files whole."""
    import fedcsg.io

    out = tmp_path / "out"

    def write_round_0(runs: list, o: Path, v: bool) -> None:
        real_fdopen = os.fdopen

        class Full:
            def __init__(self, fd: int, mode: str) -> None:
                self.handle = real_fdopen(fd, mode)

            def __enter__(self) -> Full:
                return self

            def __exit__(self, *exc: object) -> None:
                self.handle.close()

            def write(self, data: bytes) -> int:
                raise OSError(code, os.strerror(code))

            def __getattr__(self, name: str) -> object:
                return getattr(self.handle, name)

        _checkpointed(Path(runs[0].out_dir), runs[0].replace(out_dir=str(Path(runs[0].out_dir).absolute())))
        monkeypatch.setattr(fedcsg.io.os, "fdopen", Full)
        _checkpointed(Path(runs[0].out_dir), runs[0].replace(out_dir=str(Path(runs[0].out_dir).absolute())), 1)

    monkeypatch.setattr(commands, "_simulate", write_round_0)
    code_ = main(["run", "--arm", "csg", "--out", str(out), "--set", "num-clients=2", "--set", "num-rounds=4"])
    err = capsys.readouterr().err
    assert code_ == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert err.startswith(f"fedcsg run: error: {os.strerror(code)} writing {str(out / 'arms' / 'csg.json')!r}")
    assert "the files written before are intact" in err
    assert sorted(p.name for p in (out / "state").iterdir()) == ["csg-round-0000.safetensors", "csg.json"]
    assert not list(out.rglob("*.tmp")) and not (out / LOCK_FILE).exists()


# -- report checks every record before it writes anything ---------------------------------------


def _seeds_run(out: Path, seeds: tuple[int, ...] = (1, 2)) -> None:
    """Arm records of a finished two-round `compare --arms fedavg,csg --seeds 1,2`, as the ServerApp writes them."""
    from fedcsg.fl.server_app import recorded_config
    from fedcsg.runs.records import ArmRecorder, RoundRecord

    cfg = _tiny_cfg(out).replace(seeds=",".join(map(str, seeds)), arms="fedavg,csg", num_rounds=2)
    for seed in seeds:
        for arm in ("fedavg", "csg"):
            run_cfg = cfg.replace(seed=seed, arm=arm, out_dir=str(seed_dir(out, seed)))
            recorder = ArmRecorder(seed_dir(out, seed), arm, recorded_config(run_cfg))
            for r in range(3):
                record = RoundRecord(
                    r, test_accuracy=0.1 + 0.1 * r, test_loss=2.0 - r / 2, status="ok" if r else "initial"
                )
                record.payload_up = record.wire_up = 1000 * r
                recorder.add(record, save=False)
            recorder.save()


def _edit(path: Path, change: object) -> None:
    document = json.loads(path.read_text())
    change(document)
    path.write_text(json.dumps(document))


def _set_round(key: str, value: object) -> object:
    return lambda document: document["rounds"][1].__setitem__(key, value)


@pytest.mark.parametrize(
    ("file", "change", "message"),
    [
        ("seed-1/arms/csg.json", _set_round("test_accuracy", 1e308), "rounds[1].test_accuracy is 1e+308, accepted"),
        ("seed-2/arms/csg.json", _set_round("test_accuracy", 7.5), "rounds[1].test_accuracy is 7.5, accepted"),
        ("seed-2/arms/csg.json", _set_round("test_accuracy", -0.5), "rounds[1].test_accuracy is -0.5"),
        ("seed-2/arms/csg.json", _set_round("wire_up", -5), "rounds[1].wire_up is -5, accepted is a number in [0, "),
        ("seed-2/arms/fedavg.json", _set_round("test_loss", float("inf")), "rounds[1].test_loss is inf"),
        ("seed-2/arms/fedavg.json", _set_round("partitions", [0, -1]), "rounds[1].partitions is -1"),
        ("seed-2/arms/csg.json", lambda d: d.__setitem__("arm", "fedavg"), "of arm 'csg': it records arm 'fedavg'"),
        (
            "seed-2/arms/csg.json",
            lambda d: d["config"].__setitem__("model", "resnet20"),
            "was recorded under another config than",
        ),
        ("seed-2/arms/csg.json", lambda d: d["config"].__setitem__("seed", 7), "records seed 7, not 2 of its folder"),
    ],
)
def test_report_refuses_a_record_no_run_writes_before_writing_anything(
    file: str, change: object, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _seeds_run(tmp_path)
    assert main(["report", str(tmp_path)]) == 0  # the run as written reports
    capsys.readouterr()
    _edit(tmp_path / file, change)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err, err
    assert str(tmp_path) in err  # the file is named
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before  # nothing rewritten
    (tmp_path / file).unlink()  # an Infinity the session's strict-JSON check must not find


def test_report_leaves_out_a_seed_folder_of_an_earlier_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """seed-3 of an earlier `--seeds 1,2,3` run beside this `--seeds 1,2` run: reported over [1, 2],
    with a warning naming the folder left out."""
    _seeds_run(tmp_path, (1, 2, 3))
    import time

    time.sleep(0.01)
    _seeds_run(tmp_path, (1, 2))  # the newer run
    assert main(["report", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "results.json").read_text())["seeds"] == [1, 2]
    err = capsys.readouterr().err
    assert f"{seed_dir(tmp_path, 3)} left out: seed 3 is not one of the run's seeds 1,2" in err


# -- bad data found where it is opened, before anything is written -------------------------------


def _png(size: tuple[int, int] = (32, 32), colour: tuple[int, int, int] = (9, 99, 199)) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _bomb(width: int, height: int) -> bytes:
    """A PNG whose header says width x height (a few hundred bytes: no pixel is ever made)."""
    import struct
    import zlib

    data = bytearray(_png((1, 1)))
    ihdr = 8 + 8  # signature, then the IHDR chunk's length and type
    data[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[ihdr - 4 : ihdr + 13])))
    return bytes(data)


def _cifar_dir(root: Path, bad_row: int | None = None, image: bytes | None = b"", label: int | None = None) -> Path:
    """A CIFAR-10-style data directory of 8 train and 8 test rows; the train split's ``bad_row`` gets
    ``image`` (b"": a good one) and ``label`` (None: a good one)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    directory = root / "data" / "cifar10"
    directory.mkdir(parents=True)
    for split in ("train", "test"):
        images = [{"bytes": _png(colour=(i, i, i)), "path": f"{i}.png"} for i in range(8)]
        labels = [i % 10 for i in range(8)]
        if split == "train" and bad_row is not None:
            images[bad_row] = {"bytes": image if image != b"" else images[bad_row]["bytes"], "path": "bad.png"}
            labels[bad_row] = labels[bad_row] if label is None else label
        pq.write_table(pa.table({"img": images, "label": pa.array(labels, pa.int64())}), directory / f"{split}.parquet")
    return directory.parent


@pytest.mark.parametrize(
    ("image", "label", "message"),
    [
        (b"", 99, "row 5: label 99 is not accepted: a class in 0..9 is"),
        (b"", -1, "row 5: label -1 is not accepted: a class in 0..9 is"),
        (b"not an image at all", None, "row 5: image does not decode (cannot identify image file"),
        (None, None, "row 5: the image is null; accepted is a JPEG or PNG"),
        (_bomb(20000, 20000), None, "row 5: image is more than 1,048,576 pixels (Image size (400000000 pixels)"),
        (_bomb(2000, 2000), None, "row 5: image is more than 1,048,576 pixels (2000x2000)"),
        (_bomb(33, 32), None, "row 5: image is 33x32, expected 32x32"),
    ],
)
def test_bad_data_is_refused_where_it_is_opened_naming_file_and_row(
    image: bytes | None, label: int | None, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedcsg.data.hf_parquet import _check_headers

    data = _cifar_dir(tmp_path, 5, image, label)
    out = tmp_path / "out"
    sets = ["dataset='cifar10'", f"data-dir='{data}'", "num-clients=2", "train-limit=0", "test-limit=0"]
    args = ["run", "--arm", "fedavg", "--out", str(out), *[a for s in sets for a in ("--set", s)]]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert (
        err
        == f"fedcsg run: error: {data / 'cifar10' / 'train.parquet'}: {message}"
        + err[err.index(message) + len(message) :]
    )
    assert err.count("\n") == 1 and not out.exists()
    _check_headers.cache_clear()


def test_a_broken_image_met_while_decoding_rows_names_file_and_row(tmp_path: Path) -> None:
    """A client's decode of its rows says the same (a file changed after the run's check)."""
    from fedcsg.data.readers import load_split

    data = _cifar_dir(tmp_path, 6, _png()[:60])
    with pytest.raises(ValueError, match=r"train\.parquet: row 6: image does not decode \(") as info:
        load_split("cifar10", "train", data, indices=[1, 6])
    assert "\n" not in str(info.value)


# -- what a process started dies with it --------------------------------------------------------


def test_the_watchdog_kills_what_a_sigkilled_process_started(tmp_path: Path) -> None:
    """A parent starts a child, which starts a grandchild in a session of its own (as Ray's raylet
    starts its agents); the parent is SIGKILLed: the watchdog kills both within a second or two.
    (Through Ray: tests/test_reliability.py::test_sigkill_anywhere_then_resume_matches_an_uninterrupted_compare.)"""
    import signal
    import time

    from fedcsg.processes import _pid_alive, start_watchdog

    pids = tmp_path / "pids"
    grandchild = "import os, time; os.setsid(); time.sleep(60)"
    child = (
        f"import subprocess, sys, time; g = subprocess.Popen([sys.executable, '-c', {grandchild!r}]); "
        f"open({str(pids)!r}, 'a').write(f'{{g.pid}}\\n'); time.sleep(60)"
    )
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', {child!r}]); "
            f"open({str(pids)!r}, 'a').write(f'{{c.pid}}\\n'); time.sleep(60)",
        ]
    )
    watchdog = start_watchdog(parent.pid)
    try:
        deadline = time.monotonic() + 30
        while len(pids.read_text().split() if pids.exists() else []) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(1.5)  # the watchdog's look at the descendants (every 0.5 s)
        started = [int(p) for p in pids.read_text().split()]
        assert all(_pid_alive(p) for p in started)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        watchdog.wait(timeout=10)
        assert [p for p in started if _pid_alive(p)] == []
    finally:
        for pid in [int(p) for p in pids.read_text().split()] if pids.exists() else []:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        watchdog.kill()
