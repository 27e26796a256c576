"""Flower's private surface (fedcsg.fl.flower_private): present in the installed flwr, and a missing
name reported by its module and the installed version."""

from __future__ import annotations

import pytest

from fedcsg.fl import flower_private

from .sources import lines_matching


def test_the_installed_flwr_has_every_private_name_fedcsg_uses() -> None:
    assert flower_private.missing_names() == []


def test_a_moved_name_is_reported_with_its_module_and_flwr_version(monkeypatch: pytest.MonkeyPatch) -> None:
    import flwr
    import flwr.supercore.run

    monkeypatch.delattr(flwr.supercore.run, "Run")
    assert flower_private.missing_names() == [f"flwr.supercore.run.Run (flwr {flwr.__version__})"]


def test_only_the_adapter_imports_flower_internals() -> None:
    """Outside fedcsg/fl/flower_private.py, fedcsg imports Flower's public packages alone."""
    # flwr.common's own namespace is public (its __all__); its submodules are not
    private = r"^\s*(from|import) flwr\.(common\.|(supercore|proto|server|simulation|cli)\b)"
    assert lines_matching(private, except_in="flower_private.py") == []
