"""`medtta ui`: the MLflow UI on the results store, opened on the runs tables of the medtta experiments."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import click

from medtta.cli.options import RESULTS, TRACKING_URI, quiet_mlflow

HOST = "127.0.0.1"  # the UI shows every result of the store: never on an outside interface
STARTUP_SECONDS = 120


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
    server.terminate()
    raise MedttaError(f"the MLflow server did not answer on {url} within {STARTUP_SECONDS} s")


@click.command()
@RESULTS
@TRACKING_URI
@click.option("--port", default=5000, show_default=True, type=click.IntRange(1, 65535), help="Port on 127.0.0.1.")
def ui(results: Path | None, tracking_uri: str | None, port: int) -> None:
    """Start the MLflow UI on the results store (on 127.0.0.1 only) and print the address of each medtta
    experiment's runs table: one row per parent run (`tent · synth-mri · seed 0`); group by `medtta.method` to
    average over seeds, or chart `dice_recovery_MRI`/`_CT`/`_OCT` to rank methods per modality. Ctrl-C stops it.
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
    experiments = [e for e in MlflowClient(tracking_uri=uri).search_experiments(filter_string="name LIKE 'medtta/%'")]
    if not experiments:
        raise MedttaError(f"{uri}: no medtta experiment (run `medtta bench` or `medtta run` first)")
    if not _port_free(port):
        raise MedttaError(f"--port {port}: {HOST}:{port} is already in use (choose another with --port)")
    url = f"http://{HOST}:{port}"
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", HOST,
                               "--port", str(port), "--workers", "1"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        _wait_until_up(server, url)
        click.echo(f"MLflow UI on {uri}, runs tables:")
        for exp in sorted(experiments, key=lambda e: e.name):
            click.echo(f"  {exp.name:<24} {url}/#/experiments/{exp.experiment_id}/runs")
        click.echo("Group the rows by medtta.method to average over seeds. Ctrl-C stops the server.", err=True)
        server.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.terminate()
        server.wait()
