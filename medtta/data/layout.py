"""The on-disk dataset layout: nnU-Net v2 raw layout plus `sites.csv` (see DESIGN.md).

```
<dataset dir>/
  dataset.json          channel_names, labels (name -> int), numTraining, file_ending
  imagesTr/<case>_0000.nii.gz
  labelsTr/<case>.nii.gz
  sites.csv             case_id,site[,split]
```
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from medtta.errors import DataError

SPLITS = ("train", "val", "test")
MANIFEST = "manifest.csv"
MANIFEST_FIELDS = ["case_id", "site", "split", "image", "image_sha256", "label", "label_sha256"]


@dataclass(frozen=True)
class Case:
    """One image/label pair of a dataset, with the site it was acquired at."""

    case_id: str
    site: str
    split: str | None
    image: Path
    label: Path


@dataclass(frozen=True)
class Volume:
    """A loaded case: image and label arrays of the same shape (2D or 3D) and the voxel spacing in mm. The image is
    None once preprocessed into slices (`data.cache.PreparedVolume`): the label gives the shape."""

    case_id: str
    image: np.ndarray | None
    label: np.ndarray
    spacing: tuple[float, ...]


@dataclass(frozen=True)
class Dataset:
    """A dataset folder in the medtta layout, read and checked for structure (not yet for voxel content)."""

    root: Path
    name: str
    labels: dict[str, int]
    channel: str
    cases: tuple[Case, ...]

    @property
    def sites(self) -> list[str]:
        return sorted({c.site for c in self.cases})

    @property
    def modality(self) -> str:
        """CT, OCT or MRI, from the first channel name (nnU-Net names CT channels "CT")."""
        upper = self.channel.upper()
        return upper if upper in ("CT", "OCT") else "MRI"

    def cases_of(self, site: str, split: str | None = None) -> list[Case]:
        return [c for c in self.cases if c.site == site and (split is None or c.split == split)]


def read_json(path: Path, missing: str, error: type[DataError] = DataError) -> dict:
    """A JSON file, failing as `error` with the path when it is missing (`missing` says what it should be) or
    malformed."""
    if not path.is_file():
        raise error(f"{path}: missing ({missing})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise error(f"{path}: not valid JSON ({err})") from None


def read_dataset_json(path: Path) -> dict:
    """Parse and check an nnU-Net `dataset.json`."""
    meta = read_json(path, "every dataset folder needs a dataset.json")
    for key in ("channel_names", "labels"):
        if not isinstance(meta.get(key), dict) or not meta[key]:
            raise DataError(f"{path}: field '{key}' must be a non-empty mapping")
    if sorted(meta["labels"].values()) != list(range(len(meta["labels"]))):
        raise DataError(f"{path}: field 'labels' must map names to 0, 1, ..., N-1 (got {meta['labels']})")
    return meta


def read_sites_csv(path: Path) -> list[dict[str, str]]:
    """Parse and check a `case_id,site[,split]` table."""
    if not path.is_file():
        raise DataError(f"{path}: missing (medtta needs a case_id,site[,split] table)")
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        fields = reader.fieldnames or []
        if "case_id" not in fields or "site" not in fields:
            raise DataError(f"{path}: header must start with case_id,site (found {','.join(fields) or 'nothing'})")
        rows = list(reader)
    for line, row in enumerate(rows, start=2):
        if not row["case_id"] or not row["site"]:
            raise DataError(f"{path}:{line}: empty case_id or site")
        split = (row.get("split") or "").strip()
        if split and split not in SPLITS:
            raise DataError(f"{path}:{line}: split '{split}' is not one of {', '.join(SPLITS)}")
    return rows


def read_dataset(root: str | Path) -> Dataset:
    """Read a dataset folder, failing with the file and what is wrong when the layout is broken."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder not found")
    meta = read_dataset_json(root / "dataset.json")
    ending = meta.get("file_ending", ".nii.gz")
    cases = []
    for row in read_sites_csv(root / "sites.csv"):
        cid = row["case_id"].strip()
        case = Case(
            case_id=cid,
            site=row["site"].strip(),
            split=(row.get("split") or "").strip() or None,
            image=root / "imagesTr" / f"{cid}_0000{ending}",
            label=root / "labelsTr" / f"{cid}{ending}",
        )
        for path in (case.image, case.label):
            if not path.is_file():
                raise DataError(f"{path}: missing (listed in {root / 'sites.csv'})")
        cases.append(case)
    if not cases:
        raise DataError(f"{root / 'sites.csv'}: lists no cases")
    return Dataset(
        root=root,
        name=meta.get("name") or root.name,
        labels={str(k): int(v) for k, v in meta["labels"].items()},
        channel=str(meta["channel_names"].get("0", next(iter(meta["channel_names"].values())))),
        cases=tuple(cases),
    )


def _unreadable(path: Path, err: Exception) -> DataError:
    return DataError(f"{path}: cannot be read as NIfTI ({err})")


def _spacing(img: nib.spatialimages.SpatialImage, ndim: int) -> tuple[float, ...]:
    return tuple(float(z) for z in img.header.get_zooms()[:ndim])


def _load_nifti(path: Path) -> tuple[np.ndarray, tuple[float, ...]]:
    """Voxel array (a 4D array with one frame squeezed to 3D) and spacing; unreadable files name the path."""
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except Exception as err:  # nibabel raises many types for truncated or foreign files
        raise _unreadable(path, err) from None
    data = np.squeeze(data) if data.ndim > 3 else data
    return data, _spacing(img, data.ndim)


def read_geometry(path: Path) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """A NIfTI file's shape and spacing (mm per axis) as `load_volume` gives them, from its header alone (the
    voxels are not read)."""
    try:
        img = nib.load(str(path))
    except Exception as err:  # as in `_load_nifti`
        raise _unreadable(path, err) from None
    shape = tuple(n for n in img.shape if n != 1) if len(img.shape) > 3 else tuple(img.shape)  # as np.squeeze
    return shape, _spacing(img, len(shape))


def check_pair(image: np.ndarray, label: np.ndarray, labels: dict[str, int], image_path: Path,
               label_path: Path) -> None:
    """What a segmentation case needs: matching 2D/3D shapes, a finite image, integer labels in `labels`."""
    if image.shape != label.shape:
        raise DataError(f"{label_path}: shape {label.shape} differs from image {image_path} shape {image.shape}")
    if image.ndim not in (2, 3):
        raise DataError(f"{image_path}: expected a 2D or 3D image, got shape {image.shape}")
    if not np.isfinite(image).all():
        raise DataError(f"{image_path}: contains NaN or infinite values")
    values = np.unique(label)
    if np.any(values != np.round(values)):
        raise DataError(f"{label_path}: label values must be integers")
    unknown = sorted(set(values.astype(int).tolist()) - set(labels.values()))
    if unknown:
        raise DataError(f"{label_path}: label values {unknown} are not in dataset.json labels "
                        f"{sorted(labels.values())}")


def check_geometry(image_affine: np.ndarray, label_affine: np.ndarray, image_path: Path, label_path: Path) -> None:
    """Image and label must lie in the same space (affines equal to 1e-3)."""
    if not np.allclose(image_affine, label_affine, atol=1e-3):
        raise DataError(f"{label_path}: geometry (affine) differs from image {image_path}")


def load_volume(case: Case, labels: dict[str, int]) -> Volume:
    """Load a case, checked with `check_pair`."""
    image, spacing = _load_nifti(case.image)
    label, _ = _load_nifti(case.label)
    check_pair(image, label, labels, case.image, case.label)
    return Volume(case.case_id, image.astype(np.float32), label.astype(np.int64), spacing)


def assign_splits(dataset: Dataset, source_site: str, seed: int, fractions: tuple[float, float, float]) -> Dataset:
    """Give every case a split: keep a `split` column where present, else split the source site by a seeded
    shuffle into train/val/test with `fractions` (at least one case for a non-zero fraction); every other
    site's cases become test cases."""
    if all(c.split for c in dataset.cases):
        return dataset
    source = sorted(c.case_id for c in dataset.cases_of(source_site) if not c.split)
    order = [source[i] for i in np.random.default_rng(seed).permutation(len(source))]
    n_val, n_test = (max(1, round(f * len(order))) if f > 0 else 0 for f in fractions[1:])
    chosen = {cid: "val" for cid in order[:n_val]}
    chosen.update({cid: "test" for cid in order[n_val : n_val + n_test]})
    chosen.update({cid: "train" for cid in order[n_val + n_test :]})

    def split_of(case: Case) -> str:
        return case.split or (chosen[case.case_id] if case.site == source_site else "test")

    cases = tuple(Case(c.case_id, c.site, split_of(c), c.image, c.label) for c in dataset.cases)
    return Dataset(dataset.root, dataset.name, dataset.labels, dataset.channel, cases)


def write_case(root: Path, case_id: str, image: np.ndarray, label: np.ndarray,
               spacing: tuple[float, ...] = (1.0, 1.0, 1.0), *, affine: np.ndarray | None = None) -> None:
    """Write one case's image and label as NIfTI into the layout, with `affine` (from the source file)
    or, without one, an axis-aligned affine of `spacing`.

    The sform keeps the affine exactly (nibabel reads it). When its direction cosines are not orthonormal (as in
    some M&Ms scans), which SimpleITK refuses, the qform holds the nearest rotation and zooms, so that SimpleITK
    reads the file too."""
    if affine is None:
        affine = np.diag([*spacing, *([1.0] * (3 - len(spacing))), 1.0])
    for folder, name, array in (
        ("imagesTr", f"{case_id}_0000.nii.gz", image.astype(np.float32)),
        ("labelsTr", f"{case_id}.nii.gz", label.astype(np.uint8)),
    ):
        (root / folder).mkdir(parents=True, exist_ok=True)
        nifti = nib.Nifti1Image(array, affine)
        if not _orthonormal(affine):
            nifti.set_qform(affine, code=1)
        nib.save(nifti, str(root / folder / name))


def _orthonormal(affine: np.ndarray) -> bool:
    directions = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    return np.allclose(directions.T @ directions, np.eye(3), rtol=0, atol=1e-9)


def write_metadata(
    root: Path, name: str, labels: dict[str, int], channel: str, rows: list[tuple[str, str, str | None]]
) -> None:
    """Write `dataset.json` and `sites.csv` (rows of case_id, site, split or None)."""
    root.mkdir(parents=True, exist_ok=True)
    meta = {"name": name, "channel_names": {"0": channel}, "labels": labels, "numTraining": len(rows),
            "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(meta, indent=2))
    with_split = any(split for _, _, split in rows)
    with (root / "sites.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["case_id", "site", "split"] if with_split else ["case_id", "site"])
        for cid, site, split in rows:
            writer.writerow([cid, site, split] if with_split else [cid, site])


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def manifest_row(root: Path, case_id: str, site: str, split: str | None) -> dict[str, str]:
    """A manifest row for a written case: its files and their sha256."""
    row = {"case_id": case_id, "site": site, "split": split or ""}
    for key, rel in (("image", f"imagesTr/{case_id}_0000.nii.gz"), ("label", f"labelsTr/{case_id}.nii.gz")):
        row[key] = rel
        row[f"{key}_sha256"] = sha256(root / rel)
    return row


def read_manifest(path: Path) -> dict[str, dict[str, str]]:
    """Manifest rows by case id (empty when there is no manifest yet)."""
    if not path.is_file():
        return {}
    with path.open(newline="") as fh:
        return {row["case_id"]: row for row in csv.DictReader(fh)}


def append_manifest(root: Path, row: dict[str, str]) -> None:
    """Append one row to `<root>/manifest.csv`, written per case so that an interrupted run resumes."""
    with (root / MANIFEST).open("a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=MANIFEST_FIELDS)
        if fh.tell() == 0:
            writer.writeheader()
        writer.writerow(row)
