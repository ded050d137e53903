"""Split edge cases: a source site left without test cases is refused before any training; few are warned of."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from medtta.data.datasets import MIN_IN_DOMAIN_CASES, open_dataset
from medtta.data.layout import write_metadata
from medtta.errors import DataError, MedttaWarning
from medtta.protocol import Protocol, load_protocol

LABELS = {"background": 0, "organ": 1}


def _dataset(root: Path, write_nifti, splits: list[str | None]) -> Path:
    """Source site S with one case per entry of `splits`, target site T with one case."""
    rows = [(f"s{i}", "S", split) for i, split in enumerate(splits)] + [("t0", "T", "test" if any(splits) else None)]
    for cid, _, _ in rows:
        write_nifti(root / "imagesTr" / f"{cid}_0000.nii.gz", np.ones((4, 4, 2), np.float32))
        write_nifti(root / "labelsTr" / f"{cid}.nii.gz", np.ones((4, 4, 2), np.uint8))
    write_metadata(root, "toy", LABELS, "T1", rows)
    return root


def _protocol(tmp_path: Path, root: Path, fractions: list[float]) -> tuple[Path, Protocol]:
    path = tmp_path / "toy.yaml"
    raw = {"name": "toy", "modality": "MRI", "labels": LABELS, "dataset": {"folder": str(root)}, "source_site": "S",
           "target_sites": ["T"], "split": {"fractions": fractions}}
    path.write_text(yaml.safe_dump(raw))
    return path, load_protocol(path)


def test_fractions_without_test_cases_name_the_protocol_field(tmp_path: Path, write_nifti) -> None:
    root = _dataset(tmp_path / "ds", write_nifti, [None] * 10)
    path, protocol = _protocol(tmp_path, root, [0.8, 0.2, 0.0])
    with pytest.raises(DataError, match=f"^{path}: field 'split.fractions' \\[0.8, 0.2, 0.0\\] leaves source site "
                                        "'S' no test case"):
        open_dataset(protocol)


def test_split_column_without_test_cases_names_sites_csv(tmp_path: Path, write_nifti) -> None:
    root = _dataset(tmp_path / "ds", write_nifti, ["train"] * 8 + ["val"] * 2)
    _, protocol = _protocol(tmp_path, root, [0.7, 0.15, 0.15])
    with pytest.raises(DataError, match=f"^{root / 'sites.csv'}: column 'split' gives source site 'S' no test case"):
        open_dataset(protocol)


def test_official_test_cases_with_a_zero_test_fraction_are_enough(tmp_path: Path, write_nifti) -> None:
    """AMOS: the source's Tr cases are split by fractions with no test share; its Va cases are test cases."""
    root = _dataset(tmp_path / "ds", write_nifti, [None] * 10 + ["test"] * MIN_IN_DOMAIN_CASES)
    _, protocol = _protocol(tmp_path, root, [0.8, 0.2, 0.0])
    splits = [c.split for c in open_dataset(protocol).cases_of("S")]
    assert (splits.count("train"), splits.count("val"), splits.count("test")) == (8, 2, MIN_IN_DOMAIN_CASES)


def test_few_source_test_cases_warn(tmp_path: Path, write_nifti) -> None:
    root = _dataset(tmp_path / "ds", write_nifti, [None] * 12)  # 70/15/15 of 12: 2 test cases
    _, protocol = _protocol(tmp_path, root, [0.7, 0.15, 0.15])
    with pytest.warns(MedttaWarning, match="source site 'S' has only 2 test case\\(s\\)"):
        open_dataset(protocol)
