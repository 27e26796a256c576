"""The by-hand guide of docs/deployment.md is ``examples/deployment/guide.sh``: the page shows the
script byte for byte, and the script runs end to end on loopback at a tiny size (Fashion-MNIST's
small CNN, one round, 100 training images per SuperNode)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import time
from pathlib import Path

from fedcsg.processes import adopting_orphans, descendants, free_port, process_table, stop_pids

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "examples" / "deployment" / "guide.sh"
DOC = ROOT / "docs" / "deployment.md"
MARKER = "<!-- examples/deployment/guide.sh, verbatim (tests/test_deploy_guide.py) -->\n```bash\n"
PER_CLASS = 5  # test images of each of the 10 classes the device predicts
TIMEOUT = 600.0  # the whole guide, generous for a loaded 2-core machine


def test_the_page_shows_the_guide_script_byte_for_byte() -> None:
    text = DOC.read_text()
    assert text.count(MARKER) == 1, f"docs/deployment.md has no (or more than one) block after {MARKER!r}"
    shown = text.split(MARKER, 1)[1].split("\n```\n", 1)[0] + "\n"
    assert shown == GUIDE.read_text()


def test_the_guide_refuses_another_directory_or_an_existing_work_dir_in_one_line(tmp_path: Path) -> None:
    """Before anything starts: no data directory, a run from elsewhere than the checkout, or an
    existing WORK is one line on stderr and exit 2."""
    env = dict(os.environ, WORK=str(tmp_path))
    cases = [
        (ROOT, {"FEDCSG_DATA_DIR": ""}, "FEDCSG_DATA_DIR '' is not a directory: set it to the data directory"),
        (tmp_path, {}, "run this from the fedcsg checkout"),
        (ROOT, {}, f"{tmp_path} exists: remove it or set WORK"),
    ]
    for cwd, changes, message in cases:
        run_env = env | changes
        done = subprocess.run(["bash", str(GUIDE)], cwd=cwd, env=run_env, capture_output=True, text=True, timeout=30)
        assert (done.returncode, done.stdout, done.stderr.count("\n")) == (2, "", 1), done.stderr
        assert done.stderr.startswith(message)


def test_the_guide_script_runs_a_federation_end_to_end(tmp_path: Path) -> None:
    """TLS, node authentication, two SuperNodes with their own ports, an unregistered one refused
    with Flower's own messages, one round, the status from `flwr ls`, the results under the
    SuperLink's directory, the export, and the device's prediction on 5 test images of each class."""
    from flwr.cli.build import build_fab_from_disk
    from flwr.proto.fab_pb2 import Fab, GetFabResponse  # pylint: disable=E0611

    work = tmp_path / "guide"
    ports = [free_port() for _ in range(4)]
    run_config = "model='fmnist-cnn' slice='8x8x3x3' code-dim=32 dataset='fashion-mnist' train-limit=200 test-limit=100"
    env = dict(os.environ, WORK=str(work), LISTEN="127.0.0.1", PORT=str(ports[0]), ROUNDS="1")
    env |= dict(NODE_PORTS=" ".join(map(str, ports[1:])), RUN_CONFIG=run_config, PER_CLASS=str(PER_CLASS))
    env |= dict(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # two ClientApps at once on a shared 2-core machine
    with adopting_orphans():
        before = set(descendants(os.getpid()))
        try:
            done = subprocess.run(
                ["bash", str(GUIDE)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT
            )
        finally:
            left = _running_below(before)
            stop_pids(left)
    out = done.stdout + done.stderr
    print(out)
    assert done.returncode == 0, out[-3000:]
    assert not left, f"the guide left processes running: {left}"
    assert [int(n) for n in re.findall(r"^== \[\d+ s\] (\d+)\. ", done.stdout, re.M)] == list(range(1, 12))

    # Refused: the SuperNode's and the SuperLink's own words, and exit status 1.
    assert "Exit Code: 305" in out and "[code: 2004] Failed to activate SuperNode." in out
    refusal = "[ApiError:2004] Attempted to register SuperNode with public key: ..., exception: "
    assert refusal + "No SuperNode found with the given public key." in out
    assert "the unregistered SuperNode exited 1" in out

    run_id = int(re.search(r"^run (\d+): finished:completed$", done.stdout, re.M).group(1))
    results = work / "runs" / f"flwr-{run_id}"
    assert {"results.json", "report.md", "arms", "model-csg.safetensors"} <= {p.name for p in results.iterdir()}
    record = json.loads((results / "arms" / "csg.json").read_text())
    assert [r["round"] for r in record["rounds"]] == [0, 1]
    assert (record["rounds"][1]["replied"], sorted(record["rounds"][1]["partitions"])) == (2, [0, 1])
    fab = build_fab_from_disk(ROOT)  # what a SuperNode downloads: the serialized GetFab reply
    bundle = GetFabResponse(fab=Fab(hash_str=hashlib.sha256(fab).hexdigest(), content=fab)).ByteSize()
    assert record["bundle_bytes"] == bundle and f"| csg | {bundle:,} B |" in done.stdout

    assert (work / "model.compact.safetensors").is_file()
    images = 10 * PER_CLASS
    line = f"on-device: fmnist-cnn (csg), {images} test images, the first {PER_CLASS} of each class: accuracy "
    accuracy = float(re.search(re.escape(line) + r"([0-9.]+)$", done.stdout, re.M).group(1))
    assert round(accuracy * images, 2) == round(accuracy * images)


def _running_below(before: set[int], grace: float = 15.0) -> list[int]:
    """Live processes below this one that were not there ``before``, once ``grace`` seconds have
    passed or none is left (Flower's SuperExecs exit on their own a moment after their SuperNode)."""
    deadline = time.monotonic() + grace
    while True:
        table = process_table()
        below = set(descendants(os.getpid())) - before
        left = sorted(pid for pid in below if pid in table and table[pid].state != "Z")
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)
