"""Shared fixtures: isolated data/results dirs and a NIfTI writer for building test datasets."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medtta.data.synthetic.cardiac import generate


@pytest.fixture(autouse=True)
def isolated_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test gets its own MEDTTA_DATA / MEDTTA_RESULTS and no inherited MLflow URI."""
    monkeypatch.setenv("MEDTTA_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("MEDTTA_RESULTS", str(tmp_path / "results"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture
def write_nifti() -> Callable[..., Path]:
    """`write_nifti(path, array, spacing=(1, 1, 1))` writes a NIfTI file, creating folders."""

    def write(path: Path, array: np.ndarray, spacing: tuple[float, ...] = (1.0, 1.0, 1.0)) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        affine = np.diag([*spacing[:3], *([1.0] * (3 - len(spacing[:3]))), 1.0])
        nib.save(nib.Nifti1Image(np.asarray(array), affine), str(path))
        return path

    return write


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny generated cardiac dataset folder, one per test module: site A 6 cases (4 train, 1 val, 1 test), sites
    B and C 2 cases each."""
    root = tmp_path_factory.mktemp("ds") / "tiny-cardiac"
    generate(root, seed=1, cases={"A": 6, "B": 2, "C": 2}, splits={"A": [4, 1]})
    return root


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A results dir shared by the tests of a module, so that its source models are trained once."""
    return tmp_path_factory.mktemp("results")
