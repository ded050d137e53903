"""`synth-ct3d`: the `synth-ct` abdominal phantom rendered at a coarse pixel (about 6 mm, 64 x 64 pixels) and about
3 mm between slices (43-53 slices a volume, 64 x 64 x ~48 at the protocol's 3 mm), small enough to train and adapt 3D
networks on a CPU and deep enough along z for several 16-slice patches.

Subjects and tissues are `synth-ct`'s (`medtta.data.synthetic.abdomen`); the sites keep its scanner differences
(kernel, noise, HU offset, slice thickness as partial-volume averaging along z) at a coarser pixel:

| site | protocol               | pixel (mm) | kernel blur (mm) | sharpen | thick / spacing (mm) | noise (HU) | offset |
|------|------------------------|------------|------------------|---------|----------------------|------------|--------|
| A    | standard soft kernel   | 6.0        | 3.0              | 0       | 3 / 3                | 12         | 0      |
| B    | sharp kernel, low dose | 5.4        | 1.0              | 1.5     | 2.7 / 2.7            | 40         | +10    |
| C    | thick smooth slices    | 6.8        | 8.0              | 0       | 15 / 3.4             | 5          | -30    |
| D    | miscalibrated, older   | 6.0        | 4.0              | 0.5     | 10 / 3               | 20         | +50    |
"""

from __future__ import annotations

from pathlib import Path

from medtta.data.synthetic import abdomen

VERSION = 2  # 2: slices 3 mm apart (were 6 mm: 22-27 slices, about one patch deep)
SITES: dict[str, dict[str, float]] = {
    "A": dict(pixel=6.0, blur=3.0, sharpen=0.0, thickness=3.0, spacing=3.0, noise=12.0, offset=0.0),
    "B": dict(pixel=5.4, blur=1.0, sharpen=1.5, thickness=2.7, spacing=2.7, noise=40.0, offset=10.0),
    "C": dict(pixel=6.8, blur=8.0, sharpen=0.0, thickness=15.0, spacing=3.4, noise=5.0, offset=-30.0),
    "D": dict(pixel=6.0, blur=4.0, sharpen=0.5, thickness=10.0, spacing=3.0, noise=20.0, offset=50.0),
}
CASES = {"A": 24, "B": 6, "C": 6, "D": 6}
SPLITS = {"A": [14, 4]}


def generate(root: Path, seed: int = 0, cases: dict[str, int] | None = None,
             splits: dict[str, list[int]] | None = None) -> None:
    """Write the dataset into `root` (default: `CASES` subjects per site, `SPLITS` [train, val] counts)."""
    abdomen.generate(root, seed, cases or CASES, splits or SPLITS, "synth-ct3d", SITES)
