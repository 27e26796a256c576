"""Issue 25: per-factor learning rates and the balanced CSG initialisation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedcsg.data.readers import load_split
from fedcsg.fl import task
from fedcsg.nn.csg import csg_layers, generators
from fedcsg.nn.csg_factors import factor_lr_scales
from fedcsg.nn.csgify import kaiming_std
from fedcsg.nn.models import build_model, default_csg_config
from fedcsg.nn.training import make_optimizer
from fedcsg.spec.config import RunConfig


def _resnet20(init: str = "kaiming", frozen: bool = False, seed: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("resnet20", csg=default_csg_config("resnet20", frozen=frozen, seed=seed, init=init))


def _group_lrs(optimizer: torch.optim.Optimizer) -> dict[int, float]:
    return {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}


def test_param_groups_get_lr_times_scale_per_factor() -> None:
    model = _resnet20()
    optimizer = make_optimizer(model, 0.05, 0.9, 5e-4, factor_lr_scales(model, codes=0.1, generator=2.0))
    lrs = _group_lrs(optimizer)
    names = dict(model.named_parameters())
    codes = {n for n in names if n.endswith(".codes")}
    gens = {n for n in names if n.startswith("csg_generators.")}
    assert len(codes) == 18 and gens == {"csg_generators.3x3.weight"}
    assert {lrs[id(names[n])] for n in codes} == {0.05 * 0.1}
    assert {lrs[id(names[n])] for n in gens} == {0.05 * 2.0}
    rest = set(names) - codes - gens
    assert rest and {lrs[id(names[n])] for n in rest} == {0.05}
    assert len(lrs) == len(names)  # every trainable parameter, once


def test_default_scales_leave_the_optimizer_as_before() -> None:
    model = _resnet20()
    cfg = RunConfig()
    assert (cfg.codes_lr_scale, cfg.generator_lr_scale) == (1.0, 1.0)
    scaled = make_optimizer(model, 0.05, 0.9, 5e-4, factor_lr_scales(model, 1.0, 1.0))
    plain = make_optimizer(model, 0.05, 0.9, 5e-4)
    assert len(scaled.param_groups) == len(plain.param_groups) == 1
    assert [id(p) for p in scaled.param_groups[0]["params"]] == [id(p) for p in model.parameters()]
    assert scaled.state_dict() == plain.state_dict()


def test_frozen_generator_is_not_in_any_group() -> None:
    model = _resnet20(frozen=True)
    scales = factor_lr_scales(model, codes=0.1, generator=0.5)
    assert not any(k.startswith("csg_generators.") for k in scales)
    optimizer = make_optimizer(model, 0.05, 0.9, 5e-4, scales)
    assert id(generators(model)["3x3"].weight) not in _group_lrs(optimizer)
    assert sorted(g["lr"] for g in optimizer.param_groups) == [0.05 * 0.1, 0.05]


@pytest.mark.parametrize("name", ["codes_lr_scale", "generator_lr_scale"])
@pytest.mark.parametrize("value", [0.0, -1.0, 100.5, float("nan"), float("inf")])
def test_bad_scale_rejected_in_one_line(name: str, value: float) -> None:
    kebab = name.replace("_", "-")
    with pytest.raises(ValueError, match=rf"^{kebab} = .* is not accepted: a number in \(0, 100\] is$"):
        RunConfig(**{name: value})
    assert getattr(RunConfig(**{name: 100.0}), name) == 100.0


def test_balanced_init_keeps_kaiming_std_with_comparable_factors() -> None:
    model = _resnet20("balanced")
    generator = generators(model)["3x3"].weight
    with torch.no_grad():
        for layer_name, layer in csg_layers(model):
            ratio = layer.weight.std().item() / kaiming_std(layer)
            assert abs(ratio - 1) < 0.1, f"{layer_name}: std/kaiming {ratio:.3f}"
            codes_over_generator = layer.codes.std().item() / generator.std().item()
            assert 0.5 < codes_over_generator < 2.0, f"{layer_name}: codes/generator std {codes_over_generator:.3f}"
    kaiming = _resnet20("kaiming")
    # kaiming leaves the codes 2-4x smaller than the generator (measured 0.25-0.51; balanced 0.68-1.39)
    generator_std = generators(kaiming)["3x3"].weight.std().item()
    ratios = [layer.codes.std().item() / generator_std for _, layer in csg_layers(kaiming)]
    assert min(ratios) < 0.3 and max(ratios) < 0.55


def test_balanced_keeps_frozen_generator_and_default_is_kaiming() -> None:
    balanced, kaiming, paper = (_resnet20(init, frozen=True) for init in ("balanced", "kaiming", "paper"))
    # rebuilt from the seed bit for bit: the same for every init
    assert torch.equal(generators(balanced)["3x3"].weight, generators(paper)["3x3"].weight)
    assert set(generators(balanced)["3x3"].weight.unique().tolist()) == {-0.5, 0.5}
    for (_, b), (_, k) in zip(csg_layers(balanced), csg_layers(kaiming), strict=True):
        assert torch.equal(b.codes, k.codes)
    assert RunConfig().csg_init == "kaiming"
    assert RunConfig(csg_init="balanced").csg_config().init == "balanced"
    # the default (kaiming) draw is untouched by the new init: trainable generator as drawn
    assert torch.equal(generators(_resnet20("kaiming"))["3x3"].weight, generators(_resnet20("paper"))["3x3"].weight)


def test_local_train_builds_the_optimizer_with_the_run_s_scales(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    built: list[torch.optim.SGD] = []

    def recording(*args: object) -> torch.optim.SGD:
        built.append(make_optimizer(*args))  # type: ignore[arg-type]
        return built[-1]

    monkeypatch.setattr(task, "make_optimizer", recording)
    model = _resnet20()
    data = load_split("cifar10", "train", str(data_dir), limit=8, seed=0)
    cfg = RunConfig(codes_lr_scale=0.1, generator_lr_scale=3.0)
    task.local_train(model, data, cfg, lr=0.05, epochs=1, batch_size=8, seed=0, device=torch.device("cpu"))
    lrs = _group_lrs(built[0])
    assert lrs[id(model.layer1[0].conv1.codes)] == pytest.approx(0.005, rel=1e-12)
    assert lrs[id(generators(model)["3x3"].weight)] == pytest.approx(0.15, rel=1e-12)
    assert lrs[id(model.fc.weight)] == 0.05
