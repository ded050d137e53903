"""The CC-359 recipe end to end through the CLI, on a tiny download in the official Original/ + mask layout."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import recipe_checks as checks

from medtta.data.datasets import open_dataset
from medtta.data.layout import load_volume
from medtta.data.preprocess import image_slices
from medtta.protocol import list_protocols

SPACING = (1.0, 1.0, 1.2)
# image file stems as released (<id>_<vendor>_<field>_<age>_<sex>); the last one sits in a per-scanner folder
STEMS = ["CC0001_ge_15_60_F", "CC0002_ge_3_55_M", "CC0003_philips_15_47_M", "CC0004_philips_3_62_F",
         "CC0005_philips_3_29_M", "CC0006_siemens_15_71_F", "CC0007_siemens_3_50_M"]
EXPECTED = [("CC0001", "ge_15"), ("CC0002", "ge_3"), ("CC0003", "philips_15"), ("CC0004", "philips_3"),
            ("CC0005", "philips_3"), ("CC0006", "siemens_15"), ("CC0007", "siemens_3")]


def image_path(download: Path, stem: str) -> Path:
    folder = download / "CC359" / "Original"
    return folder / "SIEMENS_3" / f"{stem}.nii.gz" if "siemens_3" in stem else folder / f"{stem}.nii.gz"


@pytest.fixture
def build(tmp_path: Path, write_nifti: Callable[..., Path]) -> Callable[..., Path]:
    """`build(kinds)`: a download with the Original images and the brain masks of `kinds` (ss: 0/1 masks in
    Silver-standard/, staple: probabilities in STAPLE/), plus a hippocampus mask that must be ignored."""

    def make(kinds: tuple[str, ...] = ("ss",)) -> Path:
        download = tmp_path / "download"
        rng = np.random.default_rng(2)
        for stem in STEMS:
            write_nifti(image_path(download, stem), rng.normal(300, 80, (8, 8, 3)).astype(np.float32), SPACING)
            if "ss" in kinds:
                write_nifti(download / "CC359" / "Silver-standard" / f"{stem}_ss.nii.gz",
                            rng.integers(0, 2, (8, 8, 3)).astype(np.uint8), SPACING)
            if "staple" in kinds:
                write_nifti(download / "CC359" / "STAPLE" / f"{stem}_staple.nii.gz",
                            rng.random((8, 8, 3)).astype(np.float32), SPACING)
        write_nifti(download / "CC359" / "hippocampus_staple" / f"{STEMS[0]}_hippocampus_staple.nii.gz",
                    np.zeros((4, 4, 2), np.uint8), SPACING)
        return download

    return make


def written_label(out: Path, case_id: str) -> np.ndarray:
    return np.asanyarray(nib.load(out / "labelsTr" / f"{case_id}.nii.gz").dataobj)


def test_prepare_converts_official_layout(build: Callable[..., Path], tmp_path: Path) -> None:
    download = build()
    out = tmp_path / "data" / "cc359"  # $MEDTTA_DATA/cc359: where the protocol looks
    checks.assert_prepared(checks.prepare("cc359", download, out), "cc359", 7)

    # header case_id,site: no official split, the protocol's seeded rule decides
    assert checks.read_sites(out) == [["case_id", "site"], *map(list, EXPECTED)]

    for (case_id, _), stem in zip(EXPECTED, STEMS, strict=True):
        image = nib.load(out / "imagesTr" / f"{case_id}_0000.nii.gz")
        source = nib.load(image_path(download, stem))
        np.testing.assert_array_equal(np.asanyarray(image.dataobj), np.asanyarray(source.dataobj))
        mask = np.asanyarray(nib.load(download / "CC359" / "Silver-standard" / f"{stem}_ss.nii.gz").dataobj)
        np.testing.assert_array_equal(written_label(out, case_id), mask)
        assert image.header.get_zooms() == SPACING
        np.testing.assert_allclose(image.affine, source.affine)

    checks.assert_manifest_matches(out, [c for c, _ in EXPECTED])
    checks.assert_check_passes(out)

    dataset = open_dataset(list_protocols()["cc359"])  # every protocol site is there; philips_3 gets split
    assert sorted(c.split for c in dataset.cases_of("philips_3")) == ["test", "val"]
    protocol = list_protocols()["cc359"]  # sagittal slices: along axis 0 of the (8, 8, 3) volumes
    volume = load_volume(dataset.cases[0], protocol.labels)
    assert image_slices(volume, protocol.preprocessing).shape == (8, 1, 256, 256)

    checks.assert_rerun_skips("cc359", download, out, 7)


def test_staple_masks_are_thresholded_and_ss_preferred(build: Callable[..., Path], tmp_path: Path) -> None:
    download = build(("staple",))
    assert checks.prepare("cc359", download, tmp_path / "staple").exit_code == 0
    for (case_id, _), stem in zip(EXPECTED, STEMS, strict=True):
        staple = np.asanyarray(nib.load(download / "CC359" / "STAPLE" / f"{stem}_staple.nii.gz").dataobj)
        np.testing.assert_array_equal(written_label(tmp_path / "staple", case_id), (staple > 0.5).astype(np.uint8))

    both = build(("ss", "staple"))
    assert checks.prepare("cc359", both, tmp_path / "both").exit_code == 0
    ss = np.asanyarray(nib.load(both / "CC359" / "Silver-standard" / f"{STEMS[0]}_ss.nii.gz").dataobj)
    np.testing.assert_array_equal(written_label(tmp_path / "both", "CC0001"), ss)


def test_tissue_masks_named_like_the_images_are_ignored(build: Callable[..., Path], tmp_path: Path,
                                                         write_nifti: Callable[..., Path]) -> None:
    """The WM-GM-CSF masks carry the image file names; unpacked under --from, prepare says it ignores them."""
    download = build()
    for stem in STEMS[:2]:
        write_nifti(download / "WM-GM-CSF" / f"{stem}.nii.gz", np.full((8, 8, 3), 3, np.uint8), SPACING)
    result = checks.prepare("cc359", download, tmp_path / "cc359")
    checks.assert_prepared(result, "cc359", 7)
    assert result.stderr.strip() == (f"Warning: {download / 'WM-GM-CSF'}: ignored, its files are named like the T1 "
                                     "images of Original/ (the WM-GM-CSF tissue masks are); the brain masks come "
                                     "from Silver-standard/ or STAPLE/")
    image = np.asanyarray(nib.load(tmp_path / "cc359" / "imagesTr" / "CC0001_0000.nii.gz").dataobj)
    np.testing.assert_array_equal(image, np.asanyarray(nib.load(image_path(download, STEMS[0])).dataobj))


def drop_mask(download: Path) -> str:
    (download / "CC359" / "Silver-standard" / f"{STEMS[2]}_ss.nii.gz").unlink()
    return f"Silver-standard/{STEMS[2]}_ss.nii.gz: missing label file"


def truncate_image(download: Path) -> str:
    path = image_path(download, STEMS[4])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return f"{STEMS[4]}.nii.gz: cannot be read"


def mask_out_of_range(download: Path) -> str:
    path = download / "CC359" / "Silver-standard" / f"{STEMS[1]}_ss.nii.gz"
    nib.save(nib.Nifti1Image(np.full((8, 8, 3), 255, np.uint8), np.diag([*SPACING, 1.0])), str(path))
    return f"{STEMS[1]}_ss.nii.gz: brain mask values must lie in [0, 1]"


def no_masks(download: Path) -> str:
    for path in (download / "CC359" / "Silver-standard").iterdir():
        path.unlink()
    return "expected brain masks named like CC0001_philips_15_55_M_ss.nii.gz"


@pytest.mark.parametrize("corrupt", [drop_mask, truncate_image, mask_out_of_range, no_masks])
def test_corrupted_download_fails_with_one_line(build: Callable[..., Path], tmp_path: Path,
                                                corrupt: Callable[[Path], str]) -> None:
    download = build()
    expected = corrupt(download)
    checks.assert_one_line_error(checks.prepare("cc359", download, tmp_path / "cc359"), expected)
