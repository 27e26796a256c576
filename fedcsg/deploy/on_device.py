"""On a device: load a compact model file and predict, with torch and safetensors alone.

A device that only runs inference installs torch, safetensors and fedcsg; it never imports Flower,
Ray, Hugging Face ``datasets`` or matplotlib, and neither does anything this module imports (a test
checks ``sys.modules`` in a fresh interpreter). The compact file
(``fedcsg export --format compact``) holds the generator (or, for a frozen one, only its seed), the
codes and the ordinary layers; :func:`load_compact` rebuilds the CSG model from its metadata and
generates the filters on the device, once, at the first forward pass in eval mode.

Example::

    from fedcsg.deploy.on_device import load_compact, predict

    model, info, metadata = load_compact("model-csg.compact.safetensors")
    labels = predict(model, images, metadata)   # images: uint8 [N, H, W, C] or [N, C, H, W]

The file is read with safetensors: nothing is unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from fedcsg.nn.csg import frozen_generator_keys
from fedcsg.runs.weights import COMPACT_FORMAT, load_state, read_safetensors
from fedcsg.spec.settings import ModelSettings


def load_compact(path: str | Path) -> tuple[nn.Module, ModelSettings, dict[str, str]]:
    """The model of a compact file, in eval mode on the CPU, how it was built, and the file's
    metadata (``mean``, ``std`` and ``input`` say what it takes)."""
    path = Path(path)
    tensors, metadata = read_safetensors(path)
    if metadata.get("format") != COMPACT_FORMAT:
        raise ValueError(
            f"{path} is not a compact model file (format {metadata.get('format')!r}); accepted: "
            f"{COMPACT_FORMAT!r}, as `fedcsg export --format compact` writes it"
        )
    info = ModelSettings.from_mapping(metadata)
    model = info.build()
    load_state(model, tensors, frozen_generator_keys(model), path)
    return model.eval(), info, metadata


def predict(model: nn.Module, images: torch.Tensor, metadata: dict[str, str]) -> torch.Tensor:
    """Class indices for ``images``: uint8 ``[N, H, W, C]`` or ``[N, C, H, W]`` as stored, scaled to
    [0, 1] and normalised with the file's ``mean`` and ``std``."""
    mean, std = (torch.tensor(json.loads(metadata[key]), dtype=torch.float32) for key in ("mean", "std"))
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"images must be uint8 [N, H, W, C] or [N, C, H, W], got {images.dtype}{list(images.shape)}")
    if images.shape[1] != mean.numel():
        images = images.permute(0, 3, 1, 2)
    x = (images.float() / 255 - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
    with torch.no_grad():
        return model(x).argmax(dim=1)
