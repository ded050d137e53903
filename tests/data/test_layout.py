"""Dataset layout: reading, the seeded split rule, and per-case validation errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medtta.data.layout import assign_splits, load_volume, read_dataset, write_metadata
from medtta.errors import DataError

LABELS = {"background": 0, "organ": 1}


@pytest.fixture
def folder(tmp_path: Path, write_nifti) -> Path:
    """Site X with 10 cases (no split column) and site Y with 3; 3D and 2D volumes of varying size."""
    root = tmp_path / "ds"
    rows = []
    for i in range(13):
        cid, site = f"c{i:02d}", "X" if i < 10 else "Y"
        shape = (20 + i, 16) if i % 2 else (20, 18 + i, 3)
        write_nifti(root / "imagesTr" / f"{cid}_0000.nii.gz", np.random.rand(*shape).astype(np.float32), (0.7, 0.8, 5))
        write_nifti(root / "labelsTr" / f"{cid}.nii.gz", (np.random.rand(*shape) > 0.5).astype(np.uint8))
        rows.append((cid, site, None))
    write_metadata(root, "toy", LABELS, "T1", rows)
    return root


def test_read_dataset(folder: Path) -> None:
    ds = read_dataset(folder)
    assert ds.name == "toy" and ds.sites == ["X", "Y"] and ds.modality == "MRI"
    assert len(ds.cases_of("X")) == 10 and all(c.split is None for c in ds.cases)


def test_seeded_split_rule(folder: Path) -> None:
    ds = read_dataset(folder)
    a = assign_splits(ds, "X", seed=0, fractions=(0.6, 0.2, 0.2))
    b = assign_splits(ds, "X", seed=0, fractions=(0.6, 0.2, 0.2))
    c = assign_splits(ds, "X", seed=1, fractions=(0.6, 0.2, 0.2))
    splits = [case.split for case in a.cases_of("X")]
    assert (splits.count("train"), splits.count("val"), splits.count("test")) == (6, 2, 2)
    assert [x.split for x in a.cases] == [x.split for x in b.cases]
    assert [x.split for x in a.cases] != [x.split for x in c.cases]
    assert all(case.split == "test" for case in a.cases_of("Y"))


def test_split_column_is_honoured(folder: Path) -> None:
    rows = [(f"c{i:02d}", "X" if i < 10 else "Y", "train" if i < 9 else "test") for i in range(13)]
    write_metadata(folder, "toy", LABELS, "T1", rows)
    ds = assign_splits(read_dataset(folder), "X", seed=0, fractions=(0.6, 0.2, 0.2))
    assert [c.split for c in ds.cases] == [r[2] for r in rows]


def test_2d_and_3d_volumes_load(folder: Path) -> None:
    ds = read_dataset(folder)
    v3, v2 = load_volume(ds.cases[0], LABELS), load_volume(ds.cases[1], LABELS)
    assert v3.image.shape == (20, 18, 3) and v3.spacing == pytest.approx((0.7, 0.8, 5.0))
    assert v2.image.shape == (21, 16) and v2.spacing == pytest.approx((0.7, 0.8))


def test_missing_folder_and_files(tmp_path: Path, folder: Path) -> None:
    with pytest.raises(DataError, match="dataset folder not found"):
        read_dataset(tmp_path / "nothing")
    (folder / "labelsTr" / "c03.nii.gz").unlink()
    with pytest.raises(DataError, match=r"labelsTr/c03.nii.gz: missing \(listed in"):
        read_dataset(folder)
    (folder / "dataset.json").write_text("{not json")
    with pytest.raises(DataError, match="dataset.json: not valid JSON"):
        read_dataset(folder)


@pytest.mark.parametrize(
    ("image", "label", "message"),
    [
        (np.zeros((8, 8, 2)), np.zeros((8, 7, 2)), r"c00.nii.gz: shape \(8, 7, 2\) differs from image"),
        (np.full((8, 8, 2), np.nan), np.zeros((8, 8, 2)), "c00_0000.nii.gz: contains NaN or infinite values"),
        (np.zeros((8, 8, 2)), np.full((8, 8, 2), 3), r"label values \[3\] are not in dataset.json labels \[0, 1\]"),
        (np.zeros((8, 8, 2, 2, 2)), np.zeros((8, 8, 2, 2, 2)), "expected a 2D or 3D image"),
    ],
)
def test_invalid_case(folder: Path, write_nifti, image, label, message) -> None:
    write_nifti(folder / "imagesTr" / "c00_0000.nii.gz", image.astype(np.float32))
    write_nifti(folder / "labelsTr" / "c00.nii.gz", label.astype(np.uint8))
    with pytest.raises(DataError, match=message):
        load_volume(read_dataset(folder).cases[0], LABELS)


def test_truncated_file(folder: Path) -> None:
    path = folder / "imagesTr" / "c00_0000.nii.gz"
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(DataError, match="c00_0000.nii.gz: cannot be read as NIfTI"):
        load_volume(read_dataset(folder).cases[0], LABELS)
