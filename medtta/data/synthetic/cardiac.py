"""`synth-mri`: a procedural cardiac short-axis cine phantom rendered at four vendor-like sites.

Each subject has a body outline with subcutaneous fat, lungs, liver, a left-ventricular
(LV) blood pool, its myocardium (MYO) and a crescent right ventricle (RV); size, position,
rotation, wall thickness and the number of slices vary per subject, and the heart shrinks
from base to apex (the RV vanishes first). Labels: LV 1, MYO 2, RV 3 (as in M&Ms).

Sites differ the way MR vendors and protocols do (values in `SITES`):

| site | pixel (mm) | blood / myo / fat contrast | bias field | Rician noise | blur (mm) | gamma | scale |
|------|-----------|-----------------------------|-----------|--------------|-----------|-------|-------|
| A    | 2.0       | 1.00 / 0.30 / 0.85          | 0.15      | 0.03         | 0         | 1.0   | 800   |
| B    | 1.8       | 0.80 / 0.45 / 1.00          | 0.40      | 0.07         | 1.0       | 1.0   | 2500  |
| C    | 2.6       | 1.00 / 0.55 / 0.60          | 0.20      | 0.05         | 2.8       | 1.0   | 150   |
| D    | 2.0       | 0.70 / 0.25 / 1.00          | 0.35      | 0.10         | 0.5       | 0.6   | 1200  |

Noise is relative to a blood intensity of 1; the scale multiplies the stored intensities.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter

from medtta.data.synthetic.phantoms import write_phantoms

VERSION = 1
LABELS = {"background": 0, "LV": 1, "MYO": 2, "RV": 3}
FOV_MM = 256.0
SLICE_MM = 8.0

SITES: dict[str, dict[str, float]] = {
    "A": dict(pixel=2.0, blood=1.00, myo=0.30, fat=0.85, muscle=0.35, liver=0.45, lung=0.05, bias=0.15,
              noise=0.03, blur=0.0, gamma=1.0, scale=800.0),
    "B": dict(pixel=1.8, blood=0.80, myo=0.45, fat=1.00, muscle=0.50, liver=0.55, lung=0.10, bias=0.40,
              noise=0.07, blur=1.0, gamma=1.0, scale=2500.0),
    "C": dict(pixel=2.6, blood=1.00, myo=0.55, fat=0.60, muscle=0.45, liver=0.70, lung=0.12, bias=0.20,
              noise=0.05, blur=2.8, gamma=1.0, scale=150.0),
    "D": dict(pixel=2.0, blood=0.70, myo=0.25, fat=1.00, muscle=0.40, liver=0.50, lung=0.08, bias=0.35,
              noise=0.10, blur=0.5, gamma=0.6, scale=1200.0),
}


def _subject(rng: np.random.Generator) -> dict[str, float]:
    """Anatomy of one subject, in mm and radians."""
    return dict(
        cx=rng.uniform(-12, 12), cy=rng.uniform(-12, 12), theta=rng.uniform(-0.5, 0.5),
        r_lv=rng.uniform(20, 28), wall=rng.uniform(8, 12), ecc=rng.uniform(0.85, 1.0),
        rv_a=rng.uniform(18, 26), rv_b=rng.uniform(34, 46), n_slices=int(rng.integers(8, 13)),
        body_a=rng.uniform(105, 122), body_b=rng.uniform(78, 92), fat=rng.uniform(6, 12),
        liver=rng.uniform(40, 60),
    )


def _ellipse(x: np.ndarray, y: np.ndarray, cx: float, cy: float, a: float, b: float) -> np.ndarray:
    return ((x - cx) / a) ** 2 + ((y - cy) / b) ** 2 <= 1.0


def _slice(s: dict[str, float], z: float, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Tissue map (0 air, 1 muscle, 2 fat, 3 lung, 4 liver, 5 blood, 6 myo) and labels of one slice;
    z runs from 0 (base) to 1 (apex)."""
    tissue = np.zeros(x.shape, np.int8)
    tissue[_ellipse(x, y, 0, 0, s["body_a"], s["body_b"])] = 2
    tissue[_ellipse(x, y, 0, 0, s["body_a"] - s["fat"], s["body_b"] - s["fat"])] = 1
    for side in (-1, 1):
        tissue[_ellipse(x, y, side * 55, -10, 38, 55)] = 3
    tissue[_ellipse(x, y, -60, 50, s["liver"], 30)] = 4
    # heart frame: rotated about the LV centre
    c, si = np.cos(s["theta"]), np.sin(s["theta"])
    u = c * (x - s["cx"]) + si * (y - s["cy"])
    v = -si * (x - s["cx"]) + c * (y - s["cy"])
    shrink = 1.0 - 0.55 * z**1.5
    r_endo, r_epi = s["r_lv"] * shrink, (s["r_lv"] + s["wall"]) * shrink
    label = np.zeros(x.shape, np.uint8)
    rv_shrink = 1.0 - 1.1 * z
    if rv_shrink > 0.25:
        rv = _ellipse(u, v, -(r_epi + 0.3 * s["rv_a"] * rv_shrink), 0, s["rv_a"] * rv_shrink, s["rv_b"] * rv_shrink)
        rv &= ~_ellipse(u, v, 0, 0, r_epi + 2.5, (r_epi + 2.5) / s["ecc"])
        label[rv] = 3
    label[_ellipse(u, v, 0, 0, r_epi, r_epi / s["ecc"])] = 2
    label[_ellipse(u, v, 0, 0, r_endo, r_endo / s["ecc"])] = 1
    tissue[label > 0] = 1  # pericardial muscle under the RV wall and epicardium
    tissue[(label == 1) | (label == 3)] = 5
    tissue[label == 2] = 6
    return tissue, label


def render(anatomy: dict[str, float], site: dict[str, float],
           rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Render one subject at one site: (image, label), shaped (X, Y, slices)."""
    n = int(round(FOV_MM / site["pixel"]))
    coords = (np.arange(n) - (n - 1) / 2) * site["pixel"]
    x, y = np.meshgrid(coords, coords, indexing="ij")
    intensity = np.array([0.0, site["muscle"], site["fat"], site["lung"], site["liver"], site["blood"], site["myo"]])
    n_slices = anatomy["n_slices"]
    image = np.zeros((n, n, n_slices), np.float32)
    label = np.zeros((n, n, n_slices), np.uint8)
    xn, yn = x / (FOV_MM / 2), y / (FOV_MM / 2)
    coeffs = rng.normal(size=5)
    bias = 1.0 + site["bias"] * np.tanh(
        coeffs[0] * xn + coeffs[1] * yn + 0.5 * (coeffs[2] * xn * yn + coeffs[3] * xn**2 + coeffs[4] * yn**2))
    for k in range(n_slices):
        tissue, label[..., k] = _slice(anatomy, k / max(n_slices - 1, 1), x, y)
        texture = 1.0 + 0.06 * gaussian_filter(rng.normal(size=x.shape), 3.0 / site["pixel"]) * 3
        clean = intensity[tissue] * texture
        if site["blur"] > 0:
            clean = gaussian_filter(clean, site["blur"] / site["pixel"])
        clean = np.clip(clean, 0, None) ** site["gamma"] * bias
        noisy = np.hypot(clean + site["noise"] * rng.normal(size=x.shape), site["noise"] * rng.normal(size=x.shape))
        image[..., k] = site["scale"] * noisy
    return image, label


CASES = {"A": 48, "B": 12, "C": 12, "D": 12}
SPLITS = {"A": [32, 8]}


def render_case(site: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """One new subject at `site`: image, label and spacing."""
    image, label = render(_subject(rng), SITES[site], rng)
    return image, label, (SITES[site]["pixel"], SITES[site]["pixel"], SLICE_MM)


def generate(root: Path, seed: int = 0, cases: dict[str, int] | None = None,
             splits: dict[str, list[int]] | None = None) -> None:
    """Write the dataset into `root` (default: `CASES` subjects per site, `SPLITS` [train, val] counts)."""
    write_phantoms(root, "synth-mri", LABELS, "cine-MRI", seed, cases or CASES, splits or SPLITS, render_case)
