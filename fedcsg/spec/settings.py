"""The settings other code builds from, cut out of a run's config: the model every party rebuilds
(:class:`ModelSettings`) and the data a run is trained and tested on (:class:`DataSettings`).
:meth:`fedcsg.spec.config.RunConfig.model_settings` and ``.data_settings`` make them from a run."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn

from fedcsg.data.folders import FolderSettings
from fedcsg.data.registry import get_spec
from fedcsg.nn.csgify import INITS as CSG_INITS
from fedcsg.nn.csgify import CSGConfig
from fedcsg.nn.fedpara import DEFAULT_RATIO as FEDPARA_RATIO
from fedcsg.nn.fedpara import check_ratio as check_fedpara_ratio
from fedcsg.nn.fedpara import fedparafy
from fedcsg.nn.models import build_model, default_csg_config, model_slice
from fedcsg.nn.params import check_model_size, check_slices_fit, planned_bytes
from fedcsg.spec.arms import Arm
from fedcsg.spec.checks import check_seed, kebab, names, one_of


@dataclass(frozen=True)
class ModelSettings:
    """What decides a model's architecture and initial weights, so that any party rebuilds the same
    model: the model and its CSG settings, the arm, the seed and the data set's shape.

    :meth:`~fedcsg.spec.config.RunConfig.model_settings` gives a run's; checkpoints and exported files store theirs as
    metadata (:meth:`to_metadata`). ``slice`` "" is the model's own slice setting (e.g. 12x12x3x3 / 72,
    8x8x3x3 / 32 for fmnist-cnn) and ``code_dim`` 0 that slice's code dim; ``num_classes`` and
    ``in_channels`` 0 are the registry data set's (a folder set's are found from its data and given:
    :meth:`~fedcsg.spec.config.RunConfig.model_settings`). ``seed`` seeds the initial weights and the generator (the
    whole frozen generator of ``csg-frozen`` is redrawn from it). Defaults are filled in on
    construction, so two settings that build the same model compare equal.
    """

    model: str
    arm: str  # the model part of the arm: fedavg, fedpara, csg, csg-frozen or csg-warm (a codec changes no model)
    slice: str = ""
    code_dim: int = 0
    pointwise_slice: str = ""
    pointwise_code_dim: int = 16
    csg_init: str = "kaiming"
    fedpara_ratio: float = FEDPARA_RATIO
    seed: int = 0
    num_classes: int = 0
    in_channels: int = 0
    dataset: str = "cifar10"

    def __post_init__(self) -> None:
        object.__setattr__(self, "arm", Arm.parse(self.arm).model)
        check_seed(self.seed)
        one_of("csg-init", self.csg_init, CSG_INITS)
        check_fedpara_ratio(self.fedpara_ratio)
        own = model_slice(self.model, self.slice or None, self.code_dim or None)
        object.__setattr__(self, "slice", str(own.shape))
        object.__setattr__(self, "code_dim", own.code_dim)
        if not (self.num_classes and self.in_channels):
            spec = get_spec(self.dataset)
            object.__setattr__(self, "num_classes", self.num_classes or spec.num_classes)
            object.__setattr__(self, "in_channels", self.in_channels or spec.in_channels)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> ModelSettings:
        """From kebab-case keys (safetensors metadata, str -> str, or a run config); other keys are ignored.

        Raises ValueError when ``model`` or ``arm`` is missing or an integer setting is not one.
        """
        changes: dict[str, Any] = {}
        for f in fields(cls):
            key = kebab(f.name)
            if key not in values:
                continue
            raw = values[key]
            try:
                kind = {"int": int, "float": float}.get(str(f.type), str)
                changes[f.name] = kind(raw)
            except (TypeError, ValueError):
                raise ValueError(f"checkpoint metadata {key} = {raw!r} is not a number") from None
        if "model" not in changes:
            raise ValueError("checkpoint metadata has no 'model' key: cannot tell which model to rebuild")
        if "arm" not in changes:
            raise ValueError("checkpoint metadata has no 'arm' key: cannot tell which arm's model it is")
        return cls(**changes)

    def to_metadata(self) -> dict[str, str]:
        """Kebab-case str -> str, as safetensors metadata holds it."""
        return {kebab(f.name): str(getattr(self, f.name)) for f in fields(self)}

    def csg_config(self) -> CSGConfig | None:
        """The converter settings of this arm; None for fedavg and fedpara."""
        if self.arm not in ("csg", "csg-frozen", "csg-warm"):
            return None
        return default_csg_config(
            self.model,
            self.slice,
            self.code_dim,
            frozen=self.arm == "csg-frozen",
            seed=self.seed,
            pointwise_slice=self.pointwise_slice or None,
            pointwise_code_dim=self.pointwise_code_dim,
            init=self.csg_init,
        )

    def check_size(self) -> None:
        """Raise a one-line ValueError, before any tensor is made, when the model is too large for this
        machine (:func:`~fedcsg.nn.params.check_model_size`)."""
        planned = planned_bytes(
            self.model, self.num_classes, self.in_channels, self.csg_config(), fedpara=self.arm == "fedpara"
        )
        described = (
            f"model {self.model} ({self.arm}, slice {self.slice} / code-dim {self.code_dim}, "
            f"num-classes = {self.num_classes}, in-channels = {self.in_channels})"
        )
        check_model_size(planned, described)
        config = self.csg_config()
        if config is not None:
            check_slices_fit(self.model, self.num_classes, self.in_channels, config)

    def build(self) -> nn.Module:
        """A fresh model of these settings, initialised from the seed (its frozen generator, if any, drawn);
        refused first when it would not fit in memory (:meth:`check_size`)."""
        self.check_size()
        torch.manual_seed(self.seed)
        model = build_model(self.model, self.num_classes, self.in_channels, csg=self.csg_config())
        if self.arm == "fedpara":
            fedparafy(model, self.fedpara_ratio)
        return model


@dataclass(frozen=True)
class DataSettings:
    """Where a run's data comes from and how it is cut: what decides the clients' partitions and the
    test set, and nothing else (so the arms of a comparison share them, and their caches)."""

    dataset: str
    data_dir: str
    hub_name: str
    partitioner: str
    dirichlet_alpha: float
    shards_per_client: int
    train_limit: int
    test_limit: int
    seed: int
    image_size: int
    image_column: str
    label_column: str
    test_fraction: float
    norm_mean: str
    norm_std: str

    def check_sizes(self, train_size: int, test_size: int, num_clients: int) -> None:
        """Raise a one-line ValueError naming the setting when the splits (``train_size`` and
        ``test_size`` rows) cannot give what these settings ask of them for ``num_clients`` clients."""
        for key, limit, size, split in (
            ("train-limit", self.train_limit, train_size, "train"),
            ("test-limit", self.test_limit, test_size, "test"),
        ):
            if limit > size:
                raise ValueError(
                    f"{key} = {limit} is not accepted: the {split} split of {self.dataset} has {size:,} rows "
                    f"(accepted is 0..{size}; 0 = all of them)"
                )
        rows = self.train_limit or train_size
        if num_clients > rows:
            raise ValueError(
                f"num-clients = {num_clients} is not accepted: there are {rows:,} train rows to partition "
                "(train-limit); accepted is at most one client per row"
            )
        if self.partitioner == "shards" and num_clients * self.shards_per_client > rows:
            raise ValueError(
                f"shards-per-client = {self.shards_per_client} is not accepted: {num_clients} clients x "
                f"{self.shards_per_client} shards exceed the {rows:,} train rows (train-limit); accepted is at most "
                f"{rows // num_clients}"
            )

    @property
    def folder(self) -> FolderSettings:
        """How a folder set is read (:mod:`fedcsg.data.folders`)."""
        return FolderSettings(**{name: getattr(self, name) for name in names(FolderSettings)})

    @property
    def source(self) -> dict[str, Any]:
        """``data_dir``, ``hub_name`` and ``folder`` as the readers take them (None: search / the data
        set's own)."""
        return {"data_dir": self.data_dir or None, "hub_name": self.hub_name or None, "folder": self.folder}
