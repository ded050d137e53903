"""AMOS recipe: a tiny download in the official layout (amos22/ + metadata CSV), prepared through the CLI."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import recipe_checks as checks

from medtta.data.recipes.amos import AmosRecipe
from medtta.protocol import list_protocols

CT_SPACING, MR_SPACING = (0.68, 0.68, 5.0), (1.19, 1.19, 6.0)
SHAPE = (10, 9, 3)
HEADER = ["amos_id", "Patient's Birth Date", "Patient's Sex", "Patient's Age", "Manufacturer's Model Name",
          "Manufacturer", "Acquisition Date", "Site"]
# rows as the released CSV has them: id 500 twice (its CT row and an MRI row) and no row for 600
META = [
    (1, "Aquilion ONE", "TOSHIBA", "center"), (3, "Aquilion ONE", "TOSHIBA", "center"),
    (52, "Brilliance16", "Philips", "center"), (235, "SOMATOM Force", "SIEMENS", "people"),
    (500, "Optima CT540", "GE MEDICAL SYSTEMS", "people"), (541, "Prisma", "SIEMENS", "people"),
    (505, "Ingenia", "Philips", "center"), (500, "Ingenia", "Philips", "center"),
    (539, "Achieva", "Philips Medical Systems", "center"),
]
PARTS = {"Tr": [1, 235, 500, 541, 600], "Va": [52, 505]}
EXPECTED_SITES = [
    ["case_id", "site", "split"],
    ["amos_0001", "CT-TOSHIBA-Aquilion-ONE", ""], ["amos_0235", "CT-SIEMENS-SOMATOM-Force", ""],
    ["amos_0500", "CT-GE-Optima-CT540", ""], ["amos_0541", "MR-SIEMENS-Prisma", ""],
    ["amos_0600", "MR-Philips-Ingenia", ""],
    ["amos_0052", "CT-Philips-Brilliance16", "test"], ["amos_0505", "MR-Philips-Ingenia", "test"],
]


def write_meta(path: Path, rows: list[tuple[int, str, str, str]], header: list[str] = HEADER) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        for amos_id, model, manufacturer, site in rows:
            writer.writerow([amos_id, "19600101", "F", "060Y", model, manufacturer, "20200101", site])


@pytest.fixture
def download(tmp_path: Path, write_nifti) -> tuple[Path, dict[str, np.ndarray]]:
    """amos22/ with Tr, Va and an unlabelled Ts case, its dataset.json, and the metadata CSV beside it."""
    root, labels = tmp_path / "download", {}
    rng = np.random.default_rng(0)
    data = root / "amos22"
    for part, ids in PARTS.items():
        for amos_id in ids:
            name = f"amos_{amos_id:04d}.nii.gz"
            ct = amos_id <= 500
            image = rng.integers(-1000, 1000, SHAPE).astype(np.int16) if ct else rng.random(SHAPE).astype(np.float32)
            write_nifti(data / f"images{part}" / name, image, CT_SPACING if ct else MR_SPACING)
            labels[name] = rng.integers(0, 16, SHAPE).astype(np.uint8)
            write_nifti(data / f"labels{part}" / name, labels[name], CT_SPACING if ct else MR_SPACING)
    write_nifti(data / "imagesTs" / "amos_0003.nii.gz", np.zeros(SHAPE, np.int16), CT_SPACING)
    organs = ["background", "spleen", "right kidney", "left kidney", "gall bladder", "esophagus", "liver",
              "stomach", "arota", "postcava", "pancreas", "right adrenal gland", "left adrenal gland", "duodenum",
              "bladder", "prostate/uterus"]
    (data / "dataset.json").write_text(json.dumps({"name": "AMOS", "labels": dict(enumerate(organs)),
                                                   "numTraining": 5, "numValidation": 2, "numTest": 1}))
    write_meta(root / "labeled_data_meta_0000_0599.csv", META)
    return root, labels


def test_prepare_end_to_end(download, tmp_path: Path) -> None:
    root, labels = download
    out = tmp_path / "amos"
    result = checks.prepare("amos", root, out)
    checks.assert_prepared(result, "amos", 7)
    assert result.stderr.strip() == (  # amos_0600, by inference from the CSV's second row of id 500
        f"Warning: {root / 'labeled_data_meta_0000_0599.csv'}: no row for amos_id 600; its scanner (Ingenia) is read "
        "from the MR row of id 500 at line 9, which the CSV lists twice (an inference, not an official erratum)")

    assert checks.read_sites(out) == EXPECTED_SITES
    assert not (out / "imagesTr" / "amos_0003_0000.nii.gz").exists()  # Ts without a label
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["labels"] == AmosRecipe.labels and len(meta["labels"]) == 16

    for cid, *_ in EXPECTED_SITES[1:]:
        image, label = nib.load(out / "imagesTr" / f"{cid}_0000.nii.gz"), nib.load(out / "labelsTr" / f"{cid}.nii.gz")
        assert image.shape == label.shape == SHAPE
        assert np.array_equal(np.asanyarray(label.dataobj), labels[f"{cid}.nii.gz"])
        spacing = CT_SPACING if int(cid[5:]) <= 500 else MR_SPACING
        assert image.header.get_zooms() == pytest.approx(spacing) and np.allclose(image.affine, label.affine)

    manifest = checks.assert_manifest_matches(out, [row[0] for row in EXPECTED_SITES[1:]])
    assert [r["split"] for r in manifest] == [row[2] for row in EXPECTED_SITES[1:]]
    checks.assert_check_passes(out)

    checks.assert_rerun_skips("amos", root, out, 7)


def test_dataset_folder_given_directly_and_metadata_by_option(download, tmp_path: Path) -> None:
    """`--from amos22/` finds the CSV one level up; a CSV kept elsewhere is given with --sites."""
    root, _ = download
    assert checks.prepare("amos", root / "amos22", tmp_path / "a").exit_code == 0
    elsewhere = tmp_path / "meta.csv"
    (root / "labeled_data_meta_0000_0599.csv").rename(elsewhere)
    result = checks.prepare("amos", root, tmp_path / "b")
    checks.assert_one_line_error(result, "labeled_data_meta_0000_0599.csv", "--sites")
    result = checks.prepare("amos", root, tmp_path / "b", "--sites", str(elsewhere))
    assert result.exit_code == 0, result.output
    assert checks.read_sites(tmp_path / "b") == EXPECTED_SITES


def test_missing_label(download, tmp_path: Path) -> None:
    root, _ = download
    (root / "amos22" / "labelsVa" / "amos_0052.nii.gz").unlink()
    checks.assert_one_line_error(checks.prepare("amos", root, tmp_path / "out"), "labelsVa/amos_0052.nii.gz", "missing")


def test_missing_metadata_row(download, tmp_path: Path) -> None:
    root, _ = download
    write_meta(root / "labeled_data_meta_0000_0599.csv", [r for r in META if r[0] != 235])
    result = checks.prepare("amos", root, tmp_path / "out")
    checks.assert_one_line_error(result, "labeled_data_meta_0000_0599.csv", "no row for amos_id 235")


def test_wrong_metadata_row(download, tmp_path: Path) -> None:
    """An MRI id whose row names a CT scanner."""
    root, _ = download
    rows = [(541, "Optima CT660", "GE MEDICAL SYSTEMS", "people") if r[0] == 541 else r for r in META]
    write_meta(root / "labeled_data_meta_0000_0599.csv", rows)
    result = checks.prepare("amos", root, tmp_path / "out")
    checks.assert_one_line_error(result, "labeled_data_meta_0000_0599.csv", "Optima CT660",
                                 "amos_0541, MR by its id")


def test_metadata_without_scanner_columns(download, tmp_path: Path) -> None:
    root, _ = download
    write_meta(root / "labeled_data_meta_0000_0599.csv", META, [*HEADER[:4], "Model", "Vendor", *HEADER[6:]])
    result = checks.prepare("amos", root, tmp_path / "out")
    checks.assert_one_line_error(result, "labeled_data_meta_0000_0599.csv", "no 'manufacturer'")


def test_truncated_image(download, tmp_path: Path) -> None:
    root, _ = download
    image = root / "amos22" / "imagesTr" / "amos_0235.nii.gz"
    image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])
    checks.assert_one_line_error(checks.prepare("amos", root, tmp_path / "out"), str(image), "cannot be read")


def test_protocols_match_the_recipes() -> None:
    """The AMOS protocols use the labels the recipe writes, a CT source, and CT or MRI targets."""
    protocols = list_protocols()
    for name in ("amos-ct", "amos-ct2mr"):
        p = protocols[name]
        assert p.labels == AmosRecipe.labels and p.dataset == {"folder": "amos"}
        assert p.source_site.startswith("CT-")
    assert all(s.startswith("CT-") for s in protocols["amos-ct"].target_sites)
    assert all(s.startswith("MR-") for s in protocols["amos-ct2mr"].target_sites)
    assert protocols["amos-ct"].preprocessing.intensity == "ct"
    assert protocols["amos-ct2mr"].preprocessing.intensity == "mr"
    # MRI is scored without bladder and prostate/uterus, the in-domain CT Dice too
    assert set(AmosRecipe.labels) - set(protocols["amos-ct2mr"].scored_labels) == {
        "background", "bladder", "prostate_uterus"}


def test_targets_have_enough_labelled_cases() -> None:
    """The manifest (the real labelled id lists) gives every AMOS target scanner at least 20 labelled cases and
    the source scanner test cases (its Va cases); the GE Optima scanners have none."""
    from medtta.data.checks import expected_cases

    protocols = list_protocols()
    manifest = expected_cases(protocols["amos-ct"])
    assert len(manifest) == 360 and expected_cases(protocols["amos-ct2mr"]) == manifest
    labelled = Counter(row["site"] for row in manifest.values())
    assert labelled["CT-GE-Optima-CT540"] == labelled["CT-GE-Optima-CT660"] == 0
    for p in (protocols["amos-ct"], protocols["amos-ct2mr"]):
        assert all(labelled[site] >= 20 for site in p.target_sites), p.name
        assert sum(r["site"] == p.source_site and r["split"] == "test" for r in manifest.values()) == 50
