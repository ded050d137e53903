"""The M&Ms recipe end to end through the CLI, on a tiny download in the official OpenDataset layout."""

from __future__ import annotations

import csv
import gzip
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import recipe_checks as checks

from medtta.data.datasets import open_dataset
from medtta.protocol import list_protocols

SPACING = (1.25, 1.25, 10.0)
INFO = "211230_M&Ms_Dataset_information_diagnosis_opendataset.csv"
# code: (partition folder, vendor letter, vendor name, ED, ES)
SUBJECTS = {
    "A0S9V9": ("Training/Labeled", "A", "Siemens", 0, 3),
    "A1D0Q7": ("Training/Labeled", "A", "Siemens", 4, 2),
    "A2C0I1": ("Training/Labeled", "B", "Philips", 1, 3),
    "C5U5U5": ("Training/Unlabeled", "C", "GE", 0, 2),
    "D1V1V1": ("Validation", "D", "Canon", 0, 2),
    "A3V3V3": ("Validation", "A", "Siemens", 1, 3),
    "C2T2T2": ("Testing", "C", "GE", 0, 4),
}
# (case, site, split): Training/Labeled subjects by the recipe's fixed per-subject rule, then Validation, Testing
EXPECTED = [("A0S9V9_ED", "A", "train"), ("A0S9V9_ES", "A", "train"),
            ("A1D0Q7_ED", "A", "val"), ("A1D0Q7_ES", "A", "val"),
            ("A2C0I1_ED", "B", "train"), ("A2C0I1_ES", "B", "train"),
            ("A3V3V3_ED", "A", "test"), ("A3V3V3_ES", "A", "test"),
            ("D1V1V1_ED", "D", "test"), ("D1V1V1_ES", "D", "test"),
            ("C2T2T2_ED", "C", "test"), ("C2T2T2_ES", "C", "test")]


def write_info(root: Path, rows: dict[str, tuple]) -> None:
    """The information CSV as released (a leading unnamed index column, then the named columns)."""
    with (root / INFO).open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["", "External code", "VendorName", "Vendor", "Centre", "ED", "ES", "Age", "Pathology"])
        for i, (code, (_, letter, vendor, ed, es)) in enumerate(rows.items()):
            writer.writerow([i, code, vendor, letter, 1, ed, es, 50, "NOR"])


@pytest.fixture
def download(tmp_path: Path, write_nifti: Callable[..., Path]) -> Path:
    """An unzipped download: OpenDataset/ with the CSV and 8x8x3 cines of 5 frames (labels 0-3)."""
    root = tmp_path / "download" / "OpenDataset"
    rng = np.random.default_rng(0)
    for code, (partition, *_) in SUBJECTS.items():
        folder = root / partition / code
        # the Testing subject uses the uncompressed, upper-case variant of the names
        sa, gt = (f"{code}_SA.nii", f"{code}_SA_GT.nii") if partition == "Testing" else (
            f"{code}_sa.nii.gz", f"{code}_sa_gt.nii.gz")
        write_nifti(folder / sa, rng.integers(0, 1000, (8, 8, 3, 5)).astype(np.int16), SPACING)
        if partition != "Training/Unlabeled":
            write_nifti(folder / gt, rng.integers(0, 4, (8, 8, 3, 5)).astype(np.uint8), SPACING)
    write_info(root, SUBJECTS)
    return tmp_path / "download"


def source_file(download: Path, code: str, gt: bool) -> Path:
    partition = SUBJECTS[code][0]
    folder = download / "OpenDataset" / partition / code
    if partition == "Testing":
        return folder / f"{code}_SA{'_GT' if gt else ''}.nii"
    return folder / f"{code}_sa{'_gt' if gt else ''}.nii.gz"


def test_prepare_converts_official_layout(download: Path, tmp_path: Path) -> None:
    out = tmp_path / "data" / "mnms"  # $MEDTTA_DATA/mnms: where the protocol looks
    checks.assert_prepared(checks.prepare("mnms", download, out), "mnms", 12)

    assert checks.read_sites(out) == [["case_id", "site", "split"], *map(list, EXPECTED)]

    for case_id, _, _ in EXPECTED:
        code, phase = case_id.split("_")
        frame = SUBJECTS[code][3 if phase == "ED" else 4]
        image = nib.load(out / "imagesTr" / f"{case_id}_0000.nii.gz")
        label = nib.load(out / "labelsTr" / f"{case_id}.nii.gz")
        raw_image, raw_label = (np.asanyarray(nib.load(source_file(download, code, gt)).dataobj)[..., frame]
                                for gt in (False, True))
        np.testing.assert_array_equal(np.asanyarray(image.dataobj), raw_image)
        np.testing.assert_array_equal(np.asanyarray(label.dataobj), raw_label)  # 1 LV, 2 MYO, 3 RV kept
        assert image.header.get_zooms() == SPACING and label.header.get_zooms() == SPACING
        np.testing.assert_allclose(image.affine, np.diag([*SPACING, 1.0]))

    checks.assert_manifest_matches(out, [c for c, _, _ in EXPECTED], ordered=False)
    checks.assert_check_passes(out)

    dataset = open_dataset(list_protocols()["mnms"])  # every protocol site is there; the recipe's splits are kept
    assert [(c.case_id, c.site, c.split) for c in dataset.cases] == EXPECTED

    checks.assert_rerun_skips("mnms", download, out, 12)


def test_older_release_layout(download: Path, tmp_path: Path) -> None:
    """2020 release: Training-corrected/ and the table exported from `M&Ms Dataset Information.xlsx` inside it."""
    root = download / "OpenDataset"
    (root / "Training").rename(root / "Training-corrected")
    (root / INFO).unlink()
    with (root / "Training-corrected" / "M&Ms Dataset Information.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["External code", "Vendor", "Centre", "ED", "ES"])
        writer.writerows([code, letter, 1, ed, es] for code, (_, letter, _, ed, es) in SUBJECTS.items())
    result = checks.prepare("mnms", download, tmp_path / "mnms")
    assert result.exit_code == 0, result.output
    assert checks.read_sites(tmp_path / "mnms") == [["case_id", "site", "split"], *map(list, EXPECTED)]


def test_direction_cosines_that_are_not_orthonormal(download: Path, tmp_path: Path) -> None:
    """Some M&Ms Validation/Testing scans have direction cosines that are not orthonormal, which SimpleITK
    refuses (nnU-Net's converter skips them). medtta keeps them: prepare, check and the engine read them with
    nibabel, and SimpleITK reads the prepared files."""
    import SimpleITK as sitk

    sheared = np.array([[1.25, 0.05, 0, -100], [0, 1.25, 0, -120], [0, 0.02, 10, 30], [0, 0, 0, 1.0]])
    for gt in (False, True):
        path = source_file(download, "D1V1V1", gt)
        nib.save(nib.Nifti1Image(np.asanyarray(nib.load(path).dataobj), sheared), str(path))
    with pytest.raises(RuntimeError, match="orthonormal"):  # the download itself, as SimpleITK sees it
        sitk.ReadImage(str(source_file(download, "D1V1V1", False)))
    out = tmp_path / "mnms"
    checks.assert_prepared(checks.prepare("mnms", download, out), "mnms", 12)
    checks.assert_check_passes(out)
    written = out / "imagesTr" / "D1V1V1_ED_0000.nii.gz"
    np.testing.assert_allclose(nib.load(written).affine, sheared)  # exact for nibabel
    image = sitk.ReadImage(str(written))
    assert image.GetSize() == (8, 8, 3) and np.allclose(image.GetOrigin(), (100, 120, 30))  # LPS


def drop_label(download: Path) -> str:
    source_file(download, "A0S9V9", gt=True).unlink()
    return "A0S9V9_sa_gt.nii.gz: missing label file"


def drop_csv_row(download: Path) -> str:
    write_info(download / "OpenDataset", {k: v for k, v in SUBJECTS.items() if k != "A2C0I1"})
    return f"{INFO}: no row for subject 'A2C0I1'"


def frame_out_of_range(download: Path) -> str:
    write_info(download / "OpenDataset", {**SUBJECTS, "D1V1V1": ("Validation", "D", "Canon", 0, 5)})
    return f"{INFO}:6: ES frame 5 of subject 'D1V1V1' is out of range"


def truncate_image(download: Path) -> str:
    path = source_file(download, "A1D0Q7", gt=False)
    data = path.read_bytes()
    assert gzip.decompress(data)  # a valid file before the cut
    path.write_bytes(data[: len(data) // 2])
    return "A1D0Q7_sa.nii.gz: cannot be read"


def no_info_csv(download: Path) -> str:
    (download / "OpenDataset" / INFO).unlink()
    return "expected the M&Ms information CSV"


def excel_table_only(download: Path) -> str:
    (download / "OpenDataset" / INFO).unlink()
    (download / "OpenDataset" / "M&Ms Dataset Information.xlsx").write_bytes(b"PK")
    return "M&Ms Dataset Information.xlsx: the M&Ms information table must be a CSV"


@pytest.mark.parametrize("corrupt", [drop_label, drop_csv_row, frame_out_of_range, truncate_image, no_info_csv,
                                     excel_table_only])
def test_corrupted_download_fails_with_one_line(download: Path, tmp_path: Path, corrupt: Callable[[Path], str]) -> None:
    expected = corrupt(download)
    checks.assert_one_line_error(checks.prepare("mnms", download, tmp_path / "mnms"), expected)
