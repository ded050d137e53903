"""Registry: register, fnmatch listing, create, and entry-point discovery as a third-party plugin uses it."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch

from medtta.adapters.base import Adapter
from medtta.errors import RegistryError
from medtta.registry import ADAPTERS, Registry

PLUGIN = '''
from typing import ClassVar

from medtta.adapters.base import Adapter


class Halve(Adapter):
    """Halves the logits (a third-party test plugin)."""

    defaults: ClassVar[dict] = {"factor": 0.5}

    def predict(self, x):
        return self.model(x) * self.hparams["factor"]
'''


def _install_plugin(root: Path, entry: str) -> None:
    """A plugin distribution on sys.path, found by importlib.metadata like a pip-installed one."""
    (root / "medtta_test_plugin.py").write_text(PLUGIN)
    info = root / "medtta_test_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: medtta-test-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(textwrap.dedent(f"""
        [medtta.adapters]
        {entry}
    """))


def test_builtin_adapters_come_from_entry_points() -> None:
    assert {"source", "bn-stats", "tent"} <= set(ADAPTERS.list())
    assert ADAPTERS.list("*tent*") == ["sam-tent", "tent"]
    assert ADAPTERS.list("bn-*") == ["bn-stats"]
    assert ADAPTERS.describe("tent").startswith("Minimize the entropy")


def test_register_and_create() -> None:
    registry = Registry("medtta.test-nothing", "widget")

    @registry.register("double")
    class Double:
        def __init__(self, x: int) -> None:
            self.x = 2 * x

    assert registry.list() == ["double"]
    assert registry.create("double", 3).x == 6


def test_unknown_name_lists_available() -> None:
    available = ", ".join(ADAPTERS.list())  # every registered one, sorted
    with pytest.raises(RegistryError, match=rf"unknown adapter 'nope' \(available: {available}\)"):
        ADAPTERS.create("nope", torch.nn.Identity())


def test_third_party_plugin_is_discovered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _install_plugin(tmp_path, "halve = medtta_test_plugin:Halve")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = Registry("medtta.adapters", "adapter")
    assert "halve" in registry.list()
    adapter = registry.create("halve", torch.nn.Identity(), factor=0.25)
    assert isinstance(adapter, Adapter)
    assert torch.equal(adapter.predict(torch.ones(2, 1)), torch.full((2, 1), 0.25))
    assert registry.describe("halve") == "Halves the logits (a third-party test plugin)."


def test_broken_plugin_fails_naming_its_entry_point(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _install_plugin(tmp_path, "broken = medtta_test_plugin_missing:Nothing")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = Registry("medtta.adapters", "adapter")
    with pytest.raises(RegistryError, match="medtta_test_plugin_missing:Nothing"):
        registry.get("broken")
