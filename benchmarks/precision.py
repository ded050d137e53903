"""Dice of every method per `--precision`: `medtta bench` once per precision (same protocol, seed and device;
each precision trains its own source model), then per method the Dice, recovery and seconds per volume of each
precision, and their differences from fp32. Prints figures; asserts nothing.

    python benchmarks/precision.py [--methods all] [--dataset synth-oct] [--precisions fp32 bf16]
                                   [--results DIR] [--device auto] [--seed 0]

A method "tolerates" a precision when its adapted Dice is within `TOLERANCE` of fp32's.
"""

from __future__ import annotations

import argparse
import tempfile
from math import nan
from pathlib import Path

from mlflow.tracking import MlflowClient

from medtta.bench import BenchConfig, bench, select_methods, select_protocols
from medtta.engine import RunConfig
from medtta.report import format_table
from medtta.tracking import experiment_name, tracking_uri

TOLERANCE = 0.01  # one Dice point


def parent_metrics(results: Path, protocol: str) -> dict[tuple[str, str], dict[str, float]]:
    """(method, precision) -> the metrics of its latest finished parent run."""
    client = MlflowClient(tracking_uri=tracking_uri(None, results))
    experiment = client.get_experiment_by_name(experiment_name(protocol))
    runs = client.search_runs([experiment.experiment_id], "attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time ASC"], max_results=50000)
    return {(r.data.tags["medtta.method"], r.data.params.get("precision", "fp32")): r.data.metrics
            for r in runs if "mlflow.parentRunId" not in r.data.tags}


def table(metrics: dict[tuple[str, str], dict[str, float]], methods: tuple[str, ...], precisions: list[str]) -> str:
    others = [p for p in precisions if p != "fp32"]
    header = ["method", *(f"dice {p}" for p in precisions), *(f"Δdice {p}" for p in others),
              *(f"Δrecovery {p}" for p in others), *(f"s/vol {p}" for p in precisions), "tolerates"]
    rows = []
    for method in methods:
        m = {p: metrics.get((method, p)) for p in precisions}
        if any(v is None for v in m.values()):
            rows.append([method, *("failed" if m[p] is None else "" for p in precisions)]
                        + [""] * (len(header) - 1 - len(precisions)))
            continue
        deltas = {p: m[p]["dice"] - m["fp32"]["dice"] for p in others}
        rows.append([method, *(f"{m[p]['dice']:.3f}" for p in precisions), *(f"{deltas[p]:+.3f}" for p in others),
                     *(f"{m[p].get('dice_recovery', nan) - m['fp32'].get('dice_recovery', nan):+.3f}" for p in others),
                     *(f"{m[p]['seconds_per_volume']:.3f}" for p in precisions),
                     ",".join(p for p in others if abs(deltas[p]) <= TOLERANCE) or "-"])
    return format_table(header, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="all")
    parser.add_argument("--dataset", default="synth-oct")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--results", type=Path, help="results dir (default: a new one); finished cells are reused")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    precisions = ["fp32", *(p for p in args.precisions if p != "fp32")]
    methods, protocols = select_methods(args.methods), select_protocols(args.dataset)
    with tempfile.TemporaryDirectory() as tmp:
        results = args.results or Path(tmp)
        for precision in precisions:
            run = RunConfig(method="source", precision=precision, device=args.device, results=results)
            outcome = bench(BenchConfig(methods, protocols, seeds=(args.seed,), run=run), echo=print)
            print(f"{precision}: source models {outcome.prepare_seconds:.0f} s, cells {outcome.cells_seconds:.0f} s")
        for protocol in protocols:
            print(f"\n{protocol.name}, seed {args.seed}: Dice per precision (tolerates: |Δdice| <= {TOLERANCE})")
            print(table(parent_metrics(results, protocol.name), methods, precisions))


if __name__ == "__main__":
    main()
