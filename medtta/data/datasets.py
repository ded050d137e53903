"""From a protocol to the dataset on disk: generate the synthetic ones, find the prepared ones."""

from __future__ import annotations

from pathlib import Path

from medtta.data.layout import Dataset, assign_splits, read_dataset
from medtta.data.synthetic import ensure_synthetic
from medtta.errors import DataError
from medtta.paths import data_root
from medtta.protocol import Protocol


def dataset_root(protocol: Protocol) -> Path:
    """Where the protocol's dataset lives: `$MEDTTA_DATA/<name>` unless the protocol gives a path."""
    spec = protocol.dataset
    if "synthetic" in spec:
        return data_root() / protocol.name
    folder = Path(spec["folder"]).expanduser()
    return folder if folder.is_absolute() else data_root() / folder


def open_dataset(protocol: Protocol) -> Dataset:
    """The protocol's dataset with every case assigned a split; synthetic data is generated on first use."""
    root = dataset_root(protocol)
    if "synthetic" in protocol.dataset:
        ensure_synthetic(protocol.dataset["synthetic"], root, protocol.dataset.get("params", {}))
    elif not root.is_dir():
        raise DataError(f"{root}: dataset for protocol '{protocol.name}' not found (prepare it with "
                        "`medtta data prepare`, or set MEDTTA_DATA to the folder that holds it)")
    dataset = read_dataset(root)
    if dataset.labels != protocol.labels:
        raise DataError(f"{root / 'dataset.json'}: labels {dataset.labels} differ from protocol "
                        f"'{protocol.name}' labels {protocol.labels}")
    for site in (protocol.source_site, *protocol.target_sites):
        if site not in dataset.sites:
            raise DataError(f"{root / 'sites.csv'}: no case of site '{site}' (sites: {', '.join(dataset.sites)})")
    return assign_splits(dataset, protocol.source_site, protocol.split_seed, protocol.split_fractions)
