"""Local training and evaluation loops, device choice, seeding, learning-rate schedules, and the
process-level malloc settings of training workers (:func:`tune_malloc`).

The loops take any iterable of ``(x, y)`` batches (normally :class:`fedcsg.data.batches.TensorBatches`)
and keep running sums on the device, so a CUDA run synchronises once per epoch rather than once
per batch.
"""

from __future__ import annotations

import ctypes
import functools
import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedcsg.nn.execution import FP32_EAGER, Execution

SCHEDULES: tuple[str, ...] = ("constant", "step", "cosine")


@dataclass(frozen=True)
class PassStats:
    """Result of one pass over a set of batches: a training epoch or an evaluation.

    Attributes
    ----------
    loss : float
        Mean cross-entropy over the examples (0.0 when there were none).
    accuracy : float
        Fraction of examples whose arg-max prediction matched the label (0.0 when there were none);
        in training measured on the fly, with the weights of the moment, in train mode.
    num_examples : int
        Number of examples seen.
    seconds : float
        Wall-clock time of the pass.
    """

    loss: float
    accuracy: float
    num_examples: int
    seconds: float


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3


@functools.cache
def tune_malloc() -> bool:
    """Keep freed memory in the process instead of handing it back to the OS (glibc only).

    A training step allocates and frees the same large tensors every step (a CSG step also
    generates every conv weight anew). With glibc's defaults the freed pages are returned to the
    kernel and faulted in again on the next step: measured here, ~9,400 page faults and 27 ms of
    system time per ResNet-56 CSG step, and a plain ResNet-20 eval pass 1.7x slower than with the
    settings below. Returns False where glibc's mallopt is not available (the call is then a no-op).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return all(
        mallopt(param, value)
        for param, value in (
            (_M_MMAP_THRESHOLD, 32 * 2**20),  # glibc's maximum: larger blocks still come from mmap
            (_M_TRIM_THRESHOLD, 2**30),
            (_M_TOP_PAD, 256 * 2**20),
        )
    )


def get_device(preference: str = "auto") -> torch.device:
    """Choose the torch device.

    Parameters
    ----------
    preference : str, default "auto"
        ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:<index>"``.

    Returns
    -------
    torch.device

    Raises
    ------
    ValueError
        For an unknown preference, or CUDA requested where none is available.
    """
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if preference == "cpu":
        return torch.device("cpu")
    if preference == "cuda" or (preference.startswith("cuda:") and preference[5:].isdigit()):
        if not torch.cuda.is_available():
            raise ValueError(f"device {preference!r} requested but CUDA is not available; use 'auto' or 'cpu'")
        index = torch.device(preference).index
        if index is not None and index >= torch.cuda.device_count():
            raise ValueError(
                f"device {preference!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
        return torch.device(preference)
    raise ValueError(f"unknown device {preference!r}; accepted: auto, cpu, cuda, cuda:<index>")


def set_seed(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global generator and torch (CPU and all CUDA devices).

    Raises
    ------
    ValueError
        If ``seed`` is not an integer in ``[0, 2**32)`` (NumPy's accepted range).
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")
    random.seed(int(seed))
    np.random.seed(int(seed))
    torch.manual_seed(int(seed))


def make_optimizer(
    model: nn.Module,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    lr_scales: dict[str, float] | None = None,
) -> torch.optim.SGD:
    """SGD with momentum and weight decay over the model's trainable parameters.

    Parameters
    ----------
    model : torch.nn.Module
        Only parameters with ``requires_grad`` are optimised (frozen ones get no decay either).
    lr : float
        Learning rate, ``> 0``.
    momentum : float, default 0.9
        Momentum, ``>= 0``.
    weight_decay : float, default 5e-4
        L2 penalty, ``>= 0``.
    lr_scales : dict, optional
        Parameter name -> factor: that parameter trains at ``lr * factor`` (one param group per
        distinct factor, in first-seen order); every other at ``lr``. ``None`` or all factors 1.0
        give the single group of before.

    Returns
    -------
    torch.optim.SGD

    Raises
    ------
    ValueError
        For a bad hyperparameter, or a model with no trainable parameter.
    """
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    if not momentum >= 0:
        raise ValueError(f"momentum must be >= 0, got {momentum!r}")
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError(f"{type(model).__name__} has no parameter with requires_grad=True to optimise")
    scales = lr_scales or {}
    groups: dict[float, list[nn.Parameter]] = {}
    for name, p in named:
        groups.setdefault(scales.get(name, 1.0), []).append(p)
    if list(groups) == [1.0]:
        return torch.optim.SGD(groups[1.0], lr=lr, momentum=momentum, weight_decay=weight_decay)
    param_groups = [{"params": ps, "lr": lr * scale} for scale, ps in groups.items()]
    return torch.optim.SGD(param_groups, lr=lr, momentum=momentum, weight_decay=weight_decay)


def _sync(device: torch.device) -> None:
    # CUDA kernels run asynchronously; without this the timer would stop before the work does.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _run_pass(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    step: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    execution: Execution = FP32_EAGER,
) -> PassStats:
    """Run ``step(x, y) -> (logits, summed loss)`` on every batch (in ``execution``'s memory
    format), keeping the sums on the device (calling .item() per batch would stall a GPU every
    step), and time the pass."""
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    total_correct = torch.zeros((), dtype=torch.int64, device=device)
    num_examples = 0
    _sync(device)
    start = time.perf_counter()
    for x, y in batches:
        x = execution.batch(x.to(device, non_blocking=True))
        y = y.to(device, non_blocking=True)
        logits, loss_sum = step(x, y)
        total_loss += loss_sum
        total_correct += (logits.argmax(dim=1) == y).sum()
        num_examples += int(y.shape[0])
    _sync(device)
    seconds = time.perf_counter() - start
    if num_examples == 0:
        return PassStats(loss=0.0, accuracy=0.0, num_examples=0, seconds=seconds)
    return PassStats(
        loss=float(total_loss.item()) / num_examples,
        accuracy=int(total_correct.item()) / num_examples,
        num_examples=num_examples,
        seconds=seconds,
    )


def backward_and_step(
    loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None = None
) -> None:
    """Back-propagate ``loss`` and step ``optimizer``, through ``scaler`` when fp16 training has one
    (:meth:`~fedcsg.nn.execution.Execution.grad_scaler`)."""
    if scaler is None:
        loss.backward()
        optimizer.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()


def train_epoch(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    device: torch.device | str,
    execution: Execution = FP32_EAGER,
    compiled: nn.Module | None = None,
) -> PassStats:
    """Train ``model`` for one pass over ``batches`` with cross-entropy loss.

    Parameters
    ----------
    model : torch.nn.Module
        A classifier returning logits ``[B, num_classes]``; put in train mode here. It must
        already live on ``device``.
    batches : iterable of (x, y)
        ``float [B, C, H, W]`` inputs and ``int64 [B]`` labels (moved to ``device`` if elsewhere).
    optimizer : torch.optim.Optimizer
        Stepped once per batch.
    device : torch.device or str
        Where to compute.
    execution : Execution, default fp32, eager, contiguous
        Precision (autocast, and loss scaling for fp16) and memory format of the steps; the model
        must already be placed in that format (:meth:`Execution.place`).
    compiled : torch.nn.Module, optional
        ``model``'s compiled twin (:meth:`Execution.compiled`): it runs every batch of the pass's
        first batch size, and a smaller last batch runs on ``model`` (no second graph, no example
        dropped).

    Returns
    -------
    PassStats
    """
    device = torch.device(device)
    scaler = execution.grad_scaler(device)
    full_size = 0  # the pass's first batch size: the one the compiled twin runs

    def step(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        nonlocal full_size
        full_size = full_size or x.shape[0]
        forward = compiled if compiled is not None and x.shape[0] == full_size else model
        optimizer.zero_grad(set_to_none=True)
        with execution.autocast(device):
            logits = forward(x)
            loss = F.cross_entropy(logits, y)
        backward_and_step(loss, optimizer, scaler)
        return logits.detach(), loss.detach().double() * y.shape[0]

    model.train()
    return _run_pass(model, batches, device, step, execution)


def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device | str,
    execution: Execution = FP32_EAGER,
) -> PassStats:
    """Mean cross-entropy and top-1 accuracy of ``model`` over ``batches``.

    The model is left in eval mode. Gradients are disabled with ``torch.no_grad()`` rather than
    ``torch.inference_mode()``: CSG layers cache generated weights, and tensors created under
    inference mode could not be reused later by autograd-enabled training.

    ``model``, ``batches``, ``device`` and ``execution`` are as for :func:`train_epoch` (the model is
    not stepped, nor compiled); the :class:`PassStats` are of this pass.
    """
    device = torch.device(device)

    def step(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with execution.autocast(device):
            logits = model(x)
        # Summed, not averaged, so a smaller last batch is weighted correctly.
        return logits, F.cross_entropy(logits.float(), y, reduction="sum").double()

    model.eval()
    with torch.no_grad():
        return _run_pass(model, batches, device, step, execution)


def step_lr(base_lr: float, epoch_or_round: int, total: int, schedule: str) -> float:
    """Learning rate at a 0-based epoch (or federated round) of ``total``.

    Parameters
    ----------
    base_lr : float
        The initial learning rate.
    epoch_or_round : int
        0-based position, ``0 <= epoch_or_round <= total`` (Flower's 1-based ``server_round``
        is passed as ``server_round - 1``).
    total : int
        Number of epochs or rounds, ``>= 1``.
    schedule : {"constant", "step", "cosine"}
        ``"constant"``: ``base_lr``. ``"step"`` (the paper's): ``base_lr`` for the first half
        (``epoch < total / 2``), ``base_lr / 10`` until three quarters (``epoch < 3 total / 4``),
        ``base_lr / 100`` after. ``"cosine"``: ``base_lr * (1 + cos(pi * epoch / total)) / 2``,
        from ``base_lr`` at 0 down to 0 at ``total``.

    Returns
    -------
    float

    Raises
    ------
    ValueError
        For an unknown schedule or out-of-range position.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown lr schedule {schedule!r}; accepted: {', '.join(SCHEDULES)}")
    if isinstance(total, bool) or not isinstance(total, (int, np.integer)) or total < 1:
        raise ValueError(f"total must be an integer >= 1, got {total!r}")
    if isinstance(epoch_or_round, bool) or not isinstance(epoch_or_round, (int, np.integer)):
        raise ValueError(f"epoch_or_round must be an integer, got {epoch_or_round!r}")
    if not 0 <= epoch_or_round <= total:
        raise ValueError(f"epoch_or_round {epoch_or_round} out of range; accepted: 0 <= epoch_or_round <= {total}")
    if schedule == "constant":
        return float(base_lr)
    if schedule == "step":
        # Integer comparisons: no float rounding at the 50% / 75% boundaries.
        if 2 * epoch_or_round < total:
            return float(base_lr)
        if 4 * epoch_or_round < 3 * total:
            return base_lr / 10
        return base_lr / 100
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * epoch_or_round / total))
