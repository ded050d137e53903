"""synth-mri: deterministic per seed, four sites that really differ, cached by parameters."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medtta.data.layout import load_volume, read_dataset, read_manifest
from medtta.data.synthetic import ensure_synthetic
from medtta.data.synthetic.cardiac import LABELS, SITES

PARAMS = {"seed": 3, "cases": {"A": 3, "B": 2, "C": 2, "D": 2}, "splits": {"A": [1, 1]}}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return ensure_synthetic("cardiac-cine", tmp_path_factory.mktemp("s") / "synth", PARAMS)


def test_layout_and_labels(dataset: Path) -> None:
    ds = read_dataset(dataset)
    assert ds.sites == ["A", "B", "C", "D"] and ds.labels == LABELS
    assert [c.split for c in ds.cases_of("A")] == ["train", "val", "test"]
    for case in ds.cases:
        volume = load_volume(case, LABELS)
        assert set(np.unique(volume.label)) == {0, 1, 2, 3}
        pixel = SITES[case.site]["pixel"]
        assert volume.spacing == pytest.approx((pixel, pixel, 8.0))
        assert 8 <= volume.image.shape[2] <= 12


def test_deterministic_per_seed(dataset: Path, tmp_path: Path) -> None:
    again = ensure_synthetic("cardiac-cine", tmp_path / "again", PARAMS)
    other = ensure_synthetic("cardiac-cine", tmp_path / "other", {**PARAMS, "seed": 4})
    first, second, third = (read_manifest(p / "manifest.csv") for p in (dataset, again, other))
    assert first == second
    assert first["A000"]["image_sha256"] != third["A000"]["image_sha256"]


def test_sites_differ_as_documented(dataset: Path) -> None:
    def background_noise(case_id: str) -> float:
        image = nib.load(str(dataset / "imagesTr" / f"{case_id}_0000.nii.gz")).get_fdata()
        corner = image[:6, :6]  # air: pure Rician noise, scaled by the site's intensity scale
        return float(corner.mean() / SITES[case_id[0]]["scale"])

    noise = {site: background_noise(f"{site}000") for site in "ABCD"}
    assert noise["A"] < noise["C"] < noise["B"] < noise["D"]  # Rician floor grows with the noise level


def test_cached_unless_parameters_change(dataset: Path) -> None:
    stamp = (dataset / "generator.json").stat().st_mtime_ns
    ensure_synthetic("cardiac-cine", dataset, PARAMS)
    assert (dataset / "generator.json").stat().st_mtime_ns == stamp
