"""Server optimizers: one step of Flower's FedAvgM / FedAdam / FedYogi from (global, exact average).

:class:`~fedcsg.fl.strategy.CSGFedAvg` computes the exact float64 weighted average of the replies;
a :class:`ServerOptimizer` then turns (the global payload the clients were sent, that average)
into the new global payload. ``fedavg`` takes the average as it is; the others run one
``aggregate_train`` step of Flower's own strategy class (``flwr.serverapp.strategy``), which holds
the optimizer state (momentum vector, Adam / Yogi moments), so the update rule is Flower's code,
not a copy of it.

Why Flower's classes are not the strategy itself
-------------------------------------------------
Used as is, FedAvgM / FedAdam / FedYogi would (1) average in the arrays' own dtype and turn an
int64 array (BatchNorm's ``num_batches_tracked``) into float64, (2) apply the optimizer to every
entry, BatchNorm running statistics included, and with fedcsg's ``flat`` packing they cannot tell
parameters from buffers inside one concatenated array, (3) move a factor that ``alternate``
aggregation kept fixed in its round (Adam's first moment keeps it moving), and (4) hold their
state in attributes a checkpoint does not see. So each step is fed a *single synthetic reply*
carrying the exact average (Flower's weighted average of one reply with weight 1 is that reply,
exactly), of float64 copies of the payload arrays; only the elements selected by a per-round
mask (the trainable parameters, minus a factor frozen this round) take the optimizer's value,
every other element takes the exact average (BatchNorm statistics are running averages of data,
not parameters with a gradient: they are averaged, never "optimized"), and the optimizer state of
unselected elements is left as it was. Results are cast back to each array's dtype.
:meth:`ServerOptimizer.state_dict` exports the state (float64 arrays, base64) for checkpoints.
"""

from __future__ import annotations

import base64
import inspect
import logging
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedYogi

from fedcsg.spec.checks import one_of
from fedcsg.spec.config import SERVER_OPTIMIZERS
from fedcsg.wire.messages import ARRAYS, METRICS, WEIGHT_KEY

_FLOWER_CLASSES: dict[str, type[FedAvg]] = {"fedavgm": FedAvgM, "fedadam": FedAdam, "fedyogi": FedYogi}
_LR_ARGUMENT = {"fedavgm": "server_learning_rate", "fedadam": "eta", "fedyogi": "eta"}
_STATE_ATTRS = {"fedavgm": ("momentum_vector",), "fedadam": ("m_t", "v_t"), "fedyogi": ("m_t", "v_t")}

Mask = dict[str, np.ndarray]  # ArrayRecord key -> flat bool array: the elements the optimizer moves


def default_server_lr(name: str) -> float:
    """Flower's default server learning rate of optimizer ``name`` (1.0 for fedavg)."""
    if name == "fedavg":
        return 1.0
    return float(inspect.signature(_FLOWER_CLASSES[name]).parameters[_LR_ARGUMENT[name]].default)


class ServerOptimizer:
    """Turn (global, exact average) into the new global payload with one step of a Flower strategy.

    Parameters
    ----------
    name
        One of :data:`SERVER_OPTIMIZERS`.
    lr
        Server learning rate (FedAvgM's ``server_learning_rate``, FedAdam's / FedYogi's ``eta``);
        0 takes Flower's default for the optimizer.
    momentum
        FedAvgM's ``server_momentum``.
    beta_1, beta_2, tau
        FedAdam's / FedYogi's moment decays and adaptivity.
    """

    def __init__(
        self,
        name: str = "fedavg",
        *,
        lr: float = 0.0,
        momentum: float = 0.9,
        beta_1: float = 0.9,
        beta_2: float = 0.99,
        tau: float = 1e-3,
    ) -> None:
        one_of("server-optimizer", name, SERVER_OPTIMIZERS)
        self.name = name
        self.lr = lr or default_server_lr(name)
        self.flower: FedAvg | None = None
        if name == "fedavgm":
            self.flower = FedAvgM(server_learning_rate=self.lr, server_momentum=momentum)
        elif name in ("fedadam", "fedyogi"):
            self.flower = _FLOWER_CLASSES[name](eta=self.lr, beta_1=beta_1, beta_2=beta_2, tau=tau)

    @property
    def stateful(self) -> bool:
        return self.flower is not None

    def __call__(self, server_round: int, current: ArrayRecord, average: ArrayRecord, mask: Mask) -> ArrayRecord:
        """The new global payload after ``server_round``.

        ``current`` is the global payload the round's clients were sent, ``average`` the exact
        weighted average of their replies (same keys, shapes and dtypes), ``mask`` the elements
        the optimizer may move (per ArrayRecord key, flat); every other element is the average.
        """
        if self.flower is None:
            return average
        keys = [k for k in average if k in mask]  # the same keys every round: Flower keys its state by them
        cur = {k: current[k].numpy().astype(np.float64).ravel() for k in keys}
        avg = {k: average[k].numpy().astype(np.float64).ravel() for k in keys}
        before = self._state_arrays()
        stepped = self._flower_step(server_round, cur, avg)
        self._keep_state_outside(before, mask, keys)
        out = {}
        for key in average:
            array = average[key].numpy()
            if key in keys:
                merged = np.where(mask[key], stepped[key], avg[key]).reshape(array.shape)
                array = np.asarray(merged, dtype=array.dtype)
            out[key] = Array(array)
        return ArrayRecord(out)

    def _flower_step(self, server_round: int, cur: dict[str, np.ndarray], avg: dict[str, np.ndarray]) -> dict:
        flower = self.flower
        assert flower is not None
        if isinstance(flower, FedAvgM):
            flower.current_arrays = ArrayRecord({k: Array(v) for k, v in cur.items()})
        else:
            flower.current_arrays = dict(cur)
        reply = Message(
            content=RecordDict(
                {
                    ARRAYS: ArrayRecord({k: Array(v) for k, v in avg.items()}),
                    METRICS: MetricRecord({WEIGHT_KEY: 1}),
                }
            ),
            dst_node_id=0,
            message_type=MessageType.TRAIN,
        )
        flwr_logger = logging.getLogger("flwr")
        level = flwr_logger.level
        flwr_logger.setLevel(logging.WARNING)  # Flower logs "Received 1 results" for the synthetic reply
        try:
            arrays, _ = flower.aggregate_train(server_round, [reply])
        finally:
            flwr_logger.setLevel(level)
        assert arrays is not None
        return {k: arrays[k].numpy().astype(np.float64) for k in cur}

    def _state_arrays(self) -> dict[str, Any]:
        if self.flower is None:
            return {}
        return {attr: getattr(self.flower, attr) for attr in _STATE_ATTRS[self.name]}

    def _keep_state_outside(self, before: dict[str, Any], mask: Mask, keys: list[str]) -> None:
        """Undo the step's change of the optimizer state on the elements outside ``mask``."""
        for attr, old in before.items():
            new = getattr(self.flower, attr)
            if old is None or not old:
                # First step: state born here; outside the mask it must stay what a no-step leaves.
                old = _zero_state(attr, keys, new)
            if isinstance(new, list):  # FedAvgM's momentum vector, in key order
                new = [np.where(mask[k], n, o) for k, n, o in zip(keys, new, old, strict=True)]
            else:
                new = {k: np.where(mask[k], new[k], old[k]) for k in new}
            setattr(self.flower, attr, new)

    # -- state -------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The optimizer state as JSON values (float64 arrays in base64)."""
        state: dict[str, Any] = {"name": self.name}
        for attr, value in self._state_arrays().items():
            if isinstance(value, list):
                state[attr] = [_encode(v) for v in value]
            elif value:
                state[attr] = {k: _encode(v) for k, v in value.items()}
            else:
                state[attr] = None
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("name", self.name) != self.name:
            raise ValueError(f"checkpoint holds {state['name']!r} server-optimizer state, the run uses {self.name!r}")
        if self.flower is None:
            return
        for attr in _STATE_ATTRS[self.name]:
            value = state.get(attr)
            if isinstance(value, list):
                value = [_decode(v) for v in value]
            elif value:
                value = {k: _decode(v) for k, v in value.items()}
            setattr(self.flower, attr, value)


def _zero_state(attr: str, keys: list[str], like: Any) -> Any:
    if isinstance(like, list):
        return [np.zeros_like(v) for v in like]
    return {k: np.zeros_like(v) for k, v in like.items()}


def _encode(array: np.ndarray) -> dict[str, Any]:
    array = np.ascontiguousarray(array, dtype=np.float64)
    return {"shape": list(array.shape), "data": base64.b64encode(array.tobytes()).decode("ascii")}


def _decode(value: dict[str, Any]) -> np.ndarray:
    raw = np.frombuffer(base64.b64decode(value["data"]), dtype=np.float64).copy()
    return raw.reshape(value["shape"])
