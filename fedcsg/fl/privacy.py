"""Differential privacy from Flower's own pieces (run setting ``dp``, docs/privacy.md).

Central modes wrap a plain :class:`flwr.serverapp.strategy.FedAvg` (:class:`DecodedFedAvg`) in Flower's
strategy wrapper; :class:`~fedcsg.fl.strategy.CSGFedAvg` hands that wrapper the replies it has checked
and decoded, so clipping and noise act on the update in the arm's own space (for csg: generator,
codes, ordinary layers) whatever the uplink codec. The wrapper sees the payload's floating entries
only: integer buffers (BatchNorm's batch counters) take the exact average beside it.

Client modes run Flower's mods on the client (:func:`dp_mod`): ``client-fixed`` is ``fixedclipping_mod``
under the client-side wrapper, ``local`` is ``LocalDpMod`` with noise ``sigma * C`` on every update.

Every mode accounts with Flower's ``RdpAccountant`` (no amplification, add-or-remove-one client): the
fixed-clipping wrappers compose their releases themselves and refuse the one that would pass
``dp-max-epsilon`` (``PrivacyBudgetExhausted``); for the adaptive wrapper and ``local``, whose Flower
pieces take no accountant, :class:`Privacy` composes the same Gaussian event per released round.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable, Iterable
from logging import WARNING
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp.mod import LocalDpMod, fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import log
from flwr.serverapp import GaussianPrivacyEvent, Grid, NeighboringRelation, PrivacyConfig, SamplingMethod
from flwr.serverapp.exception import PrivacyBudgetExhausted
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    Strategy,
)

from fedcsg.spec.config import RunConfig
from fedcsg.wire.messages import ARRAYS, WEIGHT_KEY
from fedcsg.wire.payload import PayloadLayout

Configure = Callable[[int, ConfigRecord, Grid], Iterable[Message]]
ACCOUNTED_BY_FLOWER = ("central-fixed", "client-fixed")  # wrappers that take Flower's accountant themselves


def floating_split(record: ArrayRecord) -> tuple[ArrayRecord, ArrayRecord]:
    """(floating entries, the rest) of ``record``, each in ``record``'s order: DP acts on the first."""
    floats, others = ArrayRecord(), ArrayRecord()
    for key, array in record.items():
        (floats if np.issubdtype(np.dtype(array.dtype), np.floating) else others)[key] = array
    return floats, others


def floor_variances(arrays: ArrayRecord, layout: PayloadLayout) -> ArrayRecord:
    """``arrays`` (a DP round's average in ``layout``) with every BatchNorm running variance floored at 0.

    The noise moves running variances like any coordinate and can push one below zero, which BatchNorm
    turns into NaN; the floor is post-processing of the release, which costs no privacy."""
    variances = {entry.key for entry in layout.floating if entry.key.endswith("running_var")}
    masks = layout.element_mask(variances)
    floored = ArrayRecord()
    for key, array in arrays.items():
        mask = masks.get(key)
        if mask is not None and mask.any():
            values = array.numpy().copy()
            values[mask.reshape(values.shape)] = np.maximum(values[mask.reshape(values.shape)], 0)
            array = Array(values)
        floored[key] = array
    return floored


def local_epsilon(cfg: RunConfig) -> float:
    """The per-release epsilon that makes ``LocalDpMod``'s noise ``sigma * C`` (its sensitivity is ``C``):
    ``sqrt(2 ln(1.25 / delta)) / sigma``, the classic Gaussian mechanism's bound."""
    return math.sqrt(2 * math.log(1.25 / cfg.dp_target_delta)) / cfg.dp_noise_multiplier


def check_accounting(cfg: RunConfig) -> None:
    """Refuse in one line a ``dp`` mode where Google's dp-accounting, the backend of Flower's
    ``RdpAccountant``, is not installed (the ``privacy`` extra: the server accounts, devices need none)."""
    if cfg.dp != "none" and importlib.util.find_spec("dp_accounting") is None:
        raise ValueError(
            f"dp = {cfg.dp!r} is not accepted here: dp-accounting (Flower's accountant) is not installed "
            '(pip install "fedcsg[privacy]"); accepted is dp = "none" or installing it'
        )


def accountant(cfg: RunConfig) -> Any:
    """Flower's ``RdpAccountant`` for ``cfg``'s clients (None for ``dp = "none"``): no amplification by
    sampling (what Flower's accounted wrappers require), ``dp-max-epsilon`` its limit (0: none)."""
    if cfg.dp == "none":
        return None
    check_accounting(cfg)
    from flwr.serverapp import RdpAccountant  # loads Google's dp-accounting

    config = PrivacyConfig(
        target_delta=cfg.dp_target_delta,
        population_size=cfg.num_clients,
        neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
        sampling_method=SamplingMethod.NO_AMPLIFICATION,
        max_epsilon=cfg.dp_max_epsilon or None,
    )
    return RdpAccountant(config)


class DecodedFedAvg(FedAvg):
    """Flower's FedAvg (its ``aggregate_train``, as an accounted wrapper requires) over decoded replies,
    whose ``configure_train`` is the outer strategy's (``configure``), with the config the wrapper filled."""

    def __init__(self, configure: Configure) -> None:
        super().__init__(weighted_by_key=WEIGHT_KEY, fraction_evaluate=0.0)
        self._configure = configure

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self._configure(server_round, config, grid)


def wrapper(cfg: RunConfig, num_sampled: int, configure: Configure, account: Any) -> Strategy | None:
    """Flower's DP strategy wrapper of ``cfg.dp`` around a :class:`DecodedFedAvg` (None for ``none``, ``local``)."""
    inner = DecodedFedAvg(configure)
    sigma, clip = cfg.dp_noise_multiplier, cfg.dp_clipping_norm
    if cfg.dp == "central-fixed":
        return DifferentialPrivacyServerSideFixedClipping(inner, sigma, clip, num_sampled, accountant=account)
    if cfg.dp == "client-fixed":
        return DifferentialPrivacyClientSideFixedClipping(inner, sigma, clip, num_sampled, accountant=account)
    if cfg.dp == "central-adaptive":
        return DifferentialPrivacyServerSideAdaptiveClipping(
            inner,
            sigma,
            num_sampled,
            initial_clipping_norm=clip,
            target_clipped_quantile=cfg.dp_target_quantile,
            clip_norm_lr=cfg.dp_clip_norm_lr,
        )
    return None


class Privacy:
    """One strategy's DP: Flower's wrapper between the sampling and the average, and the run's accountant.

    Parameters
    ----------
    cfg
        The run's DP settings (``dp`` not ``none``).
    num_sampled
        The clients every round samples: each release averages exactly this many updates.
    configure
        The strategy's own ``configure_train`` (round, config, grid -> messages), called by the wrapper.
    account
        The run's accountant (:func:`accountant`), shared by the phases of a csg-warm arm.
    """

    def __init__(self, cfg: RunConfig, num_sampled: int, configure: Configure, account: Any) -> None:
        self.mode = cfg.dp
        self.sigma = cfg.dp_noise_multiplier
        self.num_sampled = num_sampled
        self.accountant = account
        self.configure = configure
        self.wrapper = wrapper(cfg, num_sampled, configure, account if cfg.dp in ACCOUNTED_BY_FLOWER else None)

    @property
    def flower_accounts(self) -> bool:
        return self.mode in ACCOUNTED_BY_FLOWER

    def event(self) -> GaussianPrivacyEvent:
        """One round's release: the Gaussian mechanism of noise multiplier sigma over the sampled clients."""
        return GaussianPrivacyEvent(self.sigma, self.num_sampled, self.accountant.config.population_size)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        """The round's messages through the wrapper (``arrays``: the payload as the clients receive it).

        Raises
        ------
        PrivacyBudgetExhausted
            When the round's release would pass ``dp-max-epsilon``.
        """
        if not self.flower_accounts and self.accountant.config.max_epsilon is not None:
            if self.accountant.would_exceed(self.event()):
                spent = self.accountant.get_privacy_spent()
                raise PrivacyBudgetExhausted(
                    f"The next private release would exceed max_epsilon (current epsilon: {spent.epsilon})."
                )
        if self.wrapper is None:
            return list(self.configure(server_round, config, grid))
        return list(self.wrapper.configure_train(server_round, floating_split(arrays)[0], config, grid))

    def average(self, server_round: int, decoded: list[ArrayRecord]) -> ArrayRecord | None:
        """The wrapper's release of the round's floating entries (uniform FedAvg of the clipped updates
        plus noise), None when the round cannot be released: fewer updates than sampled (the noise and the
        accounting are sized for all of them; Flower's fixed-clipping wrappers refuse such a round too, its
        adaptive one would not) or one that Flower cannot clip. None as well without a wrapper (``local``:
        the clients noised their updates, the caller averages as usual)."""
        if self.wrapper is None:
            return None
        if len(decoded) != self.num_sampled:
            log(
                WARNING,
                "round %d: %d of %d sampled updates accepted, and a DP release needs every one",
                server_round,
                len(decoded),
                self.num_sampled,
            )
            self.abandon(server_round)
            return None
        replies = [_reply(floating_split(record)[0], node) for node, record in enumerate(decoded)]
        try:
            arrays, _ = self.wrapper.aggregate_train(server_round, replies)
        except ZeroDivisionError:  # Flower 1.41 clips by dividing by the update's norm: a zero update raises
            log(
                WARNING,
                "round %d: a client's update is exactly zero, which Flower's clipping cannot scale",
                server_round,
            )
            return None
        return arrays

    def released(self) -> None:
        """A round's average was released: compose its event where the wrapper does not."""
        if not self.flower_accounts:
            self.accountant.compose(self.event())

    def abandon(self, server_round: int) -> None:
        """A round failed before its average: drop the event an accounted wrapper holds for it."""
        if self.flower_accounts and self.wrapper is not None:
            self.wrapper.aggregate_train(server_round, [])

    @property
    def epsilon(self) -> float:
        """The epsilon spent so far at ``dp-target-delta`` (0 before the first release)."""
        return float(self.accountant.get_privacy_spent().epsilon) if self.accountant.num_releases else 0.0

    @property
    def clipping_norm(self) -> float:
        """The clipping norm now (central-adaptive moves it every round)."""
        return float(getattr(self.wrapper, "clipping_norm", 0.0))

    def state_dict(self) -> dict[str, Any]:
        return {"accountant": self.accountant.state_dict(), "clipping_norm": self.clipping_norm}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.accountant.load_state_dict(state["accountant"])
        if self.wrapper is not None and state.get("clipping_norm"):
            self.wrapper.clipping_norm = float(state["clipping_norm"])


def _reply(arrays: ArrayRecord, node: int) -> Message:
    """A decoded update as the reply Flower's wrappers read: one ArrayRecord, weight 1 (uniform FedAvg)."""
    content = RecordDict({ARRAYS: arrays, "metrics": MetricRecord({WEIGHT_KEY: 1})})
    return Message(content=content, dst_node_id=node, message_type=MessageType.TRAIN)


ClientMod = Callable[[Message, Context, ClientAppCallable], Message]


def client_mod(cfg: RunConfig) -> ClientMod | None:
    """Flower's client mod of ``cfg.dp``: ``fixedclipping_mod`` (client-fixed), ``LocalDpMod`` (local), else None."""
    if cfg.dp == "client-fixed":
        return fixedclipping_mod
    if cfg.dp == "local":
        clip = cfg.dp_clipping_norm
        return LocalDpMod(clip, clip, local_epsilon(cfg), cfg.dp_target_delta)
    return None


def on_floating_entries(mod: ClientMod, msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """``mod`` (a Flower client mod) run on the floating entries of the message's and the reply's payload:
    the app trains from the whole payload, and the reply's integer buffers pass beside the mod, in place."""
    whole = msg.content[ARRAYS]
    kept: dict[str, ArrayRecord] = {}

    def app(message: Message, ctxt: Context) -> Message:
        message.content[ARRAYS] = whole
        reply = call_next(message, ctxt)
        if not reply.has_error():
            kept["reply"] = reply.content[ARRAYS]
            reply.content[ARRAYS] = floating_split(kept["reply"])[0]
        return reply

    msg.content[ARRAYS] = floating_split(whole)[0]
    reply = mod(msg, context, app)
    if reply.has_error() or "reply" not in kept:
        return reply
    clipped = reply.content[ARRAYS]
    reply.content[ARRAYS] = ArrayRecord({k: clipped[k] if k in clipped else v for k, v in kept["reply"].items()})
    return reply
