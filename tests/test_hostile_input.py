"""Hostile and careless input (issue 23): every case below is answered with exit code 2 and one line
naming the bad value, no traceback, and the files it was pointed at unchanged (names and sha256
before and after). Everything runs in this process through ``fedcsg.cli.main`` (the ``cli`` fixture);
nothing here starts Ray."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from fedcsg.data import registry
from fedcsg.io import DIGEST_KEY, tensors_digest
from fedcsg.runs.checkpoint import state_path, weights_path
from fedcsg.runs.model_file import save_checkpoint
from fedcsg.spec.checks import SEED_LIMIT
from fedcsg.spec.config import MAX_BATCH_SIZE, RunConfig
from fedcsg.spec.settings import ModelSettings

from .test_reliability import ScriptedGrid, _checkpointed, _reply, _run_rounds, _shifted, _small

Cli = Callable[..., tuple[int, str, str]]
TINY = ["num-clients=2", "num-rounds=1", "train-limit=128", "test-limit=64", "batch-size=32"]


def _sets(pairs: list[str]) -> list[str]:
    return [arg for pair in pairs for arg in ("--set", pair)]


def _tree(path: Path) -> dict[str, str]:
    """Every file and directory under ``path``, files with their sha256 (directories as "dir")."""
    if not path.exists():
        return {}
    if path.is_file():
        return {path.name: hashlib.sha256(path.read_bytes()).hexdigest()}
    return {
        str(p.relative_to(path)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
    }


def refused(cli: Cli, args: list[str], message: str, watched: Path) -> str:
    """Run ``fedcsg ARGS``; assert exit code 2, one line on stderr holding ``message``, no traceback,
    nothing on stdout, and ``watched`` unchanged. Returns the line."""
    before = _tree(watched)
    code, out, err = cli(*args)
    lines = err.strip().splitlines()
    assert code == 2, (code, out, err)
    assert len(lines) == 1 and message in lines[0], lines
    assert "Traceback" not in err + out and out == ""
    assert _tree(watched) == before
    return lines[0]


def _edit_state(out: Path, **changes: object) -> None:
    path = state_path(out, "csg")
    document = json.loads(path.read_text())
    for key, value in changes.items():
        if "." in key:
            outer, inner = key.split(".")
            document[outer][inner] = value
        else:
            document[key] = value
    path.write_text(json.dumps(document))


# -- 1: an output that cannot be written ---------------------------------------------------------


def test_1_unwritable_output(tmp_path: Path, data_env: Path, cli: Cli) -> None:
    # /sys refuses a new directory even to root, as a read-only or permission-less place does to a user.
    refused(
        cli, ["run", *_sets(TINY), "--out", "/sys/fedcsg-test/out"], "'/sys/fedcsg-test/out' cannot be made", tmp_path
    )
    blocker = tmp_path / "file"
    blocker.write_text("x")
    refused(cli, ["run", *_sets(TINY), "--out", str(blocker / "out")], f"'{blocker / 'out'}' cannot be made", tmp_path)
    checkpoint = save_checkpoint(
        ModelSettings("resnet20", "csg").build(), tmp_path / "m.safetensors", ModelSettings("resnet20", "csg")
    )
    export = ["export", "--checkpoint", str(checkpoint), "--format", "compact", "--out"]
    refused(cli, [*export, "/sys/fedcsg-test/m.compact.safetensors"], "'/sys/fedcsg-test' cannot be made", tmp_path)
    refused(cli, [*export, str(tmp_path)], f"output '{tmp_path}' is a directory", tmp_path)


# -- 2: malformed records ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("weights", [], "weights is [], accepted is an object"),
        ("rounds", 5, "rounds is 5, accepted is a list"),
        ("strategy", [1, 2], "strategy is [1, 2], accepted is dict"),
        ("weights.keys", "float32", "weights.keys is 'float32', accepted is a list"),
        ("rng", {"python": [], "numpy": {}, "torch": ""}, "RNG state that does not load"),
    ],
)
def test_2_malformed_state_json(
    field: str, value: object, message: str, tmp_path: Path, data_env: Path, cli: Cli
) -> None:
    out = tmp_path / "run"
    _checkpointed(out)
    _edit_state(out, **{field: value})
    line = refused(cli, ["run", "--resume", str(out)], message, out)
    assert str(state_path(out, "csg")) in line


@pytest.mark.parametrize("document", [{"x": 1}, [1, 2], {"config": {}, "rounds": [{"round": "0"}]}])
def test_2_malformed_arm_record_in_report(document: object, tmp_path: Path, cli: Cli) -> None:
    (tmp_path / "arms").mkdir()
    (tmp_path / "arms" / "csg.json").write_text(json.dumps(document))
    line = refused(cli, ["report", str(tmp_path)], "is not a fedcsg record", tmp_path)
    assert str(tmp_path / "arms" / "csg.json") in line


@pytest.mark.parametrize("action", ["down", "status", "run"])
def test_2_malformed_federation_json(action: str, tmp_path: Path, cli: Cli) -> None:
    (tmp_path / "federation.json").write_text('{"x": 1}')
    refused(
        cli,
        ["deploy", action, "--dir", str(tmp_path)],
        "federation.json' is not a fedcsg record: directory is missing",
        tmp_path,
    )
    (tmp_path / "federation.json").write_text('{"directory": 5}')
    refused(cli, ["deploy", action, "--dir", str(tmp_path)], "directory is 5, accepted is str", tmp_path)


# -- 3: the state JSON is not trusted ------------------------------------------------------------


def test_3_a_round_edit_that_contradicts_the_files(tmp_path: Path, data_env: Path, cli: Cli) -> None:
    out = tmp_path / "run"
    _checkpointed(out, last_round=1)
    _edit_state(out, round=4)  # "complete": the records and the weights file say round 1
    refused(cli, ["run", "--resume", str(out)], "is not consistent: round 4 of 4, but it records rounds [0, 1]", out)
    _edit_state(out, round=1, num_rounds=9)
    refused(cli, ["run", "--resume", str(out)], "is not consistent: num_rounds 9, its config's num-rounds 4", out)


@pytest.mark.parametrize("named", ["/etc/passwd", "../../outside.safetensors", "csg-round-0003.safetensors"])
def test_3_weights_outside_the_run_directory(named: str, tmp_path: Path, data_env: Path, cli: Cli) -> None:
    out = tmp_path / "run"
    _checkpointed(out)
    (tmp_path / "outside.safetensors").write_bytes(weights_path(out, "csg", 0).read_bytes())
    _edit_state(out, **{"weights.file": named})
    line = refused(
        cli,
        ["run", "--resume", str(out)],
        f"names weights file {named!r}: accepted is 'csg-round-0000.safetensors'",
        tmp_path,
    )
    assert "bytes" not in line  # nothing of the named file is read or echoed
    refused(cli, ["export", "--checkpoint", str(out), "--format", "compact"], "names weights file", tmp_path)


# -- 4: integrity of model files -----------------------------------------------------------------


def _model_file(tmp_path: Path) -> tuple[Path, ModelSettings]:
    info = ModelSettings("resnet20", "csg")
    return save_checkpoint(info.build(), tmp_path / "model-csg.safetensors", info), info


def test_4_a_flipped_byte_in_a_model_file(tmp_path: Path, cli: Cli) -> None:
    path, _ = _model_file(tmp_path)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01  # inside the last tensor's bytes
    path.write_bytes(bytes(data))
    refused(cli, ["export", "--checkpoint", str(path), "--format", "compact"], "is damaged or was altered", tmp_path)


def test_4_non_finite_weights_with_a_valid_digest(tmp_path: Path, cli: Cli) -> None:
    path, info = _model_file(tmp_path)
    tensors = load_file(str(path))
    tensors = {k: torch.full_like(v, math.nan) if v.is_floating_point() else v for k, v in tensors.items()}
    metadata = {
        **info.to_metadata(),
        "format": "fedcsg-checkpoint",
        "format-version": "1",
        DIGEST_KEY: tensors_digest(tensors),
    }
    save_file(tensors, str(path), metadata=metadata)
    refused(cli, ["export", "--checkpoint", str(path), "--format", "compact"], "holds non-finite weights", tmp_path)


def test_4_a_model_file_without_its_digest(tmp_path: Path, cli: Cli) -> None:
    path, info = _model_file(tmp_path)
    save_file(load_file(str(path)), str(path), metadata={**info.to_metadata(), "format": "fedcsg-checkpoint"})
    refused(
        cli, ["export", "--checkpoint", str(path), "--format", "compact"], f"has no {DIGEST_KEY} metadata", tmp_path
    )


def test_4_the_bare_state_file_is_checked_against_its_state_json(tmp_path: Path, cli: Cli) -> None:
    out = tmp_path / "run"
    _checkpointed(out)
    weights = weights_path(out, "csg", 0)
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x40  # one weight altered: the same size, still a valid safetensors file
    weights.write_bytes(bytes(data))
    load_file(str(weights))  # still parses
    for checkpoint in (out, weights):
        refused(cli, ["export", "--checkpoint", str(checkpoint), "--format", "compact"], "sha256 differs", tmp_path)


# -- 5: sizes from input are bounded before any tensor is made -----------------------------------


@pytest.mark.parametrize(
    "changes",
    [{"model": "densenet40-k99999"}, {"num-classes": "1000000000"}, {"slice": "100000x100000x3x3"}],
    ids=["width", "classes", "slice"],
)
def test_5_crafted_export_metadata(changes: dict[str, str], tmp_path: Path, cli: Cli) -> None:
    path, info = _model_file(tmp_path)
    tensors = load_file(str(path))
    metadata = {**info.to_metadata(), "format": "fedcsg-checkpoint", **changes, DIGEST_KEY: tensors_digest(tensors)}
    save_file(tensors, str(path), metadata=metadata)
    line = refused(
        cli, ["export", "--checkpoint", str(path), "--format", "compact"], "above this machine's limit", tmp_path
    )
    assert next(iter(changes.values())).split("x")[0] in line


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--in-channels", "1000000000"], "in-channels = 1000000000"),
        (["--num-classes", "1000000000"], "num-classes = 1000000000"),
        (["--slice", "100000x100000x3x3"], "slice 100000x100000x3x3"),
    ],
)
def test_5_params_of_a_model_too_large(args: list[str], named: str, tmp_path: Path, cli: Cli) -> None:
    line = refused(cli, ["params", "--model", "resnet20", *args], named, tmp_path)
    assert "would take" in line


def test_5_a_run_of_a_model_too_large_writes_nothing(tmp_path: Path, data_env: Path, cli: Cli) -> None:
    out = tmp_path / "out"
    refused(
        cli, ["run", *_sets([*TINY, "model='densenet40-k99999'"]), "--out", str(out)], "densenet40-k99999", tmp_path
    )


# -- 6: values that make no sense -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("pair", "message"),
    [
        ("lr=inf", "lr = inf is not accepted: a finite number > 0 is"),
        ("lr=nan", "lr = nan is not accepted: a finite number > 0 is"),
        ("target-accuracy=2", "target-accuracy = 2.0 is not accepted: a number in (0, 1] is"),
        ("target-accuracy=0", "target-accuracy = 0.0 is not accepted: a number in (0, 1] is"),
        ("momentum=50", "momentum = 50.0 is not accepted: a number in [0, 1) is"),
        ("round-timeout=inf", "round-timeout = inf is not accepted: a finite number > 0 is"),
        ("batch-size=1000000000", f"batch-size = 1000000000 is not accepted: an integer in 1..{MAX_BATCH_SIZE} is"),
        ("eval-batch-size=1000000000", "eval-batch-size = 1000000000 is not accepted"),
        (f"seed={2**70}", f"seed = {2**70} is not accepted: an integer in 0..{SEED_LIMIT - 1} is"),
        (f"seeds='0,{2**40}'", f"seeds = '0,{2**40}' is not accepted"),
        ("dirichlet-alpha=inf", "dirichlet-alpha = inf is not accepted: a finite number > 0 is"),
        ("train-limit=10000000", "train-limit = 10000000 is not accepted: the train split of fashion-mnist has 60,000"),
        ("test-limit=10000000", "test-limit = 10000000 is not accepted: the test split of fashion-mnist has 10,000"),
    ],
)
def test_6_values_that_make_no_sense(pair: str, message: str, tmp_path: Path, data_env: Path, cli: Cli) -> None:
    out = tmp_path / "out"
    refused(cli, ["run", "--out", str(out), *_sets([*TINY, pair])], message, tmp_path)


def test_6_bytes_with_a_seed_too_large(tmp_path: Path, cli: Cli) -> None:
    refused(cli, ["bytes", "--model", "resnet20", "--seed", str(2**70)], f"seed = {2**70} is not accepted", tmp_path)


# -- 7: everything checkable from the config and the data's size, before the first byte ---------


@pytest.mark.parametrize(
    ("pairs", "message"),
    [
        (["num-clients=1000000"], "num-clients = 1000000 is not accepted: there are 128 train rows to partition"),
        (
            ["partitioner='shards'", "shards-per-client=100000"],
            "shards-per-client = 100000 is not accepted: 2 clients x 100000 shards exceed the 128 train rows",
        ),
    ],
)
def test_7_checked_before_anything_is_written(
    pairs: list[str], message: str, tmp_path: Path, data_env: Path, cli: Cli
) -> None:
    out = tmp_path / "o"
    refused(cli, ["run", "--out", str(out), *_sets([*TINY, *pairs])], message, tmp_path)
    assert not out.exists()


# -- 8: a named data directory never sends fedcsg to the network --------------------------------


@pytest.mark.parametrize("kind", ["missing", "empty", "file"])
def test_8_a_mistyped_data_dir_is_an_error_not_a_download(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cli: Cli
) -> None:
    named = tmp_path / "data"
    if kind == "empty":
        named.mkdir()
    elif kind == "file":
        named.write_text("x")
    hub_calls: list[str] = []
    monkeypatch.setattr(registry, "load_hub", lambda name: hub_calls.append(name))
    monkeypatch.setenv("FEDCSG_DATA_DIR", str(named))
    message = (
        "not found: looked in"
        if kind == "empty"
        else f"$FEDCSG_DATA_DIR = '{named}' does not exist or is not a directory"
    )
    line = refused(cli, ["run", *_sets(TINY), "--out", str(tmp_path / "out")], message, tmp_path)
    assert hub_calls == [] and str(named) in line


# -- 9: messages that name what is wrong ----------------------------------------------------------


def test_9_config_and_resume_messages(tmp_path: Path, data_env: Path, cli: Cli) -> None:
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\x92\x00\xff")
    refused(cli, ["run", "--config", str(binary)], f"config file '{binary}' is not valid TOML (UTF-8 text)", tmp_path)
    refused(cli, ["run", "--config", str(tmp_path)], f"config file '{tmp_path}' is a directory", tmp_path)
    refused(cli, ["run", "--resume", str(binary)], f"resume directory '{binary}' is not a directory", tmp_path)


def test_9_corrupt_federation_json_names_the_file(tmp_path: Path, cli: Cli) -> None:
    (tmp_path / "federation.json").write_bytes(b'{"directory": ')
    refused(
        cli, ["deploy", "down", "--dir", str(tmp_path)], f"'{tmp_path / 'federation.json'}' is not valid JSON", tmp_path
    )


def test_9_certificate_days_and_hosts(tmp_path: Path, cli: Cli) -> None:
    out = tmp_path / "certs"
    refused(
        cli,
        ["deploy", "certs", "--out", str(out), "--days", "1000000000"],
        "days = 1000000000 is not accepted: an integer in 1..36500 is",
        tmp_path,
    )
    refused(cli, ["deploy", "certs", "--out", str(out), "--host", ""], "host '' is not accepted", tmp_path)
    refused(cli, ["deploy", "certs", "--out", str(out), "--host", " a b"], "host ' a b' is not accepted", tmp_path)


# -- 10: a private key is always 0600 -------------------------------------------------------------


def test_10_overwrite_makes_every_private_key_0600(tmp_path: Path, cli: Cli) -> None:
    keys, certs = tmp_path / "ks", tmp_path / "certs"
    assert cli("deploy", "keys", "--out", str(keys), "--nodes", "2")[0] == 0
    assert cli("deploy", "certs", "--out", str(certs), "--nodes", "1")[0] == 0
    loose = [keys / "node-0.key", certs / "server.key", certs / "ca.key", certs / "node-0.key"]
    for path in loose:
        path.chmod(0o644)
    assert cli("deploy", "keys", "--out", str(keys), "--nodes", "2", "--overwrite")[0] == 0
    assert cli("deploy", "certs", "--out", str(certs), "--nodes", "1", "--overwrite")[0] == 0
    for path in [*loose, keys / "node-1.key"]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


# -- 11: a signal to the whole process group reaches fedcsg alone -------------------------------


def test_11_a_private_rays_processes_leave_our_process_group() -> None:
    """What ``timeout`` sends to its process group must not reach Ray's GCS and raylet (the workers
    follow the raylet): then fedcsg alone is signalled and stops Ray in order (measured in the note:
    `timeout 30 fedcsg run ...` exits 143, prints no traceback, leaves no fedcsg-app-* directory and
    no Ray process)."""
    from ray._private import services

    from fedcsg.fl.ray_cluster import ray_out_of_our_process_group

    with ray_out_of_our_process_group():
        child = services.ConsolePopen(["sleep", "5"])
    try:
        assert os.getpgid(child.pid) == child.pid != os.getpgrp()
        assert os.getsid(child.pid) == os.getsid(0)  # the same session: a session kill still finds it
    finally:
        child.kill()
        child.wait()
    assert services.ConsolePopen.__name__ == "ConsolePopen"  # restored after the block


# -- 12: what a user reads ----------------------------------------------------------------------


def test_12_large_numbers_do_not_run_together(cli: Cli) -> None:
    from fedcsg.cli.args import table

    # The issue's `params --in-channels 10000000` row, which printed as 1,440,269,2901,440,114,994.
    assert table([("", "plain", "csg"), ("total", 1_440_269_290, 1_440_114_994)])[1].split() == [
        "total",
        "1,440,269,290",
        "1,440,114,994",
    ]
    code, out, _ = cli("params", "--model", "resnet20", "--in-channels", "200000")
    assert code == 0
    total = next(line for line in out.splitlines() if line.startswith("total"))
    assert total.split() == ["total", "29,069,290", "28,914,994"]


@contextmanager
def flower_lines() -> Iterator[list[str]]:
    """The messages Flower's logger emits within the block."""
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("flwr")
    logger.addHandler(handler)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)


def test_12_a_round_about_to_be_retried_says_so() -> None:
    _, layout, initial = _small()
    good = _shifted(initial, 1e-3)

    def respond(pos: int, node: int, msg):  # noqa: ANN001, ANN202 - the scripted grid's callback
        from flwr.app import Error

        first = msg.content["config"]["server-round"] == 1 and msg.content["config"]["attempt"] == 0
        return Error(code=1, reason="injected") if first else _reply(good, 10, pos)

    from fedcsg.fl.strategy import CSGFedAvg

    strategy = CSGFedAvg(layout, lr_fn=lambda r: 0.1, min_replies=2, failed_round="retry", min_train_nodes=2)
    with flower_lines() as lines:
        _run_rounds(strategy, ScriptedGrid([3, 5], respond), initial, num_rounds=1)
    failed = [line for line in lines if "replies accepted" in line]
    assert failed == [
        "round 1: 0 of 2 replies accepted, fewer than the minimum 2: sending the round once more (failed-round = retry)"
    ]
    assert strategy.traffic[1].status == "ok"


def test_12_client_tracebacks_are_left_to_the_one_line_report() -> None:
    from fedcsg.fl.flower_logs import REPORTED_CLIENT_ERRORS

    def record(path: str, func: str, level: int = logging.ERROR) -> logging.LogRecord:
        return logging.LogRecord("flwr", level, path, 1, "Traceback ...", None, None, func)

    vce = "/site-packages/flwr/server/superlink/fleet/vce/vce_api.py"
    ray = "/site-packages/flwr/server/superlink/fleet/vce/backend/raybackend.py"
    assert not REPORTED_CLIENT_ERRORS.filter(record(vce, "worker"))
    assert not REPORTED_CLIENT_ERRORS.filter(record(ray, "process_message"))
    assert REPORTED_CLIENT_ERRORS.filter(record(vce, "start_and_shutdown"))  # the engine itself failing: shown
    assert REPORTED_CLIENT_ERRORS.filter(record(vce, "worker", logging.WARNING))
    assert REPORTED_CLIENT_ERRORS.filter(record("/fedcsg/fl/strategy.py", "aggregate_train"))


def test_12_no_skipped_evaluation_warning_for_a_server_evaluated_arm() -> None:
    from flwr.serverapp.strategy import FedAvg

    from fedcsg.fl.flower_logs import SkippedFederatedEvaluation
    from fedcsg.fl.strategy import CSGFedAvg

    _, layout, _ = _small()
    with flower_lines() as lines:
        CSGFedAvg(layout, lr_fn=lambda r: 0.1)
        assert lines == []  # every arm evaluates on the server: Flower's warning would be noise
        FedAvg(fraction_evaluate=0.0)  # Flower still warns outside the strategy's construction
    assert lines == ["fraction_evaluate is set to 0.0. Federated evaluation will be skipped."]
    assert not any(isinstance(f, SkippedFederatedEvaluation) for f in logging.getLogger("flwr").filters)


# -- every run setting: a valid config or one line ------------------------------------------------

_FIELDS = {f.name.replace("_", "-"): type(getattr(RunConfig(), f.name)) for f in dataclasses.fields(RunConfig)}
_WORDS = [
    "csg",
    "fedavg+int8",
    "resnet20",
    "densenet40-k99999",
    "12x12x3x3",
    "0x0x3x3",
    "100000x100000x3x3",
    "1,2",
    "auto",
    ":1",
    "a:b",
]
_VALUES = {
    int: st.one_of(st.integers(-3, 70), st.integers(-(2**80), 2**80)),
    float: st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-5, 5)),
    str: st.one_of(st.text(max_size=10), st.sampled_from(_WORDS)),
    bool: st.booleans(),
}
_SETTING = st.sampled_from(sorted(_FIELDS)).flatmap(
    lambda key: st.tuples(
        st.just(key), st.one_of(_VALUES[_FIELDS[key]], _VALUES[str], st.none(), st.lists(st.integers(), max_size=2))
    )
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_SETTING, min_size=1, max_size=4))
def test_random_values_of_every_setting_give_a_config_or_one_line(pairs: list[tuple[str, object]]) -> None:
    try:
        cfg = RunConfig.from_mapping(dict(pairs))
    except ValueError as error:
        assert "\n" not in str(error) and str(error)
        return
    assert isinstance(cfg, RunConfig)
    for name, value in cfg.to_flower().items():  # what was accepted is finite and within its range
        if isinstance(value, float):
            assert math.isfinite(value), name
    assert 0 <= cfg.seed < SEED_LIMIT and np.all(np.array(cfg.seed_list) < SEED_LIMIT)


# -- issue 42: every size a user can type is bounded; odd characters and files are refused ---------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["deploy", "keys", "--nodes", "99999999999"],
            "nodes = 99,999,999,999 is not accepted: an integer in 1..10,000",
        ),
        (
            ["deploy", "certs", "--nodes", "99999999999"],
            "nodes = 99,999,999,999 is not accepted: an integer in 0..10,000",
        ),
        (["deploy", "certs", "--nodes", "-1"], "nodes = -1 is not accepted: an integer in 0..10,000 is"),
        (["deploy", "certs", "--host", "a\nb"], "host 'a\\nb' is not accepted: a DNS name or an IP address"),
        (["deploy", "certs", "--host", "a\x1bb"], "host 'a\\x1bb' is not accepted"),
    ],
)
def test_42_deploy_sizes_and_hosts(args: list[str], message: str, tmp_path: Path, cli: Cli) -> None:
    refused(cli, [*args, "--out", str(tmp_path / "out")], message, tmp_path)


def test_42_deploy_up_is_bounded_before_anything_is_made(tmp_path: Path) -> None:
    from fedcsg.deploy.federation import ensure_credentials

    with pytest.raises(ValueError, match=r"^nodes = 99,999,999,999 is not accepted: an integer in 1\.\.10,000 is$"):
        ensure_credentials(tmp_path, 99_999_999_999, ["127.0.0.1"])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--slice", "128x128x3x3"],
            "model resnet20 (csg, slice 128x128x3x3 / code-dim 8192, num-classes = 10, in-channels = 3) is not "
            "accepted: it would hold 1,275,354,595 parameters, above the bound of 500,000,000 per model",
        ),
        (
            ["--slice", "65x65x3x3", "--code-dim", "10"],
            "slice 65x65x3x3 is larger than every 3x3 conv of resnet20 (the largest is 64x64x3x3)",
        ),
        (["--slice", "１２x12x3x3"], "slice shape '１２x12x3x3' does not parse"),
        (["--slice", "12x12x3x٣"], "slice shape '12x12x3x٣' does not parse"),
    ],
)
def test_42_a_slice_larger_than_every_layer_or_not_ascii(args: list[str], message: str, cli: Cli) -> None:
    code, out, err = cli("params", "--model", "resnet20", *args)
    assert code == 2 and out == "" and err.count("\n") == 1 and message in err, err


def test_42_integer_options_take_ascii_digits_only(tmp_path: Path, cli: Cli) -> None:
    code, out, err = cli("params", "--model", "resnet20", "--code-dim", "٣")
    assert (
        code == 2
        and err == "fedcsg params: error: argument --code-dim: '٣' is not an integer (a positive integer is accepted)\n"
    )
    for args in (
        ["deploy", "certs", "--out", str(tmp_path / "c"), "--nodes", "٣"],
        ["bytes", "--model", "resnet20", "--seed", "٣"],
    ):
        code, out, err = cli(*args)
        assert code == 2 and err.endswith("'٣' is not an integer\n") and err.count("\n") == 1, err


@pytest.mark.parametrize("seeds", ["٣", "1,٣", "+3", "3_0", "1,,2"])
def test_42_seeds_in_ascii_digits_only(seeds: str, tmp_path: Path, data_env: Path, cli: Cli) -> None:
    refused(
        cli, ["run", "--seeds", seeds, "--out", str(tmp_path / "o")], f"seeds = {seeds!r} is not accepted", tmp_path
    )


def test_42_twenty_thousand_seeds_are_refused_at_once(tmp_path: Path, data_env: Path, cli: Cli) -> None:
    import time

    seeds = ",".join(map(str, range(20_000)))
    start = time.perf_counter()
    line = refused(
        cli, ["run", "--seeds", seeds, "--out", str(tmp_path / "o")], "characters) is not accepted", tmp_path
    )
    assert time.perf_counter() - start < 5 and len(line) < 300
    assert "at most 1000 comma-separated integers" in line
    start = time.perf_counter()
    many = RunConfig(seeds=",".join(map(str, range(1000))))
    assert len([many.replace(seed=s) for s in many.seed_list]) == 1000  # what a run's plan does, per seed
    assert time.perf_counter() - start < 5


def test_42_a_long_arm_name_is_cut_in_the_message(tmp_path: Path, data_env: Path, cli: Cli) -> None:
    line = refused(cli, ["compare", "--arms", "x" * 100_000, "--out", str(tmp_path / "o")], "unknown arm 'x", tmp_path)
    assert "... (100,000 characters): accepted are MODEL" in line and len(line) < 600


def test_42_seeds_as_an_integer_or_a_list_like_the_flag(tmp_path: Path) -> None:
    from fedcsg.spec.experiments import load_experiment

    assert RunConfig.from_mapping({"seeds": 3}).seed_list == [3] == RunConfig.from_mapping({"seeds": "3"}).seed_list
    toml = tmp_path / "e.toml"
    toml.write_text("seeds = [0, 1, 2]\n")
    assert load_experiment(toml).seed_list == [0, 1, 2]
    toml.write_text("seeds = 3\n")
    assert load_experiment(toml).seeds == "3"


def test_42_fault_probability_one_is_accepted_above_it_refused() -> None:
    assert RunConfig.from_mapping({"fault-probability": 1.0}).fault_probability == 1.0
    with pytest.raises(ValueError, match=r"fault-probability = 1.01 is not accepted: a number in \[0, 1\] is"):
        RunConfig.from_mapping({"fault-probability": 1.01})


def test_42_export_of_something_not_a_regular_file(tmp_path: Path, cli: Cli) -> None:
    fifo = tmp_path / "fifo" / "fifo"  # never read by refused's tree walk, which would block on it
    fifo.parent.mkdir()
    os.mkfifo(fifo)
    watched = tmp_path / "out"
    watched.mkdir()
    for path in ("/dev/zero", str(fifo)):
        refused(
            cli,
            ["export", "--checkpoint", path, "--format", "compact", "--out", str(watched / "m")],
            f"checkpoint {path!r} is not a regular file: accepted is a safetensors file",
            watched,
        )
    refused(cli, ["run", "--config", str(fifo)], f"config file {str(fifo)!r} is not a regular file", watched)


def test_42_bytes_of_a_deeplabv3_resnet_is_counted_not_refused(monkeypatch: pytest.MonkeyPatch, cli: Cli) -> None:
    """Listed in --help, so accepted: counted on Pascal VOC's 21 classes (the arms' traffic is
    replaced here: building a DeepLabV3-ResNet50 per arm takes minutes on two cores)."""
    import fedcsg.fl.traffic as traffic

    seen = []

    def fake(cfg: RunConfig, clients: int, model: ModelSettings) -> dict:
        seen.append((cfg.model, model.dataset, model.num_classes))
        return {"arm": cfg.arm, "wire_up": 10, "wire_down": 10, "payload_up": 10, "payload_down": 10}

    monkeypatch.setattr(traffic, "arm_traffic", fake)
    code, out, err = cli("bytes", "--model", "deeplabv3-resnet50", "--json")
    assert code == 0 and err == "", err
    assert set(seen) == {("deeplabv3-resnet50", "voc", 21)}
