"""The deployment scenarios (`--setting`): in which order a run's target volumes reach the adapter, and when the
adapter is reset.

- `episodic`: every volume from the source model (the adapter resets per volume itself);
- `continual`: the target sites one after another, never reset (one model serving every site in turn);
- `per-site`: reset when the site changes, online within a site (one hospital's deployment);
- `mixed`: the volumes of every target site in one seeded shuffled stream, never reset;
- `recurring`: the continual stream repeated `rounds` times, never reset (long-horizon collapse, after CCC and
  RDumb); a volume is scored once per round;
- `gradual`: the continual stream with a seeded ramp between consecutive sites: over `ramp` volumes around each
  change, the next site's volumes become more frequent (after CoTTA's gradual severity 1→5→1, here site to site),
  never reset.

`shuffle_within_site` (seeded) shuffles each site's volumes, which are otherwise in case order. The method
hyper-parameter `reset_every=N`, which every method takes, resets the adapter every N volumes of an online stream
(RDumb's baseline for continual TTA).

`--site-order shuffled:N` runs the order-dependent settings (continual, recurring) over N seeded site orders, the
adapter reset before each, and scores every volume once per order: the figures are means over orders.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from medtta.errors import MedttaError

SETTINGS = ("episodic", "continual", "per-site", "mixed", "recurring", "gradual")
ORDERED = ("continual", "recurring", "gradual")  # the settings whose figures depend on the order of the sites
DEFAULT_ROUNDS = 10
DEFAULT_RAMP = 4
#: hyper-parameters every method takes, for the stream rather than the method (the adapter never sees them)
STREAM_HPARAMS = {"reset_every": 0}


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
                  site_order: str = "fixed", shuffle_within_site: bool = False, ramp: int = DEFAULT_RAMP,
                  reset_every: int = 0) -> list[Visit]:
    """The visits of `setting` over `cases` (site -> its test cases, in the protocol's site order)."""
    check_setting(setting, rounds)
    if shuffle_within_site:
        rng = np.random.default_rng([seed, 3])
        cases = {site: [of[i] for i in rng.permutation(len(of))] for site, of in cases.items()}
    sites = list(cases)
    if setting == "mixed":
        flat = [Visit(site, case) for site in sites for case in cases[site]]
        return with_resets([flat[i] for i in np.random.default_rng([seed, 0]).permutation(len(flat))], reset_every)
    orders = site_orders(sites, site_order, seed) if setting in ORDERED else [tuple(sites)]
    passes = rounds if setting == "recurring" else 1
    stream = []
    for order_index, order in enumerate(orders, start=1):
        visits = [Visit(site, case, round_index, order_index, reset=setting == "per-site" and i == 0)
                  for round_index in range(1, passes + 1) for site in order for i, case in enumerate(cases[site])]
        if setting == "gradual":
            visits = ramped(visits, ramp, np.random.default_rng([seed, 2, order_index]))
        if order_index > 1:  # each site order from the source model
            visits[0] = replace(visits[0], reset=True)
        stream += visits
    return with_resets(stream, reset_every)


def ramped(visits: list[Visit], ramp: int, rng: np.random.Generator) -> list[Visit]:
    """`visits` (one site after another) with each change of site spread over `ramp` volumes: the last `ramp`/2
    of one site and the first `ramp`/2 of the next (at most half of either) in a seeded order where the next
    site's share rises linearly."""
    segments = [list(group) for _, group in itertools.groupby(visits, key=lambda v: v.site)]
    out = segments[0]
    for previous, following in itertools.pairwise(segments):
        tail, head = min(ramp // 2, len(previous) // 2), min(ramp - ramp // 2, len(following) // 2)
        size = tail + head
        weights = np.arange(size) + 0.5
        later = set(rng.choice(size, head, replace=False, p=weights / weights.sum()).tolist()) if size else set()
        ending, starting = iter(out[len(out) - tail:]), iter(following[:head])
        out = out[:len(out) - tail] + [next(starting) if j in later else next(ending) for j in range(size)]
        out += following[head:]
    return out


def with_resets(stream: list[Visit], every: int) -> list[Visit]:
    """The stream with a reset every `every` volumes as well (RDumb); as it is for 0."""
    if not every:
        return stream
    return [replace(v, reset=v.reset or (k > 0 and k % every == 0)) for k, v in enumerate(stream)]


def check_stream_hparams(setting: str, hparams: Mapping[str, Any]) -> None:
    """`reset_every` is a whole number of volumes, and resets an online stream only."""
    every = hparams.get("reset_every", 0)
    if isinstance(every, bool) or not isinstance(every, int) or every < 0:
        raise MedttaError(f"-p reset_every={every}: expected a whole number of volumes (0: never)")
    if every and setting == "episodic":
        raise MedttaError("-p reset_every resets an online stream: the episodic setting resets before every volume "
                          f"already (use --setting {', '.join(s for s in SETTINGS if s != 'episodic')})")


def pass_labels(setting: str, visit: Visit, site_order: str) -> dict[str, int]:
    """The columns a case row gains to tell its passes apart: `round` in the recurring setting, `order` with
    several site orders."""
    labels = {"round": visit.round} if setting == "recurring" else {}
    if setting in ORDERED and parse_site_order(site_order) > 1:
        labels["order"] = visit.order
    return labels
