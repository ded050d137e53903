"""`medtta export` and `medtta site-eval` as a hospital uses them: a bundle that refuses to be tampered with, a
site's scans in the dataset layout, as plain NIfTI or as DICOM series, with or without labels, offline and never
writing under the input."""

from __future__ import annotations

import hashlib
import json
import math
import re
import shlex
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from medtta.cli.main import main
from medtta.data.synthetic.cardiac import generate
from medtta.metrics import COLLAPSE_FRACTION, label_free_indicators

LABELS = {"background": 0, "LV": 1, "MYO": 2, "RV": 3}
SCORED = {"LV": 1, "MYO": 2, "RV": 3}
REPO = Path(__file__).resolve().parents[2]


def invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ds") / "tiny-cardiac"
    generate(root, seed=1, cases={"A": 6, "B": 2}, splits={"A": [4, 1]})
    return root


@pytest.fixture(scope="module")
def bundle(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Exported once for the module: one epoch of training, no source data needed afterwards."""
    out = tmp_path_factory.mktemp("bundle") / "model"
    results = tmp_path_factory.mktemp("results")
    code, stdout, stderr = invoke("export", "--dataset", dataset, "--source-site", "A", "--epochs", 1, "--out", out,
                                  "--results", results, "-q")
    assert code == 0, stderr
    assert "source statistics: eata-fisher" in stdout
    shutil.rmtree(results)  # the model cache: site-eval must need nothing but the bundle
    return out


@pytest.fixture
def site_b(dataset: Path, tmp_path: Path) -> Path:
    """Site B's scans as a plain folder of NIfTI files, without labels."""
    folder = tmp_path / "scans"
    folder.mkdir()
    for image in sorted((dataset / "imagesTr").glob("B*_0000.nii.gz")):
        shutil.copy(image, folder / image.name.replace("_0000", ""))
    return folder


def write_dicom_series(image: sitk.Image, folder: Path) -> None:
    """One DICOM file per slice with positions, orientation and a rescale slope, as a scanner would write them."""
    folder.mkdir(parents=True)
    slope = max(float(np.abs(sitk.GetArrayViewFromImage(image)).max()), 1e-6) / 30000
    direction = image.GetDirection()
    orientation = "\\".join(str(v) for v in (*direction[0:9:3], *direction[1:9:3]))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for z in range(image.GetDepth()):
        piece = sitk.Cast(image[:, :, z], sitk.sitkFloat64)
        for tag, value in (("0008|0060", "MR"), ("0020|000d", "1.2.826.0.1.3680043.2.1125.1"),
                           ("0020|000e", "1.2.826.0.1.3680043.2.1125.1.1"), ("0020|0037", orientation),
                           ("0020|0032", "\\".join(map(str, image.TransformIndexToPhysicalPoint((0, 0, z))))),
                           ("0020|0013", str(z + 1)), ("0018|0050", str(image.GetSpacing()[2])),
                           ("0028|1053", str(slope)), ("0028|1052", "0"), ("0028|0100", "16"), ("0028|0101", "16"),
                           ("0028|0102", "15"), ("0028|0103", "1")):
            piece.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{z:04d}.dcm"))
        writer.Execute(piece)


def tree_state(folder: Path) -> dict[str, tuple]:
    """Every path under `folder` with its size, modification time and content digest."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns,
                                         hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "")
            for p in sorted(folder.rglob("*"))}


@pytest.fixture
def socket_guard(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Fails any network connection or name lookup (recording it, in case a thread swallows the error)."""
    attempts: list[str] = []

    def refuse(what: str):
        def guarded(*args, **kwargs):
            attempts.append(f"{what}{args[1:] if what == 'connect' else args}")
            raise OSError(f"network access in an offline test: {what}")
        return guarded

    monkeypatch.setattr(socket.socket, "connect", refuse("connect"))
    monkeypatch.setattr(socket.socket, "connect_ex", refuse("connect"))
    monkeypatch.setattr(socket, "create_connection", refuse("create_connection"))
    monkeypatch.setattr(socket, "getaddrinfo", refuse("getaddrinfo"))
    return attempts


def read_only_copy(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    for path in [target, *target.rglob("*")]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    return target


def test_export_writes_safetensors_and_a_manifest_with_checksums(bundle: Path) -> None:
    manifest = json.loads((bundle / "bundle.json").read_text())
    assert sorted(p.name for p in bundle.iterdir()) == ["bundle.json", "statistics-eata-fisher.safetensors",
                                                       "weights.safetensors"]  # no pickle anywhere
    assert manifest["architecture"] == "unet" and manifest["labels"] == LABELS and manifest["modality"] == "MRI"
    assert manifest["source"]["site"] == "A" and 0 <= manifest["source"]["dice_in_domain"] <= 1
    assert manifest["preprocessing"]["size"] == [128, 128] and manifest["medtta_version"]
    weights = manifest["files"]["weights"]
    assert hashlib.sha256((bundle / weights["file"]).read_bytes()).hexdigest() == weights["sha256"]
    assert all((bundle / p).stat().st_mode & 0o044 == 0o044 for p in ("weights.safetensors", "bundle.json"))


def test_site_eval_refuses_a_modified_bundle(bundle: Path, site_b: Path, tmp_path: Path) -> None:
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    with (copy / "weights.safetensors").open("r+b") as fh:
        fh.seek(-3, 2)
        fh.write(b"\x01\x02\x03")
    code, _, err = invoke("site-eval", "--model", copy, "--data", site_b, "--output", tmp_path / "out", "-q")
    assert code == 2
    assert f"{copy / 'weights.safetensors'}: sha256" in err and "corrupt or was modified" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_site_eval_refuses_a_bundle_of_an_incompatible_version(bundle: Path, site_b: Path, tmp_path: Path) -> None:
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    manifest = json.loads((copy / "bundle.json").read_text())
    (copy / "bundle.json").write_text(json.dumps({**manifest, "medtta_version": "7.0.0"}))
    code, _, err = invoke("site-eval", "--model", copy, "--data", site_b, "--output", tmp_path / "out", "-q")
    assert code == 2 and "exported by medtta 7.0.0" in err and "export the model again" in err


def test_site_eval_refuses_methods_of_another_architecture(bundle: Path, site_b: Path, tmp_path: Path) -> None:
    code, _, err = invoke("site-eval", "--model", bundle, "--data", site_b, "--methods", "tent,norm-net",
                          "--output", tmp_path / "out", "-q")
    assert code == 2 and "norm-net" in err and "--architecture unet-normalizer" in err


def test_layout_with_labels_offline_on_read_only_data(bundle: Path, dataset: Path, tmp_path: Path,
                                                      socket_guard: list[str]) -> None:
    data = read_only_copy(dataset, tmp_path / "site")
    before = tree_state(data)
    out = tmp_path / "out"
    code, stdout, err = invoke("site-eval", "--model", bundle, "--data", data, "--site", "B", "--methods",
                               "source,bn-stats,eata", "--output", out, "-q")
    assert code == 0, err
    assert socket_guard == []
    assert tree_state(data) == before  # nothing written, touched or added under --data
    assert re.search(r"method +cases +dice \[95% CI\] +dice_source +dice_in_domain +recovery \[95% CI\] +p_vs_source",
                     stdout)
    summary = {row["method"]: row for row in _csv(out / "summary.csv")}
    assert list(summary) == ["source", "bn-stats", "eata"]
    assert float(summary["source"]["dice"]) == pytest.approx(float(summary["eata"]["dice_source"]))
    assert summary["bn-stats"]["cases"] == "2.0" and summary["eata"]["dice_recovery"] not in ("", "nan")
    assert {"dice_LV", "hd95", "entropy", "changed_vs_source"} <= set(summary["eata"])
    eata = {k: float(v) for k, v in summary["eata"].items() if k != "method"}
    assert eata["dice_ci_low"] <= eata["dice"] <= eata["dice_ci_high"]  # bootstrap over the site's cases
    assert eata["dice_recovery_ci_low"] <= eata["dice_recovery"] <= eata["dice_recovery_ci_high"]
    assert float(summary["source"]["p_vs_source"]) == 1.0 and 0 < eata["p_vs_source"] <= 1
    cases = _csv(out / "cases.csv")
    assert len(cases) == 6 and all(r["labeled"] == "True" for r in cases)
    assert sorted(p.name for p in (out / "masks" / "eata").iterdir()) == ["B000.nii.gz", "B001.nii.gz"]
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("medtta/site-site-B").experiment_id])
    assert sorted(r.data.tags["medtta.method"] for r in runs) == ["bn-stats", "eata", "source"]
    assert all("dice_recovery" in r.data.metrics for r in runs if r.data.tags["medtta.method"] != "source")
    assert next(r for r in runs if r.data.tags["medtta.method"] == "eata").data.params["hp.fisher_alpha"] == "2000.0"
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "## Accuracy" in report and "| eata |" in report and "cannot be measured" not in report
    assert "95 % percentile bootstrap intervals over cases" in report


def test_dicom_series_masks_overlay_the_series(bundle: Path, site_b: Path, tmp_path: Path) -> None:
    data = tmp_path / "mixed"
    image = sitk.ReadImage(str(site_b / "B000.nii.gz"))
    image.SetOrigin((-12.5, 30.0, 7.25))  # a geometry the mask must follow, not a default one
    write_dicom_series(image, data / "B000")
    shutil.copy(site_b / "B000.nii.gz", data / "B000-nifti.nii.gz")  # the same volume as NIfTI, in the same run
    out = tmp_path / "out"
    code, _, err = invoke("site-eval", "--model", bundle, "--data", data, "--methods", "source", "--output", out, "-q")
    assert code == 0, err
    reader = sitk.ImageSeriesReader()
    series = sitk.ReadImage(reader.GetGDCMSeriesFileNames(str(data / "B000")))
    mask = sitk.ReadImage(str(out / "masks" / "source" / "B000.nii.gz"))
    assert mask.GetSize() == series.GetSize()
    assert np.allclose(mask.GetOrigin(), series.GetOrigin(), atol=1e-4)
    assert np.allclose(mask.GetSpacing(), series.GetSpacing(), atol=1e-4)
    assert np.allclose(mask.GetDirection(), series.GetDirection(), atol=1e-6)
    same = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "masks" / "source" / "B000-nifti.nii.gz")))
    assert (sitk.GetArrayFromImage(mask) == same).mean() > 0.99  # DICOM's 16-bit storage changes next to nothing


def test_output_inside_the_data_is_refused(bundle: Path, site_b: Path) -> None:
    code, _, err = invoke("site-eval", "--model", bundle, "--data", site_b, "--output", site_b / "out", "-q")
    assert code == 2 and "never writes under its input" in err and not (site_b / "out").exists()


def test_plain_folder_without_labels_skips_a_bad_file(bundle: Path, site_b: Path, tmp_path: Path) -> None:
    """The container's entry command as docker/README.md gives it, mounts replaced by local folders, on a plain
    NIfTI folder without labels that holds one file that is no volume."""
    line = next(li for li in (REPO / "docker" / "README.md").read_text().splitlines()
                if li.startswith("medtta site-eval"))
    (site_b / "B001.nii.gz").unlink()  # one good volume is enough here
    (site_b / "broken.nii.gz").write_bytes(b"not a volume")
    out = tmp_path / "out"
    mounts = {"/site/bundle": str(bundle), "/site/scans": str(site_b), "/site/out": str(out)}
    code, stdout, err = invoke(*[mounts.get(a, a) for a in shlex.split(line)[1:]], "-q")
    assert code == 0, err
    assert f"Warning: skipped {site_b / 'broken.nii.gz'}: cannot be read" in err
    assert "accuracy (Dice, HD95, recovery) cannot be measured" in stdout
    assert "entropy  changed_vs_source  vol_LV/source" in stdout
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["bn-stats", "eata", "source", "tent"]
    assert [p.name for p in (out / "masks" / "tent").iterdir()] == ["B000.nii.gz"]
    assert [r["path"] for r in _csv(out / "skipped.csv")] == [str(site_b / "broken.nii.gz")]
    cases = _csv(out / "cases.csv")
    assert len(cases) == 4 and "dice" not in cases[0]
    source = next(r for r in cases if r["method"] == "source")
    assert float(source["changed_vs_source"]) == 0 and float(source["volume_ratio_LV"]) == 1
    assert float(next(r for r in cases if r["method"] == "tent")["entropy"]) > 0
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "broken.nii.gz" in report and "cannot be measured" in report


def test_label_free_indicators_on_a_crafted_case() -> None:
    source = torch.zeros(10, 10, 4, dtype=torch.long)
    source[0:5, 0:4] = 1  # LV: 80 voxels
    source[5:10, 0:4] = 2  # MYO: 80 voxels
    source[0:2, 5:10] = 3  # RV: 40 voxels
    pred = source.clone()
    pred[5:10, 0:4] = 0  # MYO vanishes
    pred[0:2, 5:10] = 0
    pred[0, 5] = 3  # RV keeps 4 of 40 voxels: 10 %
    pred[0:5, 4] = 1  # LV grows by 20 voxels
    out = label_free_indicators(pred, source, SCORED, (1.0, 1.0, 2.5))
    changed = 80 + 36 + 20
    assert out["changed_vs_source"] == pytest.approx(changed / 400)
    assert out["volume_LV_ml"] == pytest.approx(100 * 2.5 / 1000) and out["volume_ratio_LV"] == pytest.approx(1.25)
    assert out["volume_ratio_MYO"] == 0 and out["volume_ratio_RV"] == pytest.approx(0.1)
    assert out["volume_ratio_RV"] < COLLAPSE_FRACTION
    assert out["collapsed"] and out["collapse"] == "MYO vanished; RV at 10% of source"
    same = label_free_indicators(source, source, SCORED, (1.0, 1.0, 1.0))
    assert not same["collapsed"] and same["changed_vs_source"] == 0
    empty = label_free_indicators(torch.zeros_like(source), torch.zeros_like(source), SCORED, (1.0, 1.0, 1.0))
    assert math.isnan(empty["volume_ratio_LV"]) and not empty["collapsed"]  # nothing to lose: no collapse


def _csv(path: Path) -> list[dict[str, str]]:
    import csv

    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))
