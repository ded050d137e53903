"""Small geometric and texture helpers shared by the synthetic phantoms."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.ndimage import gaussian_filter


def ellipse(x: np.ndarray, y: np.ndarray, cx: float, cy: float, a: float, b: float, theta: float = 0.0,
            wobble: Sequence[tuple[float, float]] = ()) -> np.ndarray:
    """Mask of an ellipse centred at (cx, cy) with half-axes (a, b), rotated by `theta` radians.

    `wobble` perturbs the outline: the k-th (amplitude, phase) pair, k = 2, 3, ..., scales the radius by
    `1 + amplitude * cos(k * angle + phase)`, which gives organ-like irregular blobs.
    """
    if a <= 0 or b <= 0:
        return np.zeros(np.broadcast(x, y).shape, bool)
    c, s = np.cos(theta), np.sin(theta)
    u = (c * (x - cx) + s * (y - cy)) / a
    v = (-s * (x - cx) + c * (y - cy)) / b
    radius = 1.0
    if len(wobble):
        angle = np.arctan2(v, u)
        radius = 1.0 + sum(amp * np.cos((k + 2) * angle + phase) for k, (amp, phase) in enumerate(wobble))
    return u**2 + v**2 <= radius**2


def smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float | Sequence[float]) -> np.ndarray:
    """Gaussian-smoothed white noise rescaled to unit standard deviation (a texture or a random field)."""
    field = gaussian_filter(rng.normal(size=shape), sigma)
    return field / (field.std() + 1e-12)


def random_wobble(rng: np.random.Generator, amplitude: float, harmonics: int = 3) -> tuple[tuple[float, float], ...]:
    """Random outline perturbation for `ellipse`: `harmonics` (amplitude, phase) pairs, amplitudes up to
    `amplitude`."""
    return tuple((float(rng.uniform(0, amplitude)), float(rng.uniform(0, 2 * np.pi))) for _ in range(harmonics))
