"""Model files for devices: checkpoints in, compact / TorchScript / ONNX files out.

Input: a *checkpoint*, a safetensors file of a model's ``state_dict`` whose metadata (a str -> str
map) says how to rebuild the model (:class:`ModelSettings`), written by
:func:`~fedcsg.runs.model_file.save_checkpoint` or, at the end of a federated run, by
:func:`~fedcsg.runs.model_file.save_global_model`. Also accepted: a bare payload file (the
arm's payload, flat- or per-tensor-packed, as the ServerApp sends it and checkpoints it under
``RUN/state/``) when the run directory it sits in gives the settings (``arms/ARM.json`` or
``state/ARM.json``), and a run directory itself (its last checkpoint). Nothing is ever unpickled:
tensors come from safetensors only.

Outputs (:func:`export_model`):

``compact``
    The smallest file that rebuilds the model exactly: for a CSG model the generator (or, for a
    frozen generator, only its seed, in the metadata), the codes, and the ordinary layers with
    their BatchNorm buffers; never a generated filter. safetensors.
``torchscript``
    The materialized plain model (generated filters written out as ordinary conv weights), traced,
    for PyTorch Mobile / libtorch.
``onnx``
    The same plain model as ONNX (opset 17, dynamic batch) for onnxruntime and other runtimes.

The exported inference models take what the PyTorch model takes: ``float32 [N, C, H, W]``
normalised with the data set's mean and std (recorded in each file's metadata).
"""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord
from torch import nn

from fedcsg.data.registry import FOLDER_SETS, DatasetSpec, get_spec
from fedcsg.io import DIGEST_KEY, tensors_digest, writable_dir
from fedcsg.nn.csg import frozen_generator_keys, generators, is_csg
from fedcsg.nn.csgify import materialize
from fedcsg.runs.checkpoint import read_state
from fedcsg.runs.layout import ARMS_DIR, STATE_DIR, arm_record_files, state_files
from fedcsg.runs.model_file import FORMAT_VERSION, cpu_tensors
from fedcsg.runs.records import read_arm_record
from fedcsg.runs.weights import CHECKPOINT_FORMAT, COMPACT_FORMAT, check_finite, load_state, read_safetensors
from fedcsg.spec.arms import MODELS, arm_of_stem, file_stem
from fedcsg.spec.config import RunConfig, with_added_settings
from fedcsg.spec.settings import ModelSettings
from fedcsg.wire.payload import PayloadLayout, load_payload

EXPORT_FORMATS = ("compact", "torchscript", "onnx")
SUFFIXES = {"compact": ".compact.safetensors", "torchscript": ".pt", "onnx": ".onnx"}
ONNX_OPSET = 17


# ------------------------------------------------------------------------------------- loading


def recorded_run_config(run_dir: Path, arm: str | None) -> dict[str, Any] | None:
    """The run config (kebab-case, with its ``arm``) that a run directory records for ``arm``: from
    ``arms/ARM.json``, else the ServerApp's ``state/ARM.json``; None if it records none.

    Raises ValueError when ``arm`` is None and the directory holds several arms.
    """
    for sub, records in ((ARMS_DIR, arm_record_files(run_dir)), (STATE_DIR, state_files(run_dir))):
        if arm is not None:
            records = [r for r in records if arm_of_stem(r.stem) == arm]
        if len(records) > 1:
            names = [arm_of_stem(r.stem) for r in records]
            raise ValueError(f"{run_dir / sub} holds arms {names}: say which with --arm ({', '.join(MODELS)})")
        if records:
            document = (
                read_arm_record(records[0]) if sub == ARMS_DIR else read_state(run_dir, arm_of_stem(records[0].stem))
            )
            assert document is not None  # the state file exists
            return {**document["config"], "arm": document.get("arm", arm_of_stem(records[0].stem))}
    return None


def _run_config_near(path: Path, arm: str | None) -> dict[str, Any] | None:
    """The run config recorded beside a payload file: that of the run directory holding ``path``, up to
    two levels up (see :func:`recorded_run_config`)."""
    for directory in [path.parent, *path.parent.parents][:3]:
        found = recorded_run_config(directory, arm)
        if found is not None:
            return found
    return None


def _arm_naming(path: Path) -> str | None:
    """The arm whose state JSON (``RUN/state/ARM.json``) names the payload file ``path``, if any: such a
    file is loaded as its run directory's checkpoint, its size and sha256 checked against that JSON."""
    if path.parent.name != STATE_DIR:
        return None
    for state in sorted(path.parent.glob("*.json")):
        document = read_state(path.parent.parent, arm_of_stem(state.stem))
        if document is not None and document["weights"]["file"] == path.name:
            return arm_of_stem(state.stem)
    return None


def _from_run_directory(run_dir: Path, arm: str | None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The global payload and config of a run directory's last checkpoint (``state/ARM.json``, written by
    the ServerApp after every round, size and sha256 verified by :mod:`fedcsg.runs.checkpoint`)."""
    from fedcsg.runs.checkpoint import load_checkpoint as load_run_checkpoint

    states = state_files(run_dir)
    if arm is not None:
        states = [s for s in states if arm_of_stem(s.stem) == arm]
    if not states:
        raise FileNotFoundError(f"no checkpoint {STATE_DIR}/{arm or '*'}.json in run directory {str(run_dir)!r}")
    if len(states) > 1:
        raise ValueError(
            f"{run_dir} holds checkpoints of arms {[arm_of_stem(s.stem) for s in states]}: say which with --arm"
        )
    checkpoint = load_run_checkpoint(run_dir, arm_of_stem(states[0].stem))
    assert checkpoint is not None  # the state file exists
    tensors = {k: torch.from_numpy(np.array(a.numpy(), copy=True)) for k, a in checkpoint.arrays.items()}
    return tensors, {**checkpoint.config, "arm": checkpoint.arm}


def load_checkpoint(
    path: str | Path, run_config: dict[str, Any] | None = None, arm: str | None = None
) -> tuple[nn.Module, ModelSettings]:
    """Rebuild a model from a checkpoint, a compact file, a bare payload file or a run directory.

    Parameters
    ----------
    path
        A safetensors file: a checkpoint (:func:`~fedcsg.runs.model_file.save_checkpoint`), a compact
        file, or a bare payload (flat- or per-tensor-packed, e.g. the ServerApp's
        ``state/ARM-round-NNNN.safetensors``); or a run directory, whose last checkpoint
        (``state/ARM.json``) is used.
    run_config
        Kebab-case settings (a run config) for a payload whose metadata does not say which model it
        holds; default: ``arms/ARM.json`` or ``state/ARM.json`` of the run directory around ``path``.
    arm
        The arm, when the run directory holds several (a payload's ``arm`` metadata also says it).

    Returns
    -------
    model, info
        The model in eval mode, and how it was built.

    Raises
    ------
    FileNotFoundError, ValueError
        A missing file, a file that is not safetensors, or tensors that do not fit the model.
    """
    path = Path(path)
    named_by = None if path.is_dir() else _arm_naming(path)
    if path.is_dir() or named_by is not None:  # a run directory, or the payload its state JSON names
        tensors, source = _from_run_directory(path if named_by is None else path.parent.parent, named_by or arm)
        check_finite(tensors, path)
        metadata: dict[str, str] = {}
        run_config = run_config or source
    else:
        tensors, metadata = read_safetensors(path)
    if metadata.get("format") in (CHECKPOINT_FORMAT, COMPACT_FORMAT) or "model" in metadata:
        info = ModelSettings.from_mapping(metadata)
    else:
        arm = arm or metadata.get("arm")
        source = run_config or _run_config_near(path, arm)
        if source is None:
            raise ValueError(
                f"{path} has no fedcsg metadata and no run directory (arms/ARM.json) around it: "
                "cannot tell which model it holds"
            )
        info = _recorded_model({**source, **({"arm": arm} if arm else {})})
    model = info.build()
    state = model.state_dict()
    frozen = frozen_generator_keys(model)
    if set(tensors) <= set(state):
        load_state(model, tensors, frozen, path)
    else:
        _load_packed(model, tensors, path)
    model.eval()
    return model, info


def _recorded_model(record: dict[str, Any]) -> ModelSettings:
    """The model a recorded run config describes; a folder set's class count and channels found from
    the run's data (:meth:`~fedcsg.spec.config.RunConfig.model_settings`)."""
    if record.get("dataset") in FOLDER_SETS:
        return RunConfig.from_mapping(with_added_settings(record)).model_settings()
    return ModelSettings.from_mapping(record)


def input_spec(
    info: ModelSettings, checkpoint: Path, run_config: dict[str, Any] | None, arm: str | None
) -> DatasetSpec:
    """What a model of ``info`` takes: its registry data set's image size and normalisation, or a
    folder set's, found from the data of the run recorded with ``checkpoint`` (or ``run_config``).

    Raises
    ------
    ValueError
        For a folder set's model with no run config beside it, in one line.
    """
    if info.dataset not in FOLDER_SETS:
        return get_spec(info.dataset)
    if run_config is not None:
        record: dict[str, Any] | None = run_config
    else:
        record = recorded_run_config(checkpoint, arm) if checkpoint.is_dir() else _run_config_near(checkpoint, arm)
    if record is None:
        raise ValueError(
            f"{checkpoint}: a model of dataset {info.dataset!r} takes the image size and normalisation of its "
            "run's data-dir, and no run config (arms/ARM.json) is recorded beside it; accepted is --run-dir RUN"
        )
    return RunConfig.from_mapping(with_added_settings(record)).dataset_spec()


def _load_packed(model: nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> None:
    from flwr.app import Array

    keys = set(tensors)
    dtype_names = {str(v.dtype).removeprefix("torch.") for v in model.state_dict().values()}
    packing = "flat" if keys <= dtype_names else "per-tensor"
    layout = PayloadLayout.for_model(model, packing)
    record = ArrayRecord({k: Array(np.ascontiguousarray(v.numpy())) for k, v in tensors.items()})
    try:
        load_payload(model, record, layout)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None


# ------------------------------------------------------------------------------------ exporting


def compact_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a compact file stores: the ``state_dict`` without frozen generators (they come from the seed)."""
    frozen = frozen_generator_keys(model)
    return cpu_tensors({k: v for k, v in model.state_dict().items() if k not in frozen})


def save_compact(model: nn.Module, info: ModelSettings, path: str | Path, spec: DatasetSpec | None = None) -> Path:
    """Write the compact file of ``model`` (see the module docstring); ``spec`` is what it takes
    (:func:`input_spec`; default: its registry data set's)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    gens = generators(model)
    generator = "none" if not gens else ("seed" if all(g.frozen for g in gens.values()) else "stored")
    metadata = {
        "format": COMPACT_FORMAT,
        "format-version": FORMAT_VERSION,
        "generator": generator,
        **info.to_metadata(),
        **_input_metadata(info, spec),
    }
    tensors = compact_tensors(model)
    save_file(tensors, str(path), metadata={**metadata, DIGEST_KEY: tensors_digest(tensors)})
    return path


def _input_metadata(info: ModelSettings, spec: DatasetSpec | None) -> dict[str, str]:
    spec = spec or get_spec(info.dataset)
    return {
        "input": f"float32 [N, {info.in_channels}, {spec.image_size[0]}, {spec.image_size[1]}], (x/255 - mean) / std",
        "mean": json.dumps(list(spec.mean)),
        "std": json.dumps(list(spec.std)),
    }


def example_input(info: ModelSettings, batch: int = 2, spec: DatasetSpec | None = None) -> torch.Tensor:
    spec = spec or get_spec(info.dataset)
    return torch.randn(batch, info.in_channels, *spec.image_size, generator=torch.Generator().manual_seed(0))


def inference_model(model: nn.Module) -> nn.Module:
    """The plain model an inference runtime runs: CSG convs materialized, eval mode, no gradients."""
    plain = materialize(model) if is_csg(model) else model
    plain = plain.to("cpu").eval()
    for parameter in plain.parameters():
        parameter.requires_grad_(False)
    return plain


def save_torchscript(model: nn.Module, info: ModelSettings, path: str | Path, spec: DatasetSpec | None = None) -> Path:
    """Trace the materialized model and save it (metadata in the archive's ``fedcsg.json``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    plain = inference_model(model)
    with warnings.catch_warnings():
        # torch.jit is deprecated in favour of torch.export, but libtorch / PyTorch Mobile still load it.
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        # No check_trace: a static CNN traces exactly, and re-running it doubles the export time.
        traced = torch.jit.trace(plain, example_input(info, spec=spec), check_trace=False)
        extra = {"fedcsg.json": json.dumps({**info.to_metadata(), **_input_metadata(info, spec)})}
        torch.jit.save(traced, str(path), _extra_files=extra)
    return path


def save_onnx(model: nn.Module, info: ModelSettings, path: str | Path, spec: DatasetSpec | None = None) -> Path:
    """Export the materialized model to ONNX (input ``input``, output ``logits``, dynamic batch).

    Uses torch's TorchScript-based exporter (``dynamo=False``), which needs only the ``onnx``
    package; if that exporter is gone, the dynamo exporter (which also needs ``onnxscript``).
    """
    try:
        import onnx
    except ImportError:
        raise ValueError("ONNX export needs the onnx package: pip install 'fedcsg[deploy]'") from None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    plain = inference_model(model)
    buffer = io.BytesIO()
    kwargs: dict[str, Any] = {
        "input_names": ["input"],
        "output_names": ["logits"],
        "opset_version": ONNX_OPSET,
        "dynamic_axes": {"input": {0: "batch"}, "logits": {0: "batch"}},
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation and constant-folding notes
        try:
            torch.onnx.export(plain, (example_input(info, spec=spec),), buffer, dynamo=False, **kwargs)
        except TypeError:
            kwargs.pop("dynamic_axes")
            torch.onnx.export(
                plain, (example_input(info, spec=spec),), buffer, dynamo=True, external_data=False, **kwargs
            )
    proto = onnx.load_from_string(buffer.getvalue())
    for key, value in {**info.to_metadata(), **_input_metadata(info, spec)}.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = f"fedcsg.{key}", value
    onnx.checker.check_model(proto)
    path.write_bytes(proto.SerializeToString())
    return path


def export_model(
    model: nn.Module, info: ModelSettings, fmt: str, path: str | Path, spec: DatasetSpec | None = None
) -> Path:
    """Write ``model`` in ``fmt`` (one of :data:`EXPORT_FORMATS`) to ``path``, taking ``spec``'s input
    (:func:`input_spec`; default: its registry data set's)."""
    if fmt == "compact":
        return save_compact(model, info, path, spec)
    if fmt == "torchscript":
        return save_torchscript(model, info, path, spec)
    if fmt == "onnx":
        return save_onnx(model, info, path, spec)
    raise ValueError(f"unknown export format {fmt!r}: accepted are {', '.join(EXPORT_FORMATS)}")


def default_output(checkpoint: Path, fmt: str, directory: Path | None = None, arm: str = "model") -> Path:
    """``NAME.compact.safetensors``, ``NAME.pt`` or ``NAME.onnx`` beside the checkpoint (or in
    ``directory``); for a run directory, ``RUN/export/ARM.*``."""
    if checkpoint.is_dir():
        return (directory or checkpoint / "export") / f"{file_stem(arm)}{SUFFIXES[fmt]}"
    name = checkpoint.name.removesuffix(".safetensors") + SUFFIXES[fmt]
    return (directory or checkpoint.parent) / name


def export_checkpoint(
    checkpoint: str | Path,
    formats: Sequence[str],
    out: str | Path | None = None,
    *,
    run_config: dict[str, Any] | None = None,
    arm: str | None = None,
) -> tuple[ModelSettings, list[Path]]:
    """Load ``checkpoint`` once and write it in each of ``formats`` (:data:`EXPORT_FORMATS`).

    ``out`` is the output file of a single format, or the directory of several; by default each
    file goes beside the checkpoint (:func:`default_output`). Returns the model's settings and the
    files written. Raises ValueError for an unknown format or an output that would overwrite the
    checkpoint.
    """
    unknown = [fmt for fmt in formats if fmt not in EXPORT_FORMATS]
    if unknown:
        raise ValueError(f"unknown export format {unknown[0]!r}: accepted are {', '.join(EXPORT_FORMATS)}")
    checkpoint = Path(checkpoint)
    model, info = load_checkpoint(checkpoint, run_config=run_config, arm=arm)
    targets = []
    for fmt in formats:
        if out is not None and len(formats) == 1:
            target = Path(out)
        else:
            target = default_output(checkpoint, fmt, Path(out) if out is not None else None, arm=info.arm)
        if target.resolve() == checkpoint.resolve():
            raise ValueError(f"output {str(target)!r} would overwrite the checkpoint")
        if target.is_dir():
            raise ValueError(
                f"output {str(target)!r} is a directory: accepted is a file path (a directory with --format all)"
            )
        targets.append(target)
    spec = input_spec(info, checkpoint, run_config, arm or info.arm)
    for target in targets:  # every output checked before any is written
        writable_dir(target.parent, "output directory")
    return info, [export_model(model, info, fmt, target, spec) for fmt, target in zip(formats, targets, strict=True)]


def load_torchscript(path: str | Path) -> tuple[torch.jit.ScriptModule, dict[str, str]]:
    """Load a TorchScript export and its ``fedcsg.json`` metadata."""
    extra = {"fedcsg.json": ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    return module, json.loads(extra["fedcsg.json"] or "{}")
