"""From a protocol to the dataset on disk: generate the synthetic ones, find the prepared ones."""

from __future__ import annotations

import warnings
from pathlib import Path

from medtta.data.layout import Dataset, assign_splits, read_dataset
from medtta.data.synthetic import ensure_synthetic
from medtta.errors import DataError, MedttaWarning
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
    split = assign_splits(dataset, protocol.source_site, protocol.split_seed, protocol.split_fractions)
    check_source_test_cases(split, protocol, by_fractions=any(c.split is None for c in dataset.cases_of(
        protocol.source_site)))
    return split


#: fewer source test cases than this and the in-domain Dice, the reference of Dice recovery, is noisy
MIN_IN_DOMAIN_CASES = 5


def check_source_test_cases(dataset: Dataset, protocol: Protocol, by_fractions: bool) -> None:
    """Refuse a split that leaves the source site no test case (no in-domain Dice, so no recovery), naming the
    protocol's `split.fractions` when they split the site (`by_fractions`), else the `split` column of
    sites.csv; warn below `MIN_IN_DOMAIN_CASES`."""
    site = protocol.source_site
    n = len(dataset.cases_of(site, "test"))
    if n == 0:
        fractions = list(protocol.split_fractions)
        if not by_fractions:
            where = f"{dataset.root / 'sites.csv'}: column 'split' gives"
        elif protocol.source.endswith((".yaml", ".yml")):
            where = f"{protocol.source}: field 'split.fractions' {fractions} leaves"
        else:
            where = f"{dataset.root}: the default split {fractions} of {len(dataset.cases_of(site))} case(s) leaves"
        raise DataError(f"{where} source site '{site}' no test case; the in-domain Dice, and with it Dice "
                        "recovery, needs at least one")
    if n < MIN_IN_DOMAIN_CASES:
        warnings.warn(f"source site '{site}' has only {n} test case(s) in {dataset.root}: the in-domain Dice, the "
                      f"reference of Dice recovery, rests on them (at least {MIN_IN_DOMAIN_CASES} are advised)",
                      MedttaWarning, stacklevel=2)
