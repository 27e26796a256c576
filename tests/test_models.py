"""The model zoo, the paper's parameter counts, and the `fedcsg params` command."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable

import pytest
import torch

from fedcsg.cli import main
from fedcsg.nn.csg import csg_layers
from fedcsg.nn.csgify import materialize
from fedcsg.nn.models import MODELS, build_model, default_csg_config
from fedcsg.nn.params import count_parameters

# The paper's Table (CIFAR-10, option-A ResNets): plain, 12x12x3x3 / 72, 16x16x3x3 / 128.
PAPER_COUNTS = {
    "resnet20": (269_722, 115_426, 312_218),
    "resnet32": (464_154, 130_434, 323_866),
    "resnet56": (853_018, 160_450, 347_162),
    "resnet110": (1_727_962, 227_986, 399_578),
}


@pytest.mark.parametrize("name", PAPER_COUNTS)
def test_paper_parameter_counts(name: str) -> None:
    plain, small, large = PAPER_COUNTS[name]
    assert count_parameters(build_model(name)).total == plain
    counts = count_parameters(build_model(name, csg=default_csg_config(name, "12x12x3x3", 72)))
    assert counts.total == small
    assert counts.generator == 93_312
    assert counts.total == counts.generator + counts.codes + counts.other
    counts = count_parameters(build_model(name, csg=default_csg_config(name, "16x16x3x3", 128)))
    assert counts.total == large
    assert counts.generator == 294_912


def test_frozen_generator_sendable_count() -> None:
    counts = count_parameters(build_model("resnet56", csg=default_csg_config("resnet56", frozen=True, seed=3)))
    assert counts.total == 160_450
    assert counts.sendable == 67_138
    # BN running mean/var (2 x 2,032 channels) and 55 batch counters: buffers, not parameters.
    assert counts.buffers == 4_119


def test_default_code_dim_follows_paper_ratio() -> None:
    config = default_csg_config("resnet20", "16x16x3x3")
    assert config.slices[0].code_dim == 128


def _input_for(name: str) -> torch.Tensor:
    return torch.randn(2, 1, 28, 28) if name == "fmnist-cnn" else torch.randn(2, 3, 32, 32)


@pytest.mark.parametrize("name", [*MODELS, "densenet40-k12"])
def test_every_model_converts_trains_and_materializes(name: str) -> None:
    torch.manual_seed(0)
    x = _input_for(name)
    plain = build_model(name, num_classes=7, in_channels=x.shape[1])
    model = build_model(name, num_classes=7, in_channels=x.shape[1], csg=default_csg_config(name))
    assert list(csg_layers(model))
    out = model(x)
    assert out.shape == (2, 7)
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    plain_counts, csg_counts = count_parameters(plain), count_parameters(model)
    # Generated filters replace stored ones; a small model may not repay the generator itself,
    # but the per-layer codes always cost less than the filters they replace.
    assert csg_counts.codes + csg_counts.other < plain_counts.total
    if name != "densenet40-k12":
        assert csg_counts.total < plain_counts.total
    model.eval()
    with torch.no_grad():
        assert (materialize(model)(x) - model(x)).abs().max().item() <= 1e-5


def test_bad_model_options() -> None:
    with pytest.raises(ValueError, match="unknown model 'resnet21'"):
        build_model("resnet21")
    with pytest.raises(ValueError, match="num_classes must be a positive integer, got 0"):
        build_model("resnet20", num_classes=0)
    with pytest.raises(ValueError, match="slice shape '12x12' does not parse"):
        default_csg_config("resnet20", "12x12")
    with pytest.raises(ValueError, match="code dim must be a positive integer, got 0"):
        default_csg_config("resnet20", "12x12x3x3", 0)


def test_params_command_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["params", "--model", "resnet56", "--frozen-generator", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["plain"]["total"] == 853_018
    assert result["csg"]["total"] == 160_450
    assert result["csg"]["sendable"] == 67_138
    assert result["slices"] == [{"shape": "12x12x3x3", "code_dim": 72}]
    assert result["reduction"] == pytest.approx(853_018 / 160_450)
    assert result["sendable_reduction"] == pytest.approx(853_018 / 67_138)


def test_params_command_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["params", "--model", "resnet20", "--slice", "16x16x3x3", "--code-dim", "128"]) == 0
    out = capsys.readouterr().out
    assert "312,218" in out and "269,722" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "resnet20", "--slice", "12x12"], "slice shape '12x12' does not parse"),
        (["--model", "resnet20", "--code-dim", "0"], "argument --code-dim: 0 is not positive"),
        (["--model", "vgg11"], "unknown model 'vgg11'"),
    ],
)
def test_params_command_bad_input(args: list[str], message: str, cli: Callable[..., tuple[int, str, str]]) -> None:
    code, out, err = cli("params", *args)
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0]


def test_params_command_bad_input_through_the_console_entry_point() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "fedcsg.cli", "params", "--model", "vgg11"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown model 'vgg11'" in lines[0]
