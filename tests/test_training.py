"""Tests for fedcsg.nn.training."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedcsg.data.batches import TensorBatches
from fedcsg.data.readers import ImageData, load_split
from fedcsg.nn import training as T


@pytest.fixture(scope="module")
def cifar_train_subset(data_dir: Path) -> ImageData:
    return load_split("cifar10", "train", data_dir=data_dir, limit=400, seed=0)


def _linear_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))


def test_train_epoch_decreases_loss_on_real_images(cifar_train_subset: ImageData) -> None:
    device = torch.device("cpu")
    model = _linear_model()
    batches = TensorBatches(cifar_train_subset, batch_size=50, shuffle=True, seed=0)
    eval_batches = TensorBatches(cifar_train_subset, batch_size=200)
    before = T.evaluate(model, eval_batches, device)
    optimizer = T.make_optimizer(model, lr=0.005)
    history = [T.train_epoch(model, batches, optimizer, device) for _ in range(5)]
    after = T.evaluate(model, eval_batches, device)
    assert all(stats.num_examples == 400 for stats in history)
    assert all(0.0 <= stats.accuracy <= 1.0 and stats.seconds > 0 for stats in history)
    assert history[-1].loss < 0.7 * history[0].loss
    assert after.loss < 0.6 * before.loss
    assert after.accuracy > before.accuracy + 0.2


class _ModeRecorder(nn.Module):
    """A linear classifier that records the autograd and train/eval state of each forward call."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3 * 32 * 32, 10)
        self.calls: list[tuple[bool, bool, bool]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append((self.training, torch.is_grad_enabled(), torch.is_inference_mode_enabled()))
        return self.linear(x.flatten(1))


def test_modes_during_train_and_evaluate(cifar_train_subset: ImageData) -> None:
    model = _ModeRecorder()
    batches = TensorBatches(cifar_train_subset, batch_size=200)
    model.eval()
    T.train_epoch(model, batches, T.make_optimizer(model, lr=0.01), "cpu")
    assert model.calls == [(True, True, False)] * 2
    model.calls.clear()
    T.evaluate(model, batches, "cpu")
    # no_grad, not inference_mode: cached tensors must stay usable by later autograd code.
    assert model.calls == [(False, False, False)] * 2
    assert not model.training


def test_evaluate_matches_direct_computation(cifar_train_subset: ImageData) -> None:
    model = _linear_model(1)
    stats = T.evaluate(model, TensorBatches(cifar_train_subset, batch_size=64), "cpu")  # uneven last batch
    x, y = next(iter(TensorBatches(cifar_train_subset, batch_size=400)))
    with torch.no_grad():
        logits = model(x)
    assert stats.num_examples == 400
    assert stats.loss == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)
    assert stats.accuracy == int((logits.argmax(1) == y).sum()) / 400


def test_empty_batches_give_zero_examples() -> None:
    model = _linear_model()
    train = T.train_epoch(model, [], T.make_optimizer(model, lr=0.1), "cpu")
    assert (train.loss, train.accuracy, train.num_examples) == (0.0, 0.0, 0)
    evaluation = T.evaluate(model, [], "cpu")
    assert (evaluation.loss, evaluation.accuracy, evaluation.num_examples) == (0.0, 0.0, 0)


def test_make_optimizer_skips_frozen_parameters() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    model[0].weight.requires_grad_(False)
    optimizer = T.make_optimizer(model, lr=0.1)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    assert len(params) == 3 and all(p.requires_grad for p in params)
    group = optimizer.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.1, 0.9, 5e-4)
    with pytest.raises(ValueError, match="lr must be > 0, got 0"):
        T.make_optimizer(model, lr=0)
    with pytest.raises(ValueError, match="momentum must be >= 0"):
        T.make_optimizer(model, lr=0.1, momentum=-0.5)
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="Sequential has no parameter with requires_grad=True"):
        T.make_optimizer(model, lr=0.1)


def test_get_device() -> None:
    assert T.get_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert T.get_device().type == expected
    assert T.get_device("auto").type == expected
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="'cuda' requested but CUDA is not available"):
            T.get_device("cuda")
    with pytest.raises(ValueError, match="unknown device 'tpu'; accepted: auto, cpu, cuda"):
        T.get_device("tpu")


def test_set_seed_reproduces_all_generators() -> None:
    def draw() -> tuple[float, float, float]:
        return random.random(), float(np.random.rand()), float(torch.rand(()))

    T.set_seed(123)
    first = draw()
    T.set_seed(123)
    assert draw() == first
    T.set_seed(124)
    assert draw() != first
    with pytest.raises(ValueError, match="seed must be an integer in"):
        T.set_seed(-1)


@pytest.mark.parametrize(
    ("epoch", "expected"),
    [(0, 0.1), (4, 0.1), (5, 0.01), (7, 0.01), (8, 0.001), (9, 0.001), (10, 0.001)],
)
def test_step_lr_step_schedule_exact(epoch: int, expected: float) -> None:
    # total=10: full LR for epochs 0-4 (< 50%), /10 for 5-7 (< 75%), /100 from 8.
    assert T.step_lr(0.1, epoch, 10, "step") == expected


def test_step_lr_boundaries_and_other_schedules() -> None:
    assert [T.step_lr(1.0, e, 100, "step") for e in (49, 50, 74, 75)] == [1.0, 0.1, 0.1, 0.01]
    assert [T.step_lr(1.0, e, 3, "step") for e in (0, 1, 2, 3)] == [1.0, 1.0, 0.1, 0.01]
    assert T.step_lr(0.05, 37, 100, "constant") == 0.05
    assert T.step_lr(0.1, 0, 10, "cosine") == 0.1
    assert T.step_lr(0.1, 5, 10, "cosine") == 0.05
    assert T.step_lr(0.1, 10, 10, "cosine") == 0.0
    assert T.step_lr(1.0, 25, 100, "cosine") == pytest.approx((1 + np.cos(np.pi / 4)) / 2, abs=1e-15)
    with pytest.raises(ValueError, match="unknown lr schedule 'linear'; accepted: constant, step, cosine"):
        T.step_lr(0.1, 0, 10, "linear")
    with pytest.raises(ValueError, match="epoch_or_round 11 out of range"):
        T.step_lr(0.1, 11, 10, "step")
    with pytest.raises(ValueError, match="total must be an integer >= 1, got 0"):
        T.step_lr(0.1, 0, 0, "step")
