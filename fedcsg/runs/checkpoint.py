"""Crash-safe checkpoints of a federated run, and what resuming one needs.

After every round (round 0, the initial model, included) the ServerApp writes, for its arm::

    DIR/state/<arm>-round-NNNN.safetensors   the global payload after round NNNN (safetensors, never pickle),
                                             and a delta downlink's x̂ under keys ``x-hat:KEY``
    DIR/state/<arm>.json                     round, config and its hash, strategy state, RNG states, the round
                                             records so far, and the size and sha256 of the weights file

Each file is written atomically (temporary file, fsync, rename, fsync of the directory), the weights
first under a name of their own, then the JSON that names them: the JSON is the commit point, so a
run killed at any instant leaves the previous complete round or the new one, never a mix. Older
weights files are deleted only after the JSON that replaces them is in place. (The ServerApp writes
``DIR/arms/<arm>.json`` just before the checkpoint, so that file is never behind it.) A resumed run
reads the JSON, checks the weights file's size and sha256 before parsing it, and continues with the
next round.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from fedcsg.io import DIGEST_KEY, atomic_write_bytes, atomic_write_text, check_schema, strict_json, tensors_digest
from fedcsg.runs.layout import STATE_DIR, in_state_dir, shown_differences, state_path, weights_path
from fedcsg.runs.records import ROUND_SCHEMA
from fedcsg.spec.arms import file_stem
from fedcsg.wire.payload import PayloadLayout, check_record

FORMAT = 1
X_HAT_PREFIX = "x-hat:"  # keys of a delta downlink's x̂ in the weights file (fedcsg.wire.downlink)
STATE_SCHEMA = {  # the state JSON's fields and their JSON types (fedcsg.io.check_schema)
    "format": int,
    "arm": str,
    "round": int,
    "num_rounds": int,
    "config": dict,
    "config_hash": str,
    "weights": {"file": str, "bytes": int, "sha256": str, "keys": [str]},
    "strategy": dict,
    "rng": {"python": list, "numpy": dict, "torch": str},
    "resumed_from?": [int],
    "rounds": [ROUND_SCHEMA],
}


@dataclass(frozen=True)
class Checkpoint:
    """A loaded, verified checkpoint of one arm."""

    arm: str
    round: int
    num_rounds: int
    arrays: ArrayRecord
    rounds: list[dict[str, Any]]
    config: dict[str, Any]
    config_hash: str
    strategy: dict[str, Any]
    rng: dict[str, Any]
    resumed_from: list[int]
    weights_path: Path
    downlink_arrays: ArrayRecord | None = None  # a delta downlink's x̂

    def check_written_under(self, identity: dict[str, Any], where: Path) -> None:
        """Refuse in one line a checkpoint written under another config than ``identity``: its recorded
        config's identity, a setting an older fedcsg did not have read at its old behaviour
        (:func:`~fedcsg.runs.layout.differing_settings`), so that a fedcsg that only added settings resumes
        it. (``config_hash`` is the identity's hash as the writing fedcsg defined it: across versions
        that added settings it differs although the run is the same.)"""
        differing = shown_differences(identity, self.config)
        if differing:
            raise ValueError(
                f"the checkpoint of arm {self.arm!r} in {str(where)!r} was written under another config "
                f"({differing} differ): accepted is --overwrite or another --out"
            )


def config_hash(identity: dict[str, Any]) -> str:
    """sha256 of a config identity (:meth:`fedcsg.spec.config.RunConfig.identity`), keys sorted."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def rng_state() -> dict[str, Any]:
    """Python's, NumPy's global and torch's CPU generator states, as JSON values."""
    version, internal, gauss = random.getstate()
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"]["key"] = numpy_state["state"]["key"].tolist()
    return {
        "python": [version, list(internal), gauss],
        "numpy": numpy_state,
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode("ascii"),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` saved."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = dict(state["numpy"])
    numpy_state["state"] = {**numpy_state["state"], "key": np.asarray(numpy_state["state"]["key"], dtype=np.uint32)}
    np.random.set_state(numpy_state)
    raw = np.frombuffer(base64.b64decode(state["torch"]), dtype=np.uint8).copy()
    torch.set_rng_state(torch.from_numpy(raw))


def save_checkpoint(
    out_dir: Path,
    arm: str,
    server_round: int,
    arrays: ArrayRecord,
    *,
    num_rounds: int,
    rounds: list[dict[str, Any]],
    config: dict[str, Any],
    identity: dict[str, Any],
    strategy: dict[str, Any],
    resumed_from: list[int] | None = None,
    downlink_arrays: ArrayRecord | None = None,
) -> Path:
    """Write the checkpoint of ``arm`` after ``server_round`` (with a delta downlink's x̂,
    ``downlink_arrays``, if any); returns the state JSON's path."""
    from safetensors.numpy import save

    tensors = {key: np.ascontiguousarray(arrays[key].numpy()) for key in arrays.keys()}
    for key, array in (downlink_arrays or ArrayRecord()).items():
        tensors[X_HAT_PREFIX + key] = np.ascontiguousarray(array.numpy())
    keys = list(tensors)
    data = save(tensors, metadata={"arm": arm, DIGEST_KEY: tensors_digest(tensors)})
    weights = weights_path(out_dir, arm, server_round)
    atomic_write_bytes(weights, data)
    document = {
        "format": FORMAT,
        "arm": arm,
        "round": server_round,
        "num_rounds": num_rounds,
        "config": config,
        "config_hash": config_hash(identity),
        "weights": {
            "file": weights.name,
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "keys": keys,
        },
        "strategy": strategy,
        "rng": rng_state(),
        "resumed_from": resumed_from or [],
        "rounds": rounds,
    }
    path = state_path(out_dir, arm)
    atomic_write_text(path, strict_json(document))
    stem = file_stem(arm)
    for stale in path.parent.glob(f"{stem}-round-*.safetensors"):
        if stale != weights:
            stale.unlink(missing_ok=True)
    for torn in path.parent.glob(f".{stem}[.-]*.tmp"):  # left by a write that a kill interrupted
        if torn.name.startswith((f".{stem}.json.", f".{stem}-round-")):
            torn.unlink(missing_ok=True)
    return path


def read_state(out_dir: Path, arm: str) -> dict[str, Any] | None:
    """The state JSON of ``arm`` (weights not read), or None if there is none.

    Raises ValueError (one line) when the file is not a fedcsg checkpoint of this format.
    """
    path = state_path(out_dir, arm)
    if not path.is_file():
        return None
    try:
        document = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"checkpoint state {str(path)!r} is not valid JSON: {error}") from None
    where = f"checkpoint state {str(path)!r}"
    if isinstance(document, dict) and "format" in document and document["format"] != FORMAT:
        raise ValueError(f"{where} has format {document['format']!r}: only format {FORMAT} is accepted")
    check_schema(document, STATE_SCHEMA, where)
    if document["arm"] != arm:
        raise ValueError(f"{where} belongs to arm {document['arm']!r}, not {arm!r}")
    _check_consistent(document, out_dir, arm, where)
    return document


def _check_consistent(document: dict[str, Any], out_dir: Path, arm: str, where: str) -> None:
    """Refuse a state JSON whose fields contradict each other or its files (a hand edit): its round
    must be the last of its round records and within ``num_rounds``, and the weights it names
    the file of that round in its own ``state/`` directory (nothing outside the run directory)."""
    server_round, rounds = document["round"], document["rounds"]
    numbers = [r["round"] for r in rounds]
    if not 0 <= server_round <= document["num_rounds"] or numbers != list(range(server_round + 1)):
        raise ValueError(
            f"{where} is not consistent: round {server_round} of {document['num_rounds']}, but it records rounds "
            f"{numbers[:8]}; accepted is the file as the run wrote it (--overwrite to start again)"
        )
    recorded_rounds = document["config"].get("num-rounds", document["num_rounds"])
    if recorded_rounds != document["num_rounds"]:
        raise ValueError(
            f"{where} is not consistent: num_rounds {document['num_rounds']}, its config's num-rounds "
            f"{recorded_rounds!r}"
        )
    expected = weights_path(out_dir, arm, server_round)
    named = in_state_dir(out_dir, document["weights"]["file"])
    if named.resolve() != expected.resolve() or named.name != expected.name:
        raise ValueError(
            f"{where} names weights file {document['weights']['file']!r}: accepted is {expected.name!r}, the file "
            f"of its round {server_round} in its own {STATE_DIR}/ directory"
        )
    current = rng_state()
    try:
        set_rng_state(document["rng"])
    except (TypeError, ValueError, KeyError, IndexError, OverflowError, RuntimeError) as error:
        raise ValueError(
            f"{where} holds an RNG state that does not load: {' '.join(str(error).split())[:120]}"
        ) from None
    finally:
        set_rng_state(current)


def load_checkpoint(out_dir: Path, arm: str, layout: PayloadLayout | None = None) -> Checkpoint | None:
    """Read and verify the checkpoint of ``arm``; None if there is none.

    The weights file must have the recorded size and sha256 (a truncated or damaged file is
    never parsed), parse as safetensors with the recorded keys and, when ``layout`` is given, match
    the model's payload array for array (shape and dtype). Every failure is a one-line ValueError
    naming the file.
    """
    document = read_state(out_dir, arm)
    if document is None:
        return None
    weights = in_state_dir(out_dir, str(document["weights"]["file"]))
    if not weights.is_file():
        raise ValueError(f"checkpoint weights {str(weights)!r} named by {str(state_path(out_dir, arm))!r} are missing")
    data = weights.read_bytes()
    expected = int(document["weights"]["bytes"])
    if len(data) != expected:
        raise ValueError(
            f"checkpoint weights {str(weights)!r} are truncated or damaged: {len(data)} bytes, {expected} recorded"
        )
    if hashlib.sha256(data).hexdigest() != document["weights"]["sha256"]:
        raise ValueError(f"checkpoint weights {str(weights)!r} are damaged: sha256 differs from the recorded one")
    everything = parse_weights(data, weights, list(document["weights"]["keys"]))
    arrays = ArrayRecord({k: a for k, a in everything.items() if not k.startswith(X_HAT_PREFIX)})
    x_hat = {k.removeprefix(X_HAT_PREFIX): a for k, a in everything.items() if k.startswith(X_HAT_PREFIX)}
    if layout is not None:
        try:
            check_record(arrays, layout)
        except ValueError as error:
            raise ValueError(f"checkpoint weights {str(weights)!r} do not fit the model: {error}") from None
    return Checkpoint(
        arm=arm,
        round=int(document["round"]),
        num_rounds=int(document["num_rounds"]),
        arrays=arrays,
        rounds=list(document["rounds"]),
        config=dict(document["config"]),
        config_hash=str(document["config_hash"]),
        strategy=dict(document["strategy"]),
        rng=dict(document["rng"]),
        resumed_from=list(document.get("resumed_from", [])),
        weights_path=weights,
        downlink_arrays=ArrayRecord(x_hat) if x_hat else None,
    )


def parse_weights(data: bytes, origin: Path, keys: list[str]) -> ArrayRecord:
    """An ArrayRecord (in the order of ``keys``) from safetensors bytes; one-line ValueError if they
    do not parse or hold other keys."""
    from safetensors.numpy import load

    try:
        tensors = load(data)
    except Exception as error:  # safetensors raises its own SafetensorError, or OSError/ValueError
        detail = " ".join(str(error).split())
        raise ValueError(f"checkpoint weights {str(origin)!r} do not parse as safetensors: {detail}") from None
    if sorted(tensors) != sorted(keys):
        raise ValueError(f"checkpoint weights {str(origin)!r} hold keys {sorted(tensors)}, recorded {sorted(keys)}")
    return ArrayRecord({key: Array(tensors[key]) for key in keys})
