"""Run settings: one validated dataclass behind [tool.flwr.app.config], experiment files
(:mod:`fedcsg.spec.experiments`) and the CLI (:class:`RunConfig`), each key defined once here, and a
run's identity (the settings that decide what it computes). The parts other code builds from, the
model and the data, are :mod:`fedcsg.spec.settings`; the checks of single values :mod:`fedcsg.spec.checks`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from fedcsg.data.folders import FolderSettings, image_size_of
from fedcsg.data.partitions import SCHEMES as PARTITION_SCHEMES
from fedcsg.data.readers import dataset_spec
from fedcsg.data.registry import DATASETS as DATASET_SPECS
from fedcsg.data.registry import FOLDER_SETS, DatasetSpec, sized_spec, task_of
from fedcsg.nn.csg import SliceShape
from fedcsg.nn.csg_factors import AGGREGATIONS as CSG_AGGREGATIONS
from fedcsg.nn.csgify import INITS as CSG_INITS
from fedcsg.nn.csgify import CSGConfig
from fedcsg.nn.execution import COMPILE_MODES, PRECISIONS, Execution, compile_pays
from fedcsg.nn.fedpara import DEFAULT_RATIO as FEDPARA_RATIO
from fedcsg.nn.fedpara import check_ratio as check_fedpara_ratio
from fedcsg.nn.models import check_trainable
from fedcsg.nn.training import SCHEDULES
from fedcsg.spec.arms import DOWN_SEPARATOR, DOWNLINKS, SEPARATOR, Arm, check_arm
from fedcsg.spec.checks import check_ray_address, check_seed, coerce, fraction, kebab, names, one_of, parse_seeds, shown
from fedcsg.spec.codecs import Codec, codec_type
from fedcsg.spec.resources import DEFAULT_CLIENTS_PER_GPU, SERVER_DEVICES, check_client_num_gpus
from fedcsg.spec.settings import DataSettings, ModelSettings


def fedcsg_version() -> str:
    """The installed fedcsg's version (its package metadata)."""
    try:
        return version("fedcsg")
    except PackageNotFoundError:
        return "unknown"


INSTALLED_VERSION = fedcsg_version()

DATASETS = (*DATASET_SPECS, *FOLDER_SETS)
DEVICES = ("auto", "cpu", "cuda")
FAILED_ROUND_POLICIES = ("skip", "retry")  # fewer accepted replies than the minimum: keep the model, or resend once


def sample_size(num_nodes: int, fraction: float, minimum: int) -> int:
    """The nodes a round samples out of ``num_nodes`` connected ones: Flower's FedAvg rule,
    ``max(int(num_nodes * fraction), minimum)`` (``fraction-train``, ``min-train-nodes``)."""
    return max(int(num_nodes * fraction), minimum)


PACKINGS = ("flat", "per-tensor")  # how a payload's float entries travel: one flat array, or one per tensor
SERVER_OPTIMIZERS = ("fedavg", "fedavgm", "fedadam", "fedyogi")  # fedcsg.fl.server_opt: Flower's strategies
# Differential privacy (fedcsg.fl.privacy, docs/privacy.md): Flower's strategy wrappers (central-*), its client
# mods (client-fixed: fixedclipping_mod under the client-side wrapper; local: LocalDpMod), "none" neither.
DP_MODES = ("none", "central-fixed", "central-adaptive", "client-fixed", "local")
CLIENT_DP_MODES = ("client-fixed", "local")  # a Flower mod on the client clips the reply against the message's arrays
# Keys that say where or how a run is carried out, not what it computes: a resumed run may differ in them
# (a run started on CPUs may go on on GPUs). `seeds` only says how many runs to make; each run's own `seed`
# is part of its identity.
# PLACEMENT_KEYS say where it computes on the machine it runs on, and `fedcsg-version` with what: a
# resumed run takes them from its --config/--set or the defaults (this installation), not from the run it
# continues (a run started under fedcsg 0.1.0 goes on under the fedcsg installed now, its nodes checked
# against that).
PLACEMENT_KEYS = ("device", "server-device", "client-num-gpus", "clients-per-gpu", "fedcsg-version")
# tracker -> the module it needs (fedcsg.runs.tracking)
TRACKERS: dict[str, str] = {"none": "", "tensorboard": "tensorboard", "mlflow": "mlflow"}
NOT_IDENTITY_KEYS = (
    "out-dir",
    "tracker",
    "arms",
    "resume",
    "seeds",
    "ray-address",
    "client-num-cpus",
    "deterministic",
    "compile",
    "channels-last",
    *PLACEMENT_KEYS,
)
# Identity settings added after runs were first recorded, each with the value that does what fedcsg did before
# the setting existed. A record that lacks one was written by an older fedcsg and is read with that value, so a
# run resumes across versions that only added settings (an identity setting added later goes here with its
# value; a setting of NOT_IDENTITY_KEYS needs no entry: a resumed run takes it from its config or the defaults).
ADDED_SETTINGS: dict[str, Any] = {
    "precision": "fp32",
    "loader-workers": 0,
    "freeze-generator-after": 0,
    **{kebab(f.name): f.default for f in fields(FolderSettings)},
    "dp": "none",
    "dp-noise-multiplier": 1.0,
    "dp-clipping-norm": 1.0,
    "dp-target-delta": 1e-5,
    "dp-target-quantile": 0.5,
    "dp-clip-norm-lr": 0.2,
    "dp-max-epsilon": 0.0,
}
# Identity settings that only some models read: left out of the identity of every other arm, so that a run of those
# arms resumes whatever they say (a compare may add a csg-warm arm, and its K, to a run whose other arms started).
MODEL_SETTINGS: dict[str, tuple[str, ...]] = {"freeze-generator-after": ("csg-warm",)}
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
    "clients_per_gpu",
)
MAX_LOADER_WORKERS = 64  # loader-workers: decoding processes per client
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
    freeze_generator_after: int = 0  # csg-warm: the rounds K its generator trains and travels (1 <= K < num-rounds)
    # Traffic: an arm MODEL+CODEC sends its update through the codec; MODEL[+CODEC]/DOWNLINK receives the
    # global model through DOWNLINK, an arm that names none through `downlink`
    topk_fraction: float = 0.01  # topk codec: the fraction of the update's entries sent
    downlink: str = "full"  # full, fp16, int8 (blockwise), delta-int8, delta-topk (fedcsg.wire.downlink)
    downlink_topk_fraction: float = 0.05  # delta-topk downlink: the fraction of the model's change sent
    # Data and partitions
    dataset: str = "cifar10"
    data_dir: str = ""  # "" = $FEDCSG_DATA_DIR, else the hub; a folder set's folder (imagefolder, parquet)
    hub_name: str = ""  # "" = the dataset's hub name
    # Folder sets (fedcsg.data.folders): columns, the test split, normalisation
    image_column: str = ""  # parquet: the image column; "" = found
    label_column: str = ""  # parquet: the label column; "" = found
    test_fraction: float = 0.0  # 0 = data-dir holds a test split; in (0, 1) = cut from its train split (seed 0)
    norm_mean: str = ""  # per-channel mean, comma-separated, in [0, 1] units; "" = computed from the train split
    norm_std: str = ""  # per-channel std, the same way
    num_clients: int = 4
    partitioner: str = "iid"
    dirichlet_alpha: float = 0.5
    shards_per_client: int = 2
    train_limit: int = 4000  # 0 = the whole train split; N = a seeded subset of N images, then partitioned
    test_limit: int = 2000  # 0 = the whole test split for server-side evaluation
    image_size: int = 0  # any-size and folder sets are cut to this (0 = imagenet 224, voc 320, folders 64)
    loader_workers: int = 2  # any-size sets: decoding processes per client streaming its rows; 0 = decode into memory
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
    # Differential privacy (docs/privacy.md): clipping and Gaussian noise on the update's floating entries
    dp: str = "none"  # none, central-fixed, central-adaptive, client-fixed, local (DP_MODES)
    dp_noise_multiplier: float = 1.0  # sigma: noise std sigma*C/n on the average (local: sigma*C on each update)
    dp_clipping_norm: float = 1.0  # C: the L2 bound of a client's update (central-adaptive: its initial value)
    dp_target_delta: float = 1e-5  # the delta at which the accountant reports epsilon
    dp_target_quantile: float = 0.5  # central-adaptive: the fraction of updates left unclipped that C tracks
    dp_clip_norm_lr: float = 0.2  # central-adaptive: the geometric step of C per round
    dp_max_epsilon: float = 0.0  # stop before the round whose release would exceed this epsilon; 0 = no limit
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
    fedcsg_version: str = INSTALLED_VERSION  # the server's fedcsg; a node with another version refuses to train
    seed: int = 0
    seeds: str = ""  # fedcsg run/compare: comma-separated seeds, one run of every arm per seed; "" = `seed` alone
    payload_packing: str = "flat"
    device: str = "auto"  # the clients': auto = cuda where a client has a GPU share and sees a CUDA device
    server_device: str = "auto"  # auto = cuda where the server's machine has a CUDA device (fedcsg.spec.resources)
    deterministic: bool = False  # deterministic CUDA kernels, cuDNN without autotuning, TF32 off (docs/gpu.md)
    compile: str = "auto"  # torch.compile the training step: off, on, auto (on where it pays back: compile_pays)
    channels_last: bool = True  # channels-last memory format for weights, generated filters and batches
    precision: str = "fp32"  # autocast dtype of training and evaluation: fp32, bf16, fp16 (fedcsg.nn.execution)
    client_num_cpus: int = 1
    client_num_gpus: float | str = "auto"  # auto = 1 / clients-per-gpu on a cluster with GPUs, else 0
    clients_per_gpu: int = DEFAULT_CLIENTS_PER_GPU
    ray_address: str = ""  # "" a private Ray, "auto" the cluster on this machine, HOST:PORT a head node
    target_accuracy: float = 0.5  # the report's "bytes to reach" threshold
    tracker: str = "none"  # log every round to: none, tensorboard, mlflow (fedcsg.runs.tracking; extra "track")
    out_dir: str = ""  # where the ServerApp writes results; "" = runs/flwr-<run id>
    resume: bool = False  # continue from out-dir/state/<arm>.json when it exists (fedcsg run/compare --resume)

    def __post_init__(self) -> None:
        for name in POSITIVE_INTS:
            if getattr(self, name) <= 0:
                raise ValueError(f"{kebab(name)} = {getattr(self, name)!r} is not accepted: a positive integer is")
        if not 0 <= self.loader_workers <= MAX_LOADER_WORKERS:
            raise ValueError(
                f"loader-workers = {self.loader_workers!r} is not accepted: an integer in 0..{MAX_LOADER_WORKERS} is"
            )
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
        one_of("compile", self.compile, COMPILE_MODES)
        one_of("precision", self.precision, PRECISIONS)
        one_of("server-device", self.server_device, SERVER_DEVICES)
        check_client_num_gpus(self.client_num_gpus)
        if self.device == "cuda" and self.client_num_gpus == 0:
            raise ValueError(
                "device = 'cuda' is not accepted with client-num-gpus = 0: the clients would have no GPU; "
                'accepted is client-num-gpus = "auto" or > 0, or device = "auto" or "cpu"'
            )
        one_of("failed-round", self.failed_round, FAILED_ROUND_POLICIES)
        one_of("tracker", self.tracker, tuple(TRACKERS))
        if self.tracker != "none" and importlib.util.find_spec(TRACKERS[self.tracker]) is None:
            raise ValueError(
                f"tracker = {self.tracker!r} is not accepted here: {TRACKERS[self.tracker]} is not installed "
                '(pip install "fedcsg[track]"); accepted is tracker = "none" or installing it'
            )
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
        if any(Arm.parse(arm).model == "csg-warm" for arm in {self.arm, *self.arm_list}):
            self._check_warm()
        check_trainable(self.model, task_of(self.dataset))
        if task_of(self.dataset) == "segmentation" and (self.compile == "on" or self.precision != "fp32"):
            raise ValueError(
                f"compile = {self.compile!r}, precision = {self.precision!r} are not accepted for segmentation "
                f"({self.dataset}): its loop runs eager fp32; accepted are compile 'off' or 'auto', precision 'fp32'"
            )
        if self.dataset in FOLDER_SETS:
            image_size_of(self.image_size)
        else:
            sized_spec(self.dataset, self.image_size)
        self.data_settings.folder  # noqa: B018 - validates test-fraction, norm-mean and norm-std
        SliceShape.parse(self.slice)
        if self.pointwise_slice:
            SliceShape.parse(self.pointwise_slice)
        for name in ("fraction_train", "topk_fraction", "downlink_topk_fraction", "target_accuracy"):
            fraction(kebab(name), getattr(self, name))
        for name in ("dirichlet_alpha", "lr", "round_timeout"):
            value = getattr(self, name)
            if not 0 < value < float("inf"):  # written so that NaN fails too
                raise ValueError(f"{kebab(name)} = {value!r} is not accepted: a finite number > 0 is")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum = {self.momentum!r} is not accepted: a number in [0, 1) is")
        for name in ("weight_decay", "max_update_norm", "server_lr"):
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
        self._check_dp()
        if self.clients_per_round > self.num_clients:
            raise ValueError(
                f"clients-per-round = {self.clients_per_round} is more than num-clients = {self.num_clients}"
            )

    def _check_warm(self) -> None:
        """A csg-warm arm needs its K, a payload that may change at K (no delta downlink, whose x̂ has the
        payload's shape; no server optimizer with per-element state)."""
        if not 1 <= self.freeze_generator_after < self.num_rounds:
            raise ValueError(
                f"freeze-generator-after = {self.freeze_generator_after!r} is not accepted for arm csg-warm with "
                f"num-rounds = {self.num_rounds}: an integer K in 1..{self.num_rounds - 1} is (the rounds its "
                "generator trains)"
            )
        warm = [Arm.parse(a) for a in {self.arm, *self.arm_list} if Arm.parse(a).model == "csg-warm"]
        downlinks = {arm.downlink_or(self.downlink) for arm in warm}
        delta = sorted(d for d in downlinks if d.startswith("delta"))
        if delta:
            raise ValueError(
                f"downlink {delta[0]!r} is not accepted for arm csg-warm: its payload loses the generator after round "
                "K, and a delta downlink's x̂ keeps the payload's shape; accepted are full, fp16 and int8"
            )
        if self.server_optimizer != "fedavg":
            raise ValueError(
                f"server-optimizer = {self.server_optimizer!r} is not accepted for arm csg-warm: its per-element state "
                "would outlive the generator's leaving the payload after round K; accepted is fedavg"
            )

    def _check_dp(self) -> None:
        """The DP settings, and the arms a client-side mode cannot serve: Flower's mods clip the reply's arrays
        against the message's, so both must be the payload itself (no codec, a full downlink, no handoff)."""
        one_of("dp", self.dp, DP_MODES)
        for name in ("dp_noise_multiplier", "dp_clipping_norm", "dp_clip_norm_lr"):  # checked with dp off too
            value = getattr(self, name)
            if not 0 < value < float("inf"):
                raise ValueError(f"{kebab(name)} = {value!r} is not accepted: a finite number > 0 is")
        if not 0 < self.dp_target_delta < 1:
            raise ValueError(f"dp-target-delta = {self.dp_target_delta!r} is not accepted: a number in (0, 1) is")
        if not 0 <= self.dp_target_quantile <= 1:
            raise ValueError(f"dp-target-quantile = {self.dp_target_quantile!r} is not accepted: a number in [0, 1] is")
        if not 0 <= self.dp_max_epsilon < float("inf"):
            raise ValueError(
                f"dp-max-epsilon = {self.dp_max_epsilon!r} is not accepted: a finite number >= 0 is (0 = no limit)"
            )
        # Flower's adaptive wrapper noises the clipped count with std n/20 and needs sigma below twice that
        if self.dp == "central-adaptive" and self.dp_noise_multiplier >= self.sampled_clients / 10:
            raise ValueError(
                f"dp-noise-multiplier = {self.dp_noise_multiplier!r} is not accepted with dp = 'central-adaptive' and "
                f"{self.sampled_clients} clients a round: Flower's adaptive clipping needs sigma < clients a round / 10"
            )
        if self.dp not in CLIENT_DP_MODES:
            return
        for name in sorted({self.arm, *self.arm_list}):
            arm = Arm.parse(name)
            refusal = _client_dp_refusal(arm, arm.downlink_or(self.downlink))
            if refusal:
                raise ValueError(
                    f"arm {name!r} is not accepted with dp = {self.dp!r}: {refusal}; accepted are the central "
                    "modes (the server clips the decoded update) or an arm without codec, downlink and handoff"
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

    @property
    def frozen_after(self) -> int:
        """The round after which this run's arm stops training and sending its generator: K for csg-warm,
        0 (never) for every other arm."""
        return self.freeze_generator_after if Arm.parse(self.arm).model == "csg-warm" else 0

    def model_settings(self, arm: str | None = None) -> ModelSettings:
        """The model of ``arm`` (default: this run's arm; its codec part changes no model): what every
        party builds, and what an export records. A folder set's class count and input channels are
        found from its data (:meth:`dataset_spec`)."""
        shape = {}
        if self.dataset in FOLDER_SETS:
            spec = self.dataset_spec()
            shape = {"num-classes": spec.num_classes, "in-channels": spec.in_channels}
        return ModelSettings.from_mapping({**self.to_flower(), "arm": arm or self.arm, **shape})

    def dataset_spec(self) -> DatasetSpec:
        """The spec of this run's data at its image size (:func:`~fedcsg.data.readers.dataset_spec`: a
        folder set's found from the data in ``data-dir``)."""
        data = self.data_settings
        return dataset_spec(data.dataset, data.image_size, **data.source)

    @property
    def codec(self) -> Codec | None:
        """The uplink codec of this run's arm (``csg+int8``: int8), None for an arm without one."""
        name = Arm.parse(self.arm).codec
        return codec_type(name).of_run(self) if name else None

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

    def execution(self, device_type: str = "cpu") -> Execution:
        """How this run's steps run on a ``device_type`` device (:class:`~fedcsg.nn.execution.Execution`):
        channels-last for a classifier only; ``compile = "auto"`` compiles a classifier where
        :func:`~fedcsg.nn.execution.compile_pays` for the
        images one training process trains over the run (:meth:`images_per_process`)."""
        classifier = task_of(self.dataset) == "classification"
        compiled = self.compile == "on" or (
            self.compile == "auto" and classifier and compile_pays(self.images_per_process(), device_type)
        )
        # Segmentation stays contiguous: channels-last crashes torch 2.14's CPU backward of the small
        # DeepLabV3 (a double free; docs/performance.md).
        return Execution(compile=compiled, channels_last=self.channels_last and classifier, precision=self.precision)

    @property
    def sampling(self) -> dict[str, float | int]:
        """FedAvg's sampling arguments (``fraction_train``, ``min_train_nodes``, ``min_available_nodes``): a
        fixed ``clients-per-round`` is a fraction of exactly that many clients with that many as the minimum;
        else ``fraction-train``, the minimums capped at ``num-clients``. A round samples :func:`sample_size`
        of them."""
        if self.clients_per_round:
            count = self.clients_per_round
            return {
                "fraction_train": count / self.num_clients,
                "min_train_nodes": count,
                "min_available_nodes": max(count, min(self.min_available_nodes, self.num_clients)),
            }
        return {
            "fraction_train": self.fraction_train,
            "min_train_nodes": min(self.min_train_nodes, self.num_clients),
            "min_available_nodes": min(self.min_available_nodes, self.num_clients),
        }

    @property
    def sampled_clients(self) -> int:
        """The clients a round samples once all ``num-clients`` are connected: :func:`sample_size` of
        :attr:`sampling` (``clients-per-round`` where it is set)."""
        sampling = self.sampling
        return sample_size(self.num_clients, float(sampling["fraction_train"]), int(sampling["min_train_nodes"]))

    def images_per_process(self) -> float:
        """Images one training process trains over the run, estimated from the settings: rounds x
        local epochs x the images sampled a round, shared by as many processes as run at once
        (clients a round, at most this machine's cores / client-num-cpus). A run over a whole split
        (``train-limit`` 0) counts as unbounded."""
        if self.train_limit == 0:
            return float("inf")
        sampled = max(1, self.sampled_clients)
        processes = max(1, min(sampled, (os.cpu_count() or 1) // self.client_num_cpus))
        return self.num_rounds * self.local_epochs * self.train_limit * (sampled / self.num_clients) / processes

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
            if key == "client-num-gpus":  # "auto" or a number
                changes[known[key].name] = check_client_num_gpus(value)
                continue
            default = getattr(base, known[key].name)
            changes[known[key].name] = coerce(key, value, type(default))
        return dataclasses.replace(base, **changes)


def _client_dp_refusal(arm: Arm, downlink: str) -> str:
    """Why a client-side DP mode cannot serve ``arm`` (receiving ``downlink``), "" when it can."""
    if arm.codec:
        return f"Flower's mod would clip the {arm.codec}-encoded update, not the update in the arm's space"
    if downlink != "full":
        return f"the message holds the {downlink} downlink's encoding, not the payload the update is taken from"
    if arm.model == "csg-warm":
        return "its messages hand off the frozen generator in a second ArrayRecord, and Flower's mods take one"
    return ""


def _public_fields() -> list[dataclasses.Field]:
    return list(fields(RunConfig))


def identity_of(record: Mapping[str, Any]) -> dict[str, Any]:
    """The identity (see :meth:`RunConfig.identity`) of a kebab-case config record, such as the
    ``config`` a run file holds: its keys that decide what a run computes, a key that an older fedcsg
    did not have read as :data:`ADDED_SETTINGS` says, and without the :data:`MODEL_SETTINGS` that its
    arm's model does not read."""
    arm = str(record.get("arm", ""))
    model = arm.partition(SEPARATOR)[0].partition(DOWN_SEPARATOR)[0]
    return {
        k: v
        for k, v in with_added_settings(record).items()
        if k not in NOT_IDENTITY_KEYS and model in MODEL_SETTINGS.get(k, (model,))
    }


def with_added_settings(record: Mapping[str, Any]) -> dict[str, Any]:
    """``record`` with every :data:`ADDED_SETTINGS` key it lacks at its old-behaviour value."""
    return {**ADDED_SETTINGS, **record}
