"""What a hospital has on disk: a folder in the dataset layout, or a plain folder of NIfTI / MetaImage volumes and
DICOM series (one series per subfolder), with optional masks named like the images. Everything is read with
SimpleITK and only read: nothing is written under the input folders.

Arrays follow nibabel's index order (x, y, z), the order source models are trained in; the SimpleITK image is kept
so that a predicted mask is written with the input's own geometry (origin, spacing, direction).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from medtta.data.layout import check_pair, read_dataset_json, read_sites_csv
from medtta.errors import DataError

VOLUME_ENDINGS = (".nii.gz", ".nii", ".mha", ".mhd")


@dataclass(frozen=True)
class SiteCase:
    """One input volume: a file or a DICOM series folder, and its mask if there is one."""

    case_id: str
    image: Path
    label: Path | None = None


@dataclass(frozen=True)
class SiteVolume:
    """A read case: (x, y, z) image and optional label arrays, the spacing, and the image as SimpleITK read it."""

    case_id: str
    image: np.ndarray
    label: np.ndarray | None
    spacing: tuple[float, ...]
    reference: sitk.Image  # geometry of the input, given to the predicted masks


@dataclass(frozen=True)
class SiteInputs:
    """The cases found, the input problems found while looking (path, reason) and what kind of folder it was."""

    cases: list[SiteCase]
    skipped: list[tuple[Path, str]]
    kind: str  # "dataset layout" or "folder"


def volume_ending(path: Path) -> str | None:
    return next((e for e in VOLUME_ENDINGS if path.name.lower().endswith(e)), None)


def _case_id(name: str) -> str:
    """A file or folder name without its ending and nnU-Net's channel suffix `_0000`."""
    stem = name[: -len(volume_ending(Path(name)) or "")] if volume_ending(Path(name)) else name
    return stem.removesuffix("_0000")


def discover(data: Path, labels: Path | None = None, site: str | None = None) -> SiteInputs:
    """The cases under `data` (a dataset layout when it holds dataset.json, else a plain folder), with masks from
    `labels` (named like the images) or, in the layout, from labelsTr."""
    if not data.is_dir():
        raise DataError(f"--data {data}: not a folder")
    if labels is not None and not labels.is_dir():
        raise DataError(f"--labels {labels}: not a folder")
    if (data / "dataset.json").is_file():
        found = _layout_cases(data, site)
    elif site:
        raise DataError(f"--site {site}: only a dataset-layout folder (with dataset.json and sites.csv) has sites")
    else:
        found = _folder_cases(data)
    if labels is not None:
        found = SiteInputs([SiteCase(c.case_id, c.image, _mask_for(c, labels)) for c in found.cases], found.skipped,
                           found.kind)
    if not found.cases and not found.skipped:
        raise DataError(f"--data {data}: no NIfTI (.nii, .nii.gz), MetaImage (.mha, .mhd) file or DICOM series "
                        "subfolder found")
    return found


def _layout_cases(root: Path, site: str | None) -> SiteInputs:
    meta = read_dataset_json(root / "dataset.json")
    ending = meta.get("file_ending", ".nii.gz")
    rows = read_sites_csv(root / "sites.csv")
    sites = sorted({r["site"].strip() for r in rows})
    if site and site not in sites:
        raise DataError(f"--site {site}: not in {root / 'sites.csv'} (sites: {', '.join(sites)})")
    cases, skipped = [], []
    for row in rows:
        if site and row["site"].strip() != site:
            continue
        cid = row["case_id"].strip()
        image, label = root / "imagesTr" / f"{cid}_0000{ending}", root / "labelsTr" / f"{cid}{ending}"
        if not image.is_file():
            skipped.append((image, f"missing (listed in {root / 'sites.csv'})"))
            continue
        cases.append(SiteCase(cid, image, label if label.is_file() else None))
    return SiteInputs(cases, skipped, "dataset layout")


def _folder_cases(root: Path) -> SiteInputs:
    cases, skipped = [], []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            cases.append(SiteCase(entry.name, entry))  # a DICOM series; checked when read
        elif volume_ending(entry):
            cases.append(SiteCase(_case_id(entry.name), entry))
        elif entry.suffix.lower() not in (".raw", ".zraw", ".img"):  # a MetaImage's data file is read with its .mhd
            skipped.append((entry, "not a NIfTI, MetaImage or DICOM series folder"))
    if not cases and _dicom_series(root):  # the folder itself is one series
        cases.append(SiteCase(root.name, root))
        skipped = []
    return SiteInputs(cases, skipped, "folder")


def _mask_for(case: SiteCase, labels: Path) -> Path | None:
    """The mask of a case in `labels`: the image's own file name, or the case id with any volume ending."""
    candidates = [labels / case.image.name] + [labels / f"{case.case_id}{e}" for e in VOLUME_ENDINGS]
    return next((p for p in candidates if p.is_file()), None)


def _dicom_series(folder: Path) -> list[str]:
    try:
        return list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    except RuntimeError:
        return []


def read_image(path: Path) -> sitk.Image:
    """A volume file, or the one DICOM series in a folder (sorted by slice position by SimpleITK's series reader)."""
    try:
        if not path.is_dir():
            return sitk.ReadImage(str(path))
        series = _dicom_series(path)
        if len(series) != 1:
            found = f"{len(series)} DICOM series" if series else "no DICOM series"
            raise DataError(f"{path}: holds {found}; put exactly one series in each subfolder")
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(path), series[0]))
        return reader.Execute()
    except RuntimeError as err:  # SimpleITK's message for unreadable or foreign files
        reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise DataError(f"{path}: cannot be read as an image ({reason})") from None


def as_array(image: sitk.Image, path: Path) -> np.ndarray:
    """Voxels in (x, y, z) order; a 4D image with one frame becomes 3D."""
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise DataError(f"{path}: {image.GetNumberOfComponentsPerPixel()} components per voxel; expected a "
                        "single-channel (grey-value) image")
    array = sitk.GetArrayFromImage(image)
    array = np.squeeze(array, axis=tuple(range(array.ndim - 3))) if array.ndim > 3 and array.shape[0] == 1 else array
    return np.ascontiguousarray(np.transpose(array))


def read_case(case: SiteCase, labels: dict[str, int]) -> SiteVolume:
    """Read a case's image and mask; a mask must have the image's shape and geometry and known label values."""
    image = read_image(case.image)
    array = as_array(image, case.image).astype(np.float32)
    label = None
    if case.label is not None:
        mask = read_image(case.label)
        label = as_array(mask, case.label)
        check_pair(array, label, labels, case.image, case.label)
        _check_geometry(image, mask, case)
        label = label.astype(np.int64)
    elif array.ndim not in (2, 3) or not np.isfinite(array).all():
        check_pair(array, np.zeros(array.shape, np.uint8), labels, case.image, case.image)
    return SiteVolume(case.case_id, array, label, tuple(image.GetSpacing()), image)


def _check_geometry(image: sitk.Image, mask: sitk.Image, case: SiteCase) -> None:
    for name, a, b in (("origin", image.GetOrigin(), mask.GetOrigin()),
                       ("spacing", image.GetSpacing(), mask.GetSpacing()),
                       ("direction", image.GetDirection(), mask.GetDirection())):
        if not np.allclose(a, b, atol=1e-3):
            raise DataError(f"{case.label}: {name} {tuple(round(v, 4) for v in b)} differs from image {case.image} "
                            f"{tuple(round(v, 4) for v in a)}")


def write_mask(prediction: np.ndarray, reference: sitk.Image, path: Path) -> None:
    """A predicted (x, y, z) label map as compressed NIfTI with the geometry of the input it was predicted on."""
    mask = sitk.GetImageFromArray(np.transpose(prediction).astype(np.uint8))
    mask.CopyInformation(reference)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(mask, str(path), useCompression=True)
