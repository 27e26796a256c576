"""How a torch device is named in records: ``cpu``, or ``cuda:N`` with the device's name."""

from __future__ import annotations

import torch


def describe(device: torch.device | str) -> str:
    """``cpu``, or ``cuda:N NAME`` (e.g. ``cuda:0 NVIDIA H100 80GB HBM3``) for a CUDA device; the index
    is the one this process sees (after CUDA_VISIBLE_DEVICES)."""
    device = torch.device(device)
    if device.type != "cuda":
        return device.type
    index = device.index if device.index is not None else torch.cuda.current_device()
    return f"cuda:{index} {torch.cuda.get_device_name(index)}"


def on_cpu(description: str) -> bool:
    """Whether a :func:`describe` string names the CPU."""
    return description == "cpu"
