"""Run settings: one validated dataclass behind [tool.flwr.app.config], experiment files and the CLI
(:class:`RunConfig`), and the settings it is made of that other code builds from: the model
(:class:`ModelSettings`) and the data (:class:`DataSettings`).

Experiment files hold flat kebab-case keys, only those that differ from the defaults. They ship
with the package (fedcsg/configs/NAME.toml, reachable from a checkout as configs/NAME.toml), so
``fedcsg run --config NAME`` finds them from any directory; ``flwr run . --run-config
configs/NAME.toml`` and ``fedcsg run --config path/to/file.toml`` read the same files.
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedcsg.data.partitions import SCHEMES as PARTITION_SCHEMES
from fedcsg.data.registry import DATASETS as DATASET_SPECS
from fedcsg.data.registry import SEGMENTATION_DATASETS, get_spec
from fedcsg.nn.csg import SliceShape
from fedcsg.nn.csg_factors import AGGREGATIONS as CSG_AGGREGATIONS
from fedcsg.nn.csgify import INITS as CSG_INITS
from fedcsg.nn.csgify import CSGConfig
from fedcsg.nn.fedpara import DEFAULT_RATIO as FEDPARA_RATIO
from fedcsg.nn.fedpara import check_ratio as check_fedpara_ratio
from fedcsg.nn.fedpara import fedparafy
from fedcsg.nn.models import build_model, check_trainable, default_csg_config, model_slice
from fedcsg.nn.params import check_model_size, planned_bytes
from fedcsg.nn.training import SCHEDULES
from fedcsg.spec.arms import DOWNLINKS, Arm, check_arm
from fedcsg.spec.codecs import Codec

DATASETS = tuple(DATASET_SPECS)
DEVICES = ("auto", "cpu", "cuda")
FAILED_ROUND_POLICIES = ("skip", "retry")  # fewer accepted replies than the minimum: keep the model, or resend once
PACKINGS = ("flat", "per-tensor")  # how a payload's float entries travel: one flat array, or one per tensor
SERVER_OPTIMIZERS = ("fedavg", "fedavgm", "fedadam", "fedyogi")  # fedcsg.fl.server_opt: Flower's strategies
ACCEPTED_ADDRESSES = '"" (a private Ray), "auto" (the cluster on this machine) or HOST:PORT of a head node'
# Keys that say where or how a run is carried out, not what it computes: a resumed run may differ in them.
# `seeds` only says how many runs to make; each run's own `seed` is part of its identity.
NOT_IDENTITY_KEYS = ("out-dir", "arms", "resume", "seeds", "ray-address")
POSITIVE_INTS = (
    "code_dim",
    "pointwise_code_dim",
    "num_clients",
    "shards_per_client",
    "num_rounds",
    "min_train_nodes",
    "min_available_nodes",
    "local_epochs",
    "batch_size",
    "eval_batch_size",
    "client_num_cpus",
)
DEFAULT_EXPERIMENT = "quickstart"
SEED_LIMIT = 2**32  # seeds are in [0, 2**32): NumPy's legacy seeding (fedcsg.nn.training.set_seed) accepts no more
MAX_BATCH_SIZE = 65536  # batch-size and eval-batch-size: far above any partition a simulation holds


@dataclass(frozen=True)
class ModelSettings:
    """What decides a model's architecture and initial weights, so that any party rebuilds the same
    model: the model and its CSG settings, the arm, the seed and the data set's shape.

    :meth:`RunConfig.model_settings` gives a run's; checkpoints and exported files store theirs as
    metadata (:meth:`to_metadata`). ``slice`` "" is the model's own slice setting (e.g. 12x12x3x3 / 72,
    8x8x3x3 / 32 for fmnist-cnn) and ``code_dim`` 0 that slice's code dim; ``num_classes`` and
    ``in_channels`` 0 are the data set's. ``seed`` seeds the initial weights and the generator (the
    whole frozen generator of ``csg-frozen`` is redrawn from it). Defaults are filled in on
    construction, so two settings that build the same model compare equal.
    """

    model: str
    arm: str  # the model part of the arm: fedavg, fedpara, csg or csg-frozen (a codec changes no model)
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
        if not 0 <= self.seed < SEED_LIMIT:
            raise ValueError(f"seed = {self.seed!r} is not accepted: an integer in 0..{SEED_LIMIT - 1} is")
        _one_of("csg-init", self.csg_init, CSG_INITS)
        check_fedpara_ratio(self.fedpara_ratio)
        own = model_slice(self.model, self.slice or None, self.code_dim or None)
        spec = get_spec(self.dataset)
        object.__setattr__(self, "slice", str(own.shape))
        object.__setattr__(self, "code_dim", own.code_dim)
        object.__setattr__(self, "num_classes", self.num_classes or spec.num_classes)
        object.__setattr__(self, "in_channels", self.in_channels or spec.in_channels)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> ModelSettings:
        """From kebab-case keys (safetensors metadata, str -> str, or a run config); other keys are ignored.

        Raises ValueError when ``model`` or ``arm`` is missing or an integer setting is not one.
        """
        changes: dict[str, Any] = {}
        for f in fields(cls):
            key = _kebab(f.name)
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
        return {_kebab(f.name): str(getattr(self, f.name)) for f in fields(self)}

    def csg_config(self) -> CSGConfig | None:
        """The converter settings of this arm; None for fedavg and fedpara."""
        if self.arm not in ("csg", "csg-frozen"):
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

    def run_config(self, **changes: Any) -> RunConfig:
        """A run of this model and arm (the settings a RunConfig shares with these), the rest ``changes``
        or the defaults; its :meth:`RunConfig.model_settings` are these settings again."""
        shared = {name: getattr(self, name) for name in _names(ModelSettings) if name in _names(RunConfig)}
        return RunConfig(**shared, **changes)

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
    def source(self) -> dict[str, str | None]:
        """``data_dir`` and ``hub_name`` as the readers take them (None: search / the data set's own)."""
        return {"data_dir": self.data_dir or None, "hub_name": self.hub_name or None}


@dataclass(frozen=True)
class RunConfig:
    """Every setting of a federated run (kebab-case in TOML: ``code-dim`` for ``code_dim``).

    The flat fields are the config keys, each defined once here. The parts that other code builds
    from come out as small frozen settings, by field name: :meth:`model_settings` (the model every
    party builds, the one an exported file records) and :attr:`data_settings` (what decides the
    partitions and the test set).
    """

    # What is trained
    model: str = "resnet20"
    arm: str = "csg"
    arms: str = "fedavg,csg,csg-frozen"  # what `fedcsg compare` runs, comma-separated
    slice: str = "12x12x3x3"
    code_dim: int = 72
    pointwise_slice: str = ""  # "" = the model's paper setting (MobileNetV2/ShuffleNetV2: 16x16x1x1)
    pointwise_code_dim: int = 16
    csg_init: str = "kaiming"  # kaiming: generated filters start at std sqrt(2/fan_in); paper: codes N(0.001, 1)
    csg_aggregation: str = "factors"  # factors: average generator and codes; alternate: one factor per round
    fedpara_ratio: float = FEDPARA_RATIO  # fedpara's rank between its minimum (0) and the plain conv's size (1)
    # Traffic: an arm MODEL+CODEC sends its update through the codec; MODEL[+CODEC]/DOWNLINK receives the
    # global model through DOWNLINK, an arm that names none through `downlink`
    topk_fraction: float = 0.01  # topk codec: the fraction of the update's entries sent
    downlink: str = "full"  # full, fp16, int8 (blockwise), delta-int8, delta-topk (fedcsg.wire.downlink)
    downlink_topk_fraction: float = 0.05  # delta-topk downlink: the fraction of the model's change sent
    # Data and partitions
    dataset: str = "cifar10"
    data_dir: str = ""  # "" = $FEDCSG_DATA_DIR, else the hub
    hub_name: str = ""  # "" = the dataset's hub name
    num_clients: int = 4
    partitioner: str = "iid"
    dirichlet_alpha: float = 0.5
    shards_per_client: int = 2
    train_limit: int = 4000  # 0 = the whole train split; N = a seeded subset of N images, then partitioned
    test_limit: int = 2000  # 0 = the whole test split for server-side evaluation
    # Rounds and sampling
    num_rounds: int = 3
    clients_per_round: int = 0  # 0 = use fraction-train
    fraction_train: float = 1.0
    min_train_nodes: int = 2
    min_available_nodes: int = 2
    round_timeout: float = 3600.0  # seconds to wait for replies; a client that has not replied by then has failed
    failed_round: str = "skip"  # fewer than min-train-nodes accepted replies: skip (keep the model) or retry once
    # Reliability
    fault_probability: float = 0.0  # chance that a client raises in a round, drawn from (seed, round, partition)
    max_update_norm: float = 0.0  # reject a reply whose L2 distance to the global payload exceeds this; 0 = off
    # Local training
    local_epochs: int = 1
    batch_size: int = 64
    eval_batch_size: int = 256
    lr: float = 0.05
    lr_schedule: str = "constant"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    codes_lr_scale: float = 1.0  # CSG codes train at lr * this, in (0, 100]
    generator_lr_scale: float = 1.0  # a trainable CSG generator trains at lr * this, in (0, 100]
    # Server update (Flower's FedAvgM / FedAdam / FedYogi step on the exact average)
    server_optimizer: str = "fedavg"
    server_lr: float = 0.0  # 0 = Flower's default: fedavgm 1.0, fedadam 0.1, fedyogi 0.01
    server_momentum: float = 0.9  # fedavgm
    server_beta1: float = 0.9  # fedadam, fedyogi
    server_beta2: float = 0.99  # fedadam, fedyogi
    server_tau: float = 1e-3  # fedadam, fedyogi
    # Run
    seed: int = 0
    seeds: str = ""  # fedcsg run/compare: comma-separated seeds, one run of every arm per seed; "" = `seed` alone
    payload_packing: str = "flat"
    device: str = "auto"
    client_num_cpus: int = 1
    client_num_gpus: float = 0.0
    ray_address: str = ""  # "" a private Ray, "auto" the cluster on this machine, HOST:PORT a head node
    target_accuracy: float = 0.5  # the report's "bytes to reach" threshold
    out_dir: str = ""  # where the ServerApp writes results; "" = runs/flwr-<run id>
    resume: bool = False  # continue from out-dir/state/<arm>.json when it exists (fedcsg run/compare --resume)

    def __post_init__(self) -> None:
        for name in POSITIVE_INTS:
            if getattr(self, name) <= 0:
                raise ValueError(f"{_kebab(name)} = {getattr(self, name)!r} is not accepted: a positive integer is")
        for name in ("train_limit", "test_limit", "clients_per_round", "seed"):
            if getattr(self, name) < 0:
                raise ValueError(
                    f"{_kebab(name)} = {getattr(self, name)!r} is not accepted: 0 or a positive integer is"
                )
        if self.seed >= SEED_LIMIT:
            raise ValueError(f"seed = {self.seed!r} is not accepted: an integer in 0..{SEED_LIMIT - 1} is")
        for name in ("batch_size", "eval_batch_size"):
            if getattr(self, name) > MAX_BATCH_SIZE:
                raise ValueError(
                    f"{_kebab(name)} = {getattr(self, name)!r} is not accepted: an integer in 1..{MAX_BATCH_SIZE} is"
                )
        _one_of("dataset", self.dataset, DATASETS)
        _one_of("partitioner", self.partitioner, PARTITION_SCHEMES)
        _one_of("lr-schedule", self.lr_schedule, SCHEDULES)
        _one_of("payload-packing", self.payload_packing, PACKINGS)
        _one_of("device", self.device, DEVICES)
        _one_of("failed-round", self.failed_round, FAILED_ROUND_POLICIES)
        _one_of("csg-init", self.csg_init, CSG_INITS)
        _one_of("csg-aggregation", self.csg_aggregation, CSG_AGGREGATIONS)
        _one_of("server-optimizer", self.server_optimizer, SERVER_OPTIMIZERS)
        _one_of("downlink", self.downlink, DOWNLINKS)
        check_fedpara_ratio(self.fedpara_ratio)
        check_ray_address(self.ray_address)
        for name in ("server_momentum", "server_beta1", "server_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{_kebab(name)} = {getattr(self, name)!r} is not accepted: a number in [0, 1) is")
        if not 0 < self.server_tau < float("inf"):
            raise ValueError(f"server-tau = {self.server_tau!r} is not accepted: a finite number > 0 is")
        check_arm(self.arm)
        for arm in self.arm_list:
            check_arm(arm)
        check_trainable(self.model, "segmentation" if self.dataset in SEGMENTATION_DATASETS else "classification")
        SliceShape.parse(self.slice)
        if self.pointwise_slice:
            SliceShape.parse(self.pointwise_slice)
        for name in ("fraction_train", "topk_fraction", "downlink_topk_fraction", "target_accuracy"):
            value = getattr(self, name)
            if not 0 < value <= 1:
                raise ValueError(f"{_kebab(name)} = {value!r} is not accepted: a number in (0, 1] is")
        for name in ("dirichlet_alpha", "lr", "round_timeout"):
            value = getattr(self, name)
            if not 0 < value < float("inf"):  # written so that NaN fails too
                raise ValueError(f"{_kebab(name)} = {value!r} is not accepted: a finite number > 0 is")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum = {self.momentum!r} is not accepted: a number in [0, 1) is")
        for name in ("weight_decay", "client_num_gpus", "max_update_norm", "server_lr"):
            value = getattr(self, name)
            if not 0 <= value < float("inf"):  # written so that NaN fails too
                raise ValueError(f"{_kebab(name)} = {value!r} is not accepted: a finite number >= 0 is")
        for name in ("codes_lr_scale", "generator_lr_scale"):
            value = getattr(self, name)
            if not 0 < value <= 100:  # written so that NaN fails too
                raise ValueError(f"{_kebab(name)} = {value!r} is not accepted: a number in (0, 100] is")
        if not 0 <= self.fault_probability <= 1:
            raise ValueError(f"fault-probability = {self.fault_probability!r} is not accepted: a number in [0, 1] is")
        self.seed_list  # noqa: B018 - validates `seeds`
        if self.clients_per_round > self.num_clients:
            raise ValueError(
                f"clients-per-round = {self.clients_per_round} is more than num-clients = {self.num_clients}"
            )

    @property
    def arm_list(self) -> list[str]:
        return [a.strip() for a in self.arms.split(",") if a.strip()]

    @property
    def seed_list(self) -> list[int]:
        """The seeds of the runs to make: ``seeds`` parsed, else ``[seed]``."""
        if not self.seeds.strip():
            return [self.seed]
        accepted = f"comma-separated integers in 0..{SEED_LIMIT - 1} without repeats, e.g. 0,1,2"
        try:
            values = [int(part) for part in self.seeds.split(",")]
        except ValueError:
            raise ValueError(f"seeds = {self.seeds!r} is not accepted: {accepted} are") from None
        if any(not 0 <= v < SEED_LIMIT for v in values) or len(set(values)) != len(values):
            raise ValueError(f"seeds = {self.seeds!r} is not accepted: {accepted} are")
        return values

    def model_settings(self, arm: str | None = None) -> ModelSettings:
        """The model of ``arm`` (default: this run's arm; its codec part changes no model): what every
        party builds, and what an export records."""
        return ModelSettings.from_mapping({**self.to_flower(), "arm": arm or self.arm})

    @property
    def codec(self) -> Codec | None:
        """The uplink codec of this run's arm (``csg+int8``: int8), None for an arm without one."""
        name = Arm.parse(self.arm).codec
        return Codec(name, self.topk_fraction) if name else None

    @property
    def downlink_mode(self) -> str:
        """The downlink of this run's arm: the one it names (``csg+int8/int8``: int8), else ``downlink``."""
        return Arm.parse(self.arm).downlink_or(self.downlink)

    @property
    def data_settings(self) -> DataSettings:
        """The data of this run: the same for every arm of a comparison."""
        return DataSettings(**{name: getattr(self, name) for name in _names(DataSettings)})

    def csg_config(self, arm: str | None = None) -> CSGConfig | None:
        """The converter settings of ``arm`` (default: this run's arm); None for fedavg."""
        return self.model_settings(arm).csg_config()

    def identity(self) -> dict[str, Any]:
        """The settings that decide what a run computes (kebab-case): a run may only be resumed
        under a config with the same identity."""
        return identity_of(self.to_flower())

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)

    def to_flower(self) -> dict[str, Any]:
        """Kebab-case mapping, as in [tool.flwr.app.config]."""
        return {_kebab(f.name): getattr(self, f.name) for f in _public_fields()}

    @classmethod
    def from_mapping(cls, values: dict[str, Any], base: RunConfig | None = None) -> RunConfig:
        """Validate kebab-case ``values`` over ``base`` (default: the defaults).

        Raises ValueError naming the first unknown key or badly typed value.
        """
        base = base or cls()
        known = {_kebab(f.name): f for f in _public_fields()}
        changes: dict[str, Any] = {}
        for key, value in values.items():
            if key not in known:
                raise ValueError(f"unknown config key {key!r}: accepted keys are {', '.join(sorted(known))}")
            default = getattr(base, known[key].name)
            changes[known[key].name] = _coerce(key, value, type(default))
        return dataclasses.replace(base, **changes)


def _public_fields() -> list[dataclasses.Field]:
    return list(fields(RunConfig))


def _names(cls: type) -> list[str]:
    return [f.name for f in fields(cls)]


def _kebab(name: str) -> str:
    return name.replace("_", "-")


def check_ray_address(value: str) -> str:
    """``value`` if it is an accepted ``ray-address``, else a one-line ValueError."""
    if value in ("", "auto"):
        return value
    host, sep, port = value.rpartition(":")
    if sep and host and port.isdigit() and 0 < int(port) < 65536 and "/" not in value:
        return value
    raise ValueError(f"ray-address = {value!r} is not accepted: {ACCEPTED_ADDRESSES} is")


def _one_of(key: str, value: str, accepted: tuple[str, ...]) -> None:
    if value not in accepted:
        raise ValueError(f"{key} = {value!r} is not accepted: one of {', '.join(accepted)} is")


def _coerce(key: str, value: Any, kind: type) -> Any:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is bool and not isinstance(value, bool):
        raise ValueError(f"{key} = {value!r} is not accepted: true or false is")
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"{key} = {value!r} ({type(value).__name__}) is not accepted: a {kind.__name__} is")
    return value


def shipped_experiments() -> dict[str, Path]:
    """The experiment files that ship with the package, by name (file name without ``.toml``)."""
    folder = resources.files("fedcsg") / "configs"
    return {
        entry.name.removesuffix(".toml"): Path(str(entry))
        for entry in sorted(folder.iterdir(), key=lambda e: e.name)
        if entry.name.endswith(".toml")
    }


def find_experiment(name_or_path: str | Path) -> Path:
    """The experiment file ``name_or_path`` names: an existing file, else a shipped experiment
    (``quickstart`` or ``quickstart.toml``).

    Raises
    ------
    FileNotFoundError
        If it is neither, naming the shipped experiments.
    """
    path = Path(name_or_path)
    if path.is_file():
        return path
    if path.is_dir():
        raise FileNotFoundError(
            f"config file {str(name_or_path)!r} is a directory; accepted: a TOML file or a shipped experiment"
        )
    shipped = shipped_experiments()
    name = path.name.removesuffix(".toml")
    if path.parent == Path(".") and name in shipped:
        return shipped[name]
    raise FileNotFoundError(
        f"config file {str(name_or_path)!r} does not exist; accepted: a TOML file or a shipped experiment "
        f"({', '.join(shipped)})"
    )


def load_experiment(name_or_path: str | Path, base: RunConfig | None = None) -> RunConfig:
    """Read an experiment TOML file (flat kebab-case keys) over ``base`` (default: the defaults);
    ``name_or_path`` is a file or the name of a shipped experiment (see :func:`find_experiment`)."""
    path = find_experiment(name_or_path)
    try:
        values = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"config file {str(path)!r} is not valid TOML (UTF-8 text): {error}") from None
    nested = [k for k, v in values.items() if isinstance(v, dict)]
    if nested:
        raise ValueError(f"config file {str(path)!r} has table(s) {nested}: only flat kebab-case keys are accepted")
    try:
        return RunConfig.from_mapping(values, base)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None


def identity_of(record: Mapping[str, Any]) -> dict[str, Any]:
    """The identity (see :meth:`RunConfig.identity`) of a kebab-case config record, such as the
    ``config`` a run file holds: its keys that decide what a run computes."""
    return {k: v for k, v in record.items() if k not in NOT_IDENTITY_KEYS}
