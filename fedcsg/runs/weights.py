"""Model weight files on disk, read without Flower: their formats, the digest and finiteness checks
every load makes, and loading the tensors into a model key by key.

A run's model file (:mod:`fedcsg.runs.model_file`) and a compact export (``fedcsg export --format
compact``) are safetensors files whose metadata carry ``format`` and a sha256 of their tensors
(:data:`fedcsg.io.DIGEST_KEY`). Nothing is unpickled.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fedcsg.io import DIGEST_KEY, tensors_digest
from fedcsg.nn.csg import generators

COMPACT_FORMAT = "fedcsg-compact"
CHECKPOINT_FORMAT = "fedcsg-checkpoint"  # a run's model file (fedcsg.runs.model_file)


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor of a safetensors file and its metadata; a one-line error for anything else."""
    from safetensors import SafetensorError, safe_open

    if path.exists() and not path.is_file():
        raise ValueError(f"checkpoint {str(path)!r} is not a regular file: accepted is a safetensors file")
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
