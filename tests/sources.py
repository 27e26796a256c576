"""The package's own source lines, for tests that hold a rule of the code's layout."""

from __future__ import annotations

import re
from pathlib import Path

import fedcsg


def lines_matching(pattern: str, *, except_in: str) -> list[str]:
    """``module:line`` of every line of fedcsg's modules matching ``pattern``, the file named
    ``except_in`` (the rule's one home) aside."""
    root, compiled = Path(fedcsg.__file__).parent, re.compile(pattern)
    return [
        f"{path.relative_to(root)}:{number}"
        for path in sorted(root.rglob("*.py"))
        if path.name != except_in
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if compiled.search(line)
    ]
