"""Strict JSON reading for the tests: what JavaScript's ``JSON.parse`` and most databases accept."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class NonStrictJSON(ValueError):
    """A JSON text holds NaN, Infinity or -Infinity (Python writes them; RFC 8259 has no such values)."""


def _refuse(constant: str) -> Any:
    raise NonStrictJSON(f"non-standard JSON constant {constant}")


def loads_strict(text: str) -> Any:
    """``json.loads`` that refuses NaN, Infinity and -Infinity."""
    return json.loads(text, parse_constant=_refuse)


def results_files(root: Path) -> list[Path]:
    """The results files fedcsg writes under ``root``: results.json, arms/*.json, state/*.json."""
    return sorted(
        path
        for path in Path(root).rglob("*.json")
        if path.name == "results.json" or path.parent.name in ("arms", "state")
    )
