"""The multi-site prostate recipe end to end through the CLI, on a tiny download in the SAML release layout."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import recipe_checks as checks

from medtta.data.datasets import open_dataset
from medtta.protocol import list_protocols

SPACING = (0.6, 0.6, 3.0)
# site folder as found in downloads, case file names, raw label values: the known variants
# (lower-case folder, capital `_Segmentation`, uncompressed .nii, 0/255 and 0/1/2 masks)
CASES = [
    ("RUNMC", "Case00.nii.gz", "Case00_segmentation.nii.gz", (0, 1)),
    ("RUNMC", "Case01.nii.gz", "Case01_segmentation.nii.gz", (0, 1, 2)),
    ("BMC", "Case00.nii.gz", "Case00_Segmentation.nii.gz", (0, 255)),
    ("i2cvb", "Case00.nii", "Case00_segmentation.nii", (0, 1)),
    ("UCL", "Case01.nii.gz", "Case01_segmentation.nii.gz", (0, 1)),
    ("BIDMC", "Case00.nii.gz", "Case00_segmentation.nii.gz", (0, 1)),
    ("HK", "Case38.nii.gz", "Case38_segmentation.nii.gz", (0, 1)),
]
EXPECTED = [("RUNMC_Case00", "RUNMC"), ("RUNMC_Case01", "RUNMC"), ("BMC_Case00", "BMC"), ("I2CVB_Case00", "I2CVB"),
            ("UCL_Case01", "UCL"), ("BIDMC_Case00", "BIDMC"), ("HK_Case38", "HK")]
# an oblique, flipped geometry: orientation must survive the conversion, not only the spacing
OBLIQUE = np.array([[0.0, -0.6, 0.0, 40.0], [0.6, 0.0, 0.0, -20.0], [0.0, 0.0, -3.0, 15.0], [0.0, 0.0, 0.0, 1.0]])


def affine_of(folder: str) -> np.ndarray:
    return OBLIQUE if folder == "BIDMC" else np.diag([*SPACING, 1.0])


@pytest.fixture
def download(tmp_path: Path, write_nifti: Callable[..., Path]) -> Path:
    """The unzipped release: one extra folder, then a folder per site (and macOS zip debris to ignore)."""
    root = tmp_path / "download" / "Processed_data_nii"
    rng = np.random.default_rng(1)
    for folder, image, label, values in CASES:
        for name, array in ((image, rng.normal(100, 20, (8, 8, 3)).astype(np.float32)),
                            (label, rng.choice(values, (8, 8, 3)).astype(np.uint8))):
            (root / folder).mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(array, affine_of(folder)), str(root / folder / name))
    write_nifti(root / "RUNMC" / "._Case00.nii.gz", np.zeros((2, 2, 2)))  # AppleDouble debris, not a case
    (root / "__MACOSX").mkdir()
    return tmp_path / "download"


def test_prepare_converts_official_layout(download: Path, tmp_path: Path) -> None:
    out = tmp_path / "data" / "prostate"  # $MEDTTA_DATA/prostate: where the protocol looks
    checks.assert_prepared(checks.prepare("prostate", download, out), "prostate", 7)

    # header case_id,site: no official split, the protocol's seeded rule decides
    assert checks.read_sites(out) == [["case_id", "site"], *map(list, EXPECTED)]

    for (case_id, _), (folder, image_name, label_name, _) in zip(EXPECTED, CASES, strict=True):
        source = download / "Processed_data_nii" / folder
        image = nib.load(out / "imagesTr" / f"{case_id}_0000.nii.gz")
        label = nib.load(out / "labelsTr" / f"{case_id}.nii.gz")
        raw_image, raw_label = (np.asanyarray(nib.load(source / name).dataobj) for name in (image_name, label_name))
        np.testing.assert_array_equal(np.asanyarray(image.dataobj), raw_image)
        np.testing.assert_array_equal(np.asanyarray(label.dataobj), (raw_label > 0).astype(np.uint8))
        for written in (image, label):
            np.testing.assert_allclose(written.affine, affine_of(folder), atol=1e-6)
            np.testing.assert_allclose(np.sqrt((written.affine[:3, :3] ** 2).sum(0)), SPACING, atol=1e-6)
    assert set(np.unique(nib.load(out / "labelsTr" / "BMC_Case00.nii.gz").dataobj)) == {0, 1}

    checks.assert_manifest_matches(out, [c for c, _ in EXPECTED])
    checks.assert_check_passes(out)

    dataset = open_dataset(list_protocols()["prostate"])  # every protocol site is there; RUNMC gets split
    assert sorted(c.split for c in dataset.cases_of("RUNMC")) == ["test", "val"]
    assert {c.split for c in dataset.cases if c.site != "RUNMC"} == {"test"}

    checks.assert_rerun_skips("prostate", download, out, 7)


def drop_label(download: Path) -> str:
    (download / "Processed_data_nii" / "HK" / "Case38_segmentation.nii.gz").unlink()
    return "HK/Case38_segmentation.nii.gz: missing label file"


def truncate_image(download: Path) -> str:
    path = download / "Processed_data_nii" / "UCL" / "Case01.nii.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return "UCL/Case01.nii.gz: cannot be read"


def foreign_label_value(download: Path) -> str:
    path = download / "Processed_data_nii" / "BIDMC" / "Case00_segmentation.nii.gz"
    nib.save(nib.Nifti1Image(np.full((8, 8, 3), 7, np.uint8), OBLIQUE), str(path))
    return "BIDMC/Case00_segmentation.nii.gz: label value 7 is not one of"


def no_site_folders(download: Path) -> str:
    (download / "Processed_data_nii").rename(download / "sites")
    for site in ("RUNMC", "BMC", "i2cvb", "UCL", "BIDMC", "HK"):
        (download / "sites" / site).rename(download / "sites" / f"site_{site}")
    return "expected one folder per site (RUNMC, BMC, I2CVB, UCL, BIDMC, HK)"


@pytest.mark.parametrize("corrupt", [drop_label, truncate_image, foreign_label_value, no_site_folders])
def test_corrupted_download_fails_with_one_line(download: Path, tmp_path: Path, corrupt: Callable[[Path], str]) -> None:
    expected = corrupt(download)
    checks.assert_one_line_error(checks.prepare("prostate", download, tmp_path / "prostate"), expected)


def test_verify_names_cases_outside_samls_lists(download: Path, tmp_path: Path, write_nifti) -> None:
    """The protocol's manifest holds SAML's 116 case ids (BIDMC without Case02): `data verify` names a BIDMC
    Case02 the download may hold, and every listed case that is missing."""
    from click.testing import CliRunner

    from medtta.cli.main import main

    for name in ("Case02.nii.gz", "Case02_segmentation.nii.gz"):
        write_nifti(download / "Processed_data_nii" / "BIDMC" / name, np.zeros((8, 8, 3), np.uint8))
    out = tmp_path / "prostate"
    assert checks.prepare("prostate", download, out).exit_code == 0
    result = CliRunner().invoke(main, ["data", "verify", str(out), "--protocol", "prostate"])
    problems = result.stderr.splitlines()
    assert result.exit_code == 2 and "case 'BIDMC_Case02': not in protocol 'prostate'" in problems
    assert "case 'BIDMC_Case01': missing (expected at site BIDMC)" in problems
    assert problems[-1] == f"{116 - 7 + 1} problem(s) found"  # 109 listed cases missing, Case02 extra
