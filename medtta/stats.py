"""How sure a benchmark number is: bootstrap confidence intervals over cases, spread over seeds, a paired test
against the unadapted prediction, Dice recovery per site and per modality, the by-paradigm table and the collapse
listing (see DESIGN.md, "Metrics and the headline number").

Cases (volumes) are the unit of resampling. A method's Dice on a target site with several seeds is the mean over
seeds of its mean over cases; its bootstrap resamples cases (the same cases for every seed, since every seed sees the
same test volumes) and recomputes that mean, so the interval says how much the number depends on which volumes the
site happened to contribute, while the standard deviation over seeds says how much it depends on the seed. Over
several sites (a modality), cases are resampled within each site and the statistic is the mean over sites, so every
site weighs the same whatever its number of cases.

Intervals are percentile bootstrap intervals from a seeded `numpy.random.Generator`: the same seed gives the same
interval. The paired test is `scipy.stats.wilcoxon`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import wilcoxon

from medtta.metrics import dice_recovery, mean

RESAMPLES = 1000
CONFIDENCE = 0.95
PARADIGMS = ("input", "feature", "output", "prior")  # MedSeg-TTA's order; `none` is no adaptation

_recovery = np.vectorize(dice_recovery, otypes=[float])  # the one formula, applied to arrays


@dataclass(frozen=True)
class Estimate:
    """A statistic with its bootstrap confidence interval (NaN bounds when there is nothing to resample)."""

    value: float
    low: float
    high: float

    @classmethod
    def of(cls, row: Mapping[str, Any], key: str) -> Estimate:
        """From a table row holding `key`, `<key>_ci_low` and `<key>_ci_high` (NaN where missing)."""
        return cls(*(as_float(row.get(k)) for k in (key, f"{key}_ci_low", f"{key}_ci_high")))

    def format(self, digits: int = 3) -> str:
        """`0.612 [0.551, 0.671]`, or `n/a`."""
        if math.isnan(self.value):
            return "n/a"
        if math.isnan(self.low):
            return f"{self.value:.{digits}f}"
        return f"{self.value:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


def nanmean(values: np.ndarray | Sequence[float], axis: int | None = None) -> Any:
    """`np.nanmean` without the warning on an all-NaN slice (which gives NaN)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(np.asarray(values, dtype=float), axis=axis)


def bootstrap(statistic: Callable[[list[np.ndarray]], np.ndarray], sizes: Sequence[int], resamples: int = RESAMPLES,
              seed: int = 0, confidence: float = CONFIDENCE) -> Estimate:
    """`statistic` of the observed cases with its percentile bootstrap interval.

    Args:
        statistic: takes one integer array of case indices per stratum, shaped (rows, cases of the stratum), and
            returns one value per row; it is called once with the identity (the observed cases) and once with
            `resamples` rows drawn with replacement.
        sizes: the number of cases of each stratum (a target site); resampling stays within a stratum.
        resamples: bootstrap resamples (the benchmark uses at least 1,000).
        seed: seeds the generator: the same seed gives the same interval.
        confidence: the interval's coverage.

    Resamples whose statistic is undefined (NaN, e.g. a recovery with no gap to close) are left out of the
    quantiles. With no case at all the value and the bounds are NaN; with one case per stratum the bounds are NaN
    (there is nothing to resample).
    """
    if not sizes or min(sizes) < 1:
        return Estimate(math.nan, math.nan, math.nan)
    value = float(statistic([np.arange(n)[None] for n in sizes])[0])
    if max(sizes) < 2:
        return Estimate(value, math.nan, math.nan)
    rng = np.random.default_rng(seed)
    draws = np.asarray(statistic([rng.integers(0, n, size=(resamples, n)) for n in sizes]), dtype=float)
    finite = draws[np.isfinite(draws)]
    if not finite.size:
        return Estimate(value, math.nan, math.nan)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(finite, [alpha, 1 - alpha])
    return Estimate(value, float(low), float(high))


def mean_ci(values: Sequence[float], resamples: int = RESAMPLES, seed: int = 0,
            confidence: float = CONFIDENCE) -> Estimate:
    """Mean of `values` (one per case; NaN ones left out) with its bootstrap interval."""
    finite = np.asarray([v for v in values if not math.isnan(v)], dtype=float)
    return bootstrap(lambda idx: finite[idx[0]].mean(axis=-1), [finite.size], resamples, seed, confidence)


def seed_spread(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation over seeds (NaN ones left out); the deviation is NaN for one seed."""
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return math.nan, math.nan
    std = float(np.std(finite, ddof=1)) if len(finite) > 1 else math.nan
    return float(np.mean(finite)), std


def wilcoxon_p(adapted: Sequence[float], unadapted: Sequence[float]) -> float:
    """Two-sided p-value of the Wilcoxon signed-rank test of per-case `adapted` Dice against the `unadapted` Dice of
    the same cases (pairs with a NaN left out). 1.0 when every pair is equal (no evidence of a change), NaN with no
    pair."""
    pairs = [(a, u) for a, u in zip(adapted, unadapted, strict=True) if not (math.isnan(a) or math.isnan(u))]
    if not pairs:
        return math.nan
    a, u = np.asarray(pairs).T
    if np.all(a == u):
        return 1.0
    return float(wilcoxon(a, u).pvalue)


def _rows_by_case(rows: Iterable[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    """Rows grouped by `case_id`: a case scored once per pass (the rounds of a recurring stream, site orders)."""
    grouped: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        grouped.setdefault(str(row["case_id"]), []).append(row)
    return grouped


@dataclass(frozen=True)
class SiteCases:
    """A method's cases on one target site: per-case Dice adapted (`dice`) and unadapted (`dice_source`), one row per
    seed over the same cases (a case scored in several passes: the mean over them), and the in-domain Dice of each
    seed's source model."""

    site: str
    seeds: tuple[int, ...]
    case_ids: tuple[str, ...]
    dice: np.ndarray  # (seeds, cases)
    dice_source: np.ndarray  # (seeds, cases)
    dice_in_domain: np.ndarray  # (seeds,)

    @classmethod
    def from_runs(cls, site: str, runs: Mapping[int, tuple[Sequence[Mapping[str, Any]], float]]) -> SiteCases:
        """From `{seed: (case rows, in-domain Dice)}`; rows carry `case_id`, `dice` and `dice_source`. Only the cases
        every seed has are kept (every seed of a protocol sees the same test cases)."""
        seeds = tuple(sorted(runs))
        by_seed = {s: _rows_by_case(runs[s][0]) for s in seeds}
        first = by_seed[seeds[0]] if seeds else {}
        ids = tuple(c for c in first if all(c in by_seed[s] for s in seeds))

        def column(key: str) -> np.ndarray:
            return np.array([[nanmean([as_float(r.get(key)) for r in by_seed[s][c]]) for c in ids] for s in seeds],
                            dtype=float).reshape(len(seeds), len(ids))

        return cls(site, seeds, ids, column("dice"), column("dice_source"),
                   np.array([runs[s][1] for s in seeds], dtype=float))

    @property
    def cases(self) -> int:
        return len(self.case_ids)

    def case_means(self, key: str = "dice") -> np.ndarray:
        """Per case, the mean over seeds of `dice` or `dice_source`."""
        return nanmean(getattr(self, key), axis=0)

    def seed_dice(self) -> np.ndarray:
        """Mean Dice over cases, per seed."""
        return nanmean(self.dice, axis=1)

    def seed_change(self) -> np.ndarray:
        """Mean over cases of adapted minus unadapted Dice, per seed."""
        return nanmean(self.dice - self.dice_source, axis=1)

    def seed_recovery(self) -> np.ndarray:
        """Dice recovery per seed: of the seed's mean Dice, mean unadapted Dice and in-domain Dice."""
        return _recovery(nanmean(self.dice, axis=1), nanmean(self.dice_source, axis=1), self.dice_in_domain)

    def _dice_of(self, idx: np.ndarray) -> np.ndarray:
        return nanmean(nanmean(self.dice[:, idx], axis=-1), axis=0)

    def _change_of(self, idx: np.ndarray) -> np.ndarray:
        return nanmean(nanmean((self.dice - self.dice_source)[:, idx], axis=-1), axis=0)

    def _recovery_of(self, idx: np.ndarray) -> np.ndarray:
        adapted, source = nanmean(self.dice[:, idx], axis=-1), nanmean(self.dice_source[:, idx], axis=-1)
        return nanmean(_recovery(adapted, source, self.dice_in_domain[:, None]), axis=0)


def _over_sites(sites: Sequence[SiteCases], of: Callable[[SiteCases, np.ndarray], np.ndarray], resamples: int,
                seed: int, confidence: float) -> Estimate:
    sites = [s for s in sites if s.cases and s.seeds]
    return bootstrap(lambda idx: nanmean(np.stack([of(s, i) for s, i in zip(sites, idx, strict=True)]), axis=0),
                     [s.cases for s in sites], resamples, seed, confidence)


def dice_ci(sites: Sequence[SiteCases], resamples: int = RESAMPLES, seed: int = 0,
            confidence: float = CONFIDENCE) -> Estimate:
    """Mean Dice over `sites` (of each site's mean over seeds and cases) with its interval, cases resampled within
    each site."""
    return _over_sites(sites, SiteCases._dice_of, resamples, seed, confidence)


def recovery_ci(sites: Sequence[SiteCases], resamples: int = RESAMPLES, seed: int = 0,
                confidence: float = CONFIDENCE) -> Estimate:
    """Dice recovery (`medtta.metrics.dice_recovery`) per site and seed, averaged over seeds then over `sites`, with
    its interval, cases resampled within each site. Over one site it is the site's recovery; over every target site
    of every protocol of a modality it is the headline, Dice recovery per modality."""
    return _over_sites(sites, SiteCases._recovery_of, resamples, seed, confidence)


def change_ci(sites: Sequence[SiteCases], resamples: int = RESAMPLES, seed: int = 0,
              confidence: float = CONFIDENCE) -> Estimate:
    """Mean over `sites` of each site's mean over seeds and cases of adapted minus unadapted Dice, with its interval,
    cases resampled within each site. On the source site (no domain shift) it is the source-site harm: below 0,
    adaptation lowers the Dice it should leave alone."""
    return _over_sites(sites, SiteCases._change_of, resamples, seed, confidence)


def seed_values(sites: Sequence[SiteCases], per_site: Callable[[SiteCases], np.ndarray]) -> list[float]:
    """A per-seed statistic averaged over the sites that have the seed, one value per seed (sorted)."""
    seeds = sorted({seed for s in sites for seed in s.seeds})
    values = {seed: [] for seed in seeds}
    for site in sites:
        for seed, value in zip(site.seeds, per_site(site), strict=True):
            values[seed].append(value)
    return [float(nanmean(values[seed])) for seed in seeds]


def paired_p(sites: Sequence[SiteCases]) -> float:
    """Wilcoxon p of the adapted against the unadapted Dice over every case of `sites` (each the mean over seeds)."""
    adapted = [v for s in sites for v in s.case_means("dice")]
    unadapted = [v for s in sites for v in s.case_means("dice_source")]
    return wilcoxon_p(adapted, unadapted)


def by_paradigm(methods: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """MedSeg-TTA's Table 3 layout: per modality, the mean Dice of each paradigm's methods next to no adaptation.

    `methods`: one mapping per method and modality with `modality`, `method`, `paradigm`, `dice` and `dice_source`
    (the method's mean Dice over the modality's target sites, adapted and unadapted). Returns one row per modality
    and paradigm (`none` first: no adaptation, the mean unadapted Dice of every method listed, i.e. of the source
    models they start from), with the methods averaged, their mean Dice, their own mean unadapted Dice and the
    difference."""
    rows = []
    methods = list(methods)
    for modality in dict.fromkeys(m["modality"] for m in methods):
        of_modality = [m for m in methods if m["modality"] == modality]
        no_tta = mean([m["dice_source"] for m in of_modality])
        rows.append({"modality": modality, "paradigm": "none", "methods": "unadapted", "dice": no_tta,
                     "dice_source": no_tta, "delta": 0.0})
        for paradigm in PARADIGMS:
            group = [m for m in of_modality if m["paradigm"] == paradigm]
            if group:
                dice, source = mean([m["dice"] for m in group]), mean([m["dice_source"] for m in group])
                rows.append({"modality": modality, "paradigm": paradigm,
                             "methods": ",".join(m["method"] for m in group), "dice": dice, "dice_source": source,
                             "delta": dice - source})
    return rows


def is_true(value: Any) -> bool:
    """A flag as read from a table artifact or a CSV (bool, number or 'True'/'False')."""
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes")
    return bool(value) and not (isinstance(value, float) and math.isnan(value))


def collapses(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The collapsed cases of `rows` (each flagged `collapsed`), worst first: by Dice drop against the unadapted
    prediction (`dice - dice_source`), with the ratio of predicted foreground to the unadapted prediction's where the
    rows carry `foreground` and `foreground_source`. Listed one by one, never averaged away."""
    out = []
    for row in rows:
        if is_true(row.get("collapsed")):
            dice, source = as_float(row.get("dice")), as_float(row.get("dice_source"))
            fg, fg_source = as_float(row.get("foreground")), as_float(row.get("foreground_source"))
            out.append({**row, "dice_change": dice - source,
                        "foreground_ratio": fg / fg_source if fg_source > 0 else math.nan,
                        "collapse": row.get("collapse") or ""})
    return sorted(out, key=lambda r: (math.inf if math.isnan(r["dice_change"]) else r["dice_change"]))


def summarize_cases(rows: Sequence[Mapping[str, Any]], dice_in_domain: float,
                    prefixes: tuple[str, ...] = ("dice", "hd95")) -> dict[str, float]:
    """What a site's run logs: the mean over cases (NaN-aware, a column missing from a row counting as NaN) of every
    column starting with one of `prefixes`, the Dice recovery of the mean Dice (NaN without Dice), the number of
    collapsed cases, of cases (volumes) and of passes over them (rows, more in recurring streams), seconds per
    volume adapted and, where the rows time it, unadapted."""
    keys = [k for k in dict.fromkeys(k for r in rows for k in r) if k.startswith(prefixes)]
    summary = {k: mean([as_float(r.get(k)) for r in rows]) for k in keys}
    summary["dice_recovery"] = dice_recovery(summary.get("dice", math.nan), summary.get("dice_source", math.nan),
                                             dice_in_domain)
    summary.update(collapsed_cases=float(sum(is_true(r.get("collapsed")) for r in rows)),
                   cases=float(len({r.get("case_id") for r in rows})), passes=float(len(rows)),
                   seconds_per_volume=mean([as_float(r.get("seconds")) for r in rows]))
    if any("seconds_source" in r for r in rows):
        summary["seconds_per_volume_source"] = mean([as_float(r.get("seconds_source")) for r in rows])
    return summary


def recovery_per_round(sites: Sequence[Sequence[Mapping[str, Any]]], dice_in_domain: float) -> list[float]:
    """A recurring stream's curve: per round (the rows' `round`, from 1), the mean over sites (each a list of case
    rows) of the site's Dice recovery in that round."""
    rounds = sorted({int(r["round"]) for rows in sites for r in rows})
    return [mean([summarize_cases([r for r in rows if int(r["round"]) == k], dice_in_domain)["dice_recovery"]
                  for rows in sites]) for k in rounds]


def slope(values: Sequence[float]) -> float:
    """Least-squares slope of `values` against their index (per step); NaN with fewer than two."""
    if len(values) < 2:
        return math.nan
    return float(np.polyfit(np.arange(len(values)), np.asarray(values, dtype=float), 1)[0])


def mean_dice_change(rows: Sequence[Mapping[str, Any]]) -> float:
    """Mean over cases of adapted minus unadapted Dice (`dice - dice_source`; NaN pairs left out): a run's
    `source_site_harm` on the source site's cases."""
    return mean([as_float(r.get("dice")) - as_float(r.get("dice_source")) for r in rows])


def case_intervals(rows: Sequence[Mapping[str, Any]], dice_in_domain: float, resamples: int = RESAMPLES,
                   seed: int = 0, confidence: float = CONFIDENCE) -> dict[str, float]:
    """Bootstrap intervals over one run's cases: `dice_ci_low/high`, `dice_recovery_ci_low/high` and the Wilcoxon
    p-value against the unadapted Dice, `p_vs_source` (rows with `case_id`, `dice`, `dice_source`)."""
    site = SiteCases.from_runs("", {0: (rows, dice_in_domain)})
    dice, recovery = dice_ci([site], resamples, seed, confidence), recovery_ci([site], resamples, seed, confidence)
    return {"dice_ci_low": dice.low, "dice_ci_high": dice.high, "dice_recovery_ci_low": recovery.low,
            "dice_recovery_ci_high": recovery.high, "p_vs_source": paired_p([site])}


def as_float(value: Any) -> float:
    """A table cell as a float: NaN for a missing, empty or non-numeric cell."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan
