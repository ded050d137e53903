"""What every run of a dataset shares, computed once and cached in the results dir: the dataset's check (keyed by
a fingerprint of its files) with the checksum of every file, and each case preprocessed to network input (keyed
by the case's checksums and the preprocessing)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from medtta.data.checks import check_dataset
from medtta.data.layout import Case, Dataset, Volume, load_volume, sha256
from medtta.data.pipeline import Pipeline
from medtta.errors import DataError
from medtta.progress import progress_bar

_SHOWN_PROBLEMS = 5


def digest(value: object, length: int = 16) -> str:
    """A short content hash of a JSON-able value (what cache file names are made of)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:length]


def save_atomic(value: object, path: Path) -> None:
    """`torch.save` through a temporary file of this process, so that a reader (or another worker writing the same
    file) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    torch.save(value, tmp)
    tmp.replace(path)


def _data_files(root: Path) -> list[Path]:
    return sorted([root / "dataset.json", root / "sites.csv", *(root / "imagesTr").glob("*"),
                   *(root / "labelsTr").glob("*")])


def fingerprint(root: Path) -> str:
    """Changes when any file of the dataset is added, removed, rewritten or touched (name, size, mtime)."""
    return digest([(str(p.relative_to(root)), (s := p.stat()).st_size, s.st_mtime_ns)
                   for p in _data_files(root) if p.is_file()])


def validated_checksums(dataset: Dataset, cache: Path, progress: bool = True) -> dict[str, str]:
    """Check `dataset` the way `medtta data check` does, once per fingerprint of its files, and return the sha256
    of every file (by path relative to the dataset root). Raises a `DataError` listing the problems."""
    root = dataset.root
    path = cache / "checks" / f"{dataset.name}-{fingerprint(root)}.json"
    if path.is_file():
        return json.loads(path.read_text())
    problems = check_dataset(root, progress=progress)
    if problems:
        shown = "\n  ".join(problems[:_SHOWN_PROBLEMS])
        more = f"\n  ... and {len(problems) - _SHOWN_PROBLEMS} more" if len(problems) > _SHOWN_PROBLEMS else ""
        raise DataError(f"{root}: {len(problems)} problem(s) in the dataset (`medtta data check {root}` lists "
                        f"them all):\n  {shown}{more}")
    files = [p for p in _data_files(root) if p.is_file()]
    checksums = {str(p.relative_to(root)): sha256(p)
                 for p in progress_bar(files, desc=f"checksums of {dataset.name}", unit="file", disable=not progress,
                               leave=False)}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(checksums))
    return checksums


@dataclass(frozen=True)
class PreparedVolume:
    """A case as the engine uses it: its network input, the reference labels and spacing of the native
    volume that predictions are brought back to, and what else the pipeline needs for that (`meta`)."""

    x: torch.Tensor  # (slices, 1, H, W) float; 3D: (1, 1, D, H, W)
    volume: Volume  # label and spacing of the native volume; the image is left out (the slices hold it)
    meta: dict = field(default_factory=dict)  # e.g. nnU-Net's crop box and shapes (`Pipeline.prepare`)


class VolumeCache:
    """Cases preprocessed once: `get(case)` loads and preprocesses it with the `pipeline`, or reads it from
    `<cache>/volumes/<key>.pt`, keyed by the case's checksums, the labels and the pipeline's key."""

    def __init__(self, dataset: Dataset, checksums: dict[str, str], pipeline: Pipeline, cache: Path | None) -> None:
        self.dataset, self.checksums, self.pipeline, self.cache = dataset, checksums, pipeline, cache
        self.dir = cache / "volumes" if cache is not None else None

    def with_pipeline(self, pipeline: Pipeline) -> VolumeCache:
        """The same cases, prepared by another pipeline (a model's own, `Architecture.pipeline`)."""
        return VolumeCache(self.dataset, self.checksums, pipeline, self.cache)

    def key(self, case: Case) -> str:
        """The case's identity for every cache: its file contents, labels and preprocessing."""
        return digest([self._contents(case), self.dataset.labels, self.pipeline.key()])

    def _contents(self, case: Case) -> list[str]:
        """The sha256 of the case's image and label."""
        return [self.checksums.get(str(path.relative_to(self.dataset.root))) or sha256(path)
                for path in (case.image, case.label)]

    def fingerprint(self, cases: Iterable[Case]) -> str:
        """What a run read of the data, whatever the preprocessing: each case's image and label contents, its site
        and split, and the labels."""
        return digest([self.dataset.labels,
                       sorted((c.case_id, c.site, str(c.split), *self._contents(c)) for c in cases)])

    def get(self, case: Case) -> PreparedVolume:
        path = self.dir / f"{self.key(case)}.pt" if self.dir is not None else None
        if path is not None and path.is_file():
            saved = torch.load(path, weights_only=True)
            label = saved["label"].numpy()
            return PreparedVolume(saved["x"], Volume(case.case_id, None, label, tuple(saved["spacing"].tolist())),
                                  saved.get("meta", {}))
        full = load_volume(case, self.dataset.labels)
        x, meta = self.pipeline.prepare(full)
        prepared = PreparedVolume(x, Volume(case.case_id, None, full.label, full.spacing), meta)
        if path is not None:
            save_atomic({"x": prepared.x, "label": torch.as_tensor(np.ascontiguousarray(full.label)),
                         "spacing": torch.tensor(full.spacing, dtype=torch.float64), "meta": meta}, path)
        return prepared
