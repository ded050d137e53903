"""The recipe interface: turn a dataset's official download layout into the medtta dataset layout.

A recipe finds the cases of a download (`find_cases`, failing with what it expected and what it
found) and reads one case as NIfTI images with their geometry (`read_case`). `prepare` does the
rest for every recipe: validation, writing, the sha256 manifest, and skipping finished cases.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from medtta.data.layout import (
    MANIFEST,
    append_manifest,
    check_geometry,
    check_pair,
    manifest_row,
    read_manifest,
    write_case,
    write_metadata,
)
from medtta.errors import DataError
from medtta.progress import progress_bar


@dataclass(frozen=True)
class SourceCase:
    """One case of a download: where its files are and which site (and official split) it belongs to.
    `frame` picks a time frame of a 4D image (e.g. ED or ES of a cine)."""

    case_id: str
    site: str
    split: str | None
    image: Path
    label: Path
    frame: int | None = None


class Recipe:
    """Converts one dataset; subclasses set the class attributes and implement `find_cases`."""

    name: ClassVar[str]
    description: ClassVar[str]
    labels: ClassVar[dict[str, int]]
    channel: ClassVar[str]
    #: raw label value -> medtta label value, for datasets whose label values differ from `labels`
    label_map: ClassVar[dict[int, int] | None] = None

    def __init__(self, **options: Any) -> None:
        if options:
            raise DataError(f"recipe '{self.name}' takes no option --{', --'.join(options)}")

    def find_cases(self, download: Path) -> list[SourceCase]:
        raise NotImplementedError

    def read_case(self, case: SourceCase) -> tuple[nib.Nifti1Image, nib.Nifti1Image]:
        """Image and label with their geometry; labels mapped with `label_map`."""
        image, label = read_image(case.image), read_image(case.label)
        if case.frame is not None:
            image, label = take_frame(image, case.frame, case.image), take_frame(label, case.frame, case.label)
        if self.label_map is not None:
            label = map_labels(label, self.label_map, case.label)
        return image, label


def read_image(path: Path) -> nib.Nifti1Image:
    """Read NIfTI with nibabel, or anything SimpleITK reads (MetaImage .mhd/.mha, NRRD), as NIfTI (RAS)."""
    name = path.name.lower()
    try:
        if name.endswith((".nii", ".nii.gz")):
            img = nib.load(str(path))
            return nib.Nifti1Image(np.asanyarray(img.dataobj), img.affine)
        return sitk_to_nifti(sitk.ReadImage(str(path)))
    except DataError:
        raise
    except Exception as err:  # readers raise many types for truncated or foreign files
        reason = " ".join(str(err).split())  # SimpleITK's messages span several lines
        raise DataError(f"{path}: cannot be read as an image ({reason})") from None


def sitk_to_nifti(image: sitk.Image) -> nib.Nifti1Image:
    """SimpleITK (LPS, z-y-x array) -> NIfTI (RAS affine, x-y-z array), geometry preserved."""
    array = sitk.GetArrayFromImage(image).T  # -> x, y, z
    dim = image.GetDimension()
    direction = np.array(image.GetDirection()).reshape(dim, dim)
    affine = np.eye(4)
    affine[:dim, :dim] = direction * np.array(image.GetSpacing())
    affine[:dim, 3] = image.GetOrigin()
    affine[:2] *= -1  # LPS -> RAS
    return nib.Nifti1Image(array, affine)


def take_frame(image: nib.Nifti1Image, frame: int, path: Path) -> nib.Nifti1Image:
    """Frame `frame` of a 4D image (time last) as a 3D image."""
    if image.ndim != 4 or not 0 <= frame < image.shape[3]:
        raise DataError(f"{path}: expected a 4D image with a frame {frame}, got shape {image.shape}")
    return image.slicer[..., frame]


def map_labels(label: nib.Nifti1Image, mapping: dict[int, int], path: Path) -> nib.Nifti1Image:
    """Relabel raw values with `mapping`; a value it lacks is an error naming the file."""
    raw = np.asanyarray(label.dataobj)
    out = np.zeros(raw.shape, np.uint8)
    for value in np.unique(raw):
        if value != int(value) or int(value) not in mapping:
            raise DataError(f"{path}: label value {value} is not one of the dataset's values {sorted(mapping)}")
        out[raw == value] = mapping[int(value)]
    return nib.Nifti1Image(out, label.affine)


def _write_case(recipe: Recipe, case: SourceCase, out: Path) -> dict[str, str]:
    image, label = recipe.read_case(case)
    image_data, label_data = np.asanyarray(image.dataobj), np.asanyarray(label.dataobj)
    check_pair(image_data, label_data, recipe.labels, case.image, case.label)
    check_geometry(image.affine, label.affine, case.image, case.label)
    write_case(out, case.case_id, image_data, label_data, affine=image.affine)
    return manifest_row(out, case.case_id, case.site, case.split)


def prepare(recipe: Recipe, download: Path, out: Path, progress: bool = True) -> dict[str, float]:
    """Convert every case of `download` into `out`, skipping cases the manifest records as finished.

    Returns counts: cases found, written, skipped, and the seconds it took.
    """
    start = time.perf_counter()
    if not download.is_dir():
        raise DataError(f"{download}: download folder not found")
    cases = recipe.find_cases(download)
    if not cases:
        raise DataError(f"{download}: no {recipe.name} cases found")
    ids = [c.case_id for c in cases]
    if len(set(ids)) != len(ids):
        raise DataError(f"{download}: case ids are not unique ({sorted({i for i in ids if ids.count(i) > 1})[:5]})")
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / MANIFEST
    done = read_manifest(manifest_path)
    written = 0
    for case in progress_bar(cases, desc=f"preparing {recipe.name}", unit="case", disable=not progress):
        row = done.get(case.case_id)
        if row and (row["site"], row["split"]) == (case.site, case.split or "") and all(
                (out / row[k]).is_file() for k in ("image", "label")):
            continue
        row = _write_case(recipe, case, out)
        append_manifest(out, row)
        done[case.case_id] = row
        written += 1
    write_metadata(out, recipe.name, recipe.labels, recipe.channel,
                   [(c.case_id, c.site, c.split) for c in cases])
    return {"cases": len(cases), "written": written, "skipped": len(cases) - written,
            "seconds": time.perf_counter() - start}
