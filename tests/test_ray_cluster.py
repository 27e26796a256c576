"""`ray-address`: which Ray a run uses, the resource check before it starts, and where each client
ran. The run on a real two-node cluster is in test_simulation.py (it reuses that module's private-Ray
run as its reference); SIGTERM to a running `fedcsg run` is in test_reliability.py."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
from flwr.app import ConfigRecord, Message, RecordDict

from fedcsg.cli import main
from fedcsg.fl.ray_cluster import (
    NODE_ID_HEX_LENGTH,
    NODE_ID_KEY,
    PLACEMENT,
    check_client_resources,
    current_node_id,
    init_args,
    init_ray,
    placement_record,
    reported_placement,
)
from fedcsg.fl.traffic import SIMULATED_PLACEMENT, accounted_wire_bytes, round_messages
from fedcsg.runs.records import RoundRecord, comparable
from fedcsg.spec.checks import check_ray_address as check_address
from fedcsg.spec.config import RunConfig


def test_ray_address_values() -> None:
    for value in ("", "auto", "127.0.0.1:6379", "head.cluster.local:10001", "[::1]:6379"):
        assert check_address(value) == value
    for bad in ("local", "6379", ":6379", "head:", "head:port", "head:0", "head:70000", "ray://head:10001"):
        with pytest.raises(ValueError, match=rf"ray-address = {bad!r} is not accepted: \"\" \(a private Ray\)"):
            check_address(bad)
    with pytest.raises(ValueError, match="ray-address = 'nohost' is not accepted"):
        RunConfig(ray_address="nohost")


def test_the_default_is_a_private_ray_never_a_cluster_found_on_the_machine() -> None:
    """Ray's own default (no address) attaches to a `ray start` cluster or $RAY_ADDRESS; fedcsg's ""
    asks for "local", a new Ray of its own."""
    assert init_args("")["address"] == "local"
    assert init_args("auto")["address"] == "auto"
    assert init_args("10.0.0.5:6379")["address"] == "10.0.0.5:6379"


def test_ray_starts_as_flowers_backend_starts_it_with_the_users_code_shipped(monkeypatch: pytest.MonkeyPatch) -> None:
    """fedcsg initializes Ray itself before Flower's simulation engine (whose backend then uses it as it
    is), with the arguments Flower's ``RayBackend.init_ray`` passes (its runtime_env's PYTHONPATH: this
    process's sys.path, then $PYTHONPATH, exported here too) and the user's code in ``py_modules``, which
    Flower's ``init_args`` cannot carry. The call of the installed flwr is the reference."""
    import ray
    from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend
    from ray.exceptions import RuntimeEnvSetupError

    calls: list[dict] = []
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    exported = []
    for start in (
        lambda: RayBackend.init_ray(SimpleNamespace(init_args_key="init_args"), {"init_args": init_args("")}),
        lambda: init_ray(""),
    ):
        monkeypatch.setenv("PYTHONPATH", "/elsewhere")
        start()
        exported.append(os.environ["PYTHONPATH"])
    flower, ours = calls
    assert ours == flower and exported[0] == exported[1] == ours["runtime_env"]["env_vars"]["PYTHONPATH"]
    assert exported[0].endswith(os.pathsep + "/elsewhere") and flower["address"] == "local"
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    init_ray("10.0.0.5:6379", ["/code/mynets", "/code/helpers.py"])
    shipped = {"py_modules": ["/code/mynets", "/code/helpers.py"], "excludes": ["__pycache__"]}
    assert calls[2] == {**flower, "address": "10.0.0.5:6379", "runtime_env": {**flower["runtime_env"], **shipped}}

    def refuse(**kwargs: object) -> None:  # what ray.init raises for a zip over the GCS's limit
        raise RuntimeEnvSetupError(
            "Failed to upload module /code/mynets to the Ray cluster: Package size (600.00MiB)\n"
        )

    monkeypatch.setattr(ray, "init", refuse)
    with pytest.raises(ValueError) as error:
        init_ray("", ["/code/mynets"])
    assert str(error.value) == (
        "the model's code (/code/mynets) is not accepted: Ray could not ship it to its workers (Failed to upload "
        "module /code/mynets to the Ray cluster: Package size (600.00MiB)); accepted is a package Ray can zip and "
        "store (under 512 MiB; a .rayignore in it leaves files out)"
    )


def test_where_a_run_happens_is_not_what_it_computes() -> None:
    """A run may be resumed on a cluster after it started on a private Ray, and the other way round."""
    assert RunConfig(ray_address="10.0.0.5:6379").identity() == RunConfig().identity()
    assert "ray-address" in RunConfig().to_flower()


def test_a_client_must_fit_on_one_node() -> None:
    """Per node, not in total: two 1-CPU nodes cannot host a 2-CPU client (Flower's pool would be
    empty and the run would wait forever)."""
    check_client_resources(1, 0.0, [{"CPU": 1.0}, {"CPU": 1.0}])
    check_client_resources(2, 0.25, [{"CPU": 1.0}, {"CPU": 8.0, "GPU": 1.0}])
    with pytest.raises(ValueError) as error:
        check_client_resources(2, 0.0, [{"CPU": 1.0}, {"CPU": 1.0}])
    assert str(error.value) == (
        "client-num-cpus = 2 with client-num-gpus = 0 fits on no Ray node (2 node(s), at most 1 CPUs and "
        "0 GPUs on one): accepted are resources that one node has"
    )
    with pytest.raises(ValueError, match="client-num-gpus = 0.5 fits on no Ray node"):
        check_client_resources(1, 0.5, [{"CPU": 16.0}])


def _one_line_exit_2(argv: list[str], message: str, out: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    assert not out.exists()


def test_cli_refuses_a_client_larger_than_this_machine_before_anything_runs(
    data_env: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    argv = ["run", "--arm", "csg", "--out", str(out), "--set", "client-num-cpus=4096"]
    message = "client-num-cpus = 4096 with client-num-gpus = 0 fits on no Ray node (1 node(s)"
    _one_line_exit_2(argv, message, out, capsys)


def test_cli_refuses_an_address_where_no_head_answers(
    data_env: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ray would retry an unreachable head for minutes; fedcsg says so at once."""
    with socket.socket() as probe:  # a port that was free a moment ago, and nothing listens on it
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = tmp_path / "out"
    argv = ["run", "--arm", "csg", "--out", str(out), "--set", f"ray-address=127.0.0.1:{port}"]
    _one_line_exit_2(argv, f"ray-address = '127.0.0.1:{port}': no Ray head answers there", out, capsys)


def test_a_reply_names_the_ray_node_that_ran_it() -> None:
    """Outside Ray (this test, a deployed SuperNode) the node is ""; `fedcsg bytes` counts a reply
    from a Ray node (an id of Ray's width); a reply without the record names no node."""
    assert current_node_id() == "" and placement_record("cpu")[NODE_ID_KEY] == ""
    assert reported_placement(RecordDict({PLACEMENT: ConfigRecord({NODE_ID_KEY: "ab" * 28})})) == "ab" * 28
    assert reported_placement(RecordDict({})) == ""
    down, up = round_messages(RunConfig(model="fmnist-cnn", dataset="fashion-mnist", arm="csg"))
    assert len(up.content[PLACEMENT][NODE_ID_KEY]) == NODE_ID_HEX_LENGTH
    assert up.content[PLACEMENT] == SIMULATED_PLACEMENT
    without = Message(RecordDict({k: v for k, v in up.content.items() if k != PLACEMENT}), reply_to=down)
    # The record (node, "cpu", an empty CUDA_VISIBLE_DEVICES), its header and its content address in the
    # RecordDict: 284 bytes a reply.
    assert accounted_wire_bytes(up) - accounted_wire_bytes(without) == 284


def test_where_and_how_long_are_left_out_when_runs_are_compared() -> None:
    a = RoundRecord(1, test_accuracy=0.5, partitions=[0, 1], ray_nodes=["a", "b"], seconds=3.0).as_dict()
    b = RoundRecord(1, test_accuracy=0.5, partitions=[0, 1], ray_nodes=["c", "c"], seconds=9.0).as_dict()
    assert comparable([a]) == comparable([b]) and "ray_nodes" in a
    assert comparable([a]) != comparable([{**b, "partitions": [1, 0]}])
