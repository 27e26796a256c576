"""The pieces the ClientApp and the ServerApp share: the arm's model, the client's data, local
training and server-side evaluation. Pure functions over a :class:`~fedcsg.spec.config.RunConfig`."""

from __future__ import annotations

import functools
from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from fedcsg.data.batches import TensorBatches, data_on
from fedcsg.data.partitions import partition_indices
from fedcsg.data.readers import ImageData, load_labels, load_split
from fedcsg.data.registry import ANY_SIZE_FORMATS, FOLDER_SETS, resolve_source, sized_spec
from fedcsg.data.streaming import StreamedSplit
from fedcsg.nn.csg_factors import factor_keys, factor_lr_scales, freeze_factor
from fedcsg.nn.execution import Execution
from fedcsg.nn.segmentation import seg_evaluate, seg_train_epoch
from fedcsg.nn.training import PassStats, evaluate, make_optimizer, train_epoch, tune_malloc
from fedcsg.spec.config import RunConfig
from fedcsg.spec.settings import DataSettings
from fedcsg.wire.payload import PayloadLayout


def build_arm_model(cfg: RunConfig, arm: str | None = None) -> nn.Module:
    """The model of ``arm`` (default: ``cfg.arm``), initialised from ``cfg.seed``.

    Every party builds the same model; for ``csg-frozen`` this includes the generator, which is
    drawn from the seed and never sent.
    """
    return cfg.model_settings(arm).build()


def payload_layout(cfg: RunConfig, model: nn.Module) -> PayloadLayout:
    """The arm's payload: what a checkpoint and an exported model hold, and what travels while the
    generator of a csg-warm arm trains."""
    return PayloadLayout.for_model(model, cfg.payload_packing)


def round_layout(cfg: RunConfig, model: nn.Module, server_round: int) -> PayloadLayout:
    """What travels in ``server_round``: the arm's payload, without a csg-warm arm's generator once it
    froze (after round :attr:`~fedcsg.spec.config.RunConfig.frozen_after`; each node holds it then)."""
    if 0 < cfg.frozen_after < server_round:
        return PayloadLayout.for_model(model, cfg.payload_packing, held=tuple(factor_keys(model)["generator"]))
    return payload_layout(cfg, model)


def train_rows(data: DataSettings) -> np.ndarray:
    """Rows of the train split that the federation shares: all, or a seeded subset of ``train-limit``."""
    labels = load_labels(data.dataset, "train", **data.source)
    if data.train_limit == 0 or data.train_limit >= len(labels):
        return np.arange(len(labels))
    return np.sort(np.random.default_rng(data.seed).permutation(len(labels))[: data.train_limit])


def data_problem(data: DataSettings) -> str:
    """Why this process cannot open the labels of both splits of ``data`` ("" if it can): the check
    each Ray node runs before a run's first round (:func:`fedcsg.fl.ray_cluster.cluster_resources`)."""
    try:
        for split in ("train", "test"):
            load_labels(data.dataset, split, **data.source)
    except Exception as error:  # noqa: BLE001 - the node reports whatever stops it
        return " ".join(str(error).split()) or type(error).__name__
    return ""


@functools.lru_cache(maxsize=8)
def _partition_rows(data: DataSettings, partition_id: int, num_partitions: int) -> np.ndarray:
    rows = train_rows(data)
    labels = load_labels(data.dataset, "train", **data.source)[rows]
    local = partition_indices(
        labels,
        num_partitions,
        partition_id,
        data.partitioner,
        alpha=data.dirichlet_alpha,
        shards_per_partition=data.shards_per_client,
        seed=data.seed,
    )
    return rows[np.asarray(local, dtype=np.int64)]


def partition_rows(cfg: RunConfig, partition_id: int, num_partitions: int) -> np.ndarray:
    """Train-split rows of one client; the same for every arm of a comparison (they depend only on
    the data settings, :class:`~fedcsg.spec.settings.DataSettings`, which also key the caches)."""
    return _partition_rows(cfg.data_settings, partition_id, num_partitions)


@functools.lru_cache(maxsize=4)
def _client_data(data: DataSettings, partition_id: int, num_partitions: int) -> ImageData:
    rows = _partition_rows(data, partition_id, num_partitions)
    return load_split(data.dataset, "train", indices=rows, seed=data.seed, image_size=data.image_size, **data.source)


def client_data(cfg: RunConfig, partition_id: int, num_partitions: int) -> ImageData | StreamedSplit:
    """The train data of one client, at the run's ``image-size``: an any-size set's rows in its
    parquet shards, streamed by ``loader-workers`` processes while it trains (a fresh crop every
    epoch, :mod:`fedcsg.data.streaming`); otherwise, or with ``loader-workers = 0``, the decoded
    images (a few recent clients kept in memory per process; an any-size set's training crops then
    drawn once, from the run's data seed and the row, when they are decoded)."""
    data = cfg.data_settings
    if cfg.loader_workers > 0 and data.dataset not in FOLDER_SETS:
        source = resolve_source(data.dataset, data.data_dir or None, hub_name=data.hub_name or None)
        if source.kind in ANY_SIZE_FORMATS:
            rows = np.sort(_partition_rows(data, partition_id, num_partitions))
            spec = sized_spec(data.dataset, data.image_size)
            return StreamedSplit(source.files("train"), rows, spec, data.seed, cfg.loader_workers)
    return _client_data(data, partition_id, num_partitions)


@functools.lru_cache(maxsize=2)
def _local_data(data: DataSettings) -> ImageData:
    return load_split(data.dataset, "train", seed=data.seed, image_size=data.image_size, **data.source)


def local_data(cfg: RunConfig) -> ImageData:
    """A device's own train data: the whole train split of the node's ``data-dir`` (no partitions,
    no ``train-limit``), at the run's ``image-size``."""
    return _local_data(cfg.data_settings)


@functools.lru_cache(maxsize=2)
def _test_data(data: DataSettings) -> ImageData:
    limit = data.test_limit or None
    return load_split(data.dataset, "test", limit=limit, seed=data.seed, image_size=data.image_size, **data.source)


def test_data(cfg: RunConfig) -> ImageData:
    """The test split (or a seeded subset of ``test-limit`` images) for server-side evaluation."""
    return _test_data(cfg.data_settings)


def placed(model: nn.Module, cfg: RunConfig, device: torch.device) -> Execution:
    """Check the run's :meth:`~fedcsg.spec.config.RunConfig.execution` on ``device``, place ``model``
    there in its memory format, and return it."""
    execution = cfg.execution(device.type)
    execution.check(device)
    execution.place(model, device)
    return execution


def local_train(
    model: nn.Module,
    data: ImageData | StreamedSplit,
    cfg: RunConfig,
    *,
    lr: float,
    epochs: int,
    batch_size: int,
    seed: int,
    device: torch.device,
    factor: str = "all",
    compiled: nn.Module | None = None,
) -> PassStats:
    """Train ``model`` on a client's data for ``epochs`` with a fresh SGD optimizer, in the run's
    :meth:`~fedcsg.spec.config.RunConfig.execution` (through ``compiled``, the model's compiled twin,
    when the run compiles).

    ``factor`` (one of :data:`fedcsg.nn.csg_factors.FACTORS`) limits which CSG factor trains: the other is
    left out of the optimizer (no step, decay or momentum) and comes back bit-identical.
    Returns the stats of the last epoch, with ``seconds`` summed over all epochs. On a GPU the
    partition moves there once for the round (:func:`~fedcsg.data.batches.data_on`); a streamed
    one is read by its loader (:meth:`~fedcsg.data.streaming.StreamedSplit.batches`).
    """
    tune_malloc()
    execution = placed(model, cfg, device)
    if isinstance(data, StreamedSplit):
        batches: Iterable[tuple[torch.Tensor, torch.Tensor]] = data.batches(batch_size, seed, device)
    else:
        batches = TensorBatches(data_on(data, device), batch_size, shuffle=True, augment=True, seed=seed, device=device)
    seconds, stats = 0.0, None
    with freeze_factor(model, factor):
        scales = factor_lr_scales(model, cfg.codes_lr_scale, cfg.generator_lr_scale)
        optimizer = make_optimizer(model, lr, cfg.momentum, cfg.weight_decay, scales)
        for _ in range(epochs):
            if is_segmentation(data):
                stats = seg_train_epoch(model, batches, optimizer, device, data.spec.num_classes)
            else:
                stats = train_epoch(model, batches, optimizer, device, execution, compiled)
            seconds += stats.seconds
    assert stats is not None
    return PassStats(stats.loss, stats.accuracy, stats.num_examples, seconds)


def evaluate_model(model: nn.Module, data: ImageData, cfg: RunConfig, device: torch.device) -> PassStats:
    """Loss and accuracy (mean IoU for segmentation) of ``model`` on ``data``, on ``device``, in the run's
    precision and memory format (never compiled); ``data`` already there (:func:`~fedcsg.data.batches.data_on`,
    as the server keeps its test set) is not copied."""
    tune_malloc()
    execution = placed(model, cfg, device)
    batches = TensorBatches(data, cfg.eval_batch_size, device=device)
    if is_segmentation(data):
        return seg_evaluate(model, batches, device, data.spec.num_classes)
    return evaluate(model, batches, device, execution)


def is_segmentation(data: ImageData | StreamedSplit) -> bool:
    """Whether ``data``'s labels are per-pixel masks: trained with the per-pixel loss and evaluated by
    mean IoU, which then stands in every record, report and plot where a classifier's accuracy does."""
    return data.spec.task == "segmentation"
