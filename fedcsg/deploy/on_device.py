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

from fedcsg.fl.config import ModelSettings
from fedcsg.io import DIGEST_KEY, tensors_digest
from fedcsg.nn.csg import frozen_generator_keys, generators

COMPACT_FORMAT = "fedcsg-compact"
CHECKPOINT_FORMAT = "fedcsg-checkpoint"  # a run's model file (fedcsg.fl.model_file, which imports Flower)


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor of a safetensors file and its metadata; a one-line error for anything else."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{path} is not a safetensors file: {str(error).splitlines()[0]}") from None
    recorded = metadata.get(DIGEST_KEY)
    if recorded is None and (metadata.get("format") in (COMPACT_FORMAT, CHECKPOINT_FORMAT) or "model" in metadata):
        raise ValueError(
            f"{path} has no {DIGEST_KEY} metadata, so its weights cannot be checked: accepted is a file that "
            "fedcsg wrote (fedcsg export, or the model file of a run)"
        )
    if recorded is not None and tensors_digest(tensors) != recorded:
        raise ValueError(f"{path} is damaged or was altered: its tensors' sha256 differs from its {DIGEST_KEY}")
    check_finite(tensors, path)
    return tensors, metadata


def check_finite(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Raise a one-line ValueError naming the first floating-point tensor holding NaN or infinity."""
    for key, value in tensors.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ValueError(f"{path}: {key} holds non-finite weights (NaN or infinity); accepted are finite ones")


def load_state(model: nn.Module, tensors: dict[str, torch.Tensor], frozen: set[str], path: Path) -> None:
    """Load ``tensors`` into ``model``, every key checked against its shape and dtype; ``frozen``
    generator keys may be absent (the seed rebuilt them) but, if present, must be what it draws."""
    state = model.state_dict()
    missing = set(state) - set(tensors) - frozen
    if missing:
        raise ValueError(f"{path} lacks {len(missing)} tensor(s) of the model, e.g. {sorted(missing)[:3]}")
    for key, value in tensors.items():
        if value.shape != state[key].shape or value.dtype != state[key].dtype:
            raise ValueError(
                f"{path}: {key} is {value.dtype}{list(value.shape)}, the model's is "
                f"{state[key].dtype}{list(state[key].shape)}"
            )
        if key in frozen and not torch.equal(value, state[key]):
            # A stored frozen generator must be the one its seed draws, else the file and its
            # metadata disagree and a compact export (seed only) would not rebuild this model.
            seed = next((g.seed for g in generators(model).values()), None)
            raise ValueError(f"{path}: the stored frozen generator {key} is not the one seed {seed} draws")
    model.load_state_dict(tensors, strict=False)


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
