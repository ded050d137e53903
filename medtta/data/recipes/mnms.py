"""M&Ms (Multi-Centre, Multi-Vendor & Multi-Disease cardiac segmentation, MICCAI 2020): OpenDataset layout.

```
OpenDataset/                 (the folder as unzipped; one or two extra parent folders are fine)
  211230_M&Ms_Dataset_information_diagnosis_opendataset.csv    External code, VendorName, Vendor, Centre, ED, ES, ...
  Training/Labeled/<code>/<code>_sa.nii.gz, <code>_sa_gt.nii.gz    4D short-axis cine (x, y, z, time) and labels
  Training/Unlabeled/<code>/<code>_sa.nii.gz                        no labels: skipped
  Validation/<code>/...  Testing/<code>/...
```
Older releases: the CSV named `201207_M&Ms Dataset information - diagnosis - opendataset.csv` or
`M&Ms Dataset Information.csv` (exported from the .xlsx), possibly beside OpenDataset/ or inside
`Training-corrected/`, which replaces `Training/`; subject files directly in the partition folder are read too.

Each labelled subject gives two cases, `<code>_ED` and `<code>_ES` (0-based frames from the CSV), at the site
of its vendor letter (A Siemens, B Philips, C GE, D Canon); labels stay LV 1, MYO 2, RV 3.
Splits follow the official partitions: Validation and Testing are `test`; Training/Labeled is `train`,
except about one subject in five (`training_split`) that is `val`. The choice is per subject, so that the ED
and ES frames of a subject never land in different splits, as a per-case shuffle would do.
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib

from medtta.data.recipes.base import Recipe, SourceCase
from medtta.data.recipes.download import child_dir, find_root, nifti_index
from medtta.errors import DataError

VENDORS = {"A": "Siemens", "B": "Philips", "C": "GE", "D": "Canon"}
_VENDOR_NAMES = {"siemens": "A", "philips": "B", "ge": "C", "generalelectric": "C", "canon": "D"}
#: official partitions: (folder names tried in order, sub-folder names or None, split or None for train/val)
PARTITIONS = ((("Training", "Training-corrected"), ("Labeled", "Labelled"), None),
              (("Validation",), None, "test"),
              (("Testing",), None, "test"))
SPLIT_SALT = "medtta-mnms-1"
VAL_EVERY = 5


def training_split(code: str) -> str:
    """`val` for about one Training/Labeled subject in `VAL_EVERY`, else `train`: a fixed hash of the subject
    code, so the split of a subject does not depend on which other subjects a download holds."""
    digest = hashlib.sha256(f"{SPLIT_SALT}:{code.upper()}".encode()).digest()
    return "val" if int.from_bytes(digest[:8], "big") % VAL_EVERY == 0 else "train"


@dataclass(frozen=True)
class _InfoRow:
    """One row of the information CSV, kept raw: rows of unlabelled subjects are never checked."""

    line: int
    vendor: str
    vendor_name: str
    ed: str
    es: str


def _key(header: str) -> str:
    return "".join(ch for ch in header.lower() if ch.isalnum())


def read_info(path: Path) -> dict[str, _InfoRow]:
    """Rows of the M&Ms information CSV by subject code (upper case)."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot be read as CSV ({err})") from None
    header = [_key(h) for h in rows[0]] if rows else []
    cols = {k: header.index(k) if k in header else None for k in ("externalcode", "vendor", "vendorname", "ed", "es")}
    no_vendor = cols["vendor"] is None and cols["vendorname"] is None
    if None in (cols["externalcode"], cols["ed"], cols["es"]) or no_vendor:
        raise DataError(f"{path}: expected columns External code, Vendor (or VendorName), ED, ES; found "
                        f"{', '.join(rows[0]) if rows else 'an empty file'}")

    def cell(row: list[str], key: str) -> str:
        i = cols[key]
        return row[i].strip() if i is not None and i < len(row) else ""

    info: dict[str, _InfoRow] = {}
    for line, row in enumerate(rows[1:], start=2):
        code = cell(row, "externalcode").upper()
        if code:
            info[code] = _InfoRow(line, cell(row, "vendor"), cell(row, "vendorname"), cell(row, "ed"), cell(row, "es"))
    return info


def _frame(path: Path, row: _InfoRow, phase: str, raw: str) -> int:
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value.is_integer() or value < 0:
        raise DataError(f"{path}:{row.line}: {phase} '{raw}' is not a frame index (0, 1, ...)")
    return int(value)


def _vendor(path: Path, row: _InfoRow) -> str:
    letter = row.vendor.upper()
    if letter in VENDORS:
        return letter
    if _key(row.vendor_name) in _VENDOR_NAMES:
        return _VENDOR_NAMES[_key(row.vendor_name)]
    raise DataError(f"{path}:{row.line}: vendor '{row.vendor or row.vendor_name}' is not one of "
                    f"{', '.join(f'{k} ({v})' for k, v in VENDORS.items())}")


def _frame_count(image: Path) -> int:
    """Frames of a 4D cine, from the header alone."""
    try:
        shape = nib.load(str(image)).shape
    except Exception as err:  # nibabel raises many types for truncated or foreign files
        raise DataError(f"{image}: cannot be read as NIfTI ({err})") from None
    if len(shape) != 4:
        raise DataError(f"{image}: expected a 4D cine (x, y, z, time), got shape {shape}")
    return int(shape[3])


def _is_root(folder: Path) -> bool:
    return any(child_dir(folder, *names) for names, _, _ in PARTITIONS)


def _info_csv(download: Path, root: Path) -> Path:
    """The information CSV: in OpenDataset/, its Training folder, or a folder between it and `download`."""
    folders = [root, *(p for p in root.parents if download in (p, *p.parents))]
    training = child_dir(root, *PARTITIONS[0][0])
    folders += [training] if training else []
    files = [p for f in folders for p in sorted(f.iterdir()) if p.is_file()]
    tables = [p for p in files if "information" in p.name.lower() and "dataset" in p.name.lower()]
    csvs = sorted((p for p in tables if p.suffix.lower() == ".csv"), key=lambda p: (p.name[:1].isdigit(), p.name))
    if csvs:
        return csvs[-1]  # the newest release: names start with a yymmdd date
    if tables:
        raise DataError(f"{tables[0]}: the M&Ms information table must be a CSV; export it as CSV (e.g. "
                        f"{tables[0].with_suffix('.csv').name}) into the same folder")
    names = ", ".join(p.name for p in files) or "no files"
    raise DataError(f"{root}: expected the M&Ms information CSV (211230_M&Ms_Dataset_information_diagnosis_"
                    f"opendataset.csv) in it or a folder above it; found {names}")


def _subjects(partition: Path) -> list[tuple[str, Path, Path]]:
    """(code, image, label) of the subjects in a partition folder: `<code>/<code>_sa[_gt].nii.gz` or flat."""
    folders = [partition, *(p for p in sorted(partition.iterdir()) if p.is_dir())]
    found = []
    for folder in folders:
        index = nifti_index(folder)
        for key, image in index.items():
            if not key.endswith("_sa"):
                continue
            code = image.name[: len(key) - 3]
            label = index.get(f"{key}_gt")
            if label is None:
                raise DataError(f"{folder / f'{code}_sa_gt.nii.gz'}: missing label file for image {image} "
                                "(every M&Ms subject outside Training/Unlabeled has one)")
            found.append((code, image, label))
    return found


class MnMsRecipe(Recipe):
    """M&Ms cardiac cine MRI, 4 vendors (sites A, B, C, D); ED and ES frames with LV 1, MYO 2, RV 3."""

    name = "mnms"
    description = "M&Ms cardiac cine MRI, 4 vendors (A Siemens, B Philips, C GE, D Canon), ED and ES frames"
    labels = {"background": 0, "LV": 1, "MYO": 2, "RV": 3}
    channel = "cineMRI"
    #: M&Ms ground truth: 1 LV blood pool, 2 LV myocardium, 3 RV blood pool (as medtta's labels)
    label_map = {0: 0, 1: 1, 2: 2, 3: 3}

    def find_cases(self, download: Path) -> list[SourceCase]:
        root = find_root(download, _is_root, "the M&Ms OpenDataset folder (Training/Labeled, Validation, Testing "
                                             "and the information CSV)")
        info_path = _info_csv(download, root)
        info = read_info(info_path)
        cases, seen = [], {}
        for names, sub, split in PARTITIONS:
            partition = child_dir(root, *names)
            if partition and sub:
                labelled = child_dir(partition, *sub)
                if labelled is None and child_dir(partition, "Unlabeled", "Unlabelled") is None:
                    found = ", ".join(sorted(p.name for p in partition.iterdir())) or "nothing"
                    raise DataError(f"{partition}: expected the sub-folders Labeled and Unlabeled; found {found}")
                partition = labelled
            for code, image, label in _subjects(partition) if partition else []:
                if code.upper() in seen:
                    raise DataError(f"{image}: subject '{code}' also at {seen[code.upper()]}")
                seen[code.upper()] = image
                row = info.get(code.upper())
                if row is None:
                    raise DataError(f"{info_path}: no row for subject '{code}' (image {image})")
                site, frames = _vendor(info_path, row), _frame_count(image)
                for phase, raw in (("ED", row.ed), ("ES", row.es)):
                    frame = _frame(info_path, row, phase, raw)
                    if frame >= frames:
                        raise DataError(f"{info_path}:{row.line}: {phase} frame {frame} of subject '{code}' is out "
                                        f"of range for {image} ({frames} frames)")
                    cases.append(SourceCase(f"{code}_{phase}", site, split or training_split(code), image, label,
                                            frame))
        return cases
