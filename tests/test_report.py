"""`medtta report` end to end on the runs `medtta run` makes on a tiny dataset: files, tables equal to what MLflow
holds, figures logged into the parent runs without changing them, runs that must not count, bad stores."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import mlflow
import numpy as np
import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from medtta.cli.main import main
from medtta.cli.report import report
from medtta.errors import MedttaError
from medtta.report import figures
from medtta.report.store import Cell, label_variants, matching_experiments

METHODS = ("source", "bn-stats")
FIGURES = {"recovery_heatmap.png", "dice_per_site.png", "cost_vs_recovery.png", "qualitative.png"}


def _uri(results: Path) -> str:
    return f"sqlite:///{results / 'mlflow.db'}"


def _parents(client: MlflowClient, status: str = "FINISHED") -> list:
    experiment = client.get_experiment_by_name("medtta/synth-mri").experiment_id
    return [r for r in client.search_runs([experiment]) if "mlflow.parentRunId" not in r.data.tags
            and r.info.status == status]


def _children(client: MlflowClient, parent: str) -> dict[str, object]:
    runs = client.search_runs([client.get_run(parent).info.experiment_id],
                              filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    return {r.data.tags["medtta.site"]: r for r in runs}


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory, dataset: Path) -> Path:
    """source and bn-stats on a tiny dataset, one source model trained for 2 epochs; then what the report must cope
    with: a collapsed case in bn-stats' site B run (with the slice the engine saves for a collapsed case), a failed
    parent run and a site-eval experiment."""
    results = tmp_path_factory.mktemp("results")
    for method in METHODS:
        outcome = CliRunner().invoke(main, ["run", "--dataset", str(dataset), "--source-site", "A", "--epochs", "2",
                                            "--method", method, "--results", str(results), "-q"])
        assert outcome.exit_code == 0, outcome.stderr
    client = MlflowClient(_uri(results))
    bn_stats = next(r for r in _parents(client) if r.data.tags["medtta.method"] == "bn-stats"
                    and r.data.tags["medtta.seed"] == "0")
    child = _children(client, bn_stats.info.run_id)["B"]
    table = json.loads(Path(mlflow.artifacts.download_artifacts(run_id=child.info.run_id, artifact_path="cases.json",
                                                                tracking_uri=_uri(results))).read_text())
    rows = [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]
    rows[1].update(collapsed=True, collapse="RV vanished", foreground=rows[1]["foreground_source"] * 0.1)
    edited = tmp_path_factory.mktemp("edited") / "cases.json"  # log_table would append to the table: overwrite it
    edited.write_text(json.dumps({"columns": list(rows[0]), "data": [list(r.values()) for r in rows]}))
    client.log_artifact(child.info.run_id, str(edited))
    slices = tmp_path_factory.mktemp("slices")
    reference = np.zeros((32, 32), np.int16)
    reference[8:24, 8:24] = 1
    np.savez(slices / f"{rows[1]['case_id']}.npz", image=np.random.default_rng(0).random((32, 32), np.float32),
             reference=reference, source=np.roll(reference, 2), adapted=np.roll(reference, 5))
    client.log_artifacts(child.info.run_id, str(slices), "slices")
    failed = client.create_run(bn_stats.info.experiment_id, tags={**bn_stats.data.tags, "medtta.seed": "2"})
    client.set_terminated(failed.info.run_id, "FAILED")
    site_eval = client.create_experiment("medtta/site-hospital")
    client.set_terminated(client.create_run(site_eval, tags={"medtta.method": "tent"}).info.run_id)
    return results


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open() as fh:
        return list(csv.DictReader(fh))


def test_report_writes_tables_equal_to_mlflow_and_logs_figures(results: Path) -> None:
    client = MlflowClient(_uri(results))
    before = {r.info.run_id: (r.info.status, r.info.end_time) for r in _parents(client)}
    outcome = CliRunner().invoke(report, ["--results", str(results)])
    assert outcome.exit_code == 0, outcome.output
    assert "Reading 2 finished run(s) from medtta/synth-mri" in outcome.stdout
    assert "Logged the figures into 2 parent run(s)" in outcome.stdout
    out = results / "report"
    assert {p.name for p in (out / "synth-mri").iterdir()} == FIGURES
    markdown = (out / "report.md").read_text(encoding="utf-8")
    assert "| source | none |" in markdown and "| bn-stats | feature |" in markdown  # the headline table
    assert "1 unfinished run(s)" in markdown and "site-hospital" not in markdown
    assert "| bn-stats | synth-mri | B | 0 | B001 |" in markdown and "RV vanished" in markdown
    assert "source-site harm" not in markdown.lower() and not (out / "source_site.csv").exists()  # no check ran

    parents = {(r.data.tags["medtta.method"], int(r.data.tags["medtta.seed"])): r for r in _parents(client)}
    children = {key: _children(client, run.info.run_id) for key, run in parents.items()}
    by_site = {(r["method"], r["site"]): r for r in _csv(out / "dice_by_site.csv")}
    assert set(by_site) == {(m, s) for m in ("source", "bn-stats") for s in ("B", "C")}
    for (method, site), row in by_site.items():
        logged = [children[key][site].data.metrics for key in children if key[0] == method]
        for key in ("dice", "dice_source", "dice_recovery"):
            assert float(row[key]) == pytest.approx(np.mean([m[key] for m in logged])), (method, site, key)
        assert float(row["dice_ci_low"]) <= float(row["dice"]) <= float(row["dice_ci_high"])
        assert row["seeds"] == str(len(logged)) and row["cases"] == "2"
    assert float(by_site["source", "B"]["p_vs_source"]) == 1.0  # source is the unadapted prediction
    assert math.isnan(float(by_site["source", "B"]["dice_seed_std"]))  # one seed: no spread over seeds
    modality = {r["method"]: r for r in _csv(out / "recovery_by_modality.csv")}
    for method, row in modality.items():
        assert row["modality"] == "MRI" and row["sites"] == "2"
        assert float(row["dice_recovery"]) == pytest.approx(np.mean([float(by_site[method, s]["dice_recovery"])
                                                                     for s in ("B", "C")]))
    cost = {r["method"]: r for r in _csv(out / "cost.csv")}
    assert float(cost["source"]["seconds_per_volume"]) == pytest.approx(
        parents["source", 0].data.metrics["seconds_per_volume"])
    for key in ("cost_ratio", "peak_memory_mb"):  # logged by the run: taken as it is
        assert float(cost["bn-stats"][key]) == pytest.approx(parents["bn-stats", 0].data.metrics[key])
    paradigms = {r["paradigm"]: r for r in _csv(out / "by_paradigm.csv")}
    assert set(paradigms) == {"none", "feature"} and paradigms["feature"]["methods"] == "bn-stats"
    assert [(r["case_id"], r["collapse"]) for r in _csv(out / "collapses.csv")] == [("B001", "RV vanished")]
    assert float(next(r for r in _csv(out / "collapses.csv"))["foreground_ratio"]) == pytest.approx(0.1, abs=0.01)

    for run_id, (status, end_time) in before.items():
        logged = {a.path for a in client.list_artifacts(run_id, "report")}
        assert logged == {f"report/{name}" for name in FIGURES}
        run = client.get_run(run_id)
        assert (run.info.status, run.info.end_time) == (status, end_time)


def test_source_site_harm_column_only_where_the_check_ran(dataset: Path, results: Path, tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"  # the module's model, another store
    for method, extra in (("source", ()), ("bn-stats", ("--include-source-site",))):
        outcome = CliRunner().invoke(main, ["run", "--dataset", str(dataset), "--source-site", "A", "--epochs", "2",
                                            "--method", method, "--results", str(results), "--tracking-uri", store,
                                            "-q", *extra])
        assert outcome.exit_code == 0, outcome.output
    outcome = CliRunner().invoke(report, ["--tracking-uri", store, "--out", str(tmp_path / "report"),
                                          "--no-log-figures"])
    assert outcome.exit_code == 0, outcome.output
    out = tmp_path / "report"
    markdown = (out / "report.md").read_text(encoding="utf-8")
    assert "| method | paradigm | MRI | source-site harm |" in markdown
    assert "| source | none |" in markdown and "| n/a |" in markdown  # source ran without the check

    client = MlflowClient(store)
    bn_stats = next(r for r in _parents(client) if r.data.tags["medtta.method"] == "bn-stats")
    child = _children(client, bn_stats.info.run_id)["A"]
    harm = child.data.metrics["source_site_harm"]
    modality = {r["method"]: r for r in _csv(out / "recovery_by_modality.csv")}
    assert float(modality["bn-stats"]["source_site_harm"]) == pytest.approx(harm)
    assert modality["bn-stats"]["source_site_cases"] == "1" and modality["source"]["source_site_harm"] == ""
    assert modality["bn-stats"]["sites"] == "2" and float(modality["bn-stats"]["dice_recovery"]) == pytest.approx(
        bn_stats.data.metrics["dice_recovery"])  # the source site is no target site
    assert {(r["method"], r["site"]) for r in _csv(out / "dice_by_site.csv")} == {
        (m, s) for m in ("source", "bn-stats") for s in ("B", "C")}
    [row] = _csv(out / "source_site.csv")
    assert (row["method"], row["site"], row["cases"], row["seeds"]) == ("bn-stats", "A", "1", "1")
    assert float(row["source_site_harm"]) == pytest.approx(harm)
    assert float(row["dice_source"]) == pytest.approx(child.data.metrics["dice_source"])
    assert "Source-site check: the methods adapting on source site A's own test cases" in markdown
    assert "**Source-site harm**" in markdown


def test_same_seed_same_intervals_and_experiment_filter(results: Path, tmp_path: Path) -> None:
    for name in ("a", "b"):
        outcome = CliRunner().invoke(report, ["--tracking-uri", _uri(results), "--experiment", "synth-*", "--out",
                                              str(tmp_path / name), "--seed", "5", "--no-log-figures"])
        assert outcome.exit_code == 0, outcome.output
        assert "Logged" not in outcome.stdout
    assert (tmp_path / "a" / "dice_by_site.csv").read_bytes() == (tmp_path / "b" / "dice_by_site.csv").read_bytes()


def test_no_store_or_no_matching_experiment_is_a_clear_error(results: Path, tmp_path: Path) -> None:
    outcome = CliRunner().invoke(report, ["--results", str(tmp_path / "empty")])
    assert isinstance(outcome.exception, MedttaError) and "no MLflow store at" in str(outcome.exception)
    assert not (tmp_path / "empty" / "mlflow.db").exists()  # reading does not create a store
    outcome = CliRunner().invoke(report, ["--results", str(results), "--experiment", "synth-ct"])
    assert isinstance(outcome.exception, MedttaError)
    assert "matches --experiment synth-ct (available: medtta/synth-mri)" in str(outcome.exception)
    assert matching_experiments(["medtta/synth-mri", "medtta/site-x", "Default"], ["*"]) == ["medtta/synth-mri"]


def test_qualitative_cases_put_the_worst_collapse_first() -> None:
    candidates = [{"change": -0.5, "collapsed": False}, {"change": -0.3, "collapsed": True},
                  {"change": 0.0, "collapsed": False}, {"change": 0.2, "collapsed": False},
                  {"change": 0.4, "collapsed": False}]
    chosen = figures.pick_cases(candidates, 3)
    assert [c["change"] for c in chosen] == [-0.3, 0.4, -0.5]


def test_methods_are_named_by_what_tells_their_runs_apart() -> None:
    def cell(method: str, setting: str, protocol: str = "p", **params: str) -> Cell:
        return Cell("id", f"medtta/{protocol}", protocol, "MRI", method, "output", "unet", setting, 0,
                    {"seed": "0", "device": "cpu", "steps": "1", "train_lr": "0.001", **params}, {}, 0, [])

    cells = [cell("tent", "episodic", **{"hp.lr": "0.001"}), cell("tent", "episodic", **{"hp.lr": "0.0001"}),
             cell("tent", "continual", **{"hp.lr": "0.001"}), cell("sar", "episodic", device="cuda"),
             cell("tent", "continual", "q", train_lr="0.002")]  # another protocol's schedule: the same method
    label_variants(cells)
    assert [c.label for c in cells] == ["tent (episodic) [hp.lr=0.001]", "tent (episodic) [hp.lr=0.0001]",
                                        "tent (continual)", "sar (episodic)", "tent (continual)"]
    # a run logged before `precision` existed is an fp32 run; a bf16 one is another variant
    cells = [cell("tent", "episodic"), cell("tent", "episodic", precision="fp32"),
             cell("tent", "episodic", precision="bf16")]
    label_variants(cells)
    assert [c.label for c in cells] == ["tent [precision=fp32]", "tent [precision=fp32]", "tent [precision=bf16]"]
    assert cells[0].variant == cells[1].variant != cells[2].variant


def test_recurring_table_and_a_case_scored_once_per_round() -> None:
    """Recovery per round, mean over sites then seeds, and its slope; the per-site tables count every case once (the
    mean over its rounds), so rounds are not mistaken for cases."""
    from medtta.report import tables
    from medtta.report.store import SiteRun

    def rows(dice: dict[int, float]) -> list[dict]:
        return [{"case_id": case, "round": k, "dice": d, "dice_source": 0.5} for k, d in dice.items()
                for case in ("c1", "c2")]

    def cell(seed: int, shift: float) -> Cell:
        sites = [SiteRun("r", "B", {}, rows({1: 0.7 + shift, 2: 0.6 + shift})),
                 SiteRun("r", "C", {}, rows({1: 0.9 + shift, 2: 0.7 + shift}))]
        return Cell("id", "medtta/p", "p", "MRI", "tent", "output", "unet", "recurring", seed,
                    {"seed": str(seed), "rounds": "2"}, {"dice_in_domain": 0.9}, 0, sites)

    cells = [cell(0, 0.0), cell(1, 0.04)]
    label_variants(cells)
    [row] = tables.recurring(cells)
    assert (row["method"], row["seeds"], row["rounds"]) == ("tent", 2, 2)
    assert (row["round_1"], row["round_2"], row["slope"]) == pytest.approx((0.8, 0.425, -0.375))
    site_b = tables.site_cases(cells)[0]
    assert site_b.case_ids == ("c1", "c2") and site_b.dice[0] == pytest.approx([0.65, 0.65])
    assert tables.recurring([c for c in cells if c.setting != "recurring"]) == []


def test_a_recovery_outside_its_range_is_marked_with_why() -> None:
    from medtta.report import tables
    from medtta.report.benchmark import recovery_flags, site_table
    from medtta.report.store import SiteRun
    from medtta.report.tables import Bootstrap

    def site(name: str, dice: float) -> SiteRun:
        return SiteRun("r", name, {}, [{"case_id": f"{name}{k}", "dice": dice, "dice_source": 0.5} for k in range(3)])

    cells = [Cell("id", "medtta/p", "p", "MRI", "tent", "output", "unet", "episodic", 0, {"seed": "0"},
                  {"dice_in_domain": 0.6}, 0, [site("B", 0.8), site("C", 0.55)])]  # recoveries 3.0 and 0.5
    label_variants(cells)
    rows = tables.dice_by_site(cells, Bootstrap(50, 0))
    assert [bool(r["recovery_flag"]) for r in rows] == [True, False]
    _, shown = site_table(rows)
    assert shown[0][5].endswith(" !") and not shown[1][5].endswith("!")
    notes = recovery_flags(rows)
    assert notes[0] == "`!` recovery outside [-1, 1.5]:" and notes[2].startswith(
        "- tent on B: adapted Dice 0.800 is above the in-domain Dice 0.600") and len(notes) == 4
