"""Check the MLflow UI as a person sees it: `medtta ui` on a results store, headless Chromium with a fresh profile
loads the first experiment's runs page (charts view), the DOM must name every parent run and show
`dice_recovery`, and a screenshot is saved.

    python benchmarks/ui_screenshot.py --results medtta-results --out docs/mlflow-runs.png

Needs Debian's `chromium` on PATH.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from mlflow.tracking import MlflowClient

BUDGET_MS = "90000"  # virtual time for the single-page app to load its runs and draw its charts


def chromium(url: str, *args: str) -> str:
    with tempfile.TemporaryDirectory() as profile:
        done = subprocess.run([shutil.which("chromium") or "chromium", "--headless", "--no-sandbox", "--disable-gpu",
                               f"--user-data-dir={profile}", "--window-size=1600,1000",
                               f"--virtual-time-budget={BUDGET_MS}", *args, url],
                              capture_output=True, text=True, timeout=300, check=True)
    return done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("docs/mlflow-runs.png"))
    args = parser.parse_args()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "medtta", "ui", "--results", str(args.results), "--port",
                               str(port)], stdout=subprocess.PIPE, text=True)
    try:
        server.stdout.readline()
        name, url = server.stdout.readline().split()
        client = MlflowClient(tracking_uri=f"sqlite:///{args.results.resolve() / 'mlflow.db'}")
        experiment = client.get_experiment_by_name(name)
        parents = [r.info.run_name for r in client.search_runs([experiment.experiment_id])
                   if "mlflow.parentRunId" not in r.data.tags]
        page = f"{url}?compareRunsMode=CHART"
        dom = chromium(page, "--dump-dom")
        missing = [n for n in [*parents, "dice_recovery"] if n not in dom]
        if missing:
            sys.exit(f"{page}: not in the page: {', '.join(missing)}")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        chromium(page, f"--screenshot={args.out.resolve()}")
        print(f"{page}: {len(parents)} parent runs and dice_recovery in the DOM; screenshot {args.out}")
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
