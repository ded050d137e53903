"""The 3D plan of a slice protocol run on volumes (`-a spatial_dims=3`): the source site's median slice spacing, a
patch of the median resampled shape within the voxel budget, batches of 2 patches; what `list protocols` shows."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from medtta.cli.main import main
from medtta.data.layout import read_dataset, write_case, write_metadata
from medtta.data.plans import PATCH_VOXELS, fit_patch, plan_3d
from medtta.errors import DataError
from medtta.protocol import (
    DIVISOR,
    Preprocessing,
    Protocol,
    Training,
    load_protocol,
    protocol_for_folder,
    protocols_dir,
)

#: site A: train and val cases at these slice spacings (median 3 mm), one test case at 10 mm; site B at 1 mm
SOURCE_SPACINGS = {"a0": ("train", 2.0), "a1": ("train", 3.0), "a2": ("train", 5.0), "a3": ("val", 3.0),
                   "a4": ("test", 10.0)}
SLICES = 16  # resampled to 3 mm: 11, 16, 27, 16 slices; median 16


def write_spaced_dataset(root: Path) -> Path:
    """Volumes of 32 x 32 x 16 voxels (1 mm in-plane), a foreground block in each, slice spacing varying by case."""
    rng = np.random.default_rng(0)
    rows = []
    for case_id, (split, spacing) in {**SOURCE_SPACINGS, "b0": ("test", 1.0)}.items():
        label = np.zeros((32, 32, SLICES), dtype=np.uint8)
        label[8:20, 10:24, 4:12] = 1
        image = rng.normal(0.0, 0.2, label.shape) + label
        write_case(root, case_id, image, label, (1.0, 1.0, spacing))
        rows.append((case_id, case_id[0].upper(), split))
    write_metadata(root, "spaced", {"background": 0, "prostate": 1}, "T2", rows)
    return root


@pytest.fixture(scope="module")
def spaced(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_spaced_dataset(tmp_path_factory.mktemp("spaced") / "spaced")


def folder_protocol(root: Path, **preprocessing: object) -> Protocol:
    protocol = protocol_for_folder(root, "A", ("B",))
    return dataclasses.replace(protocol, preprocessing=dataclasses.replace(protocol.preprocessing, **preprocessing))


def test_the_plan_takes_the_source_sites_median_slice_spacing_and_depth(spaced: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    def unread(path: Path) -> None:
        raise AssertionError(f"{path}: voxels read, not only the header")

    monkeypatch.setattr("medtta.data.layout._load_nifti", unread)
    protocol = folder_protocol(spaced, size=(32, 32), spacing=(1.0, 1.0)).with_dims(3)
    planned = plan_3d(protocol, read_dataset(spaced)).preprocessing
    assert planned.slice_spacing == 3.0  # not the test case's 10 mm, nor site B's 1 mm
    assert planned.patch_size == (32, 32, 16) and planned.patch_shape == (16, 32, 32)
    assert plan_3d(protocol).preprocessing == planned  # the dataset opened when not given


def test_a_fixed_slice_spacing_plans_the_depth_at_it_and_fixed_values_are_kept(spaced: Path) -> None:
    dataset = read_dataset(spaced)
    at_6mm = plan_3d(folder_protocol(spaced, size=(32, 32), slice_spacing=6.0).with_dims(3), dataset)
    assert at_6mm.preprocessing.slice_spacing == 6.0
    assert at_6mm.preprocessing.patch_size == (32, 32, 8)  # 5, 8, 13, 8 slices: median 8
    fixed_patch = plan_3d(folder_protocol(spaced, patch_size=(16, 16, 8)).with_dims(3), dataset)
    assert fixed_patch.preprocessing.patch_size == (16, 16, 8) and fixed_patch.preprocessing.slice_spacing == 3.0
    both = folder_protocol(spaced, slice_spacing=2.5, patch_size=(16, 16, 8)).with_dims(3)
    gone = dataclasses.replace(both, dataset={"folder": str(spaced.parent / "gone")})
    assert plan_3d(gone) is gone  # nothing to plan: the dataset is not even opened
    slices = folder_protocol(spaced)
    assert plan_3d(slices, dataset) is slices  # 2D: unchanged


def test_2d_images_give_no_slice_spacing_to_plan(tmp_path: Path) -> None:
    root = tmp_path / "flat"
    for case_id in ("a0", "a1", "b0"):
        write_case(root, case_id, np.zeros((16, 16)), np.zeros((16, 16)), (1.0, 1.0))
    write_metadata(root, "flat", {"background": 0, "prostate": 1}, "T2",
                   [("a0", "A", "train"), ("a1", "A", "val"), ("b0", "B", "test")])
    with pytest.raises(DataError, match=f"{root}: site 'A' has no 3D train or val image .*preprocessing.slice_spacing"):
        plan_3d(folder_protocol(root).with_dims(3), read_dataset(root))


def test_the_budget_shortens_the_longest_side_first() -> None:
    assert fit_patch((64, 64, 30), budget=32 * 32 * 24) == (32, 32, 24)  # 30 -> 24; then 64, 64 in turns down to 32
    assert fit_patch((40, 64, 12), budget=40 * 40 * 8) == (40, 40, 8)
    assert fit_patch((3, 5, 9.5)) == (8, 8, 8)  # at least the UNet's divisor
    patch = fit_patch((256, 256, 200))
    assert math.prod(patch) <= PATCH_VOXELS and all(n % DIVISOR == 0 for n in patch)
    assert patch == (120, 128, 128)  # 200 deep: the in-plane sides shortened first, down to 200, then in turns


def test_a_slice_protocol_trains_3d_on_two_patches_and_a_3d_one_keeps_its_batch() -> None:
    slices = Protocol("p", "CT", {"background": 0, "organ": 1}, "A", ("B",), {"folder": "x"},
                      training=Training(batch_size=16))
    assert slices.with_dims(3).training.batch_size == 2 and slices.with_dims(2).training.batch_size == 16
    volumes = dataclasses.replace(slices, preprocessing=Preprocessing(dims=3), training=Training(batch_size=4))
    assert volumes.with_dims(3).training.batch_size == 4


def test_a_3d_run_of_a_slice_protocol_logs_the_planned_input(spaced: Path, tmp_path: Path) -> None:
    """`-a spatial_dims=3` on a copy of the prostate protocol over the spaced dataset: the logged patch, slice
    spacing and training batch are the plan's, and `medtta export` ships the same plan and reuses the run's model."""
    raw = yaml.safe_load((protocols_dir() / "prostate.yaml").read_text(encoding="utf-8"))
    del raw["manifest"]
    raw.update(name="tiny-spaced", dataset={"folder": str(spaced)}, source_site="A", target_sites=["B"])
    raw["preprocessing"].update(size=[32, 32], spacing=[1.0, 1.0])
    path = tmp_path / "tiny-spaced.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    results = tmp_path / "results"
    result = CliRunner().invoke(main, ["run", "--dataset", str(path), "--method", "source", "-a", "spatial_dims=3",
                                       "--epochs", "1", "--results", str(results), "-q"])
    assert result.exit_code == 0, result.output
    client = MlflowClient(tracking_uri=f"sqlite:///{results / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("medtta/tiny-spaced")
    parent = next(r for r in client.search_runs([experiment.experiment_id]) if "mlflow.parentRunId" not in r.data.tags)
    params = parent.data.params
    assert (params["patch_size"], params["slice_spacing"], params["train_batch_size"]) == ("32x32x16", "3.0", "2")
    assert load_protocol(path).training.batch_size == 16  # the protocol's own slice batch, not used in 3D
    bundle = tmp_path / "bundle"
    result = CliRunner().invoke(main, ["export", "--dataset", str(path), "-a", "spatial_dims=3", "--epochs", "1",
                                       "--out", str(bundle), "--results", str(results), "-q"])
    assert result.exit_code == 0, result.output
    shipped = json.loads((bundle / "bundle.json").read_text(encoding="utf-8"))["preprocessing"]
    assert (shipped["slice_spacing"], shipped["patch_size"]) == (3.0, [32, 32, 16])
    networks = list((results / "models" / "tiny-spaced").glob("unet-A-seed0-????????????.pt"))
    assert len(networks) == 1  # export planned as the run did: it reused the run's network


def test_list_protocols_shows_dims_spacing_and_patch(monkeypatch: pytest.MonkeyPatch) -> None:
    builtin = {name: load_protocol(protocols_dir() / f"{name}.yaml") for name in ("amos-ct", "cc359")}
    planned = dataclasses.replace(builtin["amos-ct"], name="amos-3d").with_dims(3)
    fixed = dataclasses.replace(planned, name="fixed-3d", preprocessing=dataclasses.replace(
        planned.preprocessing, spacing=None, slice_spacing=2.5, patch_size=(96, 96, 32)))
    monkeypatch.setattr("medtta.protocol.list_protocols", lambda: {**builtin, planned.name: planned,
                                                                   fixed.name: fixed})
    result = CliRunner().invoke(main, ["list", "protocols"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    rows = {line.split()[0]: line.split()[:5] for line in lines if not line.startswith(" ")}
    assert rows["PROTOCOL"] == ["PROTOCOL", "MODALITY", "DIMS", "SPACING", "PATCH"]
    assert rows["amos-ct"] == ["amos-ct", "CT", "2", "1.5x1.5", "256x256"]
    assert rows["cc359"][2:] == ["2", "1x1", "256x256"] and "philips_3 -> philips_15, siemens_3" in result.output
    assert rows["amos-3d"][2:] == ["3", "1.5x1.5xmedian", "planned"]
    assert rows["fixed-3d"][2:] == ["3", "-x2.5", "96x96x32"]
    description = lines[lines.index(next(line for line in lines if line.startswith("amos-ct "))) + 1]
    assert description.strip() == builtin["amos-ct"].description and description.startswith(" " * 10)
    assert max(map(len, lines)) <= 130
