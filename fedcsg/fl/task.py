"""The pieces the ClientApp and the ServerApp share: the arm's model and payload, local training and
server-side evaluation. Pure functions over a :class:`~fedcsg.spec.config.RunConfig`; which data each
party holds is :mod:`fedcsg.fl.run_data`'s."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from fedcsg.data.batches import TensorBatches, data_on
from fedcsg.data.readers import ImageData
from fedcsg.data.streaming import StreamedSplit
from fedcsg.nn.csg_factors import factor_keys, factor_lr_scales, freeze_factor
from fedcsg.nn.execution import Execution
from fedcsg.nn.segmentation import seg_evaluate, seg_train_epoch
from fedcsg.nn.training import PassStats, evaluate, make_optimizer, train_epoch, tune_malloc
from fedcsg.spec.config import RunConfig
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
