"""`synth-ct`: a procedural abdominal CT phantom (axial slices, portal-venous phase) at four scanner-like sites.

Each subject has a body outline with subcutaneous fat, an abdominal-wall muscle ring, visceral fat, the
spine (cortical bone, marrow, spinal canal), paraspinal and psoas muscles, ribs, lung bases, aorta and
IVC, stomach (fluid with an air cap), bowel loops, pancreas, gallbladder, the liver (with bright portal
vessels), the spleen and both kidneys (cortex and medulla). Body size, organ size, position, rotation,
outline (random harmonics) and craniocaudal extent vary per subject; the volume runs from below the
kidneys (first slice) to the liver dome (last slice). Labels: liver 1, spleen 2, kidney 3 (both kidneys).

Tissue values (HU, before the site's offset): air -1000, lung -850, fat -100, fluid 10, muscle 45,
pancreas 40, spleen 50, liver 60, liver vessels 150, kidney cortex 160, medulla 120, aorta 180, IVC 130,
marrow 250, cortical bone 700, oral contrast in bowel 250.

Sites differ the way CT scanners and reconstruction protocols do (values in `SITES`): in-plane pixel
(fixed 384 mm field of view), reconstruction kernel (Gaussian blur of the point-spread function, then an
edge-enhancing unsharp mask of the given strength for sharp kernels), slice thickness (the slice is the
mean of sub-slices over its thickness, i.e. partial-volume averaging along z) and spacing, noise (standard
deviation in HU, with the noise texture shaped by the same kernel) and an HU calibration offset:

| site | protocol               | pixel (mm) | kernel blur (mm) | sharpen | thick / spacing (mm) | noise (HU) | offset |
|------|------------------------|------------|------------------|---------|----------------------|------------|--------|
| A    | standard soft kernel   | 3.0        | 1.0              | 0       | 2.5 / 10             | 12         | 0      |
| B    | sharp kernel, low dose | 2.7        | 0.5              | 1.5     | 1.25 / 10            | 40         | +10    |
| C    | thick smooth slices    | 3.4        | 3.0              | 0       | 10 / 12.5            | 5          | -30    |
| D    | miscalibrated, older   | 3.0        | 1.5              | 0.5     | 5 / 10               | 20         | +50    |

Volumes are (X, Y, Z) with X towards the patient's right, Y anterior and Z superior (RAS, as the NIfTI
affine says); values are rounded to whole HU and clipped to [-1024, 3071].
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from scipy.ndimage import gaussian_filter

from medtta.data.synthetic.phantoms import write_phantoms
from medtta.data.synthetic.shapes import ellipse, random_wobble, smooth_noise

VERSION = 1
LABELS = {"background": 0, "liver": 1, "spleen": 2, "kidney": 3}
FOV_MM = 384.0
SUB_MM = 2.5  # z step of the sub-slices averaged into one reconstructed slice

# tissue index -> (HU, texture standard deviation in HU, label)
TISSUES: dict[str, tuple[float, float, int]] = {
    "air": (-1000.0, 0.0, 0), "lung": (-850.0, 25.0, 0), "fat": (-100.0, 8.0, 0), "fluid": (10.0, 3.0, 0),
    "muscle": (45.0, 6.0, 0), "pancreas": (40.0, 10.0, 0), "spleen": (50.0, 5.0, 2), "liver": (60.0, 6.0, 1),
    "liver_vessel": (150.0, 8.0, 1), "cortex": (160.0, 8.0, 3), "medulla": (120.0, 8.0, 3),
    "aorta": (180.0, 5.0, 0), "ivc": (130.0, 5.0, 0), "marrow": (250.0, 40.0, 0), "bone": (700.0, 60.0, 0),
    "contrast": (250.0, 15.0, 0), "csf": (15.0, 3.0, 0),
}
_INDEX = {name: i for i, name in enumerate(TISSUES)}
_HU = np.array([v[0] for v in TISSUES.values()], np.float32)
_TEXTURE = np.array([v[1] for v in TISSUES.values()], np.float32)
_LABEL = np.array([v[2] for v in TISSUES.values()], np.uint8)

SITES: dict[str, dict[str, float]] = {
    "A": dict(pixel=3.0, blur=1.0, sharpen=0.0, thickness=2.5, spacing=10.0, noise=12.0, offset=0.0),
    "B": dict(pixel=2.7, blur=0.5, sharpen=1.5, thickness=1.25, spacing=10.0, noise=40.0, offset=10.0),
    "C": dict(pixel=3.4, blur=3.0, sharpen=0.0, thickness=10.0, spacing=12.5, noise=5.0, offset=-30.0),
    "D": dict(pixel=3.0, blur=1.5, sharpen=0.5, thickness=5.0, spacing=10.0, noise=20.0, offset=50.0),
}


def _organ(rng: np.random.Generator, cx: float, cy: float, a: float, b: float, theta: float, z0: float,
           z1: float, jitter: float = 8.0, amp: float = 0.06) -> dict[str, Any]:
    """An ellipsoid-like organ: outline parameters at its widest slice and its z range (fractions of the
    subject's extent), all jittered."""
    size = rng.uniform(0.85, 1.15)
    return dict(cx=cx + rng.uniform(-jitter, jitter), cy=cy + rng.uniform(-jitter, jitter), a=a * size,
                b=b * size * rng.uniform(0.9, 1.1), theta=theta + rng.uniform(-0.2, 0.2),
                z0=z0 + rng.uniform(-0.05, 0.05), z1=z1 + rng.uniform(-0.05, 0.05), wobble=random_wobble(rng, amp))


def _subject(rng: np.random.Generator) -> dict[str, Any]:
    """Anatomy of one subject, in mm (z ranges as fractions of the craniocaudal `extent`)."""
    body_a, body_b = rng.uniform(140, 172), rng.uniform(100, 128)
    fat = rng.uniform(10, 28)
    spine_y = -body_b + fat + rng.uniform(32, 40)
    return dict(
        extent=rng.uniform(130, 160), body_a=body_a, body_b=body_b, body_wobble=random_wobble(rng, 0.03),
        fat=fat, wall=rng.uniform(7, 12), spine_y=spine_y, vb_r=rng.uniform(15, 20),
        liver=_organ(rng, rng.uniform(45, 70), rng.uniform(0, 25), 80, 78, rng.uniform(-0.3, 0.3), 0.25, 1.05),
        left_lobe=_organ(rng, rng.uniform(-15, 10), rng.uniform(30, 50), 50, 32, 0.0, 0.6, 1.0),
        spleen=_organ(rng, -body_a + fat + rng.uniform(40, 55), spine_y + rng.uniform(15, 35), 30, 60,
                      rng.uniform(0.5, 1.0), 0.4, 0.95),
        kidneys=[_organ(rng, side * rng.uniform(55, 72), spine_y + rng.uniform(12, 25), 24, 31,
                        side * rng.uniform(0.3, 0.7), z0, z0 + rng.uniform(0.5, 0.62), jitter=5, amp=0.04)
                 for side, z0 in ((1, rng.uniform(-0.05, 0.05)), (-1, rng.uniform(0.05, 0.15)))],
        stomach=_organ(rng, rng.uniform(-60, -30), rng.uniform(20, 45), 40, 30, rng.uniform(-0.5, 0.5), 0.55, 0.97),
        pancreas=_organ(rng, rng.uniform(-30, -10), spine_y + rng.uniform(45, 60), 50, 12, rng.uniform(-0.4, 0.1),
                        0.42, 0.62, jitter=5, amp=0.15),
        gallbladder=_organ(rng, rng.uniform(25, 45), rng.uniform(40, 60), 14, 22, rng.uniform(-0.5, 0.5), 0.3, 0.55,
                           jitter=5),
        vessels=[(rng.uniform(-0.6, 0.6), rng.uniform(-0.6, 0.6), rng.uniform(3, 6), rng.uniform(-0.3, 0.3))
                 for _ in range(int(rng.integers(3, 6)))],
        bowel=[dict(x=rng.uniform(-80, 80), y=rng.uniform(-10, 70), r=rng.uniform(8, 18),
                    z0=rng.uniform(-0.1, 0.4), z1=rng.uniform(0.25, 0.6), content=int(rng.integers(0, 3)))
               for _ in range(int(rng.integers(5, 10)))],
        rib_phase=rng.uniform(0, 2 * np.pi, size=8),
        air_cap=rng.uniform(0.2, 0.5),
        aorta_x=rng.uniform(-20, -5),
    )


def _profile(organ: dict[str, Any], t: float) -> float:
    """Cross-section scale of an organ at height fraction t: an ellipsoid's, zero outside its z range."""
    u = (t - organ["z0"]) / max(organ["z1"] - organ["z0"], 1e-6)
    return float(np.sqrt(max(0.0, 1.0 - (2 * u - 1) ** 2)))


class _Canvas:
    """A tissue map on a square grid, painted shape by shape inside each shape's bounding box (fast)."""

    def __init__(self, coords: np.ndarray, base: np.ndarray) -> None:
        self.coords = coords
        self.x, self.y = np.meshgrid(coords, coords, indexing="ij")
        self.tissue = base.copy()

    def region(self, cx: float, cy: float, a: float, b: float, theta: float = 0.0,
               wobble: tuple = ()) -> tuple[tuple[slice, slice], np.ndarray]:
        """Bounding box of an ellipse (see `shapes.ellipse`) and its mask inside that box."""
        reach = max(a, b) * (1 + sum(amp for amp, _ in wobble))
        i0, i1 = np.searchsorted(self.coords, [cx - reach, cx + reach])
        j0, j1 = np.searchsorted(self.coords, [cy - reach, cy + reach])
        box = (slice(i0, i1), slice(j0, j1))
        return box, ellipse(self.x[box], self.y[box], cx, cy, a, b, theta, wobble)

    def mask(self, *args: Any, **kwargs: Any) -> np.ndarray:
        """Full-size mask of an ellipse."""
        box, inside = self.region(*args, **kwargs)
        out = np.zeros(self.x.shape, bool)
        out[box] = inside
        return out

    def paint(self, tissue: str, *args: Any, within: np.ndarray | None = None, **kwargs: Any) -> None:
        """Set the tissue inside an ellipse, optionally only where the full-size `within` mask holds."""
        box, inside = self.region(*args, **kwargs)
        if within is not None:
            inside &= within[box]
        self.tissue[box][inside] = _INDEX[tissue]

    def organ(self, organ: dict[str, Any], t: float, floor: float = 0.25, shrink: float = 0.0) -> np.ndarray:
        """Full-size mask of an organ's cross-section at height fraction t (`shrink` mm off its half-axes)."""
        scale = _profile(organ, t)
        if scale < floor:
            return np.zeros(self.x.shape, bool)
        return self.mask(organ["cx"], organ["cy"], organ["a"] * scale - shrink, organ["b"] * scale - shrink,
                         organ["theta"], organ["wobble"])


def _body(s: dict[str, Any], coords: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What does not change along z: the body (fat, wall muscle, visceral fat) tissue map, the body mask and
    the abdominal cavity mask."""
    canvas = _Canvas(coords, np.full((len(coords),) * 2, _INDEX["air"], np.int8))
    a, b, w = s["body_a"], s["body_b"], s["body_wobble"]
    body = canvas.mask(0, 0, a, b, 0.0, w)
    cavity = canvas.mask(0, 0, a - s["fat"] - s["wall"], b - s["fat"] - s["wall"], 0.0, w)
    canvas.tissue[body] = _INDEX["fat"]
    canvas.paint("muscle", 0, 0, a - s["fat"], b - s["fat"], 0.0, w)
    canvas.tissue[cavity] = _INDEX["fat"]
    for side in (-1, 1):
        canvas.paint("muscle", side * 32, s["spine_y"] - 38, 26, 22, within=body)
    return canvas.tissue, body, cavity


def _slice(s: dict[str, Any], z: float, coords: np.ndarray, body: tuple[np.ndarray, np.ndarray, np.ndarray]
           ) -> np.ndarray:
    """Tissue map (indices into `TISSUES`) of the axial slice at height z (mm above the volume's bottom)."""
    t = z / s["extent"]
    base, inside, cavity = body
    c = _Canvas(coords, base)
    sy, vb = s["spine_y"], s["vb_r"]
    if t > 0.8:  # lung bases in the posterior recesses near the dome
        grow = (t - 0.8) / 0.2
        for side in (-1, 1):
            c.paint("lung", side * 70, sy + 8, 42 * grow + 8, 32 * grow + 6, within=cavity)
    for loop in s["bowel"]:
        if loop["z0"] <= t <= loop["z1"]:
            c.paint("muscle", loop["x"], loop["y"], loop["r"], loop["r"], within=cavity)
            content = ("air", "fluid", "contrast")[loop["content"]]
            c.paint(content, loop["x"], loop["y"], loop["r"] - 3, loop["r"] - 3, within=cavity)
    st = s["stomach"]
    stomach = c.organ(st, t) & cavity
    if stomach.any():
        c.tissue[stomach] = _INDEX["muscle"]
        lumen = c.organ(st, t, shrink=4) & cavity
        c.tissue[lumen] = _INDEX["fluid"]
        level = st["cy"] + st["b"] * _profile(st, t) * (1 - 2 * s["air_cap"])
        c.tissue[lumen & (c.y > level)] = _INDEX["air"]  # supine: the air floats anteriorly
    c.tissue[c.organ(s["pancreas"], t) & cavity] = _INDEX["pancreas"]
    lv = s["liver"]
    liver = (c.organ(lv, t, floor=0.2) | c.organ(s["left_lobe"], t)) & cavity
    c.tissue[liver] = _INDEX["liver"]
    scale = _profile(lv, t)
    for vx, vy, r, drift in s["vessels"]:
        c.paint("liver_vessel", lv["cx"] + (vx + drift * t) * lv["a"] * scale, lv["cy"] + vy * lv["b"] * scale, r, r,
                within=liver)
    c.tissue[c.organ(s["gallbladder"], t) & cavity] = _INDEX["fluid"]
    c.tissue[c.organ(s["spleen"], t) & cavity] = _INDEX["spleen"]
    for kidney in s["kidneys"]:
        cortex = c.organ(kidney, t) & cavity
        if cortex.any():
            c.tissue[cortex] = _INDEX["cortex"]
            sc = _profile(kidney, t) * 0.6
            c.paint("medulla", kidney["cx"], kidney["cy"], kidney["a"] * sc, kidney["b"] * sc, kidney["theta"],
                    within=cortex)
    # great vessels, retroperitoneal muscles and the spine sit on top of the visceral organs
    c.paint("aorta", s["aorta_x"], sy + vb + 14, 11, 11)
    if t < 0.75:
        c.paint("ivc", 22, sy + vb + 18, 13, 9)
    if t < 0.45:
        psoas = 6 + 16 * (0.45 - t) / 0.45
        for side in (-1, 1):
            c.paint("muscle", side * (vb + psoas * 0.8), sy + 4, psoas, psoas * 0.8)
    c.paint("bone", 0, sy, vb, vb * 0.9)
    c.paint("marrow", 0, sy, vb - 3, vb * 0.9 - 3)
    c.paint("bone", 0, sy - vb - 9, 9, 8)
    c.paint("csf", 0, sy - vb - 9, 6, 5)
    c.paint("bone", 0, sy - vb - 30, 5, 12)
    if t > 0.35:  # ribs: cross-sections in the wall, present where the oblique rib crosses the slice
        for j, phase in enumerate(s["rib_phase"]):
            if np.sin(2 * np.pi * z / 28.0 + phase) > 0.2:
                angle = (-0.9 + 2.2 * (j % 4) / 3) if j < 4 else np.pi - (-0.9 + 2.2 * (j % 4) / 3)
                rx = (s["body_a"] - s["fat"] - s["wall"] / 2) * np.cos(angle)
                ry = (s["body_b"] - s["fat"] - s["wall"] / 2) * np.sin(angle)
                c.paint("bone", rx, ry, 6, 4, angle, within=inside)
    return c.tissue


def _kernel(image: np.ndarray, site: dict[str, float]) -> np.ndarray:
    """Reconstruction kernel: Gaussian point-spread blur, then an unsharp mask for edge-enhancing kernels."""
    out = gaussian_filter(image, site["blur"] / site["pixel"]) if site["blur"] > 0 else image
    if site["sharpen"] > 0:
        out = out + site["sharpen"] * (out - gaussian_filter(out, 2.0 / site["pixel"]))
    return out


def render(anatomy: dict[str, Any], site: dict[str, float], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Render one subject at one site: (image in HU, label), shaped (X, Y, slices), slice 0 the lowest."""
    n = int(round(FOV_MM / site["pixel"]))
    coords = (np.arange(n) - (n - 1) / 2) * site["pixel"]
    body = _body(anatomy, coords)
    spacing, thickness = site["spacing"], site["thickness"]
    n_slices = int(anatomy["extent"] // spacing)
    first = (anatomy["extent"] - (n_slices - 1) * spacing) / 2
    n_sub = 2 * int(round(thickness / (2 * SUB_MM))) + 1  # odd: the middle sub-slice is the slice centre
    offsets = thickness * ((np.arange(n_sub) + 0.5) / n_sub - 0.5)
    image = np.zeros((n, n, n_slices), np.float32)
    label = np.zeros((n, n, n_slices), np.uint8)
    for k in range(n_slices):
        z = first + k * spacing
        texture = smooth_noise(rng, (n, n), 2.0 / site["pixel"])
        hu = np.zeros((n, n), np.float32)
        for j, dz in enumerate(offsets):
            tissue = _slice(anatomy, z + dz, coords, body)
            hu += _HU[tissue] + _TEXTURE[tissue] * texture
            if j == n_sub // 2:
                label[..., k] = _LABEL[tissue]
        hu = _kernel(hu / n_sub, site)
        noise = _kernel(rng.normal(size=(n, n)), {**site, "blur": max(site["blur"], 0.5 * site["pixel"])})
        hu = hu + site["noise"] * noise / noise.std() + site["offset"]
        image[..., k] = np.clip(np.round(hu), -1024, 3071)
    return image, label


CASES = {"A": 36, "B": 10, "C": 10, "D": 10}
SPLITS = {"A": [24, 4]}


def render_case(site: str, rng: np.random.Generator, sites: dict[str, dict[str, float]] = SITES
                ) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """One new subject at `site` (of `sites`): image, label and spacing."""
    params = sites[site]
    image, label = render(_subject(rng), params, rng)
    return image, label, (params["pixel"], params["pixel"], params["spacing"])


def generate(root: Path, seed: int = 0, cases: dict[str, int] | None = None,
             splits: dict[str, list[int]] | None = None, name: str = "synth-ct",
             sites: dict[str, dict[str, float]] = SITES) -> None:
    """Write the dataset into `root` (default: `CASES` subjects per site, `SPLITS` [train, val] counts)."""
    write_phantoms(root, name, LABELS, "CT", seed, cases or CASES, splits or SPLITS,
                   partial(render_case, sites=sites))
