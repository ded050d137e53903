"""MLflow tracking as DESIGN.md lays it out: an experiment per protocol, a parent run per
(method, protocol, seed), a nested child run per target site, per-case rows as a table artifact."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow

import medtta


def tracking_uri(override: str | None, results: Path) -> str:
    """`--tracking-uri`, else `MLFLOW_TRACKING_URI`, else a SQLite store in the results dir."""
    return override or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{results / 'mlflow.db'}"


def experiment_name(protocol: str) -> str:
    return f"medtta/{protocol}"


class Tracker:
    """Thin wrapper over MLflow's fluent API; runs end FAILED when their block raises."""

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
        name = experiment_name(protocol)
        client = mlflow.MlflowClient()
        if artifacts is not None and client.get_experiment_by_name(name) is None:
            client.create_experiment(name, artifact_location=(artifacts / name).as_uri())
        mlflow.set_experiment(name)
        # MLflow 3's UI opens an untagged experiment on its GenAI overview; this shows the runs table
        mlflow.set_experiment_tag("mlflow.experimentKind", "custom_model_development")

    @contextmanager
    def run(self, name: str, tags: dict[str, Any], params: dict[str, Any] | None = None,
            nested: bool = False) -> Iterator[str]:
        """A run (nested under the active one when `nested`); yields its id."""
        all_tags = {"medtta.version": medtta.__version__, **{k: str(v) for k, v in tags.items()}}
        with mlflow.start_run(run_name=name, nested=nested, tags=all_tags) as active:
            if params:
                mlflow.log_params(params)
            yield active.info.run_id

    @staticmethod
    def log_metrics(metrics: dict[str, float]) -> None:
        """Log the finite metrics (MLflow cannot plot NaN; a missing key says 'undefined')."""
        mlflow.log_metrics({k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(v)})

    @staticmethod
    def log_table(rows: list[dict[str, Any]], name: str) -> None:
        """Per-case rows as one table artifact (`<name>.json`, shown in the UI's artifact view)."""
        if rows:
            columns = list(rows[0])
            mlflow.log_table({c: [r.get(c) for r in rows] for c in columns}, artifact_file=f"{name}.json")

    @staticmethod
    def log_artifact(path: Path, folder: str | None = None) -> None:
        mlflow.log_artifact(str(path), artifact_path=folder)
