"""How a model's steps run on their device: ``torch.compile``, the channels-last memory format and
mixed precision (:class:`Execution`).

None of the three changes what a client trains or sends: parameters, optimizer state and payloads
stay fp32 and contiguous, and the bytes on the wire are the same. They change how fast a step runs
and, within floating-point rounding (and bf16/fp16 rounding for those precisions), its numbers.
The measurements behind the defaults are in docs/performance.md (``simulations/benchmarks/bench_train.py``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from fedcsg.nn.convert import ComputedConv2d
from fedcsg.nn.csg import clear_generated_cache

PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16")
COMPILE_MODES: tuple[str, ...] = ("off", "on", "auto")  # the run setting; "auto" is resolved per run (compile_pays)
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# Whether this CPU has the instructions of a reduced precision (oneDNN's own probes).
CPU_SUPPORTS: dict[str, Callable[[], bool]] = {
    "bf16": lambda: bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
    "fp16": lambda: bool(torch.ops.mkldnn._is_mkldnn_fp16_supported()),
}


@dataclass(frozen=True)
class CompileCost:
    """What compiling the training step costs and buys on one kind of device, measured: the cold
    compile's seconds and the train images/s of the step eager and compiled (channels-last, fp32)."""

    warm_up_seconds: float
    eager_images_per_second: float
    compiled_images_per_second: float


# compile = "auto" follows these measurements (docs/performance.md, "How a step runs"): ResNet-20 csg,
# batch 128, 2 threads, on this project's 2-core CPU, best of 3 interleaved rounds. A device type
# without a measurement (CUDA, until the GPU check has run on one) is not compiled under "auto".
MEASURED_COMPILE: dict[str, CompileCost] = {"cpu": CompileCost(40.0, 510.0, 444.0)}


def compile_pays(images_per_process: float, device_type: str) -> bool:
    """Whether compiling pays back within a run whose processes each train ``images_per_process``
    images of one model on a ``device_type`` device: the time it saves,
    ``images * (1/eager - 1/compiled)``, exceeds its warm-up (:data:`MEASURED_COMPILE`). Never where the
    compiled step is not faster, or where nothing was measured."""
    cost = MEASURED_COMPILE.get(device_type)
    if cost is None or cost.compiled_images_per_second <= cost.eager_images_per_second:
        return False
    saved = images_per_process * (1 / cost.eager_images_per_second - 1 / cost.compiled_images_per_second)
    return saved > cost.warm_up_seconds


def precision_problem(precision: str, device: torch.device) -> str:
    """Why ``precision`` cannot run on ``device`` ("" when it can)."""
    if precision not in PRECISIONS:
        return f"precision = {precision!r} is not accepted: one of {', '.join(PRECISIONS)} is"
    if precision == "fp32":
        return ""
    if device.type == "cuda":
        if precision == "bf16" and not torch.cuda.is_bf16_supported():
            return f"precision = 'bf16' is not supported by {torch.cuda.get_device_name(device)}: use fp16 or fp32"
        return ""
    if device.type == "cpu":
        if not CPU_SUPPORTS[precision]():
            return f"precision = {precision!r} is not supported by this CPU (no {precision} instructions): use fp32"
        return ""
    return f"precision = {precision!r} is not supported on device {device.type!r}: use fp32"


@dataclass(frozen=True)
class Execution:
    """How a model's training and evaluation steps run.

    Attributes
    ----------
    compile : bool
        Train through ``torch.compile`` with static shapes: one graph per model, mode and batch
        size. A pass's last, smaller batch runs eagerly instead of compiling a second graph, so no
        example is dropped (on CUDA the compiled step is captured as a CUDA graph,
        ``mode="reduce-overhead"``).
    channels_last : bool
        Keep the model's 4-d weights, the generated filters and the batches in the channels-last
        memory format.
    precision : {"fp32", "bf16", "fp16"}
        The autocast dtype of forward and backward; CSG generation, the optimizer and the payloads
        stay fp32; fp16 scales the loss (``torch.amp.GradScaler``).
    """

    compile: bool = False
    channels_last: bool = False
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision = {self.precision!r} is not accepted: one of {', '.join(PRECISIONS)} is")

    def check(self, device: torch.device) -> None:
        """Refuse a precision that ``device`` cannot run (one-line ValueError)."""
        if problem := precision_problem(self.precision, device):
            raise ValueError(problem)

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def place(self, model: nn.Module, device: torch.device) -> nn.Module:
        """Move ``model`` to ``device`` in this memory format, the filters its computed convs make included."""
        model.to(device=device, memory_format=self.memory_format)
        for module in model.modules():
            if isinstance(module, ComputedConv2d):
                module.memory_format = self.memory_format
        clear_generated_cache(model)
        return model

    def batch(self, x: torch.Tensor) -> torch.Tensor:
        """A batch in this memory format (image batches only)."""
        return x.contiguous(memory_format=self.memory_format) if self.channels_last and x.dim() == 4 else x

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        """The autocast region of a forward pass (a no-op for fp32)."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=_DTYPES[self.precision])

    def grad_scaler(self, device: torch.device) -> torch.amp.GradScaler | None:
        """The loss scaler of fp16 training (None otherwise)."""
        return torch.amp.GradScaler(device.type) if self.precision == "fp16" else None

    def compiled(self, model: nn.Module, device: torch.device) -> nn.Module | None:
        """The compiled twin of ``model`` (sharing its parameters), or None when not compiling.

        Compilation is lazy: the first call of the twin compiles. Keep the twin with the model, so
        that a process that trains the same model many times (a Ray actor serving many clients)
        compiles once.
        """
        if not self.compile:
            return None
        mode = "reduce-overhead" if device.type == "cuda" else None
        return torch.compile(model, dynamic=False, mode=mode)


FP32_EAGER = Execution()
