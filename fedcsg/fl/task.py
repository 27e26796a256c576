"""The pieces the ClientApp and the ServerApp share: the arm's model, the client's data, local
training and server-side evaluation. Pure functions over a :class:`~fedcsg.fl.config.RunConfig`."""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import nn

from fedcsg.data.batches import TensorBatches
from fedcsg.data.partitions import partition_indices
from fedcsg.data.readers import ImageData, load_labels, load_split
from fedcsg.data.registry import get_spec
from fedcsg.fl.config import RunConfig
from fedcsg.fl.payload import PayloadLayout
from fedcsg.nn.csg import freeze_factor
from fedcsg.nn.models import build_model
from fedcsg.nn.training import EvalStats, TrainStats, evaluate, make_optimizer, train_epoch, tune_malloc

TRAIN_FACTOR_KEY = "train-factor"  # train-config entry: which CSG factor trains this round (fedcsg.nn.csg.FACTORS)


def build_arm_model(cfg: RunConfig, arm: str | None = None) -> nn.Module:
    """The model of ``arm`` (default: ``cfg.arm``), initialised from ``cfg.seed``.

    Every party builds the same model; for ``csg-frozen`` this includes the generator, which is
    drawn from the seed and never sent.
    """
    torch.manual_seed(cfg.seed)
    spec = get_spec(cfg.dataset)
    return build_model(cfg.model, spec.num_classes, spec.in_channels, csg=cfg.csg_config(arm))


def payload_layout(cfg: RunConfig, model: nn.Module) -> PayloadLayout:
    return PayloadLayout.for_model(model, cfg.payload_packing)


def _data_args(cfg: RunConfig) -> dict:
    return {"data_dir": cfg.data_dir or None, "hub_name": cfg.hub_name or None}


def train_rows(cfg: RunConfig) -> np.ndarray:
    """Rows of the train split that the federation shares: all, or a seeded subset of ``train-limit``."""
    labels = load_labels(cfg.dataset, "train", **_data_args(cfg))
    if cfg.train_limit == 0 or cfg.train_limit >= len(labels):
        return np.arange(len(labels))
    return np.sort(np.random.default_rng(cfg.seed).permutation(len(labels))[: cfg.train_limit])


@functools.lru_cache(maxsize=8)
def _partition_rows(cfg: RunConfig, partition_id: int, num_partitions: int) -> np.ndarray:
    rows = train_rows(cfg)
    labels = load_labels(cfg.dataset, "train", **_data_args(cfg))[rows]
    local = partition_indices(
        labels,
        num_partitions,
        partition_id,
        cfg.partitioner,
        alpha=cfg.dirichlet_alpha,
        shards_per_partition=cfg.shards_per_client,
        seed=cfg.seed,
    )
    return rows[np.asarray(local, dtype=np.int64)]


def partition_rows(cfg: RunConfig, partition_id: int, num_partitions: int) -> np.ndarray:
    """Train-split rows of one client; the same for every arm of a comparison (they depend only on
    the data, partitioner settings and seed)."""
    return _partition_rows(_data_key(cfg), partition_id, num_partitions)


def _data_key(cfg: RunConfig) -> RunConfig:
    # Only the data settings matter for partitions: normalise the rest so that the arms of a
    # comparison share cache entries.
    return RunConfig(
        dataset=cfg.dataset,
        data_dir=cfg.data_dir,
        hub_name=cfg.hub_name,
        partitioner=cfg.partitioner,
        dirichlet_alpha=cfg.dirichlet_alpha,
        shards_per_client=cfg.shards_per_client,
        train_limit=cfg.train_limit,
        seed=cfg.seed,
        num_clients=max(cfg.num_clients, 1),
    )


@functools.lru_cache(maxsize=4)
def _client_data(cfg: RunConfig, partition_id: int, num_partitions: int) -> ImageData:
    rows = partition_rows(cfg, partition_id, num_partitions)
    return load_split(cfg.dataset, "train", indices=rows, **_data_args(cfg))


def client_data(cfg: RunConfig, partition_id: int, num_partitions: int) -> ImageData:
    """Decoded train images of one client (a few recent clients are kept in memory per process;
    a client that is not sampled holds nothing)."""
    return _client_data(_data_key(cfg), partition_id, num_partitions)


@functools.lru_cache(maxsize=2)
def _test_data(cfg: RunConfig) -> ImageData:
    return load_split(cfg.dataset, "test", limit=cfg.test_limit or None, seed=cfg.seed, **_data_args(cfg))


def test_data(cfg: RunConfig) -> ImageData:
    """The test split (or a seeded subset of ``test-limit`` images) for server-side evaluation."""
    return _test_data(
        RunConfig(
            dataset=cfg.dataset, data_dir=cfg.data_dir, hub_name=cfg.hub_name, test_limit=cfg.test_limit, seed=cfg.seed
        )
    )


def local_train(
    model: nn.Module,
    data: ImageData,
    cfg: RunConfig,
    *,
    lr: float,
    epochs: int,
    batch_size: int,
    seed: int,
    device: torch.device,
    factor: str = "all",
) -> TrainStats:
    """Train ``model`` on a client's data for ``epochs`` with a fresh SGD optimizer.

    ``factor`` (one of :data:`fedcsg.nn.csg.FACTORS`) limits which CSG factor trains: the other is
    left out of the optimizer (no step, decay or momentum) and comes back bit-identical.
    Returns the stats of the last epoch, with ``seconds`` summed over all epochs.
    """
    tune_malloc()
    model.to(device)
    batches = TensorBatches(data, batch_size, shuffle=True, augment=True, seed=seed, device=device)
    seconds, stats = 0.0, None
    with freeze_factor(model, factor):
        optimizer = make_optimizer(model, lr, cfg.momentum, cfg.weight_decay)
        for _ in range(epochs):
            stats = train_epoch(model, batches, optimizer, device)
            seconds += stats.seconds
    assert stats is not None
    return TrainStats(stats.loss, stats.accuracy, stats.num_examples, seconds)


def evaluate_model(model: nn.Module, data: ImageData, cfg: RunConfig, device: torch.device) -> EvalStats:
    tune_malloc()
    model.to(device)
    return evaluate(model, TensorBatches(data, cfg.eval_batch_size, device=device), device)
