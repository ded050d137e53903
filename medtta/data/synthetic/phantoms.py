"""Writing a phantom dataset: subjects per site, rendered, split and recorded the same way for every generator."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from medtta.data.layout import write_case, write_metadata

#: (site, rng) -> (image, label, spacing) of one new subject at that site
RenderCase = Callable[[str, np.random.Generator], tuple[np.ndarray, np.ndarray, tuple[float, ...]]]


def write_phantoms(root: Path, name: str, labels: dict[str, int], channel: str, seed: int, cases: dict[str, int],
                   splits: dict[str, list[int]], render_case: RenderCase) -> None:
    """Render `cases[site]` subjects per site (case ids `<site>000`, ...) with one generator per (seed, site);
    per site the first `splits[site] = [train, val]` cases are train and val, the rest test."""
    rows = []
    for site_index, (site, count) in enumerate(cases.items()):
        rng = np.random.default_rng([seed, site_index])
        n_train, n_val = splits.get(site, [0, 0])
        for i in range(count):
            case_id = f"{site}{i:03d}"
            image, label, spacing = render_case(site, rng)
            write_case(root, case_id, image, label, spacing)
            rows.append((case_id, site, "train" if i < n_train else "val" if i < n_train + n_val else "test"))
    write_metadata(root, name, labels, channel, rows)
