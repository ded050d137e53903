"""Protocols: one typed, immutable object per standardized cross-site benchmark (protocols/*.yaml)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from medtta.errors import ProtocolError
from medtta.streams import SETTINGS

MODALITIES = ("MRI", "CT", "OCT")
DIVISOR = 8  # a UNet input side must be a multiple of this (three stride-2 levels)
INTENSITY_SCHEMES = {"MRI": "mr", "CT": "ct", "OCT": "oct"}  # the default normalization of each modality
PATCH_BATCH = 2  # 3D source training of a slice protocol: patches per batch, as nnU-Net's 3d_fullres trains


def protocols_dir() -> Path:
    """The built-in protocols: top-level `protocols/` in a source checkout, `medtta/protocols` in a wheel."""
    here = Path(__file__).resolve().parent
    packaged = here / "protocols"
    return packaged if packaged.is_dir() else here.parent / "protocols"


@dataclass(frozen=True)
class Preprocessing:
    """How a volume becomes network input: intensity normalization, then each slice resized to `size`, or
    resampled to the in-plane `spacing` (mm) and centre-padded/cropped to `size` when a spacing is given."""

    size: tuple[int, int] = (128, 128)
    spacing: tuple[float, float] | None = None
    intensity: str = "mr"  # mr: percentile clip + z-score; ct: HU window; oct: percentile min-max
    clip_percentiles: tuple[float, float] = (0.5, 99.5)
    window: tuple[float, float] = (-160.0, 240.0)
    slice_axis: int = 2  # the array axis (x, y, z as loaded) a 3D volume is cut along: its acquisition plane
    dims: int = 2  # 2: the network sees slices; 3: the volume (its slices stacked, see `slice_spacing`)
    patch_size: tuple[int, int, int] | None = None  # 3D: training patch and sliding window, in-plane then depth
    slice_spacing: float | None = None  # 3D: mm between slices the volume is resampled to
    # (a run plans either when None, from the source site's volumes: `medtta.data.plans`)

    @property
    def patch(self) -> tuple[int, int, int]:
        """The 3D patch as `patch_size` gives it, in-plane then depth; default `size` in-plane, 32 deep."""
        return self.patch_size or (*self.size, 32)

    @property
    def patch_shape(self) -> tuple[int, int, int]:
        """The 3D patch as the network sees it, depth first: (depth, H, W)."""
        h, w, d = self.patch
        return d, h, w


@dataclass(frozen=True)
class Training:
    """Source-model training: epochs over the source train split, keeping the best validation Dice."""

    epochs: int = 40
    batch_size: int = 16
    lr: float = 1e-3


@dataclass(frozen=True)
class Protocol:
    """A standardized cross-site split: dataset, labels, source site, ordered target sites, preprocessing."""

    name: str
    modality: str
    labels: dict[str, int]
    source_site: str
    target_sites: tuple[str, ...]
    dataset: dict[str, Any]  # {"synthetic": generator, "params": {...}} or {"folder": path or name}
    description: str = ""
    setting: str = "episodic"
    split_seed: int = 0
    split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    training: Training = field(default_factory=Training)
    manifest: str | None = None  # CSV of the expected cases (case_id, site, split[, checksums]), beside the YAML
    evaluate_labels: tuple[str, ...] | None = None  # the labels scored at every site; None: all foreground labels
    source: str = "<built in>"

    @property
    def scored_labels(self) -> dict[str, int]:
        """The foreground labels Dice, recovery and collapse are computed on."""
        names = self.evaluate_labels or [n for n, v in self.labels.items() if v > 0]
        return {n: self.labels[n] for n in names}

    def with_dims(self, dims: int) -> Protocol:
        """A copy whose network sees slices (2) or volumes (3). A slice protocol run on volumes trains on batches
        of `PATCH_BATCH` patches: its `training.batch_size` counts slices (`medtta.data.plans` plans the rest)."""
        training = self.training
        if self.preprocessing.dims == 2 and dims == 3:
            training = dataclasses.replace(training, batch_size=PATCH_BATCH)
        return dataclasses.replace(self, preprocessing=dataclasses.replace(self.preprocessing, dims=dims),
                                   training=training)

    def with_sites(self, source_site: str | None, target_sites: tuple[str, ...] | None) -> Protocol:
        """A copy with another source site and/or target sites (targets default to the other sites)."""
        source = source_site or self.source_site
        targets = target_sites or tuple(s for s in self.target_sites if s != source)
        return dataclasses.replace(self, source_site=source, target_sites=tuple(targets))


def _fail(path: Path | str, message: str) -> ProtocolError:
    return ProtocolError(f"{path}: {message}")


def _section(path: Path, raw: dict, key: str, cls: type) -> Any:
    value = raw.get(key) or {}
    if not isinstance(value, dict):
        raise _fail(path, f"field '{key}' must be a mapping")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise _fail(path, f"field '{key}' has unknown keys {unknown} (known: {sorted(known)})")
    try:
        converted = {k: tuple(v) if isinstance(v, list) else v for k, v in value.items()}
        return cls(**converted)
    except TypeError as err:
        raise _fail(path, f"field '{key}': {err}") from None


def _require(path: Path, raw: dict, key: str, kind: type | tuple[type, ...]) -> Any:
    if key not in raw:
        raise _fail(path, f"missing required field '{key}'")
    if not isinstance(raw[key], kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise _fail(path, f"field '{key}' must be a {names}, got {type(raw[key]).__name__}")
    return raw[key]


def parse_protocol(raw: Any, path: Path) -> Protocol:
    """Validate a parsed YAML document and build the Protocol, naming the file and field on failure."""
    if not isinstance(raw, dict):
        raise _fail(path, "expected a mapping of protocol fields")
    name = str(_require(path, raw, "name", str))
    modality = _require(path, raw, "modality", str)
    if modality not in MODALITIES:
        raise _fail(path, f"field 'modality' must be one of {', '.join(MODALITIES)}, got '{modality}'")
    labels = _require(path, raw, "labels", dict)
    if sorted(labels.values()) != list(range(len(labels))):
        raise _fail(path, f"field 'labels' must map names to 0, 1, ..., N-1 (got {labels})")
    dataset = _require(path, raw, "dataset", dict)
    if not ("synthetic" in dataset) ^ ("folder" in dataset):
        raise _fail(path, "field 'dataset' needs exactly one of 'synthetic' (generator) or 'folder'")
    targets = _require(path, raw, "target_sites", list)
    if not targets:
        raise _fail(path, "field 'target_sites' must list at least one site")
    setting = raw.get("setting", "episodic")
    if setting not in SETTINGS:
        raise _fail(path, f"field 'setting' must be one of {', '.join(SETTINGS)}, got '{setting}'")
    preprocessing = _section(path, raw, "preprocessing", Preprocessing)
    if preprocessing.intensity not in INTENSITY_SCHEMES.values():
        raise _fail(path, f"field 'preprocessing.intensity' must be one of {', '.join(INTENSITY_SCHEMES.values())}, "
                          f"got '{preprocessing.intensity}'")
    if preprocessing.slice_axis not in (0, 1, 2):
        raise _fail(path, f"field 'preprocessing.slice_axis' must be 0, 1 or 2 (an axis of the x-y-z array), "
                          f"got {preprocessing.slice_axis!r}")
    _check_dims(path, preprocessing)
    evaluate = _evaluate_labels(path, raw, labels)
    split = raw.get("split") or {}
    fractions = tuple(split.get("fractions", (0.7, 0.15, 0.15)))
    if len(fractions) != 3 or abs(sum(fractions) - 1.0) > 1e-6:
        raise _fail(path, "field 'split.fractions' must be three numbers (train, val, test) summing to 1")
    return Protocol(
        name=name,
        modality=modality,
        labels={str(k): int(v) for k, v in labels.items()},
        source_site=str(_require(path, raw, "source_site", (str, int))),
        target_sites=tuple(str(t) for t in targets),
        dataset=dataset,
        description=str(raw.get("description", "")),
        setting=setting,
        split_seed=int(split.get("seed", 0)),
        split_fractions=fractions,
        preprocessing=preprocessing,
        training=_section(path, raw, "training", Training),
        manifest=raw.get("manifest"),
        evaluate_labels=evaluate,
        source=str(path),
    )


def _check_dims(path: Path, prep: Preprocessing) -> None:
    if prep.dims not in (2, 3):
        raise _fail(path, f"field 'preprocessing.dims' must be 2 or 3, got {prep.dims!r}")
    if prep.patch_size is not None and (len(prep.patch_size) != 3 or any(
            not isinstance(n, int) or n <= 0 or n % DIVISOR for n in prep.patch_size)):
        raise _fail(path, f"field 'preprocessing.patch_size' must be three positive multiples of {DIVISOR} (the "
                          f"UNet halves a patch three times), got {prep.patch_size!r}")
    if prep.slice_spacing is not None and not (isinstance(prep.slice_spacing, int | float) and prep.slice_spacing > 0):
        raise _fail(path, f"field 'preprocessing.slice_spacing' must be a positive number of mm, "
                          f"got {prep.slice_spacing!r}")


def _evaluate_labels(path: Path, raw: dict, labels: dict) -> tuple[str, ...] | None:
    """The optional `evaluate_labels` list: foreground label names of `labels`, at least one."""
    if "evaluate_labels" not in raw:
        return None
    names = raw["evaluate_labels"]
    foreground = [str(n) for n, v in labels.items() if v != 0]
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise _fail(path, "field 'evaluate_labels' must be a non-empty list of label names")
    unknown = [n for n in names if n not in foreground]
    if unknown:
        raise _fail(path, f"field 'evaluate_labels' names {unknown}, not foreground labels of 'labels' "
                          f"(known: {', '.join(foreground)})")
    return tuple(names)


def load_protocol(path: str | Path) -> Protocol:
    """Load and validate a protocol YAML file."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as err:
        raise _fail(path, f"cannot be read ({err.strerror})") from None
    except yaml.YAMLError as err:
        raise _fail(path, f"not valid YAML ({err})") from None
    return parse_protocol(raw, path)


def list_protocols() -> dict[str, Protocol]:
    """The built-in protocols by name."""
    found = (load_protocol(p) for p in sorted(protocols_dir().glob("*.yaml")))
    return {p.name: p for p in found}


def protocol_for_folder(folder: Path, source_site: str | None, target_sites: tuple[str, ...]) -> Protocol:
    """A protocol for any folder in the dataset layout: the other sites are targets unless given."""
    from medtta.data.layout import read_dataset

    dataset = read_dataset(folder)
    if not source_site:
        raise ProtocolError(f"--source-site is required with a dataset folder (sites in {folder}: "
                            f"{', '.join(dataset.sites)})")
    for site in (source_site, *target_sites):
        if site not in dataset.sites:
            raise ProtocolError(f"site '{site}' is not in {folder / 'sites.csv'} (sites: {', '.join(dataset.sites)})")
    targets = target_sites or tuple(s for s in dataset.sites if s != source_site)
    if not targets:
        raise ProtocolError(f"{folder / 'sites.csv'}: no site other than the source site '{source_site}' to adapt to")
    return Protocol(
        name=dataset.name,
        modality=dataset.modality,
        labels=dataset.labels,
        source_site=source_site,
        target_sites=tuple(targets),
        dataset={"folder": str(folder.resolve())},
        description=f"dataset folder {folder}",
        preprocessing=Preprocessing(intensity=INTENSITY_SCHEMES[dataset.modality]),
        source=str(folder),
    )


def resolve_protocol(
    dataset: str, source_site: str | None = None, target_sites: tuple[str, ...] = ()
) -> Protocol:
    """`--dataset` as a built-in protocol name, a protocol YAML file, or a dataset folder."""
    path = Path(dataset).expanduser()
    if path.is_dir():
        return protocol_for_folder(path, source_site, target_sites)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        protocol = load_protocol(path)
    else:
        available = list_protocols()
        if dataset not in available:
            raise ProtocolError(f"--dataset '{dataset}' is neither a protocol ({', '.join(available)}) "
                                "nor a dataset folder")
        protocol = available[dataset]
    return protocol.with_sites(source_site, target_sites or None)
