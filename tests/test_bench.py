"""`medtta bench` on a tiny dataset folder: the grid, shared unadapted predictions, resuming, failures, workers."""

from __future__ import annotations

import csv
import os
import re
import shutil
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from medtta.adapters.tent import Tent
from medtta.bench import BenchConfig, Cell, engine_of, select_protocols
from medtta.cli.main import main
from medtta.engine import RunConfig


def bench(dataset: Path, results: Path, *extra: str, store: Path | None = None, quiet: bool = True) -> tuple[int, str]:
    args = ["bench", "--datasets", str(dataset), "--source-site", "A", "--epochs", "2", "--results", str(results),
            *(["-q"] if quiet else []), *extra]
    if store is not None:
        store.mkdir(parents=True, exist_ok=True)
        args += ["--tracking-uri", f"sqlite:///{store / 'mlflow.db'}"]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    return result.exit_code, result.output


def parents(store: Path) -> list:
    client = MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}")
    exp = client.get_experiment_by_name("medtta/synth-mri")
    return [r for r in client.search_runs([exp.experiment_id]) if "mlflow.parentRunId" not in r.data.tags]


def cell_key(dataset: Path, results: Path, method: str, seed: int = 0) -> str:
    protocol = select_protocols(str(dataset), "A")[0]
    config = BenchConfig((method,), (protocol,), run=RunConfig(method="source", epochs=2, results=results))
    return engine_of(Cell(method, protocol, seed, "episodic"), config).cell()


def test_grid_runs_every_cell_once_and_shares_the_unadapted_predictions(dataset: Path, results: Path) -> None:
    code, out = bench(dataset, results, "--methods", "source,bn-stats", "--seeds", "0,1")
    assert code == 0, out
    assert re.search(r"recovery +synth-mri", out) and "4 cell(s): 4 run, 0 already finished, 0 failed" in out
    runs = parents(results)
    assert sorted(r.info.run_name for r in runs) == ["bn-stats · synth-mri · seed 0", "bn-stats · synth-mri · seed 1",
                                                    "source · synth-mri · seed 0", "source · synth-mri · seed 1"]
    assert {r.info.status for r in runs} == {"FINISHED"}
    for run in runs:
        metrics = run.data.metrics
        assert metrics["dice_recovery_MRI"] == metrics["dice_recovery"]
        assert metrics["cost_ratio"] > 0 and metrics["peak_memory_mb"] > 0
    # one cache folder per source model (seed), one file per test case: source site A's one, B's and C's two each
    models = sorted((results / "cache" / "unadapted").iterdir())
    assert len(models) == 2 and all(len(list(m.glob("*.pt"))) == 5 for m in models)
    by_seed = {}
    for run in runs:  # both methods of a seed compare against the same unadapted Dice
        by_seed.setdefault(run.data.tags["medtta.seed"], set()).add(run.data.metrics["dice_source"])
    assert all(len(values) == 1 for values in by_seed.values())

    code, out = bench(dataset, results, "--methods", "source,bn-stats", "--seeds", "0,1")
    assert code == 0 and "4 of 4 cell(s) already finished" in out and "0 run, 4 already finished" in out
    assert len(parents(results)) == 4


def test_include_source_site_reaches_every_cell_and_is_a_cell_of_its_own(dataset: Path, results: Path,
                                                                          tmp_path: Path) -> None:
    store = tmp_path / "store"
    code, out = bench(dataset, results, "--methods", "source,bn-stats", "--include-source-site", store=store)
    assert code == 0, out
    assert re.search(r"source-site harm +synth-mri\n.*\nsource +0\.000\n", out)  # the unadapted model: no change
    client = MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}")
    for run in parents(store):
        assert run.data.params["source_site_check"] == "True"
        children = client.search_runs([run.info.experiment_id], f"tags.`mlflow.parentRunId` = '{run.info.run_id}'")
        roles = {r.data.tags["medtta.site"]: r.data.tags["medtta.site_role"] for r in children}
        assert roles == {"A": "source", "B": "target", "C": "target"}
        assert run.data.metrics["source_site_harm"] == next(
            r.data.metrics["source_site_harm"] for r in children if r.data.tags["medtta.site"] == "A")
    harm = {r.data.tags["medtta.method"]: r.data.metrics["source_site_harm"] for r in parents(store)}
    assert harm["source"] == 0.0
    code, out = bench(dataset, results, "--methods", "source,bn-stats", "--include-source-site", store=store)
    assert code == 0 and "2 of 2 cell(s) already finished" in out  # resumable like any cell
    checked = BenchConfig(("tent",), (select_protocols(str(dataset), "A")[0],),
                          run=RunConfig(method="source", epochs=2, results=results, source_site_check=True))
    assert engine_of(Cell("tent", checked.protocols[0], 0, "episodic"), checked).cell() != cell_key(
        dataset, results, "tent")  # with the check a cell is another cell; without it, the one it always was


def test_a_cell_left_running_by_a_dead_process_is_marked_killed_and_run_again(dataset: Path, results: Path,
                                                                              tmp_path: Path) -> None:
    store = tmp_path / "store"
    bench(dataset, results, "--methods", "source", store=store)  # creates the experiment
    client = MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}")
    exp = client.get_experiment_by_name("medtta/synth-mri").experiment_id
    dead = subprocess.Popen(["true"])
    dead.wait()
    tags = {"medtta.host": socket.gethostname()}
    stale = client.create_run(exp, tags={**tags, "medtta.cell": cell_key(dataset, results, "bn-stats"),
                                         "medtta.pid": str(dead.pid)})
    child = client.create_run(exp, tags={"mlflow.parentRunId": stale.info.run_id})
    live = client.create_run(exp, tags={**tags, "medtta.cell": cell_key(dataset, results, "tent"),
                                        "medtta.pid": str(os.getpid())})
    code, out = bench(dataset, results, "--methods", "bn-stats,tent", store=store)
    assert code == 0, out
    assert f"tent · synth-mri · seed 0: running in pid {os.getpid()}" in out and "1 running elsewhere" in out
    assert f"({stale.info.run_id}) was left RUNNING by process {dead.pid}, which is gone: marked KILLED" in out
    assert client.get_run(stale.info.run_id).info.status == "KILLED"
    assert client.get_run(child.info.run_id).info.status == "KILLED"
    assert client.get_run(live.info.run_id).info.status == "RUNNING"
    finished = [r for r in parents(store) if r.info.status == "FINISHED"]
    assert sorted(r.data.tags["medtta.method"] for r in finished) == ["bn-stats", "source"]


def test_a_failed_cell_is_reported_and_the_grid_goes_on(dataset: Path, results: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(Tent, "adapt", broken)
    store = tmp_path / "store"
    code, out = bench(dataset, results, "--methods", "tent,bn-stats", store=store)
    assert code == 1
    assert "tent · synth-mri · seed 0: FAILED: RuntimeError: boom (traceback in" in out
    assert "2 cell(s): 1 run, 0 already finished, 1 failed" in out
    status = {r.data.tags["medtta.method"]: r.info.status for r in parents(store)}
    assert status == {"tent": "FAILED", "bn-stats": "FINISHED"}


def test_two_workers_give_the_same_numbers_as_one(dataset: Path, results: Path, tmp_path: Path) -> None:
    def dice_by_method(workers: str) -> dict[str, float]:
        store = tmp_path / f"workers-{workers}"
        code, out = bench(dataset, results, "--methods", "source,bn-stats", "--workers", workers, store=store)
        assert code == 0, out
        return {r.data.tags["medtta.method"]: r.data.metrics["dice"] for r in parents(store)}

    two = dice_by_method("2")
    assert two.keys() == {"source", "bn-stats"} and two == dice_by_method("1")


def test_one_worker_shows_the_source_training_epochs(dataset: Path, tmp_path: Path) -> None:
    """A source model can train for an hour before the first cell: its epochs show, as in `medtta run`."""
    code, out = bench(dataset, tmp_path / "results", "--methods", "source", quiet=False)
    assert code == 0, out
    assert re.search(r"training \w+ on site A: 2/2 epoch", out), out
    assert "source models: 1/1 model" in out


def test_ray_executor_runs_cells_as_ray_tasks(dataset: Path, results: Path, tmp_path: Path) -> None:
    ray = pytest.importorskip("ray")
    try:
        code, out = bench(dataset, results, "--methods", "bn-stats", "--executor", "ray", store=tmp_path / "store")
    finally:
        ray.shutdown()
    assert code == 0, out
    [run] = parents(tmp_path / "store")
    assert run.info.status == "FINISHED" and run.data.tags["medtta.pid"] != str(os.getpid())  # ran in a Ray worker


def test_bad_data_fails_before_any_training(dataset: Path, tmp_path: Path) -> None:
    import shutil

    copy = Path(shutil.copytree(dataset, tmp_path / "copy"))
    lines = (copy / "sites.csv").read_text().splitlines()
    (copy / "sites.csv").write_text("\n".join(line for line in lines if not line.startswith("B001,")) + "\n")
    code, out = bench(copy, tmp_path / "results", "--methods", "source")
    assert code == 2 and "case 'B001' has no site in" in out
    assert not (tmp_path / "results" / "models").exists()


@pytest.mark.parametrize(("params", "message"), [
    (["-p", "lr=1e-4"], "-p lr=…: no method of this grid has the hyper-parameter 'lr'"),
    (["-p", "tent.lr=1e-4"], "-p tent.…: 'tent' is not a method of this grid (source, bn-stats)"),
    (["-p", "bn-stats.nope=1"], "nope"),
    (["--seeds", "0,x"], "--seeds '0,x': expected comma-separated integers"),
])
def test_bad_options_fail_before_anything_runs(dataset: Path, tmp_path: Path, params: list[str], message: str) -> None:
    code, out = bench(dataset, tmp_path / "results", "--methods", "source,bn-stats", *params)
    assert code == 2 and message in out
    assert not (tmp_path / "results" / "models").exists()


def test_method_and_dataset_patterns(dataset: Path) -> None:
    code, out = bench(dataset, Path("unused"), "--methods", "nothing-*")
    assert code == 2 and "--methods: no method matches 'nothing-*'" in out
    result = CliRunner().invoke(main, ["bench", "-m", "source", "-d", "synth-x*"])
    assert result.exit_code == 2 and "--datasets: no protocol matches 'synth-x*'" in result.output


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ui_serves_the_runs_tables_on_localhost(dataset: Path, results: Path) -> None:
    import json
    import sys
    import urllib.request

    bench(dataset, results, "--methods", "source,bn-stats")  # the runs of the first test, or made here
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "medtta", "ui", "--results", str(results), "--port", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        lines = [server.stdout.readline() for _ in range(2)]
        assert lines[0].startswith(f"MLflow UI on sqlite:///{results / 'mlflow.db'}")
        name, url = lines[1].split()
        exp_id = url.split("/#/experiments/")[1].split("/")[0]
        assert name == "medtta/synth-mri"
        # the printed address opens the view `medtta ui` saved: recovery columns, best first, table view
        assert url == f"http://127.0.0.1:{port}/#/experiments/{exp_id}/runs?viewStateShareKey=medtta&compareRunsMode=TABLE"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ajax-api/2.0/mlflow/experiments/get?experiment_id={exp_id}",
                                    timeout=30) as response:
            tags = {t["key"]: t["value"] for t in json.load(response)["experiment"]["tags"]}
        view = json.loads(tags["mlflow.sharedViewState.medtta"])
        state = json.loads(view["state"])
        assert view["name"] == "medtta: recovery" and isinstance(view["createdAt"], int)
        assert state["selectedColumns"][:3] == ["metrics.`dice_recovery`", "metrics.`dice_recovery_MRI`",
                                                "metrics.`dice`"]
        assert "metrics.`cost_ratio`" in state["selectedColumns"]
        assert state["orderByKey"] == "metrics.`dice_recovery`" and state["orderByAsc"] is False
        assert state["searchFilter"] == "tags.`mlflow.parentRunId` IS NULL"
        request = urllib.request.Request(f"http://127.0.0.1:{port}/ajax-api/2.0/mlflow/runs/search",
                                         data=json.dumps({"experiment_ids": [exp_id]}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            runs = json.load(response)["runs"]
        names = {r["info"]["run_name"] for r in runs}
        assert {"source · synth-mri · seed 0", "bn-stats · synth-mri · seed 0"} <= names
        assert any(m["key"] == "dice_recovery_MRI" for r in runs for m in r["data"].get("metrics", []))
    finally:
        server.terminate()  # as `kill` or `docker stop` does
        server.wait(timeout=60)
    left = subprocess.run(["pgrep", "-f", f"sqlite:///{results / 'mlflow.db'}"], capture_output=True, text=True)
    assert left.stdout == "", "medtta ui ended but left its MLflow server (or its workers) running"


def test_ui_view_state_is_written_once_under_a_fixed_key(tmp_path: Path) -> None:
    import json

    from medtta.cli.ui import VIEW_TAG, _save_view, view_state

    state = view_state({"dice", "dice_recovery", "dice_recovery_OCT", "dice_recovery_CT", "dice_source", "hd95",
                        "source_site_harm", "dice_recovery_first_round", "dice_recovery_slope"})
    assert state["selectedColumns"] == ["metrics.`dice_recovery`", "metrics.`dice_recovery_CT`",
                                        "metrics.`dice_recovery_OCT`", "metrics.`dice`", "metrics.`dice_source`",
                                        "metrics.`source_site_harm`", "metrics.`dice_recovery_slope`"]
    assert "orderByKey" not in view_state({"dice"})  # nothing to sort by: MLflow's default order
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp_id = client.create_experiment("medtta/synth-x")
    run = client.create_run(exp_id)
    client.log_metric(run.info.run_id, "dice_recovery", 0.5)
    assert _save_view(client, client.get_experiment(exp_id))
    first = client.get_experiment(exp_id).tags[VIEW_TAG]
    assert json.loads(json.loads(first)["state"])["selectedColumns"] == ["metrics.`dice_recovery`"]
    assert _save_view(client, client.get_experiment(exp_id))
    assert client.get_experiment(exp_id).tags[VIEW_TAG] == first  # unchanged columns: the same tag, not rewritten


def test_ui_without_a_store_or_with_a_busy_port(results: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["ui", "--results", str(tmp_path)])
    assert result.exit_code == 2 and f"{tmp_path / 'mlflow.db'}: no MLflow store here yet" in result.output
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = CliRunner().invoke(main, ["ui", "--results", str(results), "--port", str(port)])
    assert result.exit_code == 2 and f"--port {port}: 127.0.0.1:{port} is already in use" in result.output


def test_a_sweep_runs_every_configuration_as_a_cell_of_its_own(dataset: Path, tmp_path: Path) -> None:
    results = tmp_path / "results"  # none of its cells run before
    sweep = ("--sweep", "tent.lr=1e-4,1e-2", "--sweep", "tent.steps=1,2", "--sweep", "bn-stats")
    code, out = bench(dataset, results, "--methods", "tent,bn-stats", *sweep)
    assert code == 0, out
    assert "7 cell(s): 7 run" in out and "tent [lr=0.01,steps=2]" in out
    runs = {r.data.tags["medtta.config"]: r for r in parents(results)}
    assert sorted(runs) == ["default", "lr=0.0001", "lr=0.0001,steps=2", "lr=0.01", "lr=0.01,steps=2",
                            "source_weight=0.5", "source_weight=0.9"]  # bn-stats' declared space holds its default
    hot = runs["lr=0.01,steps=2"]
    assert (hot.data.params["hp.lr"], hot.data.params["steps"]) == ("0.01", "2")
    assert hot.info.run_name == "tent · synth-mri · seed 0 · lr=0.01,steps=2"
    code, out = bench(dataset, results, "--methods", "tent,bn-stats", *sweep)
    assert code == 0 and "7 cell(s): 0 run, 7 already finished" in out
    assert {"entropy", "agreement"} <= set(_case_rows(results, runs["default"]))  # label-free, logged per case
    report = results / "report"
    done = CliRunner().invoke(main, ["report", "--results", str(results), "--out", str(report), "--no-log-figures",
                                     "--select", "default,loso,val-site:B,entropy,oracle"])
    assert done.exit_code == 0, done.output
    with (report / "selection.csv").open(encoding="utf-8") as fh:
        rows = {(r["method"], r["strategy"]): r for r in csv.DictReader(fh)}
    strategies = ("default", "loso", "val-site:B", "entropy", "oracle")
    # tent's sweep left its default lr out: no `default` pick for it
    assert set(rows) == {(m, s) for m in ("tent", "bn-stats") for s in strategies} - {("tent", "default")}
    assert rows["tent", "val-site:B"]["picks"].startswith("C: ") and float(rows["tent", "oracle"]["regret"]) == 0
    assert rows["tent", "entropy"]["own_loss"] == "True" and rows["bn-stats", "entropy"]["own_loss"] == "False"
    assert "## Choosing a configuration" in (report / "report.md").read_text(encoding="utf-8")
    assert {p.name for p in (report / "synth-mri").glob("sensitivity_*.png")} == {
        "sensitivity_lr.png", "sensitivity_steps.png", "sensitivity_source_weight.png"}
    with (report / "sensitivity.csv").open(encoding="utf-8") as fh:
        points = {(r["method"], r["key"], r["config"]): float(r["value"]) for r in csv.DictReader(fh)}
    assert points["tent", "steps", "lr=0.01,steps=2"] == 2.0 and points["bn-stats", "source_weight", "default"] == 0.0
    assert "Warning: Kendall τ between strategies rests on fewer than 3 methods for synth-mri (episodic): it is ±1" in (
        done.output)


@pytest.mark.parametrize(("sweep", "message"), [
    ("tent.momentum=1,2", "--sweep tent.momentum: tent has no hyper-parameter 'momentum' (it has: lr, steps)"),
    ("sar", "--sweep sar: not a method of this grid (tent)"),
    ("tent.lr", "Invalid value for --sweep: 'tent.lr' is not METHOD.KEY=V1,V2,..., METHOD or all"),
])
def test_a_bad_sweep_names_what_is_wrong(dataset: Path, results: Path, sweep: str, message: str) -> None:
    code, out = bench(dataset, results, "--methods", "tent", "--sweep", sweep)
    assert code == 2 and message in out, out


def _case_rows(results: Path, parent) -> list[str]:
    """The columns of a parent run's first target site's case table."""
    with next((results / "runs" / "synth-mri" / parent.info.run_id).glob("cases-*.csv")).open(encoding="utf-8") as fh:
        return next(csv.reader(fh))


def test_edited_data_reruns_the_cells_that_read_it(dataset: Path, results: Path, tmp_path: Path,
                                                    edit_label: Callable) -> None:
    """Two copies of the dataset in one grid; one label file of one copy edited: that copy's cells run again (said
    so), the other's are reused."""
    first, second = tmp_path / "one" / "tiny-cardiac", tmp_path / "two" / "tiny-cardiac"
    shutil.copytree(dataset, first)
    shutil.copytree(dataset, second)
    store, both = tmp_path / "store", f"{first},{second}"
    code, out = bench(both, results, "--methods", "source,bn-stats", store=store)
    assert code == 0 and "4 cell(s): 4 run, 0 already finished" in out, out
    edit_label(second, "B")
    code, out = bench(both, results, "--methods", "source,bn-stats", store=store)
    assert code == 0, out
    assert ("2 cell(s) finished before on other data (a file's contents or the split changed since): running again"
            in out) and "4 cell(s): 2 run, 2 already finished" in out
    runs = parents(store)
    assert len(runs) == 6 and len({r.data.tags["medtta.data"] for r in runs}) == 2
