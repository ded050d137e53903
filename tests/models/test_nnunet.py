"""`nnunet`: an nnU-Net v2 results folder trained through nnunetv2, loaded safely, predicting exactly as nnunetv2
does, adapted by the norm-aware methods, refused on data it was not trained for, and shipped in a bundle."""

from __future__ import annotations

import copy
import csv
import json
import pickle
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from medtta.cli.main import main
from medtta.data.layout import load_volume
from medtta.engine import adapt_and_predict, create_adapter
from medtta.errors import MedttaError
from medtta.models.nnunet import NnUNet, read_checkpoint, read_model_folder
from medtta.registry import ADAPTERS

pytest.importorskip("nnunetv2")

NNUNET_METHODS = [m for m in ADAPTERS.list() if "nnunet" in ADAPTERS.get(m).architectures()]


def _nnunetv2_prediction(folder: Path, image: Path, out: Path, mirror: bool = False) -> np.ndarray:
    """nnunetv2's own prediction of one NIfTI file (its predictor, from the results folder), as nibabel reads it."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=mirror,
                                perform_everything_on_device=False, device=torch.device("cpu"), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(folder), (0,), "checkpoint_final.pth")
    out.mkdir(parents=True, exist_ok=True)
    predictor.predict_from_files([[str(image)]], [str(out / "case")], save_probabilities=False, overwrite=True,
                                 num_processes_preprocessing=1, num_processes_segmentation_export=1)
    return np.asarray(nib.load(str(out / "case.nii.gz")).dataobj)


def _medtta_prediction(model: NnUNet, source, case) -> np.ndarray:
    pipeline = model.pipeline(source.protocol.preprocessing)
    volume = load_volume(case, source.dataset.labels)
    x, meta = pipeline.prepare(volume)
    with torch.no_grad():
        return pipeline.to_native(model(x), volume, meta).numpy()


def test_a_trained_nnunet_is_an_ordinary_results_folder(trained_nnunet) -> None:
    source = trained_nnunet(3)
    folder = source.model.folder.path
    assert {"plans.json", "dataset.json"} <= {p.name for p in folder.iterdir()}
    assert (folder / "fold_0" / "checkpoint_final.pth").is_file()
    checkpoint = read_checkpoint(folder / "fold_0" / "checkpoint_final.pth")
    assert checkpoint["trainer_name"] == "nnUNetTrainer" and checkpoint["init_args"]["configuration"] == "3d_fullres"
    assert source.record["model_id"].startswith("nnunet-") and source.model.network.encoder.stages[0]
    features = json.loads((folder / "plans.json").read_text())["configurations"]["3d_fullres"]["architecture"][
        "arch_kwargs"]["features_per_stage"]
    assert features[0] == 4  # nnU-Net's 32, scaled by nnunet_features / 32


def test_a_patch_runs_the_network_and_a_volume_the_predictor_alike(trained_nnunet) -> None:
    """Adaptation updates run the network on patches of the plan's size; on a volume of exactly that size, the
    predictor's one Gaussian-weighted window gives the same logits where its weights are large (it accumulates in
    half precision, which rounds the low-weighted border), and so do the differentiable windows on a larger volume."""
    model = trained_nnunet(3).model
    x = torch.randn(2, 1, *model.patch_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        patches, whole = model(x), model.sliding_window(x[:1])
    assert patches.shape == (2, 4, *model.patch_size)
    _assert_close_inside(patches[:1], whole)
    volume = torch.randn(1, 1, *(n + 9 for n in model.patch_size), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        predicted = model.sliding_window(volume)
    differentiable = model.windows_with_gradients(volume.requires_grad_())  # several windows, with gradients
    assert differentiable.requires_grad and differentiable.shape == predicted.shape
    _assert_close_inside(differentiable, predicted)


def _assert_close_inside(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal to half-precision rounding on the central half of every spatial axis."""
    inside = (..., *(slice(n // 4, n - n // 4) for n in a.shape[2:]))
    a, b = a[inside], b[inside]
    assert torch.allclose(a, b, atol=2e-3 * float(b.abs().max()) + 1e-2), float((a - b).abs().max())


@pytest.mark.parametrize("dims", [3, 2])
def test_prediction_equals_nnunetv2s_own(dims: int, trained_nnunet, tmp_path: Path) -> None:
    source = trained_nnunet(dims)
    case = source.dataset.cases_of("B", "test")[0]
    ours = _medtta_prediction(source.model, source, case)
    theirs = _nnunetv2_prediction(source.model.folder.path, case.image, tmp_path)
    assert ours.shape == theirs.shape == load_volume(case, source.dataset.labels).label.shape
    assert (ours == theirs).mean() == 1.0


def test_mirroring_is_off_by_default_and_matches_nnunetv2_when_on(trained_nnunet, tmp_path: Path) -> None:
    source = trained_nnunet(3)
    mirrored = NnUNet(1, 4, model_folder=str(source.model.folder.path), mirror=True).eval()
    case = source.dataset.cases_of("B", "test")[0]
    ours = _medtta_prediction(mirrored, source, case)
    theirs = _nnunetv2_prediction(source.model.folder.path, case.image, tmp_path, mirror=True)
    assert (ours == theirs).mean() == 1.0


@pytest.mark.parametrize("method", NNUNET_METHODS)
@pytest.mark.parametrize("setting", ["episodic", "continual"])
def test_every_method_declaring_nnunet_adapts_it_and_resets_exactly(method: str, setting: str,
                                                                     trained_nnunet) -> None:
    source = trained_nnunet(3)
    adapter = create_adapter(method, copy.deepcopy(source.model), source.record)
    volumes = source.volumes.with_pipeline(source.model.pipeline(source.protocol.preprocessing))
    x = volumes.get(source.dataset.cases_of("B", "test")[0]).x
    initial = copy.deepcopy(adapter.state_dict())
    torch.manual_seed(0)
    logits = adapt_and_predict(adapter, x, setting, steps=1, batch_size=2)
    assert logits.shape == (1, 4, *x.shape[2:]) and torch.isfinite(logits).all()
    # nnU-Net's state dict names some tensors twice (decoder.encoder.*, all_modules.*): compare tensors, not names
    state = adapter.state_dict(keep_vars=True)
    changed = {id(v) for k, v in state.items() if not torch.equal(v, initial[k])}
    collected, tracked = {id(p) for p in adapter.params}, {id(state[k]) for k in adapter.tracked_state()}
    if setting == "continual" or method == "source":  # episodic resets before, not after
        assert collected <= changed and changed - collected <= tracked
    adapter.reset()
    assert all(torch.equal(v, initial[k]) for k, v in adapter.state_dict().items())


def test_tent_on_nnunet_trains_the_instance_norm_affine_parameters(trained_nnunet) -> None:
    source = trained_nnunet(3)
    adapter = create_adapter("tent", copy.deepcopy(source.model), source.record)
    norms = [m for m in adapter.model.network.modules() if isinstance(m, torch.nn.InstanceNorm3d)]
    assert norms and {id(p) for p in adapter.params} == {id(p) for m in norms for p in (m.weight, m.bias)}


def test_a_dataset_with_other_labels_is_refused_naming_both(trained_nnunet) -> None:
    source = trained_nnunet(3)
    with pytest.raises(MedttaError, match=r"segments labels \{.*liver.*\}, the dataset has \{.*tumour"):
        source.model.check_labels({"background": 0, "tumour": 1, "spleen": 2, "kidney": 3})
    with pytest.raises(MedttaError, match="takes 1 channel"):
        NnUNet(2, 4, model_folder=str(source.model.folder.path))


def test_a_checkpoint_with_arbitrary_pickled_code_is_refused(trained_nnunet, tmp_path: Path) -> None:
    folder = tmp_path / "evil"
    shutil.copytree(trained_nnunet(3).model.folder.path, folder)
    path = folder / "fold_0" / "checkpoint_final.pth"
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    checkpoint["payload"] = shutil.rmtree  # a global that weights_only loading must not import
    path.write_bytes(pickle.dumps(checkpoint))
    with pytest.raises(MedttaError, match="cannot be read as weights only"):
        read_model_folder(folder)


def test_a_missing_fold_or_checkpoint_names_what_the_folder_has(trained_nnunet) -> None:
    folder = trained_nnunet(3).model.folder.path
    with pytest.raises(MedttaError, match=r"fold_3.*the folder has fold_0/checkpoint_best.pth"):
        read_model_folder(folder, fold=3)
    with pytest.raises(MedttaError, match="expected one of final, best"):
        read_model_folder(folder, checkpoint="latest")


def test_run_and_export_then_site_eval_of_a_given_nnunet(trained_nnunet, tmp_path: Path) -> None:
    """`medtta run --checkpoint <results folder>`, then `medtta export` of it and `medtta site-eval` on the bundle:
    the same unadapted Dice both ways."""
    source = trained_nnunet(3)
    folder, data = source.model.folder.path, source.dataset.root
    runner = CliRunner()
    ran = runner.invoke(main, ["run", "-m", "source", "-d", str(data), "--source-site", "A", "--checkpoint",
                               str(folder), "-q", "--results", str(tmp_path / "res")])
    assert ran.exit_code == 0, ran.output
    assert "source on" in ran.output and "3D" not in ran.output.split("\n")[0]
    exported = runner.invoke(main, ["export", "-d", str(data), "--source-site", "A", "--checkpoint", str(folder),
                                    "-o", str(tmp_path / "bundle"), "-q",
                                    "--results", str(tmp_path / "res")])
    assert exported.exit_code == 0, exported.output
    assert not list((tmp_path / "bundle").rglob("*.pth"))  # no pickle travels
    evaluated = runner.invoke(main, ["site-eval", "-m", str(tmp_path / "bundle"), "--data", str(data), "--site", "B",
                                     "--methods", "source", "-o", str(tmp_path / "site"), "-q"])
    assert evaluated.exit_code == 0, evaluated.output
    run_rows = {r["case_id"]: float(r["dice_source"]) for r in _csv(next((tmp_path / "res" / "runs").rglob(
        "cases-B.csv")))}
    site_rows = {r["case_id"]: float(r["dice"]) for r in _csv(tmp_path / "site" / "cases.csv")
                 if r["method"] == "source"}
    assert site_rows.keys() == run_rows.keys() and len(site_rows) == len(source.dataset.cases_of("B"))
    assert all(abs(site_rows[k] - run_rows[k]) < 1e-6 for k in site_rows)


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open() as fh:
        return list(csv.DictReader(fh))


def test_a_wrong_checkpoint_folder_fails_cleanly(tmp_path: Path, trained_nnunet) -> None:
    data = trained_nnunet(3).dataset.root
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(main, ["run", "-m", "tent", "-d", str(data), "--source-site", "A", "--checkpoint",
                                       str(tmp_path / "empty"), "-q", "--results", str(tmp_path / "res")])
    assert result.exit_code != 0 and "plans.json: missing" in result.output and "Traceback" not in result.output
