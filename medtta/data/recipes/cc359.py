"""Calgary-Campinas-359 (CC-359) brain T1 MRI, skull stripping: official download layout.

```
<download>/                       (the unzipped Original.zip and a brain-mask zip, in any folders below it)
  Original/CC0001_philips_15_55_M.nii.gz                  <id>_<vendor>_<field>_<age>_<sex>
  Silver-standard/CC0001_philips_15_55_M_ss.nii.gz        consensus masks of the first release, 0/1
    (also Skull-stripping-masks/Silver-standard-machine-learning/, or per-scanner sub-folders)
  STAPLE/CC0001_philips_15_55_M_staple.nii.gz             from Silver-standard-STAPLE.zip: probabilities
```
The site is the scanner: vendor and field strength from the file name (`ge_15`, `ge_3`, `philips_15`,
`philips_3`, `siemens_15`, `siemens_3`). `_ss` masks are used when the download has them, else `_staple` masks
(never a mix); a mask is brain where its value is above 0.5, which leaves 0/1 masks unchanged and thresholds
STAPLE probabilities. Other files of the release (hippocampus, manual masks) are ignored; the WM-GM-CSF tissue
masks carry the image file names, so when an Original/ folder exists, image-named files outside it are ignored
with a warning naming their folder.
The dataset has no official train/test partition: cases get no split and the protocol's seeded rule splits
the source site.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np

from medtta.data.recipes.base import Recipe, SourceCase, read_image
from medtta.data.recipes.download import nifti_files
from medtta.errors import DataError, MedttaWarning

SITES = ("ge_15", "ge_3", "philips_15", "philips_3", "siemens_15", "siemens_3")
_IMAGE = re.compile(r"(CC\d{4})_(ge|philips|siemens)_(15|3)_\d+_[mf]", re.IGNORECASE)
_MASK = re.compile(rf"({_IMAGE.pattern})_(ss|staple)", re.IGNORECASE)
MASK_KINDS = ("ss", "staple")  # in order of preference


def binarize(mask: nib.Nifti1Image, path: Path) -> nib.Nifti1Image:
    """Brain where the mask is above 0.5; values outside [0, 1] mean a file that is not a brain mask."""
    raw = np.asanyarray(mask.dataobj).astype(np.float32)
    if raw.size and (not np.isfinite(raw).all() or raw.min() < -1e-3 or raw.max() > 1 + 1e-3):
        raise DataError(f"{path}: brain mask values must lie in [0, 1] (0/1 or STAPLE probabilities), "
                        f"found {raw.min():g} to {raw.max():g}")
    return nib.Nifti1Image((raw > 0.5).astype(np.uint8), mask.affine)


def _add(found: dict[str, Path], key: str, path: Path) -> None:
    if key in found:
        raise DataError(f"{path}: same file name as {found[key]} (keep one of the two; the T1 images belong in "
                        "a folder named Original)")
    found[key] = path


def _in_original(path: Path, download: Path) -> bool:
    return any(part.lower() == "original" for part in path.relative_to(download).parts[:-1])


def _without_look_alikes(download: Path, files: list[tuple[str, Path]]) -> list[tuple[str, Path]]:
    """When the download has an Original/ folder, files named like its images elsewhere (the WM-GM-CSF tissue
    masks are named exactly like them) are not images: leave them out, saying which folders were ignored."""
    image_named = [path for stem, path in files if _IMAGE.fullmatch(stem)]
    look_alikes = {path for path in image_named if not _in_original(path, download)}
    if len(look_alikes) == len(image_named):  # no Original/ folder: nothing to tell them apart by
        return files
    for folder in sorted({path.parent for path in look_alikes}):
        warnings.warn(f"{folder}: ignored, its files are named like the T1 images of Original/ (the WM-GM-CSF "
                      "tissue masks are); the brain masks come from Silver-standard/ or STAPLE/", MedttaWarning,
                      stacklevel=2)
    return [(stem, path) for stem, path in files if path not in look_alikes]


class CC359Recipe(Recipe):
    """CC-359 T1 brain MRI from 6 scanners (GE, Philips, Siemens at 1.5 T and 3 T); brain label 1."""

    name = "cc359"
    description = "Calgary-Campinas-359 brain T1 MRI, 6 scanners (3 vendors x 1.5 T / 3 T), silver-standard brain masks"
    labels = {"background": 0, "brain": 1}
    channel = "T1"

    def find_cases(self, download: Path) -> list[SourceCase]:
        files = nifti_files(download, recursive=True)
        images: dict[str, Path] = {}
        masks: dict[str, dict[str, Path]] = {kind: {} for kind in MASK_KINDS}
        for stem, path in _without_look_alikes(download, files):
            if m := _MASK.fullmatch(stem):
                _add(masks[m.group(5).lower()], m.group(1).lower(), path)
            elif _IMAGE.fullmatch(stem):
                _add(images, stem.lower(), path)
        if not images:
            raise DataError(f"{download}: expected T1 images named like CC0001_philips_15_55_M.nii.gz (folder "
                            f"Original/); found none among {len(files)} NIfTI files")
        kind = next((k for k in MASK_KINDS if masks[k]), None)
        if kind is None:
            raise DataError(f"{download}: expected brain masks named like CC0001_philips_15_55_M_ss.nii.gz "
                            "(Silver-standard/) or CC0001_philips_15_55_M_staple.nii.gz (STAPLE/); found none")
        chosen = masks[kind]
        orphans = sorted(set(chosen) - set(images))
        if orphans:
            raise DataError(f"{chosen[orphans[0]]}: mask without its image {orphans[0]}.nii.gz (expected in the "
                            "folder of the Original images)")
        mask_folder = next(iter(chosen.values())).parent
        cases = []
        for key, image in sorted(images.items()):
            stem = image.name[: len(key)]
            if key not in chosen:
                raise DataError(f"{mask_folder / f'{stem}_{kind}.nii.gz'}: missing label file for image {image}")
            m = _IMAGE.fullmatch(stem)
            cases.append(SourceCase(m.group(1).upper(), f"{m.group(2).lower()}_{m.group(3)}", None, image, chosen[key]))
        return cases

    def read_case(self, case: SourceCase) -> tuple[nib.Nifti1Image, nib.Nifti1Image]:
        """Image and brain mask with their geometry; the mask binarized (STAPLE masks are probabilities)."""
        return read_image(case.image), binarize(read_image(case.label), case.label)
