"""The deployment scenarios (`--setting`): in which order a run's target volumes reach the adapter, and when the
adapter is reset.

- `episodic`: every volume from the source model (the adapter resets per volume itself);
- `continual`: the target sites one after another, never reset (one model serving every site in turn);
- `per-site`: reset when the site changes, online within a site (one hospital's deployment);
- `mixed`: the volumes of every target site in one seeded shuffled stream, never reset;
- `recurring`: the continual stream repeated `rounds` times, never reset (long-horizon collapse, after CCC and
  RDumb); a volume is scored once per round.

`--site-order shuffled:N` runs the order-dependent settings (continual, recurring) over N seeded site orders, the
adapter reset before each, and scores every volume once per order: the figures are means over orders.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from medtta.errors import MedttaError

SETTINGS = ("episodic", "continual", "per-site", "mixed", "recurring")
ORDERED = ("continual", "recurring")  # the settings whose figures depend on the order of the sites
DEFAULT_ROUNDS = 10


@dataclass(frozen=True)
class Visit:
    """One volume of the stream: its site and case, the round and site order it belongs to (1-based), and
    whether the adapter resets before it."""

    site: str
    case: Any
    round: int = 1
    order: int = 1
    reset: bool = False


def parse_site_order(spec: str) -> int:
    """`fixed` (the protocol's order) -> 1; `shuffled:N` -> N seeded orders."""
    if spec == "fixed":
        return 1
    kind, _, count = spec.partition(":")
    if kind == "shuffled" and count.isdigit() and int(count) >= 1:
        return int(count)
    raise MedttaError(f"--site-order '{spec}': expected fixed or shuffled:N with N >= 1 (e.g. shuffled:5)")


def check_setting(setting: str, rounds: int) -> None:
    if setting not in SETTINGS:
        raise MedttaError(f"--setting '{setting}': expected one of {', '.join(SETTINGS)}")
    if rounds < 1:
        raise MedttaError(f"--rounds {rounds}: expected at least 1")


def site_orders(sites: Sequence[str], spec: str, seed: int) -> list[tuple[str, ...]]:
    """The site orders a stream runs: the protocol's own, or N seeded permutations of it."""
    count = parse_site_order(spec)
    if spec == "fixed":
        return [tuple(sites)]
    rng = np.random.default_rng([seed, 1])  # another stream than the volumes' shuffle of `mixed`
    return [tuple(sites[i] for i in rng.permutation(len(sites))) for _ in range(count)]


def target_stream(setting: str, cases: Mapping[str, Sequence[Any]], seed: int, rounds: int = DEFAULT_ROUNDS,
                  site_order: str = "fixed") -> list[Visit]:
    """The visits of `setting` over `cases` (site -> its test cases, in the protocol's site order)."""
    check_setting(setting, rounds)
    sites = list(cases)
    if setting == "mixed":
        flat = [Visit(site, case) for site in sites for case in cases[site]]
        return [flat[i] for i in np.random.default_rng([seed, 0]).permutation(len(flat))]
    orders = site_orders(sites, site_order, seed) if setting in ORDERED else [tuple(sites)]
    passes = rounds if setting == "recurring" else 1
    stream = []
    for order_index, order in enumerate(orders, start=1):
        for round_index in range(1, passes + 1):
            for site in order:
                for i, case in enumerate(cases[site]):
                    first = i == 0 and (setting == "per-site" or (round_index == 1 and site == order[0]
                                                                   and order_index > 1))
                    stream.append(Visit(site, case, round_index, order_index, reset=first))
    return stream


def pass_labels(setting: str, visit: Visit, site_order: str) -> dict[str, int]:
    """The columns a case row gains to tell its passes apart: `round` in the recurring setting, `order` with
    several site orders."""
    labels = {"round": visit.round} if setting == "recurring" else {}
    if setting in ORDERED and parse_site_order(site_order) > 1:
        labels["order"] = visit.order
    return labels
