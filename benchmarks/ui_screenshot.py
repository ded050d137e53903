"""Check the MLflow UI as a person sees it: `medtta ui` on a results store, headless Chromium with a fresh profile
loads the first experiment's runs page at the address `medtta ui` prints (its saved view, table view), the runs
table must carry a `dice_recovery` column header and a row per parent run (and no per-site child run), and a
screenshot is saved.

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
from html.parser import HTMLParser
from pathlib import Path

from mlflow.tracking import MlflowClient

BUDGET_MS = "90000"  # virtual time for the single-page app to load its runs and apply the saved view
RECOVERY = "metrics.`dice_recovery`"  # the column id MLflow's runs table (ag-grid) gives the metric
RUN_NAME = "attributes.`Run Name`"
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


def chromium(url: str, *args: str) -> str:
    with tempfile.TemporaryDirectory() as profile:
        done = subprocess.run([shutil.which("chromium") or "chromium", "--headless", "--no-sandbox", "--disable-gpu",
                               f"--user-data-dir={profile}", "--window-size=1600,1000",
                               f"--virtual-time-budget={BUDGET_MS}", *args, url],
                              capture_output=True, text=True, timeout=300, check=True)
    return done.stdout


class RunsTable(HTMLParser):
    """The text of the runs table's header cells and run-name cells, by column id. ag-grid renders only the columns
    in view (column virtualisation), so a header cell in the DOM is one a person sees."""

    def __init__(self) -> None:
        super().__init__()
        self.headers: dict[str, str] = {}
        self.run_names: list[str] = []
        self._open: list[tuple[str, str, int]] = []  # (kind, col-id, depth) of the cells being read
        self._depth = 0
        self._text: dict[int, list[str]] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in VOID:  # no end tag follows
            return
        self._depth += 1
        a = dict(attrs)
        kind = {"columnheader": "header", "gridcell": "cell"}.get(a.get("role") or "")
        if kind and a.get("col-id"):
            self._open.append((kind, a["col-id"], self._depth))
            self._text[self._depth] = []

    def handle_endtag(self, tag: str) -> None:
        if tag in VOID:
            return
        if self._open and self._open[-1][2] == self._depth:
            kind, col, depth = self._open.pop()
            text = " ".join("".join(self._text.pop(depth)).split())
            if kind == "header":
                self.headers[col] = text
            elif col == RUN_NAME:
                self.run_names.append(text)
        self._depth -= 1

    def handle_data(self, data: str) -> None:
        for _, _, depth in self._open:
            self._text[depth].append(data)


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
        name, page = server.stdout.readline().split()
        client = MlflowClient(tracking_uri=f"sqlite:///{args.results.resolve() / 'mlflow.db'}")
        experiment = client.get_experiment_by_name(name)
        parents = {r.info.run_name for r in client.search_runs([experiment.experiment_id])
                   if "mlflow.parentRunId" not in r.data.tags}
        table = RunsTable()
        table.feed(chromium(page, "--dump-dom"))
        problems = []
        if table.headers.get(RECOVERY) != "dice_recovery":
            problems.append(f"no dice_recovery column header in the runs table (headers: {sorted(table.headers)})")
        missing = sorted(p for p in parents if not any(p in cell for cell in table.run_names))
        if missing:
            problems.append(f"parent runs not in the table's Run Name column: {', '.join(missing)}")
        others = [cell for cell in table.run_names if not any(cell.endswith(p) for p in parents)]
        if others:  # the view shows parent runs only: a per-site child run is no method to rank
            problems.append(f"rows that are no parent run: {', '.join(others)}")
        if problems:
            sys.exit(f"{page}: " + "; ".join(problems))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        chromium(page, f"--screenshot={args.out.resolve()}")
        print(f"{page}: the runs table shows the dice_recovery column and {len(parents)} parent run name(s) "
              f"({len(table.run_names)} rows); screenshot {args.out}")
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
