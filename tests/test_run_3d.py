"""`medtta run` on a 3D protocol: a 3D UNet trained on patches, volumes predicted by sliding windows, the same
volumes slice by slice with `-a spatial_dims=2`, and the refusals that name the option to change."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from medtta.cli.main import main
from medtta.data.datasets import open_dataset
from medtta.protocol import load_protocol, resolve_protocol


@pytest.fixture(scope="module")
def protocol_3d(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """synth-ct3d, small: site A 5 volumes (3 train, 1 val, 1 test), site B one; 32 x 32 x 16 patches."""
    raw = yaml.safe_load((Path(__file__).parents[1] / "protocols" / "synth-ct3d.yaml").read_text(encoding="utf-8"))
    raw.update(name="tiny-ct3d", target_sites=["B"])
    raw["dataset"]["params"].update(cases={"A": 5, "B": 1}, splits={"A": [3, 1]})
    raw["preprocessing"].update(size=[32, 32], spacing=[12.0, 12.0], slice_spacing=12.0, patch_size=[32, 32, 8])
    path = tmp_path_factory.mktemp("protocol") / "tiny-ct3d.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def run_3d(protocol: Path, results: Path, *extra: str) -> tuple[int, str]:
    return invoke("run", "--dataset", str(protocol), "--epochs", "2", "--results", str(results), "-q", *extra)


def test_the_built_in_3d_protocol_runs_volumes() -> None:
    prep = load_protocol(Path(__file__).parents[1] / "protocols" / "synth-ct3d.yaml").preprocessing
    assert prep.dims == 3 and prep.patch_shape == (16, 48, 48)


def test_a_3d_run_and_the_same_volumes_in_2d(protocol_3d: Path, results: Path) -> None:
    code, out = run_3d(protocol_3d, results, "--method", "tent")
    assert code == 0, out
    code, out = run_3d(protocol_3d, results, "--method", "tent", "-a", "spatial_dims=2")
    assert code == 0, out
    client = MlflowClient(tracking_uri=f"sqlite:///{results / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("medtta/tiny-ct3d")
    parents = [r for r in client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
               if "mlflow.parentRunId" not in r.data.tags]
    assert [(r.data.params["arch.spatial_dims"], r.data.params["batch_size"]) for r in parents] == [("3", "2"),
                                                                                                    ("2", "32")]
    assert all(0 <= r.data.metrics["dice"] <= 1 for r in parents)
    assert parents[0].data.params["patch_size"] == "32x32x8" and "patch_size" not in parents[1].data.params
    assert parents[0].data.tags["medtta.cell"] != parents[1].data.tags["medtta.cell"]
    assert [r.data.tags["medtta.dims"] for r in parents] == ["3", "2"]
    assert [r.data.tags["mlflow.runName"] for r in parents] == ["tent · tiny-ct3d · seed 0 · 3D",
                                                                "tent · tiny-ct3d · seed 0"]
    checkpoints = sorted((results / "models" / "tiny-ct3d").glob("unet-A-*.pt"))
    assert len(checkpoints) == 2  # one model per dimension: the cache key holds it


@pytest.mark.parametrize(("extra", "message"), [
    (["--method", "vptta"], "vptta adapts 2D networks, not 3D (-a spatial_dims=2 runs it on slices)"),
    (["--method", "sam-lora"], "sam-lora adapts 2D networks, not 3D"),
    (["--method", "bn-stats", "-a", "norm=group"],
     "bn-stats adapts BatchNorm networks: -a norm=group builds GroupNorm ones (use -a norm=batch)"),
    (["--method", "tent", "-a", "spatial_dims=4"], "-a spatial_dims=4: expected 2 (slices) or 3 (volumes)"),
])
def test_what_cannot_run_in_3d_is_refused_naming_the_option(protocol_3d: Path, tmp_path: Path, extra: list[str],
                                                             message: str) -> None:
    code, out = run_3d(protocol_3d, tmp_path / "results", *extra)
    assert code != 0 and message in out and "Traceback" not in out


def test_list_adapters_shows_the_dimensions_each_method_adapts() -> None:
    code, out = invoke("list", "adapters")
    assert code == 0
    rows = {line.split()[0]: line.split() for line in out.splitlines()}
    assert rows["METHOD"][:5] == ["METHOD", "PARADIGM", "ARCHITECTURE", "DIMS", "NORMS"]
    assert rows["tent"][3] == "2,3" and rows["vptta"][3] == "2" and rows["sam-lora"][3] == "2"
    assert rows["tent"][4] == "batch,instance,group" and rows["bn-stats"][4] == "batch" and rows["sam-lora"][4] == "-"


def test_a_3d_bundle_evaluates_volumes_at_a_site(protocol_3d: Path, tmp_path: Path) -> None:
    """`medtta export` of a 3D protocol ships a 3D model; `site-eval` slides its window over the site's volumes and
    refuses a method that adapts 2D networks only."""
    out = tmp_path / "bundle"
    code, text = invoke("export", "--dataset", str(protocol_3d), "--epochs", "1", "--out", str(out),
                        "--results", str(tmp_path / "results"), "-q")
    assert code == 0, text
    site = tmp_path / "site"
    dataset = open_dataset(resolve_protocol(str(protocol_3d)))
    site.mkdir()
    for case in dataset.cases_of("B"):
        (site / case.image.name).write_bytes(case.image.read_bytes())
    code, text = invoke("site-eval", "--model", str(out), "--data", str(site), "--methods", "source,tent,dg-tta",
                        "--output", str(tmp_path / "out"), "-q")
    assert code == 0, text
    rows = (tmp_path / "out" / "summary.csv").read_text(encoding="utf-8").splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["source", "tent", "dg-tta"]
    code, text = invoke("site-eval", "--model", str(out), "--data", str(site), "--methods", "vptta",
                        "--output", str(tmp_path / "out2"), "-q")
    assert code != 0 and "--methods vptta: adapts 2D networks, but bundle" in text and "holds a 3D one" in text


@pytest.mark.parametrize(("methods", "norm", "left"), [("source,vptta", "batch", "vptta"),
                                                       ("source,bn-stats", "instance", "bn-stats")])
def test_a_grid_leaves_out_the_methods_of_other_dimensions_or_norms_saying_so(protocol_3d: Path, tmp_path: Path,
                                                                              methods: str, norm: str,
                                                                              left: str) -> None:
    code, out = invoke("bench", "--methods", methods, "--datasets", str(protocol_3d), "--epochs", "1", "-a",
                       f"norm={norm}", "--results", str(tmp_path / "results"), "-q")
    assert code == 0, out
    assert (f"Left out, the method adapting networks of other dimensions or norms only: {left} on tiny-ct3d (3D, "
            f"{norm} norm)") in out
    assert left not in out.split("Left out")[1].split("\n", 1)[1]  # no cell, no failure row
