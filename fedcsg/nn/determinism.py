"""The ``deterministic`` run setting: the torch switches that make a rerun on the same GPU give the
same numbers, and their cost. On the CPU torch's kernels are deterministic already; docs/gpu.md says
what stays different between GPU runs and between a GPU and the CPU."""

from __future__ import annotations

import os

import torch

CUBLAS_WORKSPACE = ("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's requirement for deterministic GEMMs


def set_deterministic(on: bool) -> None:
    """Switch this process's torch to deterministic kernels (``on``) or to its defaults.

    ``on``: ``torch.use_deterministic_algorithms(True)`` (an op without a deterministic kernel
    raises), cuDNN deterministic and without autotuning (``benchmark`` off), TF32 off for matmuls
    and convolutions (float32 arithmetic throughout), and cuBLAS's fixed workspace
    (``CUBLAS_WORKSPACE_CONFIG``, read when cuBLAS starts: set before the first CUDA matmul).
    Off: nondeterministic kernels allowed again; cuDNN autotuning and TF32 are left as they are
    (torch's defaults: autotuning off, TF32 on for convolutions and off for matmuls, unless a
    precision setting changed them).
    """
    torch.use_deterministic_algorithms(on)
    torch.backends.cudnn.deterministic = on
    if on:
        name, value = CUBLAS_WORKSPACE
        os.environ.setdefault(name, value)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False


def deterministic_state() -> dict[str, bool | str | None]:
    """The switches :func:`set_deterministic` sets, as they are now in this process."""
    return {
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        CUBLAS_WORKSPACE[0]: os.environ.get(CUBLAS_WORKSPACE[0]),
    }
