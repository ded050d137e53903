"""2D against 3D, BatchNorm against InstanceNorm, on the same volumes: `medtta bench --include-source-site` once per
network dimension and norm (`-a spatial_dims`, `-a norm`; same protocol, seeds and device; each trains its own source
model), then per method, dimension, norm and seed: in-domain Dice, the source site's Dice change (adapting where there
is no shift), mean recovery, seconds per volume, cost against unadapted inference and peak memory; and per target
site its gap (in-domain minus unadapted Dice: a recovery where it is under 0.1 is noise), unadapted -> adapted Dice
and recovery. Finished cells in `--results` are reused. Prints figures; asserts nothing.

    python benchmarks/dims.py [--methods 3d] [--dataset synth-ct3d] [--dims 2 3] [--norms batch instance]
                              [--seeds 0 1] [--results DIR] [--device auto] [--setting episodic]

`--methods 3d` (default) takes every method that adapts 3D networks; a method that does not adapt a norm or
dimension is left out of that grid.
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

Cell = tuple[str, str, str, str]  # method, dims, norm, seed


def _cell(run) -> Cell:
    p = run.data.params
    return run.data.tags["medtta.method"], p.get("arch.spatial_dims", "2"), p.get("arch.norm", "batch"), p["seed"]


def finished_runs(results: Path, protocol: str, setting: str) -> tuple[dict, dict]:
    """Cell -> metrics of its latest finished parent run; (*cell, site) -> its child runs' (the source site's too)."""
    client = MlflowClient(tracking_uri=tracking_uri(None, results))
    experiment = client.get_experiment_by_name(experiment_name(protocol))
    runs = client.search_runs([experiment.experiment_id], f"attributes.status = 'FINISHED' and "
                              f"tags.`medtta.setting` = '{setting}'", order_by=["attributes.start_time ASC"],
                              max_results=50000)
    parents = {r.info.run_id: r for r in runs if "mlflow.parentRunId" not in r.data.tags}
    by_cell = {_cell(r): r for r in parents.values()}
    sites = {}
    for r in runs:
        parent = parents.get(r.data.tags.get("mlflow.parentRunId"))
        if parent is not None and by_cell.get(_cell(parent)) is parent:
            sites[(*_cell(parent), r.data.tags["medtta.site"])] = r.data.metrics
    return {k: r.data.metrics for k, r in by_cell.items()}, sites


def _f(value: float | None, digits: int = 3, sign: str = "") -> str:
    return "-" if value is None else f"{value:{sign}.{digits}f}"


def summary_table(parents: dict, cells: list[Cell]) -> str:
    header = ["method", "dims", "norm", "seed", "in-domain", "source-site change", "recovery", "s/vol", "cost ratio",
              "peak MB"]
    rows = [[*cell[:2], cell[2], cell[3], *(["-"] * 6 if (m := parents.get(cell)) is None else [
        _f(m["dice_in_domain"]), _f(m.get("source_site_harm"), sign="+"), _f(m["dice_recovery"], sign="+"),
        _f(m["seconds_per_volume"], 2), _f(m["cost_ratio"], 1), _f(m["peak_memory_mb"], 0)])] for cell in cells]
    return format_table(header, rows)


def site_table(sites: dict, cells: list[Cell], targets: tuple[str, ...]) -> str:
    """Per target site: gap, unadapted -> adapted Dice (recovery)."""
    def entry(c: dict | None) -> str:
        if c is None:
            return "-"
        return (f"gap {c['dice_in_domain'] - c['dice_source']:+.3f}: {c['dice_source']:.3f} -> {c['dice']:.3f} "
                f"({c.get('dice_recovery', nan):+.2f})")

    rows = [[*cell, *(entry(sites.get((*cell, s))) for s in targets)] for cell in cells]
    return format_table(["method", "dims", "norm", "seed", *(f"site {s}: gap: source -> adapted (recovery)"
                                                             for s in targets)], rows)


def grid(methods: tuple[str, ...], dims: str, norm: str) -> tuple[str, ...]:
    """The methods that adapt `dims`-D networks of `norm`."""
    return tuple(m for m in methods if int(dims) in ADAPTERS.get(m).spatial_dims and norm in ADAPTERS.get(m).norms)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="3d")
    parser.add_argument("--dataset", default="synth-ct3d")
    parser.add_argument("--dims", nargs="+", default=["2", "3"])
    parser.add_argument("--norms", nargs="+", default=["batch", "instance"])
    parser.add_argument("--seeds", nargs="+", default=["0"])
    parser.add_argument("--results", type=Path, help="results dir (default: a new one); finished cells are reused")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--setting", default="episodic")
    args = parser.parse_args()
    methods = (tuple(m for m in ADAPTERS.list() if 3 in ADAPTERS.get(m).spatial_dims) if args.methods == "3d"
               else select_methods(args.methods))
    protocols = select_protocols(args.dataset)
    cells = [(m, d, n, s) for m in methods for d in args.dims for n in args.norms for s in args.seeds
             if m in grid(methods, d, n)]
    with tempfile.TemporaryDirectory() as tmp:
        results = args.results or Path(tmp)
        for d in args.dims:
            for norm in args.norms:
                run = RunConfig(method="source", device=args.device, results=results, source_site_check=True,
                                arch_config={"spatial_dims": int(d), "norm": norm})
                outcome = bench(BenchConfig(grid(methods, d, norm), protocols, seeds=tuple(map(int, args.seeds)),
                                            settings=(args.setting,), run=run), echo=print)
                print(f"{d}D {norm}: source models {outcome.prepare_seconds:.0f} s, "
                      f"cells {outcome.cells_seconds:.0f} s")
        for protocol in protocols:
            parents, sites = finished_runs(results, protocol.name, args.setting)
            print(f"\n{protocol.name}, {args.setting}: 2D against 3D, BatchNorm against InstanceNorm, same volumes")
            print(summary_table(parents, cells))
            print()
            print(site_table(sites, cells, protocol.target_sites))


if __name__ == "__main__":
    main()
