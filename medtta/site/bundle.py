"""Model bundles: what `medtta export` writes and `medtta site-eval` loads, with no access to the source data.

```
<bundle>/
  bundle.json                      architecture + config, labels, preprocessing, modality, source protocol and
                                   site, in-domain Dice, medtta version, bundle format, sha256 of every file
  weights.safetensors              the whole model: network and post-trained stages (e.g. the norm-net's DAE)
  statistics-<name>.safetensors    source statistics an adapter of the architecture needs (EATA's Fisher)
```

Safetensors only (no pickle); loading checks every sha256 and refuses a bundle of another bundle format or of an
incompatible medtta version.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_file, save_model

import medtta
from medtta.data.layout import read_json, sha256
from medtta.errors import DataError
from medtta.models import build_network
from medtta.models.base import Architecture
from medtta.protocol import Preprocessing, Protocol
from medtta.registry import ADAPTERS

BUNDLE_FORMAT = 1  # raise when bundle.json or the files change in a way older readers cannot follow
MANIFEST = "bundle.json"
WEIGHTS = "weights.safetensors"


class BundleError(DataError):
    """A bundle is missing, corrupt, modified or from an incompatible medtta version."""


def compatible_versions(a: str, b: str) -> bool:
    """Same major version (same minor while the major is 0, as semantic versioning allows breaking 0.x releases)."""
    pa, pb = (v.split(".") for v in (a, b))
    depth = 2 if pa[0] == "0" else 1
    return pa[:depth] == pb[:depth]


def statistics_of(architecture: str) -> dict[str, Any]:
    """Source statistics (name -> how to compute them) of every registered adapter of `architecture`."""
    found = {}
    for name in ADAPTERS.list():
        cls = ADAPTERS.get(name)
        if architecture in cls.architectures():
            found.update(cls.statistics_to_compute())
    return found


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _write(path: Path, tensors: dict[str, torch.Tensor] | torch.nn.Module) -> dict[str, str]:
    """Tensors, or a module's whole state (a tensor it names twice, as nnU-Net does, stored once), as safetensors."""
    if isinstance(tensors, torch.nn.Module):
        save_model(tensors, str(path))
    else:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))
    path.chmod(0o644)  # safetensors writes 0600: a container's non-root user must read a mounted bundle
    return {"file": path.name, "sha256": sha256(path)}


def write_bundle(out: Path, model: Architecture, architecture: str, protocol: Protocol, seed: int,
                 statistics: dict[str, dict[str, torch.Tensor]], source: dict[str, Any]) -> dict[str, Any]:
    """Write the bundle of a trained `model` into `out`; `source` holds what source training measured
    (`dice_in_domain`, `in_domain_cases`, `source_val_dice`). Returns the manifest written as bundle.json."""
    out.mkdir(parents=True, exist_ok=True)
    files = {"weights": _write(out / WEIGHTS, model)}
    relative = model.export_files(out)  # e.g. an nnU-Net's plans, in a folder of the bundle
    files["extra"] = [{"file": str(p.relative_to(out)), "sha256": sha256(p)} for name in relative.values()
                      for p in sorted((out / name).rglob("*")) if p.is_file()]
    files["statistics"] = {name: _write(out / f"statistics-{name}.safetensors", tensors)
                           for name, tensors in statistics.items()}
    manifest = {
        "bundle_format": BUNDLE_FORMAT,
        "medtta_version": medtta.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "architecture": architecture,
        "config": {k: _jsonable(v) for k, v in {**model.config, **relative}.items()},
        "relative_config": sorted(relative),
        "in_channels": model.in_channels,
        "n_classes": model.n_classes,
        "labels": protocol.labels,
        "scored_labels": protocol.scored_labels,
        "preprocessing": {k: _jsonable(v) for k, v in asdict(protocol.preprocessing).items()},
        "modality": protocol.modality,
        "source": {"protocol": protocol.name, "site": protocol.source_site, "seed": seed, **source},
        "files": files,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


@dataclass(frozen=True)
class Bundle:
    """A loaded, verified bundle: its manifest and where its files are."""

    root: Path
    manifest: dict[str, Any]

    @property
    def architecture(self) -> str:
        return self.manifest["architecture"]

    @property
    def labels(self) -> dict[str, int]:
        return self.manifest["labels"]

    @property
    def scored_labels(self) -> dict[str, int]:
        return self.manifest["scored_labels"]

    @property
    def dice_in_domain(self) -> float:
        return float(self.manifest["source"]["dice_in_domain"])

    @property
    def preprocessing(self) -> Preprocessing:
        fields = {f.name for f in dataclasses.fields(Preprocessing)}
        raw = self.manifest["preprocessing"]
        return Preprocessing(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items() if k in fields})

    def model(self, device: torch.device) -> Architecture:
        """The exported model in eval mode on `device`, every weight from the bundle (strict)."""
        m = self.manifest
        config = {k: str(self.root / v) if k in m.get("relative_config", []) else v for k, v in m["config"].items()}
        model = build_network(m["architecture"], m["in_channels"], m["n_classes"], **config)
        load_model(model, str(self.root / m["files"]["weights"]["file"]), strict=True)
        if self.preprocessing.dims == 3:
            model.use_window(self.preprocessing.patch_shape)
        return model.to(device).eval()

    def record(self) -> dict[str, Any]:
        """A training record as `medtta.engine.create_adapter` reads it: the statistics files by name."""
        return {"statistics": {name: {"path": str(self.root / entry["file"])}
                               for name, entry in self.manifest["files"]["statistics"].items()}}

    def check_method(self, method: str) -> None:
        """Refuse a method this bundle cannot serve: another architecture, or source statistics it lacks."""
        cls = ADAPTERS.get(method)
        if self.architecture not in cls.architectures():
            adapts = "', '".join(cls.architectures())
            raise BundleError(f"--methods {method}: adapts architecture '{adapts}', but bundle {self.root} "
                              f"holds '{self.architecture}'; export one with `medtta export --architecture "
                              f"{cls.architecture}` and evaluate {method} with it")
        if self.preprocessing.dims not in cls.spatial_dims:
            raise BundleError(f"--methods {method}: adapts {' and '.join(f'{d}D' for d in cls.spatial_dims)} "
                              f"networks, but bundle {self.root} holds a {self.preprocessing.dims}D one")
        refusal = cls.norm_refusal(self.manifest["config"].get("norm", "batch"))
        if refusal:
            raise BundleError(f"--methods {method}: {refusal}, the kind bundle {self.root} holds")
        if cls.statistics and cls.statistics not in self.manifest["files"]["statistics"]:
            raise BundleError(f"--methods {method}: needs the source statistics '{cls.statistics}', which bundle "
                              f"{self.root} does not ship; export it again with the package that provides {method} "
                              "installed")


def load_bundle(root: str | Path) -> Bundle:
    """Read and verify a bundle folder: manifest, bundle format and medtta version, the sha256 of every file."""
    root = Path(root)
    path = root / MANIFEST
    manifest = read_json(path, "--model must be a folder written by `medtta export`", BundleError)
    _check_version(path, manifest)
    files = manifest.get("files", {})
    for entry in [files.get("weights", {}), *files.get("statistics", {}).values()]:
        _check_file(root, path, entry)
    for entry in files.get("extra", []):
        _check_file(root, path, entry, nested=True)
    return Bundle(root, manifest)


def _check_version(path: Path, manifest: dict[str, Any]) -> None:
    version, fmt = manifest.get("medtta_version", "?"), manifest.get("bundle_format")
    if fmt != BUNDLE_FORMAT or not compatible_versions(str(version), medtta.__version__):
        raise BundleError(f"{path}: exported by medtta {version} (bundle format {fmt}); this is medtta "
                          f"{medtta.__version__} (bundle format {BUNDLE_FORMAT}), which cannot read it: export the "
                          f"model again with medtta {medtta.__version__}, or install the medtta version that wrote it")


def _check_file(root: Path, manifest: Path, entry: dict[str, str], nested: bool = False) -> None:
    name = entry.get("file")
    inside = name and (Path(name).name == name or nested and ".." not in Path(name).parts
                       and not Path(name).is_absolute())
    if not inside:  # a file of the bundle folder: nothing outside it is read
        raise BundleError(f"{manifest}: malformed file entry {entry}")
    path = root / name
    if not path.is_file():
        raise BundleError(f"{path}: missing (named in {manifest})")
    actual = sha256(path)
    if actual != entry.get("sha256"):
        raise BundleError(f"{path}: sha256 {actual[:16]}... differs from {manifest} ({str(entry.get('sha256'))[:16]}"
                          "...): the file is corrupt or was modified; copy the bundle again or re-export it")
