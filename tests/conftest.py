"""Shared fixtures: isolated data/results dirs, a NIfTI writer for building test datasets, and small source models
trained once per test session."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch

from medtta.data.cache import PreparedVolume, VolumeCache
from medtta.data.layout import Dataset, read_dataset
from medtta.data.synthetic.abdomen3d import generate as generate_ct3d
from medtta.data.synthetic.cardiac import generate
from medtta.engine import prepare_dataset
from medtta.errors import MedttaWarning
from medtta.models.training import source_model
from medtta.protocol import Protocol, Training, resolve_protocol
from medtta.registry import ADAPTERS


@pytest.fixture(autouse=True)
def isolated_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test gets its own MEDTTA_DATA / MEDTTA_RESULTS and no inherited MLflow URI."""
    monkeypatch.setenv("MEDTTA_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("MEDTTA_RESULTS", str(tmp_path / "results"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture
def write_nifti() -> Callable[..., Path]:
    """`write_nifti(path, array, spacing=(1, 1, 1))` writes a NIfTI file, creating folders."""

    def write(path: Path, array: np.ndarray, spacing: tuple[float, ...] = (1.0, 1.0, 1.0)) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        affine = np.diag([*spacing[:3], *([1.0] * (3 - len(spacing[:3]))), 1.0])
        nib.save(nib.Nifti1Image(np.asarray(array), affine), str(path))
        return path

    return write


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny generated cardiac dataset folder, one per test module: site A 6 cases (4 train, 1 val, 1 test), sites
    B and C 2 cases each."""
    root = tmp_path_factory.mktemp("ds") / "tiny-cardiac"
    generate(root, seed=1, cases={"A": 6, "B": 2, "C": 2}, splits={"A": [4, 1]})
    return root


@pytest.fixture
def edit_label() -> Callable[[Path, str], None]:
    """Relabels a few foreground voxels of the first case of a site of a dataset folder as background."""
    def edit(root: Path, site: str) -> None:
        case = read_dataset(root).cases_of(site)[0]
        image = nib.load(str(case.label))
        label = np.asarray(image.dataobj).copy()
        label[tuple(np.argwhere(label > 0)[:20].T)] = 0
        nib.save(nib.Nifti1Image(label, image.affine, image.header), str(case.label))
    return edit


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A results dir shared by the tests of a module, so that its source models are trained once."""
    return tmp_path_factory.mktemp("results")


@dataclass(frozen=True)
class TrainedSource:
    """A source model trained on the small site A of `trained_sources`, with what adapting and scoring it needs."""

    model: torch.nn.Module
    record: dict[str, Any]
    protocol: Protocol
    dataset: Dataset
    volumes: VolumeCache

    def source_tests(self) -> list[PreparedVolume]:
        """Site A's test volumes, prepared for the network."""
        return [self.volumes.get(case) for case in self.dataset.cases_of("A", "test")]


#: small but real: DAE and autoencoders trained long enough to be a prior, SAM at 64 px
TRAINED_CONFIG = {"unet-normalizer": {"dae_epochs": 20, "prior_size": [8, 32, 32]},
                  "unet-autoencoders": {"ae_epochs": 10, "ae_output_epochs": 30}, "sam-tiny": {"image_size": 64}}


def _trainer(protocol: Protocol, root: Path, config: dict[str, dict[str, Any]]
             ) -> Callable[..., TrainedSource]:
    """`get(architecture, **arch_config)`: a source model of `protocol` trained on first use (with `config`'s
    settings of the architecture), then the same object."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MedttaWarning)  # 2 source test cases: fine for a test
        dataset, volumes = prepare_dataset(protocol, root / "cache", progress=False)
    trained: dict[tuple, TrainedSource] = {}

    def get(architecture: str, **arch_config: Any) -> TrainedSource:
        key = (architecture, *sorted(arch_config.items()))
        if key not in trained:
            model, record = source_model(protocol, dataset, architecture, 0, root / "results", torch.device("cpu"),
                                         {**config.get(architecture, {}), **arch_config}, progress=False,
                                         statistics=_statistics_of(architecture))
            trained[key] = TrainedSource(model, record, protocol, dataset, volumes)
        return trained[key]

    return get


@pytest.fixture(scope="session")
def trained_sources(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], TrainedSource]:
    """`trained_sources(architecture)`: a source model trained once per test session (on first use) on a generated
    cardiac dataset, site A 10 cases (6 train, 2 val, 2 test) at 64 x 64, 40 epochs: in-domain Dice about 0.8."""
    root = tmp_path_factory.mktemp("trained")
    generate(root / "cardiac", seed=1, cases={"A": 10, "B": 1}, splits={"A": [6, 2]})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MedttaWarning)
        protocol = resolve_protocol(str(root / "cardiac"), "A")
    protocol = dataclasses.replace(protocol, training=Training(epochs=40, batch_size=8),
                                   preprocessing=dataclasses.replace(protocol.preprocessing, size=(64, 64)))
    return _trainer(protocol, root, TRAINED_CONFIG)


@pytest.fixture(scope="session")
def trained_sources_3d(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], TrainedSource]:
    """`trained_sources_3d(norm)`: a 3D `unet` (`-a norm`) trained once per test session (on first use) on a small
    generated synth-ct3d, site A 8 volumes (5 train, 1 val, 2 test) of 32 x 32 x ~25 voxels (12 mm in-plane, 6 mm
    along z), on 32 x 32 x 16 patches (three windows along z), 80 epochs: in-domain Dice about 0.75."""
    root = tmp_path_factory.mktemp("trained3d")
    generate_ct3d(root / "ct3d", seed=1, cases={"A": 8, "B": 1}, splits={"A": [5, 1]})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MedttaWarning)
        protocol = resolve_protocol(str(root / "ct3d"), "A")
    prep = dataclasses.replace(protocol.preprocessing, dims=3, size=(32, 32), spacing=(12.0, 12.0), slice_spacing=6.0,
                               patch_size=(32, 32, 16))
    protocol = dataclasses.replace(protocol, preprocessing=prep, training=Training(epochs=80, batch_size=2, lr=2e-3))
    get = _trainer(protocol, root, {})
    return lambda norm="batch", architecture="unet": get(architecture, spatial_dims=3, norm=norm)


def _statistics_of(architecture: str) -> dict[str, Any]:
    """The source statistics every method adapting `architecture` asks for."""
    return {name: compute for method in ADAPTERS.list() if architecture in ADAPTERS.get(method).architectures()
            for name, compute in ADAPTERS.get(method).statistics_to_compute().items()}


@pytest.fixture(scope="session")
def trained_nnunet(tmp_path_factory: pytest.TempPathFactory) -> Callable[[int], TrainedSource]:
    """`trained_nnunet(dims)`: an nnU-Net (3d_fullres, or 2d) planned, preprocessed and trained by nnunetv2 through
    medtta, once per test session, on the small synth-ct3d site A of `trained_sources_3d`: 4 features at the top
    stage, 2 epochs of 3 iterations (a real results folder, not a useful model)."""
    pytest.importorskip("nnunetv2")
    root = tmp_path_factory.mktemp("nnunet")
    generate_ct3d(root / "ct3d", seed=1, cases={"A": 6, "B": 2}, splits={"A": [3, 1]})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MedttaWarning)
        protocol = resolve_protocol(str(root / "ct3d"), "A")
    get = _trainer(protocol, root, {})
    return lambda dims=3: get("nnunet", spatial_dims=dims, nnunet_epochs=2, nnunet_iterations=3, nnunet_features=4)
