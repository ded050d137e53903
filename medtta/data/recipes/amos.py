"""AMOS 2022: abdominal multi-organ CT and MRI from two Shenzhen hospitals, one site per modality and scanner.

Official download (Zenodo record 7262581, https://zenodo.org/records/7262581): `amos22.zip` unpacks to

```
amos22/dataset.json
amos22/imagesTr/amos_XXXX.nii.gz   amos22/labelsTr/amos_XXXX.nii.gz   (200 CT + 40 MRI)
amos22/imagesVa/amos_XXXX.nii.gz   amos22/labelsVa/amos_XXXX.nii.gz   (100 CT + 20 MRI)
amos22/imagesTs/amos_XXXX.nii.gz                                      (no public labels: skipped)
```

with ids up to 500 CT and above 500 MRI. The scanner of each case is in a CSV published beside the archive,
`labeled_data_meta_0000_0599.csv`, columns `amos_id, Patient's Birth Date, Patient's Sex, Patient's Age,
Manufacturer's Model Name, Manufacturer, Acquisition Date, Site` (ids unpadded; `Site` is the hospital,
"people" or "center"). The site of a case is `<CT|MR>-<first word of Manufacturer>-<Model Name>` with every run of
other characters than letters and digits turned into `-`, e.g. `CT-SIEMENS-SOMATOM-Force`, `MR-Philips-Ingenia`.

Splits: Va and labelled Ts cases are `test`; Tr cases get no split, so that the engine splits the source
scanner's Tr cases with the protocol's seed and fractions (the AMOS protocols give them no test share: the source's
Va cases are its test cases), while at every other site all cases are adaptation targets. The official validation
set thus stays a held-out test set everywhere. The labelled cases per scanner, counted from the real id lists, are
in the protocols' headers and `protocols/manifests/amos.csv`.

Tolerated variants: `--from` may be the folder holding `amos22/` (the archive unpacked where it was downloaded)
or `amos22/` itself, or hold it one level deeper; the metadata CSV is looked for in `--from`, the dataset folder
and the folder above it under any name starting with `labeled_data_meta` (e.g. a corrected
`labeled_data_meta-fix.csv`), or given with `--sites PATH`; its header may differ in case and punctuation.
The released CSV lists id 500 twice (an Optima CT540 CT row and an Ingenia MRI row) and has no row for 600:
a duplicated id keeps the row whose scanner matches the modality of the id, and the left-over MRI row of id 500
is read as the row of 600, the only MRI id without one (see `ERRATA`; an inference, not an official erratum,
which `prepare` prints as a warning when it applies it).
"""

from __future__ import annotations

import csv
import json
import re
import warnings
from pathlib import Path

from medtta.data.recipes.base import Recipe, SourceCase
from medtta.errors import DataError, MedttaWarning

#: the AMOS label values and, as medtta names, the organs of AMOS's dataset.json (which spells "arota",
#: "gall bladder" and "postcava" for the inferior vena cava)
ORGANS = ("spleen", "right_kidney", "left_kidney", "gallbladder", "esophagus", "liver", "stomach", "aorta",
          "postcava", "pancreas", "right_adrenal_gland", "left_adrenal_gland", "duodenum", "bladder",
          "prostate_uterus")
#: the official folder pairs and the split their cases get (None: the engine splits them, see module docstring)
PARTS = (("Tr", None), ("Va", "test"), ("Ts", "test"))
#: the scanners named in the released metadata, and their modality: a row that contradicts the id's modality
#: is an error (or, for a duplicated id, the wrong one of its rows)
KNOWN_SCANNERS = {"Aquilion ONE": "CT", "Brilliance16": "CT", "Optima CT540": "CT", "Optima CT660": "CT",
                  "SOMATOM Force": "CT", "Achieva": "MR", "Ingenia": "MR", "Prisma": "MR", "SIGNA HDe": "MR"}
#: known defects of the released CSV: case id -> id under which its row was published
ERRATA = {600: 500}
_CASE_FILE = re.compile(r"^amos_(\d+)\.nii(\.gz)?$")
_COLUMNS = {"id": ("amosid", "id"), "model": ("manufacturersmodelname", "modelname", "model"),
            "manufacturer": ("manufacturer",)}


def modality_of(amos_id: int) -> str:
    """AMOS numbering: ids up to 500 are CT, the others MRI."""
    return "CT" if amos_id <= 500 else "MR"


def site_name(modality: str, manufacturer: str, model: str) -> str:
    """`<modality>-<first word of the manufacturer>-<model>`, letters and digits only between the dashes."""
    vendor = manufacturer.split()[0]
    return re.sub(r"[^A-Za-z0-9]+", "-", f"{modality}-{vendor}-{model}").strip("-")


class AmosRecipe(Recipe):
    """AMOS 2022 labelled cases (Tr, Va), 15 organs, site = modality + scanner from the released metadata CSV."""

    name = "amos"
    description = "AMOS 2022 abdominal organs (15), CT and MRI, site = modality + scanner model"
    labels = {"background": 0, **{organ: i for i, organ in enumerate(ORGANS, start=1)}}
    # nnU-Net's name for a channel that is not (only) CT: per-volume normalization, right for mixed CT and MRI
    channel = "nonCT"
    label_map = {i: i for i in range(len(ORGANS) + 1)}

    def __init__(self, sites: str | Path | None = None) -> None:
        # `--sites` on the command line: the metadata CSV, for a copy kept outside the download folder
        self.meta = Path(sites) if sites is not None else None

    def find_cases(self, download: Path) -> list[SourceCase]:
        root = _dataset_folder(download)
        _check_labels(root / "dataset.json")
        scanners = ScannerTable(self.meta or _find_metadata(download, root))
        cases = []
        for part, split in PARTS:
            images, labels = root / f"images{part}", root / f"labels{part}"
            if not images.is_dir() or (part == "Ts" and not labels.is_dir()):
                continue  # Tr is checked by _dataset_folder; Va may be absent, Ts has no public labels
            for image in sorted(images.iterdir()):
                match = _CASE_FILE.match(image.name)
                if not match:
                    continue
                amos_id = int(match.group(1))
                label = labels / image.name
                if not label.is_file():
                    if part == "Ts":
                        continue  # an unlabelled test case
                    raise DataError(f"{label}: missing (label of {image})")
                cases.append(SourceCase(f"amos_{amos_id:04d}", scanners.site_of(amos_id), split, image, label))
        return cases


def _dataset_folder(download: Path) -> Path:
    """The folder holding imagesTr/labelsTr: `--from` or `--from`/amos22, or either one folder deeper."""
    below = sorted(p for p in download.iterdir() if p.is_dir())
    candidates = [download, download / "amos22", *below, *(p / "amos22" for p in below)]
    for folder in candidates:
        if (folder / "imagesTr").is_dir():
            if not (folder / "labelsTr").is_dir():
                raise DataError(f"{folder / 'labelsTr'}: missing (the labels of {folder / 'imagesTr'})")
            return folder
    seen = sorted(p.name for p in download.iterdir())[:8]
    raise DataError(f"{download}: no AMOS dataset (expected amos22/imagesTr and amos22/labelsTr from amos22.zip; "
                    f"found: {', '.join(seen) or 'nothing'})")


def _check_labels(path: Path) -> None:
    """AMOS's dataset.json, when present, must list the same label values (0-15) this recipe maps."""
    if not path.is_file():
        return
    try:
        labels = json.loads(path.read_text()).get("labels", {})
        values = sorted(int(k) for k in labels) if all(str(k).isdigit() for k in labels) else \
            sorted(int(v) for v in labels.values())
    except (ValueError, TypeError, AttributeError) as err:
        raise DataError(f"{path}: cannot read its 'labels' ({err})") from None
    if values != list(range(len(ORGANS) + 1)):
        raise DataError(f"{path}: labels {values} are not AMOS's 0-{len(ORGANS)} (background + 15 organs)")


def _find_metadata(download: Path, root: Path) -> Path:
    """The one `labeled_data_meta*.csv` in `--from`, the dataset folder or its parent."""
    found = sorted({p.resolve() for folder in (download, root, root.parent)
                    for p in folder.glob("labeled_data_meta*.csv")})
    if not found:
        raise DataError(f"{download}: scanner metadata not found (expected labeled_data_meta_0000_0599.csv, "
                        "published beside amos22.zip, in this folder or next to amos22/; or give it with --sites)")
    if len(found) > 1:
        raise DataError(f"{download}: several metadata files ({', '.join(map(str, found))}); choose one with --sites")
    return found[0]


class ScannerTable:
    """The metadata CSV: scanner rows by amos id, and the site of a case from them."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows = _read_rows(path)

    def site_of(self, amos_id: int) -> str:
        """`site_name` of the case's row; a duplicated id keeps the row whose scanner fits the id's modality."""
        modality = modality_of(amos_id)
        rows = self.rows.get(amos_id, [])
        if not rows and amos_id in ERRATA:
            rows = [r for r in self.rows.get(ERRATA[amos_id], []) if KNOWN_SCANNERS.get(r[1]) == modality]
            if rows:
                warnings.warn(f"{self.path}: no row for amos_id {amos_id}; its scanner ({rows[0][1]}) is read from the "
                              f"{modality} row of id {ERRATA[amos_id]} at line {rows[0][2]}, which the CSV lists twice "
                              "(an inference, not an official erratum)", MedttaWarning, stacklevel=2)
        if not rows:
            raise DataError(f"{self.path}: no row for amos_id {amos_id} (case amos_{amos_id:04d})")
        fitting = [r for r in rows if KNOWN_SCANNERS.get(r[1], modality) == modality]
        if len(fitting) != 1:
            what = "contradict" if not fitting else "are ambiguous for"
            raise DataError(f"{self.path}: line(s) {', '.join(str(r[2]) for r in rows)} (scanner "
                            f"{', '.join(r[1] for r in rows)}) {what} amos_{amos_id:04d}, {modality} by its id "
                            "(ids up to 500 are CT)")
        manufacturer, model, _ = fitting[0]
        return site_name(modality, manufacturer, model)


def _read_rows(path: Path) -> dict[int, list[tuple[str, str, int]]]:
    """(manufacturer, model, line number) by amos id, with the columns found by their normalized names."""
    if not path.is_file():
        raise DataError(f"{path}: metadata CSV not found")
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            header = next(reader, [])
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"{path}: cannot be read as CSV ({err})") from None
    normalized = [re.sub(r"[^a-z0-9]", "", h.lower()) for h in header]
    column = {}
    for key, names in _COLUMNS.items():
        index = next((normalized.index(n) for n in names if n in normalized), None)
        if index is None:
            raise DataError(f"{path}: no '{names[0]}' column (expected amos_id, Manufacturer's Model Name, "
                            f"Manufacturer; found: {', '.join(header) or 'nothing'})")
        column[key] = index
    table: dict[int, list[tuple[str, str, int]]] = {}
    for line, row in enumerate(rows, start=2):
        if not any(cell.strip() for cell in row):
            continue
        amos_id, manufacturer, model = (row[column[k]].strip() if column[k] < len(row) else ""
                                        for k in ("id", "manufacturer", "model"))
        if not amos_id.isdigit():
            raise DataError(f"{path}:{line}: amos_id '{amos_id}' is not a number")
        if not manufacturer or not model:
            raise DataError(f"{path}:{line}: empty Manufacturer or Manufacturer's Model Name for id {amos_id}")
        table.setdefault(int(amos_id), []).append((manufacturer, model, line))
    return table
