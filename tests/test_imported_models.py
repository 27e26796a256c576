"""Models named by import path (fedcsg.nn.imported_models): the user's own CNN (tests/user_cnn.py),
torchvision's, and every bad spelling answered in one line before anything is written. Through Ray:
tests/test_simulation.py (`own` run)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedcsg.nn.imported_models import code_to_ship, imported_builder
from fedcsg.spec.config import RunConfig

OWN = "tests.user_cnn:SmallCNN"
ROOT = Path(__file__).resolve().parents[1]


def test_a_users_cnn_is_counted_and_converted_like_a_registry_model(cli) -> None:
    code, out, err = cli(
        "params", "--model", OWN, "--slice", "8x8x3x3", "--code-dim", "32", "--in-channels", "1", "--json"
    )
    assert code == 0, err
    counts = json.loads(out)
    # 3x3 convs 1->16 (the stem, ordinary), 16->32 and 32->32, three BatchNorms, a 32->10 head.
    assert counts["plain"]["total"] == 144 + 4608 + 9216 + 2 * (16 + 32 + 32) + 330 == 14_458
    # Codes: (32/8) x (16/8) slices and (32/8) x (32/8), 32 numbers each; one 576 x 32 generator.
    assert (counts["csg"]["generator"], counts["csg"]["codes"]) == (576 * 32, (8 + 16) * 32)
    assert counts["csg"]["other"] == 14_458 - 4608 - 9216
    cfg = RunConfig(model=OWN, dataset="fashion-mnist", slice="8x8x3x3", code_dim=32, arm="csg-frozen")
    model = cfg.model_settings().build()
    assert type(model).__name__ == "SmallCNN" and model.features[3].__class__.__name__ == "CSGConv2d"


@pytest.mark.parametrize("arm", ["csg", "csg-frozen", "fedpara"])
def test_a_factory_that_returns_a_bare_sequential_trains(arm: str) -> None:
    # The generators cannot be a step of the user's nn.Sequential: it is held as `body` beside them.
    import torch

    cfg = RunConfig(
        model="tests.user_cnn:sequential_cnn", dataset="fashion-mnist", slice="8x8x3x3", code_dim=32, arm=arm
    )
    model = cfg.model_settings().build()
    assert type(model).__name__ == "Holder" and isinstance(model.body, torch.nn.Sequential)
    x = torch.randn(4, 1, 28, 28)
    loss = torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert model(x).shape == (4, 10) and torch.isfinite(loss)
    assert all(name.startswith(("body.", "csg_generators.")) for name, _ in model.named_parameters())


def test_csgify_refuses_a_bare_container() -> None:
    import torch

    from fedcsg.nn.csgify import CSGConfig, csgify

    bare = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.Conv2d(16, 16, 3, padding=1))
    with pytest.raises(ValueError, match="^csgify cannot add the generators to a bare Sequential .*child$"):
        csgify(bare, CSGConfig())
    assert not hasattr(bare, "csg_generators")


def test_a_torchvision_model_by_name(cli) -> None:
    code, out, err = cli("params", "--model", "torchvision:resnet18", "--json")
    assert code == 0, err
    counts = json.loads(out)
    assert counts["plain"]["total"] == 11_181_642  # torchvision's ResNet-18 with a 10-class head
    assert counts["slices"] == [{"shape": "12x12x3x3", "code_dim": 72}]
    assert counts["csg"]["total"] < counts["plain"]["total"] / 10


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (
            "nopkg.nets:Net",
            "model = 'nopkg.nets:Net' is not accepted: module 'nopkg.nets' does not import (ModuleNotFoundError: "
            "No module named 'nopkg'); accepted is package.module:factory",
        ),
        (
            "tests.user_cnn:Missing",
            "model = 'tests.user_cnn:Missing' is not accepted: module 'tests.user_cnn' holds nothing under 'Missing'",
        ),
        (
            "tests.user_cnn:WIDTH",
            "model = 'tests.user_cnn:WIDTH' is not accepted: module 'tests.user_cnn' holds an object of type int, "
            "not a callable",
        ),
        (
            "tests.user_cnn:not_a_model",
            "model = 'tests.user_cnn:not_a_model' is not accepted: not_a_model(10, 1) returned an object of type "
            "int, not a torch.nn.Module",
        ),
        ("tests.user_cnn:broken", "model = 'tests.user_cnn:broken': broken(10, 1) raised RuntimeError: the user's bug"),
        (
            "tests.user_cnn:depthwise_only",
            "model = 'tests.user_cnn:depthwise_only': the model has no conv that CSG can take for slice shapes 4x4x3x3 "
            "(an nn.Conv2d with groups=1, zero padding and a square kernel of a configured size, not the stem): "
            "body.0: skipped by name (ordinary layer); body.1: groups=8 (grouped/depthwise convs stay ordinary); "
            "body.2: no slice shape configured for 5x5 kernels",
        ),
        (
            "torchvision:resnet19",
            "model = 'torchvision:resnet19' is not accepted: torchvision has no classification model",
        ),
        (
            "torchvision:resnet18",
            "model = 'torchvision:resnet18' is not accepted for images of 1 channel(s): torchvision's models take "
            "3 (RGB)",
        ),
        (
            "my nets:Net",
            "model = 'my nets:Net' is not accepted: accepted are a registry model or package.module:factory",
        ),
    ],
)
def test_each_bad_model_is_one_line_exit_2_and_nothing_is_written(
    cli, data_env: Path, tmp_path: Path, model: str, message: str
) -> None:
    out = tmp_path / "run"
    code, stdout, err = cli(
        "compare", "--out", str(out), "--set", f"model='{model}'", "--set", "slice='4x4x3x3'", "--set", "code-dim=8"
    )
    assert code == 2 and stdout == "" and len(err.strip().splitlines()) == 1, err
    assert err.startswith("fedcsg compare: error: " + message), err
    assert not out.exists()


def test_the_code_ray_ships_is_the_top_level_package_or_module_that_is_not_installed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a Ray worker gets through the runtime_env's py_modules (fedcsg.fl.ray_cluster.init_ray): the
    directory of the named module's top-level package, or the file of a top-level module found in the
    current directory; nothing for what every node installs (torch, torchvision, fedcsg) or a registry
    name. The run through Ray that imports tests.user_cnn only from the shipped copy: test_simulation.py."""
    import sys

    monkeypatch.setattr(sys, "path", list(sys.path))
    for name in ("shipped_single", "shipped_pkg", "shipped_pkg.nets"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    (tmp_path / "shipped_single.py").write_text("from tests.user_cnn import SmallCNN\n")
    (tmp_path / "shipped_pkg").mkdir()
    (tmp_path / "shipped_pkg" / "__init__.py").write_text("")
    (tmp_path / "shipped_pkg" / "nets.py").write_text("from tests.user_cnn import SmallCNN\n")
    monkeypatch.chdir(tmp_path)
    assert code_to_ship(OWN) == [str(ROOT / "tests")]
    assert code_to_ship("shipped_single:SmallCNN") == [str(tmp_path / "shipped_single.py")]
    assert code_to_ship("shipped_pkg.nets:SmallCNN") == [str(tmp_path / "shipped_pkg")]
    for installed in ("resnet20", "torchvision:resnet18", "timm:resnet18", "torch.nn:Conv2d", "fedcsg.nn.models:x"):
        assert code_to_ship(installed) == [], installed
    with pytest.raises(ValueError, match=r"^model = 'nopkg.nets:Net' is not accepted: module 'nopkg.nets' does not"):
        code_to_ship("nopkg.nets:Net")


def test_a_module_on_sys_path_wins_over_one_in_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Ray worker has the shipped copy on its sys.path and its node's start directory as its current
    one: a stale module of the same name there must not shadow the copy. The current directory is
    searched only when sys.path holds no such module (a driver started by the `fedcsg` script)."""
    import sys

    shipped, stale = tmp_path / "shipped", tmp_path / "stale"
    for folder, width in ((shipped, 8), (stale, 4)):
        folder.mkdir()
        (folder / "shadowed_nets.py").write_text(f"from torch import nn\nNet = lambda c, i: nn.Conv2d(i, {width}, 3)\n")
    monkeypatch.setattr(sys, "path", [str(shipped), *sys.path])
    monkeypatch.delitem(sys.modules, "shadowed_nets", raising=False)
    monkeypatch.chdir(stale)
    assert imported_builder("shadowed_nets:Net")(10, 3).out_channels == 8
    monkeypatch.setattr(sys, "path", sys.path[1:])
    monkeypatch.delitem(sys.modules, "shadowed_nets")
    assert imported_builder("shadowed_nets:Net")(10, 3).out_channels == 4 and sys.path[0] == str(stale)


def test_the_python_api_refuses_what_the_cli_refuses_before_writing(tmp_path: Path) -> None:
    import fedcsg
    from tests.user_cnn import SmallCNN

    def local(num_classes: int, in_channels: int) -> SmallCNN:  # the actors cannot import it by name
        return SmallCNN(num_classes, in_channels)

    out = tmp_path / "run"
    with pytest.raises(ValueError, match="model factory '.*local' is not accepted: the Ray actors import it by module"):
        fedcsg.compare("quickstart", model=local, out=out)
    with pytest.raises(ValueError, match="unknown arm 'csg\\+int4'"):
        fedcsg.compare("quickstart", arms=["fedavg", "csg+int4"], out=out)
    with pytest.raises(ValueError, match="num-rounds"):
        fedcsg.run({"num-rounds": 0}, out=out)
    assert not out.exists()
    assert fedcsg.api.import_path(SmallCNN) == "tests.user_cnn:SmallCNN"


def test_importing_fedcsg_starts_neither_torch_nor_flower() -> None:
    import subprocess
    import sys

    code = "import sys, fedcsg; print(sorted(m for m in ('torch', 'flwr', 'ray') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"
