"""RETOUCH (MICCAI 2017): retinal OCT fluid segmentation, one site per OCT vendor.

Official download (https://retouch.grand-challenge.org, Details page), one archive per vendor and set:

```
RETOUCH-TrainingSet-Cirrus/TRAIN001/{oct.mhd, oct.raw, reference.mhd, reference.raw}   (TRAIN001-024)
RETOUCH-TrainingSet-Spectralis/TRAIN025/...                                             (TRAIN025-048)
RETOUCH-TrainingSet-Topcon/TRAIN049/...                                                 (TRAIN049-070)
RETOUCH-TestSet-<Vendor>/TEST001/{oct.mhd, oct.raw}                                     (no reference)
```

Volumes are ITK MetaImage; the reference has the OCT's size with 0 background, 1 intraretinal fluid (IRF),
2 subretinal fluid (SRF), 3 pigment epithelium detachment (PED). Only the training sets have references, so
the test sets are skipped; the engine splits the source vendor's cases (no split column is written).

B-scans: the challenge stores voxels "running first over x, then y, then z" and "the B-scans go over the
z-dimension". `read_image` turns MetaImage (x, y, z) into a NIfTI array of the same (x, y, z) order, so each
slice along the last array axis, which medtta's 2D models see, is one B-scan (x lateral, y axial depth). No
transposition is needed and the affine is the file's own (spacing in mm, e.g. Cirrus 0.0117 x 0.0020 x 0.047).

Tolerated variants: the vendor folders may sit at the top of `--from` or up to three levels below it (each
archive unpacked into its own folder), `--from` may be one vendor folder itself, and folder names are matched
regardless of case and of `-`, `_` or spaces between the words.
"""

from __future__ import annotations

import re
from pathlib import Path

import nibabel as nib

from medtta.data.recipes.base import Recipe, SourceCase
from medtta.errors import DataError

VENDORS = ("Cirrus", "Spectralis", "Topcon")
#: how far below `--from` the vendor folders are looked for
SEARCH_DEPTH = 3
_VENDOR_FOLDER = re.compile(r"^retouch[-_ ]*training[-_ ]*set[-_ ]*(cirrus|spectralis|topcon)$", re.IGNORECASE)
_CASE_FOLDER = re.compile(r"^train\d+$", re.IGNORECASE)
#: bytes per element of the uncompressed MetaImage element types, to tell a truncated .raw from a whole one
_ELEMENT_BYTES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
                  "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4,
                  "MET_DOUBLE": 8}


class RetouchRecipe(Recipe):
    """RETOUCH training sets: OCT volume + fluid reference per case, site = vendor (Cirrus, Spectralis, Topcon)."""

    name = "retouch"
    description = "RETOUCH retinal OCT fluid (IRF, SRF, PED), 3 vendors, MetaImage training sets"
    labels = {"background": 0, "IRF": 1, "SRF": 2, "PED": 3}
    channel = "OCT"
    label_map = {0: 0, 1: 1, 2: 2, 3: 3}  # the challenge's values, checked value by value

    def find_cases(self, download: Path) -> list[SourceCase]:
        cases = []
        for vendor, folder in sorted(_vendor_folders(download).items()):
            for case_dir in _case_folders(folder):
                image, label = case_dir / "oct.mhd", case_dir / "reference.mhd"
                for path, what in ((image, "OCT volume"), (label, "reference (training cases must have one)")):
                    if not path.is_file():
                        raise DataError(f"{path}: missing {what}")
                cases.append(SourceCase(case_dir.name, vendor, None, image, label))
        return cases

    def read_case(self, case: SourceCase) -> tuple[nib.Nifti1Image, nib.Nifti1Image]:
        """Check each MetaImage's data file first, so a missing or cut .raw is named rather than its header."""
        for header in (case.image, case.label):
            check_metaimage(header)
        try:
            return super().read_case(case)
        except DataError as err:  # SimpleITK's messages span lines; the CLI prints errors as one line
            raise DataError(" ".join(str(err).split())) from None


def _vendor_folders(download: Path) -> dict[str, Path]:
    """`RETOUCH-TrainingSet-<Vendor>` folders that hold cases, by canonical vendor name; one per vendor."""
    found: dict[str, list[Path]] = {}
    empty: dict[str, Path] = {}
    for folder in _walk(download, SEARCH_DEPTH):
        match = _VENDOR_FOLDER.match(folder.name)
        if not match:
            continue
        vendor = next(v for v in VENDORS if v.lower() == match.group(1).lower())
        if _case_folders(folder):
            found.setdefault(vendor, []).append(folder)
        else:
            empty.setdefault(vendor, folder)
    for vendor, folder in empty.items():
        if vendor not in found:  # an outer folder of the same name around the real one is fine
            raise DataError(f"{folder}: no case folders (expected TRAIN<id>/ folders holding oct.mhd)")
    twice = {v: paths for v, paths in found.items() if len(paths) > 1}
    if twice:
        vendor, paths = next(iter(twice.items()))
        raise DataError(f"{download}: {vendor} training set found more than once ({', '.join(map(str, paths))}); "
                        "keep one copy")
    if not found:
        seen = sorted(p.name for p in download.iterdir())[:8]
        raise DataError(f"{download}: no RETOUCH-TrainingSet-<Cirrus|Spectralis|Topcon> folder with TRAIN<id>/ "
                        f"cases within {SEARCH_DEPTH} levels (found: {', '.join(seen) or 'nothing'})")
    return {vendor: paths[0] for vendor, paths in found.items()}


def _walk(root: Path, depth: int) -> list[Path]:
    """`root` and its folders up to `depth` levels below it (hidden folders and macOS archive debris skipped)."""
    folders, level = [root], [root]
    for _ in range(depth):
        level = [child for folder in level for child in sorted(folder.iterdir())
                 if child.is_dir() and not child.name.startswith((".", "__MACOSX"))]
        folders += level
    return folders


def _case_folders(folder: Path) -> list[Path]:
    """Case folders of a vendor folder: named TRAIN<id>, or holding an oct.mhd."""
    return [child for child in sorted(folder.iterdir())
            if child.is_dir() and (_CASE_FOLDER.match(child.name) or (child / "oct.mhd").is_file())]


def _header_fields(header: Path) -> dict[str, str]:
    fields = {}
    try:
        text = header.read_text(errors="replace")
    except OSError as err:
        raise DataError(f"{header}: cannot be read ({err.strerror})") from None
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


def check_metaimage(header: Path) -> None:
    """Fail naming the file when a MetaImage header lacks its size, or its data file is missing or truncated.

    Only uncompressed single-file data (the RETOUCH format) is sized here; anything else is left to the reader.
    """
    fields = _header_fields(header)
    if "DimSize" not in fields or "ElementDataFile" not in fields:
        raise DataError(f"{header}: not a MetaImage header (no DimSize or ElementDataFile line)")
    data_name = fields["ElementDataFile"]
    if data_name.upper() == "LOCAL" or " " in data_name or "%" in data_name:
        return  # data inside the header file, or a list/pattern of slice files: let the reader judge
    data = header.parent / data_name
    if not data.is_file():
        raise DataError(f"{data}: missing (the data file named by {header.name})")
    element = _ELEMENT_BYTES.get(fields.get("ElementType", "").upper())
    if element is None or fields.get("CompressedData", "False").lower() == "true":
        return
    try:
        voxels = 1
        for n in fields["DimSize"].split():
            voxels *= int(n)
        expected = voxels * element * int(fields.get("ElementNumberOfChannels", "1"))
    except ValueError:
        raise DataError(f"{header}: DimSize '{fields['DimSize']}' is not a list of integers") from None
    size = data.stat().st_size
    if size < expected:
        raise DataError(f"{data}: truncated ({size} bytes, {header.name} needs {expected})")
