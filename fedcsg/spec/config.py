"""Run settings: one validated dataclass behind [tool.flwr.app.config], experiment files
(:mod:`fedcsg.spec.experiments`) and the CLI (:class:`RunConfig`), each key defined once here, and a
run's identity (the settings that decide what it computes). The parts other code builds from, the
model and the data, are :mod:`fedcsg.spec.settings`; the checks of single values :mod:`fedcsg.spec.checks`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from fedcsg.data.partitions import SCHEMES as PARTITION_SCHEMES
from fedcsg.data.registry import DATASETS as DATASET_SPECS
from fedcsg.data.registry import get_spec, sized_spec
from fedcsg.nn.csg import SliceShape
from fedcsg.nn.csg_factors import AGGREGATIONS as CSG_AGGREGATIONS
from fedcsg.nn.csgify import INITS as CSG_INITS
from fedcsg.nn.csgify import CSGConfig
from fedcsg.nn.fedpara import DEFAULT_RATIO as FEDPARA_RATIO
from fedcsg.nn.fedpara import check_ratio as check_fedpara_ratio
from fedcsg.nn.models import check_trainable
from fedcsg.nn.training import SCHEDULES
from fedcsg.spec.arms import DOWNLINKS, Arm, check_arm
from fedcsg.spec.checks import check_ray_address, check_seed, coerce, kebab, names, one_of, parse_seeds, shown
from fedcsg.spec.codecs import Codec
from fedcsg.spec.settings import DataSettings, ModelSettings

DATASETS = tuple(DATASET_SPECS)
DEVICES = ("auto", "cpu", "cuda")
FAILED_ROUND_POLICIES = ("skip", "retry")  # fewer accepted replies than the minimum: keep the model, or resend once
PACKINGS = ("flat", "per-tensor")  # how a payload's float entries travel: one flat array, or one per tensor
SERVER_OPTIMIZERS = ("fedavg", "fedavgm", "fedadam", "fedyogi")  # fedcsg.fl.server_opt: Flower's strategies
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
MAX_BATCH_SIZE = 65536  # batch-size and eval-batch-size: far above any partition a simulation holds


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
    image_size: int = 0  # any-size sets are cut to this (0 = imagenet 224, voc 320); a fixed-size set: 0 or its own
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
                raise ValueError(f"{kebab(name)} = {getattr(self, name)!r} is not accepted: a positive integer is")
        for name in ("train_limit", "test_limit", "clients_per_round", "seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"{kebab(name)} = {getattr(self, name)!r} is not accepted: 0 or a positive integer is")
        check_seed(self.seed)
        for name in ("batch_size", "eval_batch_size"):
            if getattr(self, name) > MAX_BATCH_SIZE:
                raise ValueError(
                    f"{kebab(name)} = {getattr(self, name)!r} is not accepted: an integer in 1..{MAX_BATCH_SIZE} is"
                )
        one_of("dataset", self.dataset, DATASETS)
        one_of("partitioner", self.partitioner, PARTITION_SCHEMES)
        one_of("lr-schedule", self.lr_schedule, SCHEDULES)
        one_of("payload-packing", self.payload_packing, PACKINGS)
        one_of("device", self.device, DEVICES)
        one_of("failed-round", self.failed_round, FAILED_ROUND_POLICIES)
        one_of("csg-init", self.csg_init, CSG_INITS)
        one_of("csg-aggregation", self.csg_aggregation, CSG_AGGREGATIONS)
        one_of("server-optimizer", self.server_optimizer, SERVER_OPTIMIZERS)
        one_of("downlink", self.downlink, DOWNLINKS)
        check_fedpara_ratio(self.fedpara_ratio)
        check_ray_address(self.ray_address)
        for name in ("server_momentum", "server_beta1", "server_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{kebab(name)} = {getattr(self, name)!r} is not accepted: a number in [0, 1) is")
        if not 0 < self.server_tau < float("inf"):
            raise ValueError(f"server-tau = {self.server_tau!r} is not accepted: a finite number > 0 is")
        check_arm(self.arm)
        for arm in self.arm_list:
            check_arm(arm)
        check_trainable(self.model, get_spec(self.dataset).task)
        sized_spec(self.dataset, self.image_size)
        SliceShape.parse(self.slice)
        if self.pointwise_slice:
            SliceShape.parse(self.pointwise_slice)
        for name in ("fraction_train", "topk_fraction", "downlink_topk_fraction", "target_accuracy"):
            value = getattr(self, name)
            if not 0 < value <= 1:
                raise ValueError(f"{kebab(name)} = {value!r} is not accepted: a number in (0, 1] is")
        for name in ("dirichlet_alpha", "lr", "round_timeout"):
            value = getattr(self, name)
            if not 0 < value < float("inf"):  # written so that NaN fails too
                raise ValueError(f"{kebab(name)} = {value!r} is not accepted: a finite number > 0 is")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum = {self.momentum!r} is not accepted: a number in [0, 1) is")
        for name in ("weight_decay", "client_num_gpus", "max_update_norm", "server_lr"):
            value = getattr(self, name)
            if not 0 <= value < float("inf"):  # written so that NaN fails too
                raise ValueError(f"{kebab(name)} = {value!r} is not accepted: a finite number >= 0 is")
        for name in ("codes_lr_scale", "generator_lr_scale"):
            value = getattr(self, name)
            if not 0 < value <= 100:  # written so that NaN fails too
                raise ValueError(f"{kebab(name)} = {value!r} is not accepted: a number in (0, 100] is")
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
        return parse_seeds(self.seeds)

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
        return DataSettings(**{name: getattr(self, name) for name in names(DataSettings)})

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
        return {kebab(f.name): getattr(self, f.name) for f in _public_fields()}

    @classmethod
    def for_model(cls, settings: ModelSettings, **changes: Any) -> RunConfig:
        """A run of ``settings``' model and arm (the settings a RunConfig shares with them), the rest
        ``changes`` or the defaults; its :meth:`model_settings` are ``settings`` again."""
        shared = {name: getattr(settings, name) for name in names(ModelSettings) if name in names(cls)}
        return cls(**shared, **changes)

    @classmethod
    def from_mapping(cls, values: dict[str, Any], base: RunConfig | None = None) -> RunConfig:
        """Validate kebab-case ``values`` over ``base`` (default: the defaults).

        Raises ValueError naming the first unknown key or badly typed value.
        """
        base = base or cls()
        known = {kebab(f.name): f for f in _public_fields()}
        changes: dict[str, Any] = {}
        for key, value in values.items():
            if key not in known:
                raise ValueError(f"unknown config key {shown(key)}: accepted keys are {', '.join(sorted(known))}")
            default = getattr(base, known[key].name)
            changes[known[key].name] = coerce(key, value, type(default))
        return dataclasses.replace(base, **changes)


def _public_fields() -> list[dataclasses.Field]:
    return list(fields(RunConfig))


def identity_of(record: Mapping[str, Any]) -> dict[str, Any]:
    """The identity (see :meth:`RunConfig.identity`) of a kebab-case config record, such as the
    ``config`` a run file holds: its keys that decide what a run computes."""
    return {k: v for k, v in record.items() if k not in NOT_IDENTITY_KEYS}
