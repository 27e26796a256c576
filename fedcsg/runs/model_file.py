"""Model files: a model's whole ``state_dict`` with the :class:`~fedcsg.spec.settings.ModelSettings` that
rebuild it, as safetensors metadata (str -> str). The ServerApp writes one at the end of a run
(:func:`save_global_model`); ``fedcsg export`` (:mod:`fedcsg.deploy.export`) reads them. Nothing is
ever pickled."""

from __future__ import annotations

from pathlib import Path

import torch
from flwr.app import ArrayRecord
from torch import nn

from fedcsg.io import DIGEST_KEY, tensors_digest
from fedcsg.runs.weights import CHECKPOINT_FORMAT
from fedcsg.spec.config import RunConfig
from fedcsg.spec.settings import ModelSettings
from fedcsg.wire.payload import PayloadLayout, load_payload

FORMAT_VERSION = "1"


def cpu_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` as safetensors wants it: contiguous CPU tensors that share no storage."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def save_checkpoint(
    model: nn.Module, path: str | Path, info: ModelSettings, extra: dict[str, str] | None = None
) -> Path:
    """Write ``model``'s whole ``state_dict`` and ``info`` to a safetensors checkpoint.

    Parameters
    ----------
    model
        A model built as ``info`` describes.
    path
        Output file (parents are made).
    info
        How to rebuild it.
    extra
        More str -> str metadata (e.g. run id, round); must not reuse :class:`ModelSettings` keys.
    """
    from safetensors.torch import save_file

    _check_fits(model, info)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": CHECKPOINT_FORMAT, "format-version": FORMAT_VERSION, **info.to_metadata()}
    clash = set(extra or {}) & set(metadata)
    if clash:
        raise ValueError(f"extra metadata keys {sorted(clash)} clash with the checkpoint's own keys")
    metadata.update({str(k): str(v) for k, v in (extra or {}).items()})
    tensors = cpu_tensors(model.state_dict())
    save_file(tensors, str(path), metadata={**metadata, DIGEST_KEY: tensors_digest(tensors)})
    return path


def _check_fits(model: nn.Module, info: ModelSettings) -> None:
    reference = info.build().state_dict()
    state = model.state_dict()
    if list(reference) != list(state) or any(reference[k].shape != state[k].shape for k in state):
        raise ValueError(f"the model does not match its info ({info.model}, arm {info.arm}): keys or shapes differ")


def save_global_model(
    out_dir: str | Path, cfg: RunConfig, arrays: ArrayRecord, name: str = "model.safetensors"
) -> Path:
    """Save a federated run's final global model as a checkpoint ``out_dir/name``.

    The hook for the end of :func:`fedcsg.fl.server_app.run_federation`: ``arrays`` is the final
    global ArrayRecord (``strategy.start(...).arrays``) packed with ``cfg``'s payload layout.

    Returns the checkpoint path, ready for ``fedcsg export --checkpoint``.
    """
    settings = cfg.model_settings()
    model = settings.build()
    load_payload(model, arrays, PayloadLayout.for_model(model, cfg.payload_packing))
    return save_checkpoint(model, Path(out_dir) / name, settings)
