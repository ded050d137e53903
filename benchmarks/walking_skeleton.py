"""End-to-end times of `medtta run` (cold and cached) and the adaptation cost of each method as a ratio to
unadapted inference, measured in one run on the same volumes. Prints figures; asserts nothing.

    python benchmarks/walking_skeleton.py [--dataset synth-mri] [--methods bn-stats tent]
                                          [--settings episodic continual]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from medtta.engine import RunConfig, run
from medtta.protocol import resolve_protocol
from medtta.report import format_table


def timed_cli(args: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "medtta", *args], env=env, check=True,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="synth-mri")
    parser.add_argument("--methods", nargs="+", default=["bn-stats", "tent"])
    parser.add_argument("--settings", nargs="+", default=["episodic", "continual"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "MEDTTA_DATA": f"{tmp}/data", "MEDTTA_RESULTS": f"{tmp}/results"}
        cli = ["run", "--method", "tent", "--dataset", args.dataset, "-q"]
        cold = timed_cli(cli, env)
        cached = timed_cli(cli, env)
        print(f"medtta run --method tent --dataset {args.dataset}: cold {cold:.1f} s, cached {cached:.1f} s\n")

        os.environ.update(MEDTTA_DATA=env["MEDTTA_DATA"])
        protocol = resolve_protocol(args.dataset)
        rows = []
        for method in args.methods:
            for setting in args.settings:
                config = RunConfig(method=method, setting=setting, results=Path(env["MEDTTA_RESULTS"]), progress=False)
                result = run(protocol, config)
                cases = [r for site in result.sites for r in site.rows]
                ratio = sum(r["seconds"] for r in cases) / sum(r["seconds_source"] for r in cases)
                for site in result.sites:
                    s = site.summary
                    rows.append([method, setting, site.site, f"{s['dice_source']:.3f}", f"{s['dice']:.3f}",
                                 f"{result.dice_in_domain:.3f}", f"{s['dice_recovery']:.3f}", f"{ratio:.2f}x"])
        print(format_table(["method", "setting", "site", "dice_source", "dice_adapted", "dice_in_domain", "recovery",
                            "cost vs unadapted"], rows))


if __name__ == "__main__":
    main()
