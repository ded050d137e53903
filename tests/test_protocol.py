"""Protocol loading: the built-in protocol, and malformed files failing with the file and field named."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from medtta.errors import ProtocolError
from medtta.protocol import list_protocols, load_protocol, protocols_dir, resolve_protocol


def test_synth_mri_protocol() -> None:
    p = resolve_protocol("synth-mri")
    assert (p.modality, p.source_site, p.target_sites) == ("MRI", "A", ("B", "C", "D"))
    assert p.labels == {"background": 0, "LV": 1, "MYO": 2, "RV": 3}
    assert p.setting == "episodic"
    assert "synth-mri" in list_protocols()


def test_site_overrides() -> None:
    p = resolve_protocol("synth-mri", source_site="B", target_sites=("D",))
    assert (p.source_site, p.target_sites) == ("B", ("D",))
    assert resolve_protocol("synth-mri", source_site="B").target_sites == ("C", "D")


def _write(tmp_path: Path, **changes) -> Path:
    raw = yaml.safe_load((protocols_dir() / "synth-mri.yaml").read_text())
    for key, value in changes.items():
        if value is None:
            raw.pop(key)
        else:
            raw[key] = value
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"source_site": None}, "missing required field 'source_site'"),
        ({"modality": "PET"}, "field 'modality' must be one of MRI, CT, OCT"),
        ({"labels": {"background": 0, "LV": 2}}, "field 'labels' must map names to 0, 1"),
        ({"target_sites": []}, "field 'target_sites' must list at least one site"),
        ({"target_sites": "B"}, "field 'target_sites' must be a list"),
        ({"setting": "online"}, "field 'setting' must be one of episodic, continual"),
        ({"preprocessing": {"sise": [64, 64]}}, "field 'preprocessing' has unknown keys \\['sise'\\]"),
        ({"preprocessing": {"intensity": "pet"}}, "field 'preprocessing.intensity' must be one of mr, ct, oct"),
        ({"dataset": {"nothing": 1}}, "field 'dataset' needs exactly one of"),
        ({"split": {"fractions": [0.5, 0.5, 0.5]}}, "field 'split.fractions'"),
        ({"preprocessing": {"slice_axis": 3}}, "field 'preprocessing.slice_axis' must be 0, 1 or 2"),
        ({"evaluate_labels": "LV"}, "field 'evaluate_labels' must be a non-empty list of label names"),
        ({"evaluate_labels": ["LV", "background", "lv"]}, "field 'evaluate_labels' names \\['background', 'lv'\\], "
                                                          "not foreground labels of 'labels' \\(known: LV, MYO, RV\\)"),
    ],
)
def test_malformed_protocol_names_file_and_field(tmp_path: Path, changes: dict, message: str) -> None:
    path = _write(tmp_path, **changes)
    with pytest.raises(ProtocolError, match=message) as err:
        load_protocol(path)
    assert str(err.value).startswith(str(path))


def test_scored_labels(tmp_path: Path) -> None:
    """Every foreground label is scored unless the protocol lists the evaluated ones."""
    assert resolve_protocol("synth-mri").scored_labels == {"LV": 1, "MYO": 2, "RV": 3}
    p = load_protocol(_write(tmp_path, evaluate_labels=["RV", "LV"]))
    assert p.evaluate_labels == ("RV", "LV") and p.scored_labels == {"RV": 3, "LV": 1}


def test_invalid_yaml(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("name: [unclosed\n")
    with pytest.raises(ProtocolError, match="not valid YAML"):
        load_protocol(path)


def test_unknown_dataset() -> None:
    with pytest.raises(ProtocolError, match="--dataset 'nope' is neither a protocol"):
        resolve_protocol("nope")
