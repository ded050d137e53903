"""`synth-oct`: a procedural macular OCT phantom with retinal fluid, rendered at three vendor-like sites.

Each subject's macula is a stack of curved retinal layers between the dark vitreous and the choroid:
RNFL (bright, thicker on the nasal side), GCL, IPL, INL (dark), OPL, ONL (dark), photoreceptor inner
segments, the ellipsoid zone (bright), outer segments, RPE (brightest), then a textured choroid with
dark vessels and the sclera. A foveal pit thins the inner layers at the centre. The layer surfaces are
built upwards from Bruch's membrane, so fluid lifts everything above it:

- IRF (label 1): lens-shaped dark cysts inside the ONL near the fovea (the retina thickens over them);
- SRF (label 2): a dark lens between the photoreceptor outer segments and the RPE;
- PED (label 3): a dome-shaped elevation of the RPE over dim (serous) content above Bruch's membrane.

Each kind appears in a subject with probability `FLUID_P` (at least one per subject), sized so that it is
tens of pixels wide and several pixels high. Curvature, tilt, depth position, layer thicknesses, the pit
and the fluid vary per subject. Volumes are (X lateral, Y depth, Z B-scans); labels as in RETOUCH.

Sites differ the way OCT vendors do (values in `SITES`): the depth window (the same 128 pixels cover a
different depth, so the retina looks thinner or thicker), the lateral and axial point-spread function
(FWHM), the speckle (fully developed: a complex Gaussian field filtered by the point-spread function,
averaged over `looks` frames as in Spectralis' ART averaging), the noise floor (dB relative to the RPE)
and the compression curve from linear intensity to 8-bit grey values (power law or log with a dynamic
range):

| site | vendor-like | depth (mm) | lateral / axial FWHM (um) | looks | noise floor (dB) | compression       |
|------|-------------|-----------|---------------------------|-------|------------------|-------------------|
| A    | Spectralis  | 1.2       | 50 / 15                   | 5     | -35              | power 0.25        |
| B    | Cirrus      | 1.3       | 60 / 25                   | 2     | -28              | log, 30 dB range  |
| C    | Topcon      | 1.5       | 80 / 40                   | 3     | -24              | power 0.33        |

The lateral field is 6 mm over 128 A-scans; B-scans are `BSCAN_MM` apart.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from scipy.ndimage import gaussian_filter

from medtta.data.synthetic.phantoms import write_phantoms
from medtta.data.synthetic.shapes import smooth_noise

VERSION = 3
LABELS = {"background": 0, "IRF": 1, "SRF": 2, "PED": 3}
LATERAL_MM = 6.0
BSCAN_MM = 0.25
N_ASCANS, N_DEPTH = 128, 128
TOP_MARGIN_UM = 50.0  # least vitreous above the ILM
SUPERSAMPLE = 4  # depth sub-samples per pixel (partial volume of thin layers)
FLUID_P = {"IRF": 0.7, "SRF": 0.6, "PED": 0.5}

# layer -> (reflectivity, relative to the RPE; texture strength; attenuation per um; label), top to bottom
LAYERS: dict[str, tuple[float, float, float, int]] = {
    "vitreous": (0.0005, 0.0, 0.0, 0), "RNFL": (0.55, 0.15, 0.0015, 0), "GCL": (0.22, 0.2, 0.0012, 0),
    "IPL": (0.32, 0.2, 0.0012, 0), "INL": (0.09, 0.2, 0.001, 0), "OPL": (0.28, 0.2, 0.0012, 0),
    "ONL": (0.06, 0.2, 0.001, 0), "IS": (0.15, 0.15, 0.001, 0), "EZ": (0.7, 0.1, 0.002, 0),
    "OS": (0.2, 0.15, 0.0015, 0), "SRF": (0.012, 0.1, 0.0002, 2), "RPE": (1.0, 0.1, 0.008, 0),
    "PED": (0.04, 0.3, 0.0008, 3), "choroid": (0.45, 0.8, 0.003, 0), "sclera": (0.15, 0.3, 0.002, 0),
    "IRF": (0.012, 0.1, 0.0002, 1),
}
_NAMES = list(LAYERS)
_REFLECT = np.array([v[0] for v in LAYERS.values()])
_TEXTURE = np.array([v[1] for v in LAYERS.values()])
_ATTEN = np.array([v[2] for v in LAYERS.values()])
_LABEL = np.array([v[3] for v in LAYERS.values()], np.uint8)

SITES: dict[str, dict[str, Any]] = {
    "A": dict(depth=1.2, lateral=50.0, axial=15.0, looks=5, floor_db=-35.0, curve="power", curve_param=0.25),
    "B": dict(depth=1.3, lateral=60.0, axial=25.0, looks=2, floor_db=-28.0, curve="log", curve_param=30.0),
    "C": dict(depth=1.5, lateral=80.0, axial=40.0, looks=3, floor_db=-24.0, curve="power", curve_param=0.33),
}


def _pocket(rng: np.random.Generator, spread: float, half_width: tuple[float, float], half_z: tuple[float, float],
            height: tuple[float, float]) -> dict[str, float]:
    """A fluid pocket near the fovea: centre offset (mm), half-extents (mm) and peak height (um)."""
    return dict(cx=rng.normal(0, spread), cz=rng.normal(0, spread / 2), a=rng.uniform(*half_width),
                c=rng.uniform(*half_z), h=rng.uniform(*height))


def _subject(rng: np.random.Generator) -> dict[str, Any]:
    """Anatomy of one subject: lateral positions in mm, depths and thicknesses in um."""
    present = {kind: rng.random() < p for kind, p in FLUID_P.items()}
    if not any(present.values()):
        present[str(rng.choice(list(FLUID_P)))] = True
    scale = rng.uniform(0.85, 1.15)
    return dict(
        bm=rng.uniform(0.6, 0.7), curvature=rng.uniform(5, 20), tilt=rng.uniform(-20, 20, size=2),
        fovea=(rng.uniform(-0.3, 0.3), rng.uniform(-0.15, 0.15)), pit=rng.uniform(0.8, 0.98),
        pit_width=rng.uniform(0.35, 0.55), nasal=float(rng.choice([-1.0, 1.0])),
        thickness={name: t * scale * rng.uniform(0.9, 1.1) for name, t in
                   dict(RNFL=30, GCL=45, IPL=38, INL=35, OPL=28, ONL=70, IS=25, EZ=12, OS=30, RPE=22).items()},
        choroid=rng.uniform(180, 320),
        irf=[_pocket(rng, 0.5, (0.2, 0.5), (0.25, 0.6), (80, 250)) for _ in range(int(rng.integers(1, 5)))]
        if present["IRF"] else [],
        srf=_pocket(rng, 0.35, (0.7, 1.4), (0.5, 1.0), (100, 300)) if present["SRF"] else None,
        ped=_pocket(rng, 0.5, (0.4, 0.9), (0.4, 0.7), (100, 350)) if present["PED"] else None,
    )


def _bump(pocket: dict[str, float] | None, x: np.ndarray, z: float, power: float) -> np.ndarray:
    """Height profile (um) of a pocket along the B-scan at z: h * (1 - rho^2)^power inside, 0 outside."""
    if pocket is None:
        return np.zeros_like(x)
    rho2 = ((x - pocket["cx"]) / pocket["a"]) ** 2 + ((z - pocket["cz"]) / pocket["c"]) ** 2
    return pocket["h"] * np.clip(1 - rho2, 0, None) ** power


def _surfaces(s: dict[str, Any], x: np.ndarray, z: float, depth_um: float, shift: float = 0.0
              ) -> tuple[np.ndarray, np.ndarray]:
    """Layer boundaries (depth in um, shape (A-scans, 14), top to bottom) of the B-scan at z and the IRF
    height per A-scan (um), built upwards from Bruch's membrane (`shift` um deeper than the subject's)."""
    r2 = (x - s["fovea"][0]) ** 2 + (z - s["fovea"][1]) ** 2
    pit = np.exp(-r2 / (2 * s["pit_width"] ** 2))
    bm = s["bm"] * depth_um + shift - s["curvature"] * (x**2 + z**2) + s["tilt"][0] * x + s["tilt"][1] * z
    t = s["thickness"]
    inner = 1 - s["pit"] * pit
    irf = np.max([_bump(p, x, z, 0.5) for p in s["irf"]], axis=0) if s["irf"] else np.zeros_like(x)
    below = [  # thickness of each layer, from the bottom up
        ("PED", _bump(s["ped"], x, z, 0.5)), ("RPE", t["RPE"]), ("SRF", _bump(s["srf"], x, z, 0.8)),
        ("OS", t["OS"]), ("EZ", t["EZ"]), ("IS", t["IS"]), ("ONL", t["ONL"] * (1 + 0.5 * pit) + irf),
        ("OPL", t["OPL"] * inner), ("INL", t["INL"] * inner), ("IPL", t["IPL"] * inner), ("GCL", t["GCL"] * inner),
        ("RNFL", t["RNFL"] * (1 + np.clip(s["nasal"] * x, 0, None) * 0.5) * (1 - 0.7 * s["pit"] * pit)),
    ]
    tops = [bm]
    for _, thickness in below:
        tops.append(tops[-1] - thickness)
    # tops[-1] is the ILM; the boundaries top to bottom, then the choroid-sclera boundary
    bounds = [*tops[::-1], bm + s["choroid"]]
    return np.stack([np.broadcast_to(b, x.shape) for b in bounds], axis=1), irf


def _bscan(s: dict[str, Any], x: np.ndarray, z: float, shift: float, site: dict[str, Any],
           rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Linear backscatter intensity (attenuated, before speckle) and labels of one B-scan, (A-scans, depth)."""
    depth_um = site["depth"] * 1000
    step = depth_um / (N_DEPTH * SUPERSAMPLE)
    y = (np.arange(N_DEPTH * SUPERSAMPLE) + 0.5) * step
    bounds, irf = _surfaces(s, x, z, depth_um, shift)
    layer = (y[None, :, None] >= bounds[:, None, :]).sum(-1)  # 0 vitreous ... 14 sclera
    onl = _NAMES.index("ONL")
    mid = (bounds[:, onl - 1] + bounds[:, onl]) / 2  # the ONL lies between boundaries onl-1 and onl
    cyst = (layer == onl) & (np.abs(y[None, :] - mid[:, None]) <= irf[:, None] / 2)
    layer[cyst] = _NAMES.index("IRF")
    fine = layer.shape
    texture = smooth_noise(rng, fine, (1.0, 2.0 * SUPERSAMPLE))
    vessels = smooth_noise(rng, fine, (2.5, 6.0 * SUPERSAMPLE))
    choroid = layer == _NAMES.index("choroid")
    reflect = _REFLECT[layer] * np.exp(_TEXTURE[layer] * np.where(choroid, vessels, texture) * 0.5)
    attenuation = np.exp(-2 * np.cumsum(_ATTEN[layer], axis=1) * step)
    signal = (reflect * attenuation).reshape(len(x), N_DEPTH, SUPERSAMPLE).mean(-1)
    label = _LABEL[layer[:, SUPERSAMPLE // 2 :: SUPERSAMPLE]]
    return signal, label


def _acquire(signal: np.ndarray, site: dict[str, Any], rng: np.random.Generator) -> np.ndarray:
    """Speckle, point-spread function and noise floor: the detected intensity, averaged over `looks`."""
    sigma = (site["lateral"] / 2.355 / (LATERAL_MM * 1000 / N_ASCANS),
             site["axial"] / 2.355 / (site["depth"] * 1000 / N_DEPTH))
    impulse = np.zeros((15, 15))
    impulse[7, 7] = 1.0
    gain = np.sqrt((gaussian_filter(impulse, sigma) ** 2).sum())  # keeps the mean intensity of the signal
    floor = 10 ** (site["floor_db"] / 10)
    amplitude = np.sqrt(signal / 2)
    total = np.zeros_like(signal)
    for _ in range(int(site["looks"])):
        field = [gaussian_filter(amplitude * rng.normal(size=signal.shape), sigma) / gain
                 + np.sqrt(floor / 2) * rng.normal(size=signal.shape) for _ in range(2)]
        total += field[0] ** 2 + field[1] ** 2
    return total / site["looks"]


def _compress(intensity: np.ndarray, site: dict[str, Any]) -> np.ndarray:
    """Vendor display curve: linear intensity (RPE about 1) to 8-bit grey values."""
    if site["curve"] == "power":
        grey = intensity ** site["curve_param"]
    else:
        grey = (10 * np.log10(np.maximum(intensity, 1e-12)) + site["curve_param"]) / site["curve_param"]
    return np.round(255 * np.clip(grey, 0, 1))


def render(anatomy: dict[str, Any], site: dict[str, Any], rng: np.random.Generator, n_bscans: int = 8
           ) -> tuple[np.ndarray, np.ndarray]:
    """Render one subject at one site: (8-bit image, label), shaped (A-scans, depth, B-scans)."""
    x = (np.arange(N_ASCANS) - (N_ASCANS - 1) / 2) * (LATERAL_MM / N_ASCANS)
    image = np.zeros((N_ASCANS, N_DEPTH, n_bscans), np.float32)
    label = np.zeros((N_ASCANS, N_DEPTH, n_bscans), np.uint8)
    zs = (np.arange(n_bscans) - (n_bscans - 1) / 2) * BSCAN_MM
    # like the operator's depth adjustment: move the retina down if fluid or curvature push the ILM out of view
    ilm = min(_surfaces(anatomy, x, z, site["depth"] * 1000)[0][:, 0].min() for z in zs)
    shift = max(0.0, TOP_MARGIN_UM - ilm)
    for k, z in enumerate(zs):
        signal, label[..., k] = _bscan(anatomy, x, z, shift, site, rng)
        image[..., k] = _compress(_acquire(signal, site, rng), site)
    return image, label


CASES = {"A": 36, "B": 10, "C": 10}
SPLITS = {"A": [24, 4]}


def render_case(site: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """One new subject at `site`: image, label and spacing."""
    image, label = render(_subject(rng), SITES[site], rng)
    return image, label, (LATERAL_MM / N_ASCANS, SITES[site]["depth"] / N_DEPTH, BSCAN_MM)


def generate(root: Path, seed: int = 0, cases: dict[str, int] | None = None,
             splits: dict[str, list[int]] | None = None) -> None:
    """Write the dataset into `root` (default: `CASES` subjects per site, `SPLITS` [train, val] counts)."""
    write_phantoms(root, "synth-oct", LABELS, "OCT", seed, cases or CASES, splits or SPLITS, render_case)
