"""2D against 3D on the same volumes: `medtta bench` once per network dimension (`-a spatial_dims`, same protocol,
seed and device; each trains its own source model), then per method and dimension the in-domain Dice, the Dice
before and after adaptation and the recovery per target site, seconds per volume, cost against unadapted
inference and peak memory. Prints figures; asserts nothing.

    python benchmarks/dims.py [--methods 3d] [--dataset synth-ct3d] [--dims 2 3] [--results DIR] [--device auto]
                              [--seed 0] [--setting episodic]

`--methods 3d` (default) takes every method that adapts 3D networks.
"""

from __future__ import annotations

import argparse
import tempfile
from math import nan
from pathlib import Path

from mlflow.tracking import MlflowClient

from medtta.bench import BenchConfig, bench, select_methods, select_protocols
from medtta.engine import RunConfig
from medtta.registry import ADAPTERS
from medtta.report import format_table
from medtta.tracking import experiment_name, tracking_uri


def finished_runs(results: Path, protocol: str, setting: str) -> tuple[dict, dict]:
    """(method, dims) -> metrics of its latest finished parent run; (method, dims, site) -> its child run's."""
    client = MlflowClient(tracking_uri=tracking_uri(None, results))
    experiment = client.get_experiment_by_name(experiment_name(protocol))
    runs = client.search_runs([experiment.experiment_id], f"attributes.status = 'FINISHED' and "
                              f"tags.`medtta.setting` = '{setting}'", order_by=["attributes.start_time ASC"],
                              max_results=50000)
    parents = {r.info.run_id: r for r in runs if "mlflow.parentRunId" not in r.data.tags}
    by_cell = {(r.data.tags["medtta.method"], r.data.params.get("arch.spatial_dims", "2")): r
               for r in parents.values()}
    sites = {}
    for r in runs:
        parent = parents.get(r.data.tags.get("mlflow.parentRunId"))
        if parent is not None and by_cell.get((parent.data.tags["medtta.method"],
                                               parent.data.params.get("arch.spatial_dims", "2"))) is parent:
            sites[parent.data.tags["medtta.method"], parent.data.params.get("arch.spatial_dims", "2"),
                  r.data.tags["medtta.site"]] = r.data.metrics
    return {k: r.data.metrics for k, r in by_cell.items()}, sites


def summary_table(parents: dict, methods: tuple[str, ...], dims: list[str]) -> str:
    header = ["method", "dims", "in-domain", "dice source", "dice adapted", "recovery", "s/vol", "cost ratio",
              "peak MB"]
    rows = []
    for method in methods:
        for d in dims:
            m = parents.get((method, d))
            rows.append([method, f"{d}D", *(["failed"] + [""] * 6 if m is None else [
                f"{m['dice_in_domain']:.3f}", f"{m['dice_source']:.3f}", f"{m['dice']:.3f}",
                f"{m['dice_recovery']:.3f}", f"{m['seconds_per_volume']:.3f}", f"{m['cost_ratio']:.1f}",
                f"{m['peak_memory_mb']:.0f}"])])
    return format_table(header, rows)


def site_table(sites: dict, methods: tuple[str, ...], dims: list[str], targets: tuple[str, ...]) -> str:
    """Per target site: unadapted -> adapted Dice (recovery)."""
    rows = []
    for method in methods:
        for d in dims:
            cells = [sites.get((method, d, s)) for s in targets]
            rows.append([method, f"{d}D", *("-" if c is None else f"{c['dice_source']:.3f} -> {c['dice']:.3f} "
                                          f"({c.get('dice_recovery', nan):+.3f})" for c in cells)])
    return format_table(["method", "dims", *(f"site {s}: source -> adapted (recovery)" for s in targets)], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="3d")
    parser.add_argument("--dataset", default="synth-ct3d")
    parser.add_argument("--dims", nargs="+", default=["2", "3"])
    parser.add_argument("--results", type=Path, help="results dir (default: a new one); finished cells are reused")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--setting", default="episodic")
    args = parser.parse_args()
    methods = (tuple(m for m in ADAPTERS.list() if 3 in ADAPTERS.get(m).spatial_dims) if args.methods == "3d"
               else select_methods(args.methods))
    protocols = select_protocols(args.dataset)
    with tempfile.TemporaryDirectory() as tmp:
        results = args.results or Path(tmp)
        for d in args.dims:
            run = RunConfig(method="source", device=args.device, results=results, arch_config={"spatial_dims": int(d)})
            outcome = bench(BenchConfig(methods, protocols, seeds=(args.seed,), settings=(args.setting,), run=run),
                            echo=print)
            print(f"{d}D: source models {outcome.prepare_seconds:.0f} s, cells {outcome.cells_seconds:.0f} s")
        for protocol in protocols:
            parents, sites = finished_runs(results, protocol.name, args.setting)
            print(f"\n{protocol.name}, seed {args.seed}, {args.setting}: 2D against 3D on the same volumes")
            print(summary_table(parents, methods, args.dims))
            print()
            print(site_table(sites, methods, args.dims, protocol.target_sites))


if __name__ == "__main__":
    main()
