"""`medtta data check` and `medtta data verify`: every problem of a dataset folder, with its file."""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np

from medtta.data.layout import check_geometry, check_pair, read_dataset_json, read_sites_csv, sha256
from medtta.errors import DataError, ProtocolError
from medtta.progress import progress_bar
from medtta.protocol import Protocol


def _check_case(image_path: Path, label_path: Path, labels: dict[str, int]) -> str | None:
    for path in (image_path, label_path):
        if not path.is_file():
            return f"{path}: missing"
    try:
        image, label = nib.load(str(image_path)), nib.load(str(label_path))
        image_data, label_data = np.asanyarray(image.dataobj), np.asanyarray(label.dataobj)
    except Exception as err:  # nibabel raises many types for truncated or foreign files
        return f"{image_path} / {label_path}: cannot be read as NIfTI ({err})"
    try:
        check_pair(np.squeeze(image_data), np.squeeze(label_data), labels, image_path, label_path)
        check_geometry(image.affine, label.affine, image_path, label_path)
    except DataError as err:
        return str(err)
    return None


def check_dataset(root: Path, progress: bool = True) -> list[str]:
    """Every problem of a folder in the dataset layout: unreadable or missing files, image/label shape or
    geometry disagreement, non-finite images, labels outside dataset.json, cases without a site."""
    if not root.is_dir():
        return [f"{root}: dataset folder not found"]
    try:
        meta = read_dataset_json(root / "dataset.json")
        rows = read_sites_csv(root / "sites.csv")
    except DataError as err:
        return [str(err)]
    labels = {str(k): int(v) for k, v in meta["labels"].items()}
    ending = meta.get("file_ending", ".nii.gz")
    problems, seen = [], set()
    for row in progress_bar(rows, desc=f"checking {root.name}", unit="case", disable=not progress):
        cid = row["case_id"].strip()
        if cid in seen:
            problems.append(f"{root / 'sites.csv'}: case '{cid}' is listed more than once")
            continue
        seen.add(cid)
        problem = _check_case(root / "imagesTr" / f"{cid}_0000{ending}", root / "labelsTr" / f"{cid}{ending}", labels)
        if problem:
            problems.append(problem)
    for image in sorted((root / "imagesTr").glob(f"*_0000{ending}")):
        cid = image.name[: -len(f"_0000{ending}")]
        if cid not in seen:
            problems.append(f"{image}: case '{cid}' has no site in {root / 'sites.csv'}")
    return problems


def expected_cases(protocol: Protocol) -> dict[str, dict[str, str]]:
    """The protocol's fixed case list (case_id, site, split[, checksums]) by case id."""
    if not protocol.manifest:
        raise ProtocolError(f"{protocol.source}: protocol '{protocol.name}' fixes no case list (no 'manifest' field)")
    path = Path(protocol.source).parent / protocol.manifest
    if not path.is_file():
        raise ProtocolError(f"{path}: manifest of protocol '{protocol.name}' not found")
    with path.open(newline="") as fh:
        return {row["case_id"]: row for row in csv.DictReader(fh)}


def verify_dataset(root: Path, protocol: Protocol) -> list[str]:
    """Differences between prepared data and the protocol's case list: missing or extra cases, another
    site or split, and other file contents where the protocol fixes checksums."""
    expected = expected_cases(protocol)
    try:
        actual = {r["case_id"]: r for r in read_sites_csv(root / "sites.csv")}
    except DataError as err:
        return [str(err)]
    problems = [f"case '{cid}': missing (expected at site {expected[cid]['site']})"
                for cid in sorted(set(expected) - set(actual))]
    problems += [f"case '{cid}': not in protocol '{protocol.name}'" for cid in sorted(set(actual) - set(expected))]
    for cid in sorted(set(expected) & set(actual)):
        want, have = expected[cid], actual[cid]
        for key in ("site", "split"):
            if want.get(key) and have.get(key) and want[key] != have[key]:
                problems.append(f"case '{cid}': {key} '{have[key]}', protocol says '{want[key]}'")
        for kind, rel in (("image", f"imagesTr/{cid}_0000.nii.gz"), ("label", f"labelsTr/{cid}.nii.gz")):
            fixed = want.get(f"{kind}_sha256")
            if not fixed:
                continue
            found = sha256(root / rel) if (root / rel).is_file() else "missing"
            if found != fixed:
                problems.append(f"{root / rel}: sha256 {found[:12]}..., protocol says {fixed[:12]}...")
    return problems
