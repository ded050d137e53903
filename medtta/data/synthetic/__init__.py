"""Embedded synthetic cross-site datasets: written in the dataset layout on first use, cached afterwards."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import ModuleType

from medtta.data.layout import append_manifest, manifest_row, read_sites_csv
from medtta.data.synthetic import abdomen, abdomen3d, cardiac, retina
from medtta.errors import ProtocolError

GENERATORS: dict[str, ModuleType] = {"cardiac-cine": cardiac, "abdomen-ct": abdomen, "abdomen-ct3d": abdomen3d,
                                     "retina-oct": retina}
_STAMP = "generator.json"


def ensure_synthetic(generator: str, root: Path, params: dict) -> Path:
    """Generate the dataset into `root` unless a finished copy made with the same parameters is there."""
    if generator not in GENERATORS:
        raise ProtocolError(f"unknown synthetic generator '{generator}' (available: {', '.join(GENERATORS)})")
    module = GENERATORS[generator]
    stamp = {"generator": generator, "version": module.VERSION, **params}
    stamp_file = root / _STAMP
    if stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp:
        return root
    if root.exists():
        shutil.rmtree(root)
    tmp = root.with_name(root.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    module.generate(tmp, **params)
    for row in read_sites_csv(tmp / "sites.csv"):
        append_manifest(tmp, manifest_row(tmp, row["case_id"], row["site"], row.get("split")))
    (tmp / _STAMP).write_text(json.dumps(stamp, indent=2))
    tmp.rename(root)
    return root
