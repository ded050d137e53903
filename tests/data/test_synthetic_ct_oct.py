"""synth-ct and synth-oct: deterministic per seed, labels as the protocols say, sites that differ as documented."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy.ndimage import binary_erosion

from medtta.data.layout import load_volume, read_dataset
from medtta.data.synthetic import GENERATORS, abdomen, ensure_synthetic, retina
from medtta.protocol import resolve_protocol

CT = {"seed": 5, "cases": {"A": 2, "B": 2, "C": 2, "D": 2}, "splits": {"A": [1, 1]}}
OCT = {"seed": 5, "cases": {"A": 4, "B": 3, "C": 3}, "splits": {"A": [2, 1]}}


@pytest.fixture(scope="module")
def ct(tmp_path_factory) -> Path:
    return ensure_synthetic("abdomen-ct", tmp_path_factory.mktemp("ct") / "synth-ct", CT)


@pytest.fixture(scope="module")
def oct_(tmp_path_factory) -> Path:
    return ensure_synthetic("retina-oct", tmp_path_factory.mktemp("oct") / "synth-oct", OCT)


def _arrays(root: Path, case_id: str) -> tuple[np.ndarray, np.ndarray]:
    image = np.asanyarray(nib.load(str(root / "imagesTr" / f"{case_id}_0000.nii.gz")).dataobj)
    label = np.asanyarray(nib.load(str(root / "labelsTr" / f"{case_id}.nii.gz")).dataobj)
    return image, label


@pytest.mark.parametrize("generator", ["abdomen-ct", "retina-oct"])
def test_deterministic_per_seed(generator: str, tmp_path: Path) -> None:
    params = {"cases": {"A": 1, "B": 1}, "splits": {"A": [1, 0]}}
    first, again, other = (GENERATORS[generator].generate(tmp_path / name, seed=seed, **params) or tmp_path / name
                           for name, seed in (("first", 1), ("again", 1), ("other", 2)))
    for case_id in ("A000", "B000"):
        (image, label), (image2, label2), (image3, _) = (_arrays(root, case_id) for root in (first, again, other))
        assert image.tobytes() == image2.tobytes() and label.tobytes() == label2.tobytes()
        assert image.shape != image3.shape or image.tobytes() != image3.tobytes()


@pytest.mark.parametrize(("fixture", "module", "channel"), [("ct", abdomen, "CT"), ("oct_", retina, "OCT")])
def test_layout_labels_and_spacing(fixture: str, module, channel: str, request: pytest.FixtureRequest) -> None:
    root = request.getfixturevalue(fixture)
    ds = read_dataset(root)
    assert ds.labels == module.LABELS and ds.channel == channel and ds.modality == channel
    assert ds.sites == sorted(module.SITES)
    params = CT if module is abdomen else OCT
    n_train, n_val = params["splits"]["A"]
    assert [c.split for c in ds.cases_of("A")] == ["train"] * n_train + ["val"] * n_val + ["test"] * (
        params["cases"]["A"] - n_train - n_val)
    seen: set[int] = set()
    for case in ds.cases:
        volume = load_volume(case, module.LABELS)  # fails on labels outside dataset.json
        seen |= set(np.unique(volume.label).tolist())
        site = module.SITES[case.site]
        if module is abdomen:
            assert volume.spacing == pytest.approx((site["pixel"], site["pixel"], site["spacing"]))
            assert 9 <= volume.image.shape[2] <= 16
            assert -1024 <= volume.image.min() and volume.image.max() <= 3071
        else:
            assert volume.spacing == pytest.approx((retina.LATERAL_MM / retina.N_ASCANS,
                                                    site["depth"] / retina.N_DEPTH, retina.BSCAN_MM))
            assert volume.image.shape == (retina.N_ASCANS, retina.N_DEPTH, 8)
            assert 0 <= volume.image.min() and volume.image.max() <= 255
            assert (volume.label > 0).any()  # every subject has fluid
    assert seen == set(module.LABELS.values())


def test_ct_sites_differ_as_documented(ct: Path) -> None:
    """HU offset: the liver's median is 60 HU plus the site's offset; noise: the spread inside the liver
    follows the documented noise levels (B > D > A > C)."""
    offset, spread = {}, {}
    for site in abdomen.SITES:
        values = []
        for i in range(CT["cases"][site]):
            image, label = _arrays(ct, f"{site}{i:03d}")
            core = binary_erosion(label == abdomen.LABELS["liver"], np.ones((5, 5, 1)))
            values.append(image[core])
        values = np.concatenate(values)
        offset[site] = float(np.median(values)) - abdomen.TISSUES["liver"][0]
        spread[site] = 1.4826 * float(np.median(np.abs(values - np.median(values))))  # robust to the vessels
    for site, params in abdomen.SITES.items():
        assert offset[site] == pytest.approx(params["offset"], abs=8), site
    assert spread["B"] > spread["D"] > spread["A"] > spread["C"]


def _display(intensity: float, site: dict) -> float:
    """The documented compression curve of a site, as an 8-bit grey value."""
    if site["curve"] == "power":
        return 255 * intensity ** site["curve_param"]
    return 255 * (10 * np.log10(intensity) + site["curve_param"]) / site["curve_param"]


def test_oct_vitreous_shows_each_vendors_floor_and_curve(oct_: Path) -> None:
    """The vitreous at the top of every B-scan is the noise floor seen through the site's display curve;
    its grain falls with the number of averaged frames (B: 2 < C: 3 < A: 5)."""
    level, grain = {}, {}
    for site, params in retina.SITES.items():
        top = np.concatenate([_arrays(oct_, f"{site}{i:03d}")[0][:, :3].ravel() for i in range(OCT["cases"][site])])
        level[site], grain[site] = float(np.median(top)), float(top.std())
        expected = _display(10 ** (params["floor_db"] / 10) + retina.LAYERS["vitreous"][0], params)
        assert level[site] == pytest.approx(expected, abs=6), site
    assert grain["A"] < grain["C"] < grain["B"]


@pytest.mark.parametrize("site", sorted(retina.SITES))
def test_oct_speckle_and_resolution_as_documented(site: str) -> None:
    """On a uniform signal: mean intensity = signal + noise floor, speckle contrast = 1/sqrt(looks), and
    the speckle grain along depth follows the axial resolution in pixels."""
    params = retina.SITES[site]
    signal = 0.2
    intensity = retina._acquire(np.full((128, 128), signal), params, np.random.default_rng(0))
    assert intensity.mean() == pytest.approx(signal + 10 ** (params["floor_db"] / 10), rel=0.05)
    assert intensity.std() / intensity.mean() == pytest.approx(1 / np.sqrt(params["looks"]), rel=0.1)
    centred = intensity - intensity.mean()
    lag1 = float((centred[:, 1:] * centred[:, :-1]).mean() / centred.var())
    sigma = params["axial"] / 2.355 / (params["depth"] * 1000 / retina.N_DEPTH)  # in pixels
    assert lag1 == pytest.approx(np.exp(-1 / (2 * sigma**2)), abs=0.08)  # |field correlation|^2


@pytest.mark.parametrize(("name", "generator", "module"), [("synth-ct", "abdomen-ct", abdomen),
                                                           ("synth-oct", "retina-oct", retina)])
def test_protocols_load(name: str, generator: str, module) -> None:
    protocol = resolve_protocol(name)
    assert protocol.name == name and protocol.modality == name.split("-")[1].upper()
    assert protocol.dataset["synthetic"] == generator and GENERATORS[generator] is module
    assert protocol.labels == module.LABELS
    assert {protocol.source_site, *protocol.target_sites} == set(module.SITES)
    assert protocol.preprocessing.intensity == name.split("-")[1]
