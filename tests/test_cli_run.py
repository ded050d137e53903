"""`medtta run` end to end on a small dataset folder: summary, MLflow records, caching, bad input."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import mlflow
import nibabel as nib
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from medtta.cli.main import main
from medtta.cli.options import parse_params
from medtta.data.layout import read_dataset, sha256
from medtta.metrics import dice_recovery

SITE_METRICS = {"dice", "dice_LV", "dice_MYO", "dice_RV", "hd95", "dice_source", "dice_in_domain", "dice_recovery",
                "seconds_per_volume", "collapsed_cases"}


def invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def run_args(dataset: Path, results: Path, *extra: str) -> list[str]:
    return ["run", "--dataset", str(dataset), "--source-site", "A", "--epochs", "2", "--results", str(results),
            "-q", *extra]


def uri(results: Path) -> str:
    results.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{results / 'mlflow.db'}"


def client_for(results: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=uri(results))


def runs_of(results: Path, experiment: str = "medtta/synth-mri") -> list:
    client = client_for(results)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])


def test_run_logs_parent_and_child_runs(dataset: Path, results: Path) -> None:
    code, out, err = invoke(*run_args(dataset, results, "--method", "tent"))
    assert code == 0, err
    assert "site  cases  dice_source  dice_adapted  dice_in_domain (cases)  recovery" in out
    assert "Warning: source site 'A' has only 1 test case(s)" in err  # 6 cases, 4 train and 1 val
    assert out.rstrip().endswith(f"view it:  medtta ui --results {results}")
    runs = runs_of(results)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(parents) == 1 and sorted(r.data.tags["medtta.site"] for r in children) == ["B", "C"]
    assert parents[0].info.artifact_uri.startswith((results / "mlartifacts").as_uri())  # not ./mlruns
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert {k: parent.data.tags[k] for k in ("medtta.method", "medtta.protocol", "medtta.modality",
                                              "medtta.setting", "medtta.seed")} == {
        "medtta.method": "tent", "medtta.protocol": "synth-mri", "medtta.modality": "MRI",
        "medtta.setting": "episodic", "medtta.seed": "0"}
    assert parent.data.tags["medtta.version"]
    assert parent.data.params["steps"] == "1" and parent.data.params["hp.lr"] == "0.001"
    assert parent.data.params["batch_size"] == "32" and parent.data.params["setting"] == "episodic"
    assert parent.data.params["in_domain_cases"] == "1"
    for child in children:
        m = child.data.metrics
        assert SITE_METRICS <= set(m), SITE_METRICS - set(m)
        assert m["dice_recovery"] == pytest.approx(dice_recovery(m["dice"], m["dice_source"], m["dice_in_domain"]))
        assert m["dice_in_domain"] == pytest.approx(parent.data.metrics["dice_in_domain"])
        table = json.loads(Path(mlflow.artifacts.download_artifacts(
            run_id=child.info.run_id, artifact_path="cases.json", tracking_uri=uri(results))).read_text())
        rows = [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]
        assert [r["case_id"] for r in rows] == [f"{child.data.tags['medtta.site']}{i:03d}" for i in range(2)]
        assert np.mean([r["dice"] for r in rows]) == pytest.approx(m["dice"])


def test_an_identical_run_is_reused_and_rerun_only_on_request(dataset: Path, results: Path) -> None:
    checkpoints = list((results / "models" / "synth-mri").glob("*.pt"))
    assert len(checkpoints) == 1
    mtime = checkpoints[0].stat().st_mtime_ns
    [first] = [r for r in runs_of(results) if "mlflow.parentRunId" not in r.data.tags]
    code, out, err = invoke(*run_args(dataset, results, "--method", "tent"))
    assert code == 0, err
    assert f"Already finished: MLflow run {first.info.run_id}" in out and "(--rerun runs it again)" in out
    for child in runs_of(results):
        if child.data.tags.get("mlflow.parentRunId") == first.info.run_id:
            site, m = child.data.tags["medtta.site"], child.data.metrics
            assert re.search(rf"^{site} +2 +{m['dice_source']:.3f} +{m['dice']:.3f} ", out, re.M)
    assert out.rstrip().endswith(f"view it:  medtta ui --results {results}")
    assert len([r for r in runs_of(results) if "mlflow.parentRunId" not in r.data.tags]) == 1  # no duplicate
    code, out, err = invoke(*run_args(dataset, results, "--method", "tent", "--rerun"))
    assert code == 0, err
    assert "Already finished" not in out
    assert checkpoints[0].stat().st_mtime_ns == mtime  # the source model is reused either way
    first, second = [r for r in runs_of(results) if "mlflow.parentRunId" not in r.data.tags][-2:]
    for key in ("dice", "dice_source", "dice_recovery", "dice_in_domain"):
        assert first.data.metrics[key] == second.data.metrics[key]


def test_ctrl_c_marks_the_run_killed(dataset: Path, results: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from medtta.adapters.tent import Tent

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Tent, "adapt", interrupted)
    code, _, err = invoke(*run_args(dataset, results, "--method", "tent", "--rerun"))
    assert code == 130 and "Interrupted" in err and "Traceback" not in err
    parent = _last_parent(results)
    children = [r for r in runs_of(results) if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.info.status == "KILLED" and children == []  # interrupted in its first site


def test_edited_data_runs_again(dataset: Path, results: Path, tmp_path: Path, edit_label: Callable) -> None:
    copy = tmp_path / "tiny-cardiac"
    shutil.copytree(dataset, copy)
    args = run_args(copy, results, "--method", "bn-stats", "--target-site", "C")
    assert invoke(*args)[0] == 0
    code, out, _ = invoke(*args)
    assert code == 0 and "Already finished" in out
    edit_label(copy, "C")
    code, out, _ = invoke(*args)
    assert code == 0 and "The data changed since this run last finished" in out and "Already finished" not in out


def test_target_site_and_continual_setting(dataset: Path, results: Path) -> None:
    code, out, err = invoke(*run_args(dataset, results, "--method", "bn-stats", "--target-site", "C",
                                      "--setting", "continual"))
    assert code == 0, err
    parent = _parent_of(results, out)
    assert parent.data.tags["medtta.setting"] == "continual" and parent.data.params["target_sites"] == "C"
    assert "\nC " in out and "\nB " not in out


def test_a_run_left_running_by_a_dead_process_is_marked_killed(dataset: Path, results: Path) -> None:
    client = client_for(results)
    exp = client.get_experiment_by_name("medtta/synth-mri").experiment_id
    dead = subprocess.Popen(["true"])
    dead.wait()
    here = {"medtta.host": socket.gethostname()}
    stale = client.create_run(exp, tags={**here, "medtta.pid": str(dead.pid)}, run_name="tent · synth-mri · seed 0")
    child = client.create_run(exp, tags={"mlflow.parentRunId": stale.info.run_id})
    live = client.create_run(exp, tags={**here, "medtta.pid": str(os.getpid())})
    elsewhere = client.create_run(exp, tags={"medtta.host": "another-host", "medtta.pid": str(dead.pid)})
    code, _, err = invoke(*run_args(dataset, results, "--method", "bn-stats", "--target-site", "C"))
    assert code == 0, err
    assert (f"Warning: run 'tent · synth-mri · seed 0' ({stale.info.run_id}) was left RUNNING by process {dead.pid}, "
            "which is gone: marked KILLED") in err
    status = {r: client.get_run(r.info.run_id).info.status for r in (stale, child, live, elsewhere)}
    assert list(status.values()) == ["KILLED", "KILLED", "RUNNING", "RUNNING"]
    for run in (live, elsewhere):
        client.set_terminated(run.info.run_id)


def test_list_commands() -> None:
    code, out, _ = invoke("list", "adapters")
    lines = out.splitlines()
    assert code == 0 and lines[0].split() == ["METHOD", "PARADIGM", "ARCHITECTURE", "DIMS", "NORMS", "SWEEP",
                                               "DESCRIPTION"]
    rows = {line.split()[0]: line.split()[1:6] for line in lines[1:]}
    assert rows["tent"] == ["output", "unet,nnunet", "2,3", "batch,instance,group", "lr=0.0001,0.001,0.01;steps=1,3"]
    assert rows["source"][4] == "-"
    assert rows["norm-net"][:2] == ["input", "unet-normalizer"]
    assert rows["ttt-rot"][:2] == ["feature", "unet-rotation"] and rows["source"][:2] == ["none", "unet,nnunet"]
    assert "Karani et al. 2021: adapt the normalization sub-network" in out
    code, out, _ = invoke("list", "adapters", "*bn*")
    assert out.splitlines()[1].startswith("bn-stats") and len(out.splitlines()) == 2
    code, out, _ = invoke("list", "architectures")
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[1:]}
    assert {"bn-stats", "source", "tent"} <= set(rows["unet"][0].split(",")) and "norm-net" not in rows["unet"][0]
    assert rows["unet-autoencoders"][:3] == ["ae-tta", "ae_epochs=30", "ae_output_epochs=90"]
    code, out, _ = invoke("list", "protocols")
    assert code == 0 and "synth-mri" in out and "A -> B, C, D" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "-m", "nope", "-d", "synth-mri"], "Error: unknown adapter 'nope' (available: ae-tta, bn-stats, "),
        (["run", "-m", "tent", "-d", "synth-mri", "-a", "depth=5"],
         "Error: UNetModel has no config key depth (known: spatial_dims, norm, source_aug)"),
        (["run", "-m", "tent", "-d", "synth-mri", "-a", "depth"], "'depth' is not KEY=VALUE"),
        (["run", "-m", "tent", "-d", "synth-mri", "-p", "lr=fast"],
         "Error: Tent hyper-parameter lr expects a number, got 'fast'"),
        (["run", "-m", "tent", "-d", "nope"], "Error: --dataset 'nope' is neither a protocol"),
        (["run", "-m", "tent", "-d", "synth-mri", "-p", "lrr=1"], "Error: Tent has no hyper-parameter lrr"),
        (["run", "-m", "tent", "-d", "synth-mri", "--architecture", "sam-tiny"],
         "Error: architecture 'sam-tiny': tent adapts unet"),
        (["run", "-m", "sam-lora", "-d", "synth-mri", "--checkpoint", "nope.pth"], "'nope.pth' does not exist"),
    ],
)
def test_bad_options(args: list[str], message: str) -> None:
    code, _, err = invoke(*args)
    assert code == 2 and message in err and "Traceback" not in err


def test_checkpoint_of_no_sam_shape_fails_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "unet.pth"
    torch.save({"conv.weight": torch.zeros(2, 1, 3, 3)}, path)
    code, _, err = invoke("run", "-m", "sam-lora", "-d", "synth-mri", "--checkpoint", str(path))
    assert code == 2 and f"SAM checkpoint {path}: image encoder width None is none of vit-b" in err, err


def test_run_of_a_method_with_its_own_architecture(dataset: Path, results: Path) -> None:
    code, out, err = invoke(*run_args(dataset, results, "--method", "norm-net", "--steps", "2", "--target-site", "B",
                                      "-a", "dae_epochs=1", "-a", "prior_size=[8, 32, 32]"))
    assert code == 0, err
    parent = [r for r in runs_of(results) if "mlflow.parentRunId" not in r.data.tags][-1]
    assert parent.data.tags["medtta.architecture"] == "unet-normalizer"
    assert parent.data.tags["medtta.paradigm"] == "input"
    assert parent.data.params["arch.dae_epochs"] == "1" and parent.data.params["arch.jigsaw_boxes"] == "12"
    assert parent.data.params["hp.refresh"] == "10" and parent.data.params["steps"] == "2"
    assert {"source_val_dice", "source_train_seconds", "source_dae_val_loss"} <= set(parent.data.metrics)
    assert len(list((results / "models" / "synth-mri").glob("unet-normalizer-*.pt"))) == 2  # network, DAE


def test_params_parse_as_yaml_with_exponents_as_numbers() -> None:
    assert parse_params(("lr=1e-3", "refresh=5", "prior_size=[8, 32, 32]", "name=x")) == {
        "lr": 0.001, "refresh": 5, "prior_size": [8, 32, 32], "name": "x"}


def test_folder_needs_source_site(dataset: Path) -> None:
    code, _, err = invoke("run", "-m", "tent", "-d", str(dataset))
    assert code == 2 and "--source-site is required with a dataset folder (sites in" in err
    code, _, err = invoke("run", "-m", "tent", "-d", str(dataset), "--source-site", "Z")
    assert code == 2 and "site 'Z' is not in" in err


def _copy(dataset: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(dataset, tmp_path / "copy"))


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        ("shape", "C001.nii.gz: shape (5, 5, 2) differs from image"),
        ("label", "C001.nii.gz: label values [7] are not in dataset.json labels [0, 1, 2, 3]"),
        ("nan", "C001_0000.nii.gz: contains NaN or infinite values"),
    ],
)
def test_bad_case_fails_before_training_naming_the_file(dataset: Path, results: Path, tmp_path: Path,
                                                          corrupt: str, message: str) -> None:
    copy = _copy(dataset, tmp_path)
    image_path, label_path = copy / "imagesTr" / "C001_0000.nii.gz", copy / "labelsTr" / "C001.nii.gz"
    image, label = nib.load(str(image_path)), nib.load(str(label_path))
    if corrupt == "shape":
        nib.save(nib.Nifti1Image(np.zeros((5, 5, 2), np.uint8), label.affine), str(label_path))
    elif corrupt == "label":
        data = np.asanyarray(label.dataobj).copy()
        data[0, 0, 0] = 7
        nib.save(nib.Nifti1Image(data, label.affine), str(label_path))
    else:
        data = image.get_fdata().astype(np.float32)
        data[0, 0, 0] = np.nan
        nib.save(nib.Nifti1Image(data, image.affine), str(image_path))
    own_store = tmp_path / "store"
    code, _, err = invoke(*run_args(copy, results, "--method", "bn-stats", "--tracking-uri", uri(own_store)))
    errors = [line for line in err.splitlines() if not line.startswith("Warning: ")]
    assert code == 2 and errors[0] == f"Error: {copy}: 1 problem(s) in the dataset (`medtta data check {copy}` " \
                                      "lists them all):"
    assert message in errors[1] and "Traceback" not in err
    assert not (own_store / "mlflow.db").exists()  # checked before any training or run


def test_image_without_a_site_fails_naming_the_case(dataset: Path, results: Path, tmp_path: Path) -> None:
    copy = _copy(dataset, tmp_path)
    lines = (copy / "sites.csv").read_text().splitlines()
    (copy / "sites.csv").write_text("\n".join(line for line in lines if not line.startswith("C001,")) + "\n")
    code, _, err = invoke(*run_args(copy, results, "--method", "source"))
    assert code == 2 and f"{copy / 'imagesTr' / 'C001_0000.nii.gz'}: case 'C001' has no site in" in err


def test_dataset_check_is_cached_until_a_file_changes(dataset: Path, results: Path, monkeypatch) -> None:
    from medtta.data import cache

    checked = []
    monkeypatch.setattr(cache, "check_dataset", lambda root, progress: checked.append(root) or [])
    sums = cache.validated_checksums(read_dataset(dataset), results / "cache", progress=False)
    assert sums["imagesTr/C000_0000.nii.gz"] == sha256(dataset / "imagesTr" / "C000_0000.nii.gz")
    cache.validated_checksums(read_dataset(dataset), results / "cache", progress=False)
    assert len(checked) <= 1  # checked at most once (earlier tests of this module may have cached it)
    sites = dataset / "sites.csv"
    os.utime(sites, ns=(sites.stat().st_atime_ns, sites.stat().st_mtime_ns + 1))
    cache.validated_checksums(read_dataset(dataset), results / "cache", progress=False)
    assert checked[-1] == dataset


def test_missing_dataset_folder_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    code, _, err = invoke("run", "-m", "tent", "-d", str(tmp_path / "empty"), "--source-site", "A")
    assert code == 2 and err.strip() == f"Error: {tmp_path / 'empty' / 'dataset.json'}: missing (every dataset " \
                                          "folder needs a dataset.json)"


def test_cuda_requested_without_cuda(dataset: Path, results: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, _, err = invoke(*run_args(dataset, results, "--method", "source", "--device", "cuda"))
    assert code == 2 and "--device cuda: no CUDA device is available" in err


def _cases(run_id: str, results: Path) -> list[dict]:
    table = json.loads(Path(mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path="cases.json", tracking_uri=uri(results))).read_text())
    return [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]


def _children_of(results: Path, parent) -> dict[str, object]:
    return {r.data.tags["medtta.site"]: r for r in runs_of(results)
            if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}


@pytest.mark.parametrize("setting", ["episodic", "continual"])
def test_source_site_check_is_a_stream_of_its_own_that_leaves_the_target_sites_alone(
        dataset: Path, results: Path, setting: str) -> None:
    parents = []
    for extra in ((), ("--include-source-site",)):
        code, out, err = invoke(*run_args(dataset, results, "--method", "tent", "--setting", setting, *extra))
        assert code == 0, err
        parents.append(_parent_of(results, out))
    assert "Source site A (its own stream, 1 case(s)): Dice" in out and "source-site harm" in out
    plain, checked = parents
    assert (plain.data.params["source_site_check"], checked.data.params["source_site_check"]) == ("False", "True")
    assert plain.data.tags["medtta.cell"] != checked.data.tags["medtta.cell"]
    assert "source_site_harm" not in plain.data.metrics

    children = _children_of(results, checked)
    assert {site: r.data.tags["medtta.site_role"] for site, r in children.items()} == {
        "A": "source", "B": "target", "C": "target"}
    source = children["A"].data.metrics
    assert {"dice", "dice_source", "source_site_harm", "collapsed_cases"} <= set(source)
    assert "dice_recovery" not in source  # no gap to recover on the source site
    rows = _cases(children["A"].info.run_id, results)
    harm = np.mean([r["dice"] - r["dice_source"] for r in rows])
    assert source["source_site_harm"] == pytest.approx(harm) == checked.data.metrics["source_site_harm"]
    assert source["dice_source"] == pytest.approx(checked.data.metrics["dice_in_domain"])  # the same cases, unadapted
    assert (results / "runs" / "synth-mri" / checked.info.run_id / "cases-A.csv").is_file()

    before = _children_of(results, plain)  # the target sites' numbers are exactly those of a run without the check
    for site in ("B", "C"):
        for key in ("dice", "dice_source", "dice_recovery", "hd95", "collapsed_cases"):
            assert children[site].data.metrics[key] == before[site].data.metrics[key], (site, key)
    for key in ("dice", "dice_source", "dice_recovery", "dice_recovery_MRI", "collapsed_cases"):
        assert checked.data.metrics[key] == plain.data.metrics[key], key
    assert checked.data.metrics["dice_recovery"] == pytest.approx(
        np.mean([children[s].data.metrics["dice_recovery"] for s in ("B", "C")]))  # over the target sites only

    # from a reset adapter: the source site's numbers do not depend on the target stream before it
    code, out, err = invoke(*run_args(dataset, results, "--method", "tent", "--setting", setting, "--target-site", "C",
                                      "--include-source-site"))
    assert code == 0, err
    alone = _children_of(results, _parent_of(results, out))["A"]
    for key in ("dice", "source_site_harm"):
        assert alone.data.metrics[key] == source[key], key


def test_precision_bf16_trains_its_own_model_and_is_another_cell(dataset: Path, results: Path) -> None:
    code, _, err = invoke(*run_args(dataset, results, "--method", "tent", "--precision", "bf16"))
    assert code == 0, err
    bf16, fp32 = (next(r for r in reversed(runs_of(results)) if "mlflow.parentRunId" not in r.data.tags
                       and r.data.tags["medtta.method"] == "tent" and r.data.params.get("precision") == p)
                  for p in ("bf16", "fp32"))
    assert bf16.data.tags["medtta.cell"] != fp32.data.tags["medtta.cell"]
    checkpoints = list((results / "models" / "synth-mri").glob("unet-A-*.pt"))  # not unet-normalizer's
    assert len({c.name.split(".")[0] for c in checkpoints}) == 2  # trained in bf16: another cached model
    assert abs(bf16.data.metrics["dice_in_domain"] - fp32.data.metrics["dice_in_domain"]) < 0.1
    code, _, err = invoke(*run_args(dataset, results, "--method", "tent", "--precision", "fp64"))
    assert code == 2 and "'fp64' is not one of 'fp32', 'bf16', 'fp16'" in err


@pytest.mark.parametrize("args", [["-m", "nope", "-d", "synth-mri"], ["-m", "tent", "-d", "nope"]])
def test_a_typo_fails_before_the_heavy_imports(args: list[str]) -> None:
    """An unknown method or dataset is named at once, not after seconds of importing torch, MONAI and MLflow."""
    code = ("import sys\nfrom click.testing import CliRunner\nfrom medtta.cli.main import main\n"
            f"result = CliRunner().invoke(main, ['run', *{args!r}])\n"
            "print(result.exit_code, *(name in sys.modules for name in ('torch', 'monai', 'mlflow')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["2", "False", "False", "False"]


def _site_rows(results: Path, parent, site: str) -> list[dict[str, str]]:
    path = results / "runs" / "synth-mri" / parent.info.run_id / f"cases-{site}.csv"
    with path.open(encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _parent_of(results: Path, out: str):
    """The parent run a `medtta run` printed (a new one, or the finished identical run it reused)."""
    return client_for(results).get_run(re.search(r"MLflow run (\w+) in", out)[1])


def _last_parent(results: Path):
    return [r for r in runs_of(results) if "mlflow.parentRunId" not in r.data.tags][-1]


def test_per_site_resets_when_the_site_changes(dataset: Path, results: Path) -> None:
    dice = {}
    for setting, sites in (("per-site", ("B", "C")), ("continual", ("B", "C")), ("continual", ("C",))):
        targets = [a for s in sites for a in ("--target-site", s)]
        code, out, err = invoke(*run_args(dataset, results, "--method", "tent", "--setting", setting, *targets))
        assert code == 0, err
        dice[setting, sites] = [row["dice"] for row in _site_rows(results, _parent_of(results, out), "C")]
    assert dice["per-site", ("B", "C")] == dice["continual", ("C",)]  # reset before C: as if C came first
    assert dice["continual", ("B", "C")] != dice["continual", ("C",)]  # no reset: C sees the model B adapted


def test_recurring_scores_every_round(dataset: Path, results: Path) -> None:
    code, out, err = invoke(*run_args(dataset, results, "--method", "tent", "--setting", "recurring", "--rounds", "3"))
    assert code == 0, err
    assert re.search(r"^B +2 \(6 passes\) ", out, re.M)  # volumes, then visits
    parent = _parent_of(results, out)
    assert parent.data.params["rounds"] == "3" and parent.info.run_name == "tent · synth-mri · seed 0 · recurring"
    rows = _site_rows(results, parent, "B")
    cases = len(rows) // 3
    assert [row["round"] for row in rows] == ["1"] * cases + ["2"] * cases + ["3"] * cases
    history = client_for(results).get_metric_history(parent.info.run_id, "dice_recovery_round")
    curve = [m.value for m in sorted(history, key=lambda m: m.step)]
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == [1, 2, 3]
    m = parent.data.metrics
    assert (m["dice_recovery_first_round"], m["dice_recovery_last_round"]) == pytest.approx((curve[0], curve[-1]))
    assert m["dice_recovery_slope"] == pytest.approx((curve[2] - curve[0]) / 2)
    assert m["dice_recovery"] == pytest.approx(np.mean(curve), abs=1e-6)  # every round's cases count once
    code, _, err = invoke("report", "--results", str(results), "--out", str(results / "report"), "--no-log-figures")
    assert code == 0, err
    with (results / "report" / "recurring.csv").open(encoding="utf-8") as fh:
        [row] = list(csv.DictReader(fh))  # the only recurring run
    assert [float(row[f"round_{k}"]) for k in (1, 2, 3)] == pytest.approx(curve)
    assert "## Recurring stream" in (results / "report" / "report.md").read_text(encoding="utf-8")


def test_mixed_and_shuffled_site_orders(dataset: Path, results: Path) -> None:
    code, out, err = invoke(*run_args(dataset, results, "--method", "tent", "--setting", "mixed"))
    assert code == 0, err
    mixed = _parent_of(results, out)
    assert mixed.data.tags["medtta.setting"] == "mixed" and "site_order" not in mixed.data.params
    once = {site: len(_site_rows(results, mixed, site)) for site in ("B", "C")}
    code, out, err = invoke(*run_args(dataset, results, "--method", "tent", "--setting", "continual",
                                      "--site-order", "shuffled:2"))
    assert code == 0, err
    shuffled = _parent_of(results, out)
    assert shuffled.data.params["site_order"] == "shuffled:2"
    for site in ("B", "C"):
        orders = sorted(row["order"] for row in _site_rows(results, shuffled, site))
        assert orders == ["1"] * once[site] + ["2"] * once[site]
    code, _, err = invoke(*run_args(dataset, results, "--method", "tent", "--site-order", "random"))
    assert code == 2 and "--site-order 'random': expected fixed or shuffled:N" in err


def test_a_failing_run_keeps_the_cases_it_evaluated(dataset: Path, results: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from medtta.adapters.tent import Tent
    from medtta.engine import RunConfig, run
    from medtta.protocol import resolve_protocol

    adapt, calls = Tent.adapt, []

    def fails_on_the_second_volume(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return adapt(self, *args, **kwargs)

    monkeypatch.setattr(Tent, "adapt", fails_on_the_second_volume)
    config = RunConfig(method="tent", epochs=2, results=results, progress=False, rerun=True)
    with pytest.raises(RuntimeError, match="boom"):
        run(resolve_protocol(str(dataset), "A"), config)
    parent = _last_parent(results)
    assert parent.info.status == "FAILED"
    [partial] = client_for(results).list_artifacts(parent.info.run_id, "cases-partial")
    with Path(mlflow.artifacts.download_artifacts(run_id=parent.info.run_id, artifact_path=partial.path,
                                                  tracking_uri=uri(results))).open(encoding="utf-8") as fh:
        assert [row["site"] for row in csv.DictReader(fh)] == ["B"]  # the one volume evaluated before the failure


def test_reset_every_and_gradual_reach_the_stream(dataset: Path, results: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from medtta.adapters.tent import Tent

    resets, reset = [], Tent.reset
    monkeypatch.setattr(Tent, "reset", lambda self: (resets.append(1), reset(self))[1])
    counts = {}
    for extra in ((), ("-p", "reset_every=2")):
        resets.clear()
        code, out, err = invoke(*run_args(dataset, results, "--method", "tent", "--setting", "continual", "--rerun",
                                          *extra))
        assert code == 0, err
        counts[extra] = len(resets)
    assert counts["-p", "reset_every=2"] == counts[()] + 1  # 4 target volumes: one more reset, before the third
    parent = _parent_of(results, out)
    assert parent.info.run_name == "tent · synth-mri · seed 0 · continual · reset_every=2"
    assert parent.data.params["hp.reset_every"] == "2"
    code, out, err = invoke(*run_args(dataset, results, "--method", "tent", "--setting", "gradual", "--ramp", "2"))
    assert code == 0, err
    parent = _parent_of(results, out)
    assert parent.data.params["ramp"] == "2" and parent.info.run_name == "tent · synth-mri · seed 0 · gradual"
    assert [len(_site_rows(results, parent, site)) for site in ("B", "C")] == [2, 2]
    code, _, err = invoke(*run_args(dataset, results, "--method", "tent", "-p", "reset_every=2"))
    assert code == 2 and "-p reset_every resets an online stream" in err
