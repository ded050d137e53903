"""Finding cases in download layouts: NIfTI files by stem, case-insensitive folders, the dataset root
below the extra folders that unzipping adds, and the archive debris to ignore."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from medtta.errors import DataError


def nifti_stem(path: Path) -> str | None:
    """The file name without `.nii` / `.nii.gz` (either case), or None when it is not a NIfTI file."""
    lower = path.name.lower()
    for suffix in (".nii.gz", ".nii"):
        if lower.endswith(suffix) and len(lower) > len(suffix):
            return path.name[: -len(suffix)]
    return None


def _is_debris(name: str) -> bool:
    """Hidden files and the macOS archive debris (`__MACOSX/`, `._x.nii.gz`) that zips of these datasets carry."""
    return name.startswith(".") or name == "__MACOSX"


def nifti_files(folder: Path, recursive: bool = False) -> list[tuple[str, Path]]:
    """(stem, path) of every NIfTI file in `folder` (and below it when `recursive`), sorted by path."""
    found = []
    for current, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not _is_debris(d)) if recursive else []
        for name in files:
            stem = None if _is_debris(name) else nifti_stem(Path(name))
            if stem is not None:
                found.append((stem, Path(current) / name))
    return sorted(found, key=lambda item: item[1])


def nifti_index(folder: Path) -> dict[str, Path]:
    """The NIfTI files directly in `folder` by lower-case stem; `x.nii` next to `x.nii.gz` is an error."""
    index: dict[str, Path] = {}
    for stem, path in nifti_files(folder):
        key = stem.lower()
        if key in index:
            raise DataError(f"{path}: same case as {index[key]} (keep one of the two files)")
        index[key] = path
    return index


def child_dir(folder: Path, *names: str) -> Path | None:
    """The first sub-folder of `folder` whose name is one of `names`, compared case-insensitively."""
    wanted = [n.lower() for n in names]
    children = {p.name.lower(): p for p in folder.iterdir() if p.is_dir()}
    return next((children[n] for n in wanted if n in children), None)


def find_root(download: Path, is_root: Callable[[Path], bool], expected: str, depth: int = 2) -> Path:
    """The folder `is_root` accepts: `download` itself or a folder up to `depth` levels below it (unzipping
    often adds one or two, e.g. `M&Ms/OpenDataset/`). Fails naming what was expected and what was found."""
    level = [download]
    for _ in range(depth + 1):
        matches = [p for p in level if is_root(p)]
        if len(matches) > 1:
            raise DataError(f"{download}: several folders look like the dataset ({', '.join(map(str, matches))}); "
                            "pass one of them with --from")
        if matches:
            return matches[0]
        level = [c for p in level for c in sorted(p.iterdir()) if c.is_dir() and not _is_debris(c.name)]
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in download.iterdir() if not _is_debris(p.name))
    found = ", ".join(entries[:12]) + (", ..." if len(entries) > 12 else "") if entries else "an empty folder"
    raise DataError(f"{download}: expected {expected}; found {found}")
