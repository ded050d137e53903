"""MLflow tracking as DESIGN.md lays it out: an experiment per protocol, a parent run per
(method, protocol, seed), a nested child run per target site, per-case rows as a table artifact."""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

import medtta


def tracking_uri(override: str | None, results: Path) -> str:
    """`--tracking-uri`, else `MLFLOW_TRACKING_URI`, else a SQLite store in the results dir."""
    return override or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{results / 'mlflow.db'}"


def experiment_name(protocol: str) -> str:
    return f"medtta/{protocol}"


class Tracker:
    """Thin wrapper over MLflow's fluent API; runs end FAILED when their block raises, KILLED when it is interrupted
    (Ctrl-C), as a run killed with kill -9 is marked later (`close_stale_runs`)."""

    def __init__(self, uri: str, protocol: str, artifacts: Path | None = None) -> None:
        """`artifacts`: where a new experiment keeps its artifacts; for a database store MLflow would
        otherwise write them to ./mlruns of whatever directory the command runs in."""
        self.uri = uri
        previous = os.environ.get("MLFLOW_TRACKING_URI")
        mlflow.set_tracking_uri(uri)  # MLflow also exports it as MLFLOW_TRACKING_URI, which would then override
        if previous is None:          # the results dir of every later run in this process: undo that
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous
        self.name = name = experiment_name(protocol)
        client = mlflow.MlflowClient()
        if artifacts is not None and client.get_experiment_by_name(name) is None:
            client.create_experiment(name, artifact_location=(artifacts / name).as_uri())
        self.client = client
        self.experiment_id = mlflow.set_experiment(name).experiment_id
        # MLflow 3's UI opens an untagged experiment on its GenAI overview; this shows the runs table
        mlflow.set_experiment_tag("mlflow.experimentKind", "custom_model_development")

    def close_stale_runs(self) -> list[Run]:
        """Marks KILLED the runs of this experiment left RUNNING by dead processes of this host; returns them."""
        return close_stale_runs(MlflowClient(tracking_uri=self.uri), mlflow.get_experiment_by_name(self.name))

    @contextmanager
    def run(self, name: str, tags: dict[str, Any], params: dict[str, Any] | None = None,
            nested: bool = False) -> Iterator[str]:
        """A run (nested under the active one when `nested`); yields its id."""
        all_tags = {"medtta.version": medtta.__version__, **{k: str(v) for k, v in tags.items()}}
        active = mlflow.start_run(run_name=name, nested=nested, tags=all_tags)
        try:
            if params:
                mlflow.log_params(params)
            yield active.info.run_id
        except BaseException as err:
            mlflow.end_run("KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
            raise
        mlflow.end_run("FINISHED")

    @staticmethod
    def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
        """Log the finite metrics (MLflow cannot plot NaN; a missing key says 'undefined'), at `step` of their
        history when given."""
        mlflow.log_metrics({k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(v)}, step=step)

    @staticmethod
    def set_tags(tags: dict[str, Any]) -> None:
        mlflow.set_tags({k: str(v) for k, v in tags.items()})

    @staticmethod
    def log_table(rows: list[dict[str, Any]], name: str) -> None:
        """Per-case rows as one table artifact (`<name>.json`, shown in the UI's artifact view)."""
        if rows:
            columns = list(rows[0])
            mlflow.log_table({c: [r.get(c) for r in rows] for c in columns}, artifact_file=f"{name}.json")

    @staticmethod
    def log_artifact(path: Path, folder: str | None = None) -> None:
        mlflow.log_artifact(str(path), artifact_path=folder)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _is_stale(run: Run) -> bool:
    """Left RUNNING by a process of this host that is gone (kill -9, a power cut): it will never end by itself.
    A run of another host, or without a pid, cannot be told apart from a live one."""
    tags = run.data.tags
    return (run.info.status == "RUNNING" and tags.get("medtta.host") == socket.gethostname()
            and tags.get("medtta.pid", "").isdigit() and not _process_alive(int(tags["medtta.pid"])))


def _mark_killed(client: MlflowClient, run: Run) -> None:
    """A stale run, and its running children, marked KILLED."""
    children = client.search_runs([run.info.experiment_id], f"tags.`mlflow.parentRunId` = '{run.info.run_id}'")
    for r in [*children, run]:
        if r.info.status == "RUNNING":
            client.set_terminated(r.info.run_id, "KILLED")


def close_stale_runs(client: MlflowClient, experiment: Any) -> list[Run]:
    """Marks KILLED the parent runs of `experiment` (an MLflow Experiment, or None) that are stale, with their
    children; returns them. `medtta run` and `medtta bench` both start with it."""
    if experiment is None:
        return []
    running = client.search_runs([experiment.experiment_id], "attributes.status = 'RUNNING'", max_results=50000)
    stale = [r for r in running if "mlflow.parentRunId" not in r.data.tags and _is_stale(r)]
    for run in stale:
        _mark_killed(client, run)
    return stale


def stale_message(run: Run) -> str:
    return (f"run '{run.info.run_name}' ({run.info.run_id}) was left RUNNING by process {run.data.tags['medtta.pid']}, "
            "which is gone: marked KILLED")


def parent_runs(client: MlflowClient, experiment_ids: list[str], cell: str | None = None) -> dict[str, list[Run]]:
    """The parent runs of the experiments (of one `cell` when given) by their `medtta.cell` tag."""
    by_cell: dict[str, list[Run]] = {}
    if experiment_ids:
        where = f"tags.`medtta.cell` = '{cell}'" if cell else "tags.`medtta.cell` LIKE '%'"
        for run in client.search_runs(experiment_ids, where, max_results=50000):
            if "mlflow.parentRunId" not in run.data.tags:
                by_cell.setdefault(run.data.tags["medtta.cell"], []).append(run)
    return by_cell


@dataclass(frozen=True)
class Previous:
    """What a store holds of one cell: its latest run finished on the same data (`medtta.data`), a run of it still
    running, and whether it finished before only on other data (edited files or split)."""

    finished: Run | None = None
    running: Run | None = None
    other_data: bool = False


def previous(runs: list[Run], data: str) -> Previous:
    """`runs` of one cell, sorted out for a run on `data` (its fingerprint)."""
    finished = [r for r in runs if r.info.status == "FINISHED"]
    same = [r for r in finished if r.data.tags.get("medtta.data") == data]
    running = [r for r in runs if r.info.status == "RUNNING"]
    return Previous(max(same, key=lambda r: r.info.end_time or 0) if same else None,
                    running[0] if running else None, bool(finished) and not same)
