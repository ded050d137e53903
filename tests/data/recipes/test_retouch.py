"""RETOUCH recipe: a tiny download in the official MetaImage layout, prepared end to end through the CLI."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import recipe_checks as checks
import SimpleITK as sitk

from medtta.data.recipes.retouch import RetouchRecipe
from medtta.protocol import list_protocols

# MetaImage (x, y, z) = (lateral, axial, B-scan separation) in mm, anisotropic as RETOUCH headers are
SPACING = (0.0117, 0.0039, 0.047)
SHAPE = (12, 10, 3)  # x, y, z: 3 B-scans of 12 A-scans, 10 pixels deep
CASES = {"Cirrus": ["TRAIN001", "TRAIN002"], "Spectralis": ["TRAIN025"], "Topcon": ["TRAIN049"]}


def write_mhd(path: Path, volume: np.ndarray, spacing: tuple[float, ...] = SPACING) -> None:
    """Write an (x, y, z) array as MetaImage (.mhd header + .raw data), the way the challenge ships it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(volume.T)  # SimpleITK arrays are (z, y, x)
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))


@pytest.fixture
def download(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """Three vendor training sets (4 cases) and a test set without references, with their references."""
    root, references = tmp_path / "download", {}
    rng = np.random.default_rng(0)
    for vendor, case_ids in CASES.items():
        dtype = np.uint16 if vendor == "Spectralis" else np.uint8  # as the vendors' files are
        for cid in case_ids:
            case = root / f"RETOUCH-TrainingSet-{vendor}" / cid
            write_mhd(case / "oct.mhd", rng.integers(0, 200, SHAPE).astype(dtype))
            references[cid] = rng.integers(0, 4, SHAPE).astype(np.uint8)
            write_mhd(case / "reference.mhd", references[cid])
    write_mhd(root / "RETOUCH-TestSet-Cirrus" / "TEST001" / "oct.mhd", rng.integers(0, 200, SHAPE).astype(np.uint8))
    return root, references


def test_prepare_end_to_end(download, tmp_path: Path) -> None:
    root, references = download
    out = tmp_path / "retouch"
    checks.assert_prepared(checks.prepare("retouch", root, out), "retouch", 4)

    assert checks.read_sites(out) == [["case_id", "site"], ["TRAIN001", "Cirrus"], ["TRAIN002", "Cirrus"],
                                      ["TRAIN025", "Spectralis"], ["TRAIN049", "Topcon"]]
    assert not (out / "imagesTr" / "TEST001_0000.nii.gz").exists()

    for cid, reference in references.items():
        image, label = nib.load(out / "imagesTr" / f"{cid}_0000.nii.gz"), nib.load(out / "labelsTr" / f"{cid}.nii.gz")
        # B-scans stay along the last axis, where the slice-wise models take their slices
        assert image.shape == label.shape == SHAPE
        assert np.array_equal(np.asanyarray(label.dataobj), reference)
        assert set(np.unique(np.asanyarray(label.dataobj)).tolist()) <= {0, 1, 2, 3}
        assert image.header.get_zooms() == pytest.approx(SPACING)
        assert np.allclose(image.affine, label.affine)

    checks.assert_manifest_matches(out, ["TRAIN001", "TRAIN002", "TRAIN025", "TRAIN049"])
    checks.assert_check_passes(out)

    checks.assert_rerun_skips("retouch", root, out, 4)


def test_nested_archive_folders_are_found(download, tmp_path: Path) -> None:
    """Each archive unpacked into a folder of its own name, one level further down."""
    root, _ = download
    outer = root / "unpacked" / "RETOUCH-TrainingSet-Spectralis"
    outer.mkdir(parents=True)
    (root / "RETOUCH-TrainingSet-Spectralis").rename(outer / "RETOUCH-TrainingSet-Spectralis")
    result = checks.prepare("retouch", root, tmp_path / "out")
    assert result.exit_code == 0 and "4 cases" in result.output, result.output


def test_missing_reference(download, tmp_path: Path) -> None:
    root, _ = download
    (root / "RETOUCH-TrainingSet-Topcon" / "TRAIN049" / "reference.mhd").unlink()
    checks.assert_one_line_error(checks.prepare("retouch", root, tmp_path / "out"), "TRAIN049/reference.mhd", "missing")


def test_truncated_raw_file(download, tmp_path: Path) -> None:
    root, _ = download
    raw = root / "RETOUCH-TrainingSet-Cirrus" / "TRAIN002" / "oct.raw"
    raw.write_bytes(raw.read_bytes()[: raw.stat().st_size // 2])
    checks.assert_one_line_error(checks.prepare("retouch", root, tmp_path / "out"), str(raw), "truncated")


def test_unknown_label_value(download, tmp_path: Path) -> None:
    root, references = download
    bad = references["TRAIN025"].copy()
    bad[0, 0, 0] = 7
    write_mhd(root / "RETOUCH-TrainingSet-Spectralis" / "TRAIN025" / "reference.mhd", bad)
    result = checks.prepare("retouch", root, tmp_path / "out")
    checks.assert_one_line_error(result, "TRAIN025/reference.mhd", "label value 7")


def test_no_training_set(tmp_path: Path) -> None:
    (tmp_path / "download" / "RETOUCH-TestSet-Cirrus" / "TEST001").mkdir(parents=True)
    result = checks.prepare("retouch", tmp_path / "download", tmp_path / "out")
    checks.assert_one_line_error(result, "RETOUCH-TrainingSet-", "RETOUCH-TestSet")


def test_protocol_matches_the_recipe() -> None:
    retouch = list_protocols()["retouch"]
    assert retouch.labels == RetouchRecipe.labels and retouch.dataset == {"folder": "retouch"}
    assert (retouch.source_site, retouch.target_sites) == ("Spectralis", ("Cirrus", "Topcon"))
    assert retouch.modality == "OCT" and retouch.preprocessing.intensity == "oct"
