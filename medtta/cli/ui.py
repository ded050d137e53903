"""`medtta ui`: the MLflow UI on the results store, opened on the runs tables of the medtta experiments."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import click

from medtta.cli.options import RESULTS, TRACKING_URI, quiet_mlflow
from medtta.protocol import MODALITIES

HOST = "127.0.0.1"  # the UI shows every result of the store: never on an outside interface
STARTUP_SECONDS = 120

# MLflow's web UI (3.x) shows only Source, Models and Dataset by default, so a person had to add dice_recovery by
# hand. Its "save and share view" feature stores a runs-page state as the experiment tag
# `mlflow.sharedViewState.<key>` (an envelope {name, createdAt, updatedAt, state}, `state` being the JSON of the
# search facets and UI state) and `#/experiments/<id>/runs?viewStateShareKey=<key>` opens it; columns cannot be
# chosen through the URL itself. `medtta ui` writes such a view under a fixed key before starting the server.
VIEW_KEY = "medtta"
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_KEY}"
VIEW_NAME = "medtta: recovery"
PARENTS_ONLY = "tags.`mlflow.parentRunId` IS NULL"
LEADING = ("dice_recovery",)
TRAILING = ("dice", "dice_source", "dice_in_domain", "cost_ratio", "source_site_harm", "dice_recovery_slope")


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex((HOST, port)) != 0


def _wait_until_up(server: subprocess.Popen, url: str) -> None:
    from medtta.errors import MedttaError

    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise MedttaError(f"the MLflow server stopped (exit code {server.returncode}) before it answered on {url}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise MedttaError(f"the MLflow server did not answer on {url} within {STARTUP_SECONDS} s")


def _metric_keys(client, experiment_id: str) -> set[str]:
    """The metric names of the experiment's parent runs (one row per cell in the runs table)."""
    from medtta.report.store import all_runs

    return {k for r in all_runs(client, [experiment_id], PARENTS_ONLY) for k in r.data.metrics}


def view_state(metrics: set[str]) -> dict:
    """The runs-table state: the recovery metrics as columns (dice_recovery, then per modality, then the Dice it is
    computed from and the cost), one row per parent run, ordered by dice_recovery, best first."""
    names = [m for m in LEADING if m in metrics]
    names += sorted(f"dice_recovery_{m}" for m in MODALITIES if f"dice_recovery_{m}" in metrics)
    names += [m for m in TRAILING if m in metrics]
    columns = [f"metrics.`{m}`" for m in names]
    # parent runs only: MLflow nests the per-site child runs under their parent only when sorted by date, so
    # sorted by dice_recovery they would be rows of their own, ranked among the methods
    state = {"selectedColumns": columns, "columnOrder": columns, "searchFilter": PARENTS_ONLY}
    if "dice_recovery" in metrics:
        state |= {"orderByKey": "metrics.`dice_recovery`", "orderByAsc": False}
    return state


def _save_view(client, experiment) -> bool:
    """Write the view as the experiment's shared-view tag (same key on every launch; rewritten only when the
    columns change). False when the store refuses the write: the page then opens as MLflow's default."""
    state = json.dumps(view_state(_metric_keys(client, experiment.experiment_id)), sort_keys=True)
    try:
        old = json.loads(experiment.tags.get(VIEW_TAG, "null")) or {}
    except ValueError:
        old = {}
    if isinstance(old, dict) and old.get("state") == state and old.get("name") == VIEW_NAME:
        return True
    now = int(time.time() * 1000)
    created = old.get("createdAt") if isinstance(old, dict) and isinstance(old.get("createdAt"), int) else now
    envelope = {"name": VIEW_NAME, "createdAt": created, "updatedAt": now, "state": state}
    try:
        client.set_experiment_tag(experiment.experiment_id, VIEW_TAG, json.dumps(envelope))
    except Exception:  # noqa: BLE001 (a read-only store still gets its UI)
        return False
    return True


@click.command()
@RESULTS
@TRACKING_URI
@click.option("--port", default=5000, show_default=True, type=click.IntRange(1, 65535), help="Port on 127.0.0.1.")
def ui(results: Path | None, tracking_uri: str | None, port: int) -> None:
    """Start the MLflow UI on the results store (on 127.0.0.1 only) and print the address of each medtta
    experiment's runs table: one row per parent run (`tent · synth-mri · seed 0`), with dice_recovery (and per
    modality, dice, dice_source, dice_in_domain, cost_ratio) as columns, best recovery first (a saved view,
    "medtta: recovery"); group by `medtta.method` to average over seeds. Ctrl-C stops it.
    """
    from mlflow.tracking import MlflowClient

    from medtta.errors import MedttaError
    from medtta.paths import results_root
    from medtta.tracking import tracking_uri as resolve_uri

    quiet_mlflow()
    uri = resolve_uri(tracking_uri, results_root(results))
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise MedttaError(f"{uri.removeprefix('sqlite:///')}: no MLflow store here yet (run `medtta bench` or "
                          "`medtta run` first, or give --results / --tracking-uri)")
    client = MlflowClient(tracking_uri=uri)
    experiments = client.search_experiments(filter_string="name LIKE 'medtta/%'")
    if not experiments:
        raise MedttaError(f"{uri}: no medtta experiment (run `medtta bench` or `medtta run` first)")
    if not _port_free(port):
        raise MedttaError(f"--port {port}: {HOST}:{port} is already in use (choose another with --port)")
    url = f"http://{HOST}:{port}"
    views = {e.experiment_id: _save_view(client, e) for e in experiments}
    # its own process group, stopped as a whole: MLflow's server runs uvicorn and job workers as child processes
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", HOST,
                               "--port", str(port), "--workers", "1"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    previous = signal.signal(signal.SIGTERM, _exit)  # `kill`, `docker stop`: stop the server too, not orphan it
    try:
        _wait_until_up(server, url)
        click.echo(f"MLflow UI on {uri}, runs tables:")
        for exp in sorted(experiments, key=lambda e: e.name):
            query = f"?viewStateShareKey={VIEW_KEY}&compareRunsMode=TABLE" if views[exp.experiment_id] else ""
            click.echo(f"  {exp.name:<24} {url}/#/experiments/{exp.experiment_id}/runs{query}")
        click.echo("Parent runs by dice_recovery (clear the search box for the per-site runs); group the rows by "
                   "medtta.method to average over seeds. Ctrl-C stops the server.", err=True)
        server.wait()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        _stop(server)


def _exit(signum: int, frame: object) -> None:
    sys.exit(128 + signum)


def _stop(server: subprocess.Popen) -> None:
    """The server and every process it started: terminated, killed if still there after 30 s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, sig)
        try:
            server.wait(timeout=30)
            return
        except subprocess.TimeoutExpired:
            continue
