"""Preparation throughput of the generic nnU-Net recipe (cases per second) on a synthetic dataset of 100
volumes, first run and re-run (which skips finished cases). Prints figures; asserts nothing.

    python benchmarks/prepare_throughput.py [--cases 100]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from medtta.data.recipes import get_recipe, prepare
from medtta.data.synthetic.cardiac import generate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=100)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        download, out = Path(tmp) / "raw", Path(tmp) / "prepared"
        per_site = args.cases // 4
        generate(download, seed=0, cases={s: per_site for s in "ABCD"}, splits={})
        sites = Path(tmp) / "sites.csv"
        sites.write_text("case_id,site\n" + "".join(f"{s}{i:03d},{s}\n" for s in "ABCD" for i in range(per_site)))
        recipe = get_recipe("nnunet", sites=sites)
        for label in ("first run", "re-run"):
            counts = prepare(recipe, download, out, progress=False)
            print(f"{label}: {counts['cases']} cases ({counts['written']} written) in {counts['seconds']:.2f} s "
                  f"= {counts['cases'] / counts['seconds']:.1f} cases/s")


if __name__ == "__main__":
    main()
