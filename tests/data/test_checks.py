"""`medtta data check` lists every problem of a folder; `medtta data verify` compares it with a protocol."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from medtta.cli.main import main
from medtta.data.datasets import open_dataset
from medtta.data.layout import write_metadata
from medtta.protocol import resolve_protocol


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


@pytest.fixture
def broken(tmp_path: Path, write_nifti) -> Path:
    root = tmp_path / "broken"
    for cid, image_shape, label_value in [("ok", (8, 8, 2), 1), ("shape", (8, 8, 3), 1), ("label", (8, 8, 2), 5),
                                          ("orphan", (8, 8, 2), 1)]:
        write_nifti(root / "imagesTr" / f"{cid}_0000.nii.gz", np.zeros(image_shape, np.float32))
        write_nifti(root / "labelsTr" / f"{cid}.nii.gz", np.full((8, 8, 2), label_value, np.uint8))
    write_nifti(root / "imagesTr" / "nolabel_0000.nii.gz", np.zeros((8, 8, 2), np.float32))
    write_nifti(root / "imagesTr" / "moved_0000.nii.gz", np.zeros((8, 8, 2), np.float32))
    write_nifti(root / "labelsTr" / "moved.nii.gz", np.zeros((8, 8, 2), np.uint8), spacing=(2.0, 1.0, 1.0))
    write_metadata(root, "broken", {"background": 0, "organ": 1}, "T1",
                   [(c, "X", None) for c in ("ok", "shape", "label", "nolabel", "moved")])
    return root


def test_check_lists_every_problem(broken: Path) -> None:
    result = invoke("data", "check", str(broken), "-q")
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1] == "5 problem(s) found"
    assert any("moved.nii.gz: geometry (affine) differs from image" in line for line in lines)
    assert any("shape.nii.gz: shape (8, 8, 2) differs from image" in line for line in lines)
    assert any("label.nii.gz: label values [5] are not in dataset.json labels [0, 1]" in line for line in lines)
    assert any(line.endswith("nolabel.nii.gz: missing") for line in lines)
    assert any("orphan_0000.nii.gz: case 'orphan' has no site in" in line for line in lines)


def test_check_passes_on_a_good_folder(broken: Path) -> None:
    for cid in ("shape", "label", "nolabel", "moved"):
        (broken / "imagesTr" / f"{cid}_0000.nii.gz").unlink()
    write_metadata(broken, "broken", {"background": 0, "organ": 1}, "T1", [("ok", "X", None), ("orphan", "X", None)])
    result = invoke("data", "check", str(broken), "-q")
    assert result.exit_code == 0 and "OK" in result.stdout


@pytest.mark.parametrize("name", ["synth-mri", "synth-ct", "synth-oct"])
def test_generated_data_matches_the_protocol_manifest(name: str) -> None:
    """The embedded datasets are reproducible file for file: the checksums in protocols/manifests hold."""
    root = open_dataset(resolve_protocol(name)).root
    result = invoke("data", "verify", str(root), "--protocol", name)
    assert result.exit_code == 0, result.stderr
    assert f"matches protocol '{name}'" in result.stdout


def test_verify_reports_differences(tmp_path: Path) -> None:
    root = open_dataset(resolve_protocol("synth-mri")).root
    image = root / "imagesTr" / "B000_0000.nii.gz"
    data = bytearray(image.read_bytes())
    data[len(data) // 2] ^= 0xFF
    image.write_bytes(bytes(data))
    with (root / "sites.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    rows = [r for r in rows if r["case_id"] != "C003"] + [{"case_id": "Z999", "site": "Z", "split": "test"}]
    rows[0]["site"] = "B"
    write_metadata(root, "synth-mri", resolve_protocol("synth-mri").labels, "cine-MRI",
                   [(r["case_id"], r["site"], r["split"]) for r in rows])
    result = invoke("data", "verify", str(root), "--protocol", "synth-mri")
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert "case 'C003': missing (expected at site C)" in lines
    assert "case 'Z999': not in protocol 'synth-mri'" in lines
    assert "case 'A000': site 'B', protocol says 'A'" in lines
    assert any(line.startswith(f"{image}: sha256 ") for line in lines), lines
    assert lines[-1] == "4 problem(s) found"


def test_verify_needs_a_protocol_with_a_case_list(tmp_path: Path) -> None:
    result = invoke("data", "verify", str(tmp_path), "--protocol", "mnms")
    assert result.exit_code == 2 and "protocol 'mnms' fixes no case list" in result.stderr
