"""Files that survive a crash and parse anywhere: atomic writes and strict JSON.

Every file fedcsg writes for later (round records, checkpoints, reports) goes through
:func:`atomic_write_bytes`, and every JSON document through :func:`strict_json`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers, and a restart after a crash, see the old or the
    new file, never a torn one: temporary file in the same directory, fsync, rename, fsync of the
    directory (so that the rename itself survives a power loss). An OSError (a full disk, say) names
    ``path``, whichever step raised it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), 0o644)  # mkstemp makes 0600; results are meant to be shared
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(error, OSError):
            error.filename, error.filename2 = str(path), None
        raise
    _fsync_dir(path.parent)


def writable_dir(path: Path, what: str = "output directory") -> Path:
    """Make ``path`` (and its parents) a directory this process can write files in, or raise a one-line
    ValueError naming it: an existing non-directory, a parent that cannot be made (permission, a
    read-only or virtual file system, a file in the way) or a directory without write access."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what} {str(path)!r} exists and is not a directory: accepted is a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"{what} {str(path)!r} cannot be made: {error.strerror or error}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {str(path)!r} cannot be written: permission denied")
    return path


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically, as :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"))


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # a platform without directory handles: the rename is as durable as it gets
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


NON_FINITE_KEY = "non_finite"  # in a written record: {field: "nan" | "inf" | "-inf"} for fields written as null


def _finite(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None; a dict that held one gains
    ``non_finite`` = {key: "nan" | "inf" | "-inf"}, so the record says why the value is null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        out = {k: _finite(v) for k, v in value.items()}
        why = {str(k): str(v).lower() for k, v in value.items() if isinstance(v, float) and not math.isfinite(v)}
        if why:
            out[NON_FINITE_KEY] = {**out.get(NON_FINITE_KEY, {}), **why}
        return out
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def strict_json(document: Any, indent: int | None = 1) -> str:
    """``document`` as strict JSON (RFC 8259: no NaN or Infinity, which JavaScript's ``JSON.parse``
    and most databases refuse): a non-finite number becomes null, and its record says why
    (``non_finite``). Every JSON file fedcsg writes goes through here."""
    return json.dumps(_finite(document), indent=indent, allow_nan=False)


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; one-line ValueError when it is not valid JSON or not an object."""
    try:
        document = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{str(path)!r} is not valid JSON ({error})") from None
    if not isinstance(document, dict):
        raise ValueError(f"{str(path)!r} is not a fedcsg record (a JSON object is accepted)")
    return document


Schema = type | tuple | dict | list  # see check_schema


def check_schema(value: Any, schema: Schema, where: str) -> None:
    """Raise a one-line ValueError naming ``where`` and the path of the first field of ``value`` (a
    parsed JSON document) that does not fit ``schema``.

    ``schema`` is a type or a tuple of types (``int`` excludes bool; ``float`` takes an int; ``None``
    in a tuple allows null; ``([int], None)``: a list or null), a dict ``{key: schema}`` (an object
    holding those keys, more allowed; a key ending in ``?`` may be absent), or a one-item list
    ``[schema]`` (a list of such items).
    """
    _check(value, schema, where, "")


def _kind_name(schema: Schema) -> str:
    if isinstance(schema, dict):
        return "an object"
    if isinstance(schema, list):
        return "a list"
    kinds = schema if isinstance(schema, tuple) else (schema,)
    return " or ".join("null" if k is None else k.__name__ for k in kinds)


def _fits(value: Any, kinds: tuple) -> bool:
    for kind in kinds:
        if kind is None and value is None:
            return True
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return True
        if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
            return True
        if kind not in (None, int, float) and isinstance(value, kind):
            return True
    return False


def _check(value: Any, schema: Schema, where: str, at: str) -> None:
    def fail() -> None:
        shown = repr(value) if len(repr(value)) <= 40 else f"{type(value).__name__} {repr(value)[:30]}..."
        raise ValueError(
            f"{where} is not a fedcsg record: {at or 'the document'} is {shown}, accepted is {_kind_name(schema)}"
        )

    if isinstance(schema, dict):
        if not isinstance(value, dict):
            fail()
        for key, sub in schema.items():
            name = key.removesuffix("?")
            if name not in value:
                if key.endswith("?"):
                    continue
                raise ValueError(f"{where} is not a fedcsg record: {at + '.' if at else ''}{name} is missing")
            _check(value[name], sub, where, f"{at}.{name}" if at else name)
    elif isinstance(schema, list):
        if not isinstance(value, list):
            fail()
        for i, item in enumerate(value):
            _check(item, schema[0], where, f"{at}[{i}]")
    elif isinstance(schema, tuple) and any(isinstance(k, list | dict) for k in schema):
        if value is None and None in schema:
            return
        _check(value, next(k for k in schema if isinstance(k, list | dict)), where, at)
    elif not _fits(value, schema if isinstance(schema, tuple) else (schema,)):
        fail()


DIGEST_KEY = "tensors-sha256"  # safetensors metadata: the file's own digest of its tensors (tensors_digest)


def tensors_digest(arrays: Mapping[str, Any]) -> str:
    """sha256 over the tensors of a model file, by key in sorted order: key, dtype, shape and bytes of
    each array (NumPy arrays, or anything with ``.numpy()``). Every safetensors file fedcsg writes
    carries it as :data:`DIGEST_KEY` metadata, and every path that loads one checks it."""
    import numpy as np

    digest = hashlib.sha256()
    for key in sorted(arrays):
        value = arrays[key]
        array = np.ascontiguousarray(value if isinstance(value, np.ndarray) else value.numpy())
        digest.update(f"{key}\0{array.dtype.str}\0{list(array.shape)}\0".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()
