"""The benchmark's tables, computed from the cells of a store (see `medtta.stats` for the statistics): Dice and
recovery per method and target site, per method and modality, the by-paradigm table, cost, the source-site check
and the collapsed cases. Every row is a flat dict, written as CSV as it is.

The source-site check's child runs (`Cell.source_site`) never enter a recovery or target-site aggregate: they give
the `source_site_harm` columns and the `source_site` table only."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from medtta import stats
from medtta.metrics import mean, recovery_flag
from medtta.report.store import SOURCE_ROLE, Cell, SiteRun


@dataclass(frozen=True)
class Bootstrap:
    """How intervals are drawn: resamples, generator seed, coverage."""

    resamples: int = stats.RESAMPLES
    seed: int = 0
    confidence: float = stats.CONFIDENCE


DEFAULT = Bootstrap()


def group(cells: Iterable[Cell], key: Callable[[Cell], Any]) -> dict[Any, list[Cell]]:
    """Cells grouped by `key`, groups and cells in first-seen order."""
    out: dict[Any, list[Cell]] = {}
    for c in cells:
        out.setdefault(key(c), []).append(c)
    return out


def site_cases(cells: list[Cell]) -> list[stats.SiteCases]:
    """The cases of one method variant on one protocol, per target site, over its seeds."""
    sites: dict[str, dict[int, tuple]] = {}
    for c in cells:
        for s in c.sites:
            sites.setdefault(s.site, {})[c.seed] = (s.rows, c.metrics.get("dice_in_domain", math.nan))
    return [stats.SiteCases.from_runs(site, runs) for site, runs in sites.items()]


def source_site_cases(cells: list[Cell]) -> stats.SiteCases | None:
    """The source-site check's cases of one method variant on one protocol, over the seeds that ran it (None when
    none did). No recovery there: the in-domain Dice is left undefined."""
    checked = [c for c in cells if c.source_site is not None]
    if not checked:
        return None
    return stats.SiteCases.from_runs(checked[0].source_site.site,
                                     {c.seed: (c.source_site.rows, math.nan) for c in checked})


def _estimates(prefix: str, estimate: stats.Estimate, seed_values: list[float]) -> dict[str, float]:
    _, std = stats.seed_spread(seed_values)
    return {prefix: estimate.value, f"{prefix}_ci_low": estimate.low, f"{prefix}_ci_high": estimate.high,
            f"{prefix}_seed_std": std}


def _dice(sites: list[stats.SiteCases], boot: Bootstrap) -> dict[str, Any]:
    """Seeds, cases, Dice with interval and spread over seeds, and unadapted Dice over `sites`."""
    return {"seeds": len({s for site in sites for s in site.seeds}), "cases": sum(s.cases for s in sites),
            **_estimates("dice", stats.dice_ci(sites, *_args(boot)),
                         stats.seed_values(sites, stats.SiteCases.seed_dice)),
            "dice_source": float(stats.nanmean([stats.nanmean(s.dice_source) for s in sites]))}


def _args(boot: Bootstrap) -> tuple[int, int, float]:
    return boot.resamples, boot.seed, boot.confidence


def _summary(sites: list[stats.SiteCases], boot: Bootstrap) -> dict[str, Any]:
    """Dice, unadapted Dice and recovery over `sites` with intervals and spread over seeds, the paired test."""
    return {**_dice(sites, boot),
            **_estimates("dice_recovery", stats.recovery_ci(sites, *_args(boot)),
                         stats.seed_values(sites, stats.SiteCases.seed_recovery)),
            "p_vs_source": stats.paired_p(sites)}


def _harm(sources: list[stats.SiteCases], boot: Bootstrap) -> dict[str, Any]:
    """Source-site harm over the source sites of `sources` (mean adapted minus unadapted Dice, sites weighing
    equally) with its interval and spread over seeds; nothing when no run made the check."""
    if not sources:
        return {}
    return {**_estimates("source_site_harm", stats.change_ci(sources, *_args(boot)),
                         stats.seed_values(sources, stats.SiteCases.seed_change)),
            "source_site_cases": sum(s.cases for s in sources)}


def _count_collapsed(site_runs: Iterable[SiteRun]) -> int:
    return sum(stats.is_true(r.get("collapsed")) for s in site_runs for r in s.rows)


def _collapsed(cells: list[Cell], site: str | None = None) -> int:
    return _count_collapsed(s for c in cells for s in c.sites if site in (None, s.site))


def _method(cell: Cell) -> dict[str, str]:
    return {"method": cell.label, "paradigm": cell.paradigm, "architecture": cell.architecture}


def dice_by_site(cells: list[Cell], boot: Bootstrap) -> list[dict[str, Any]]:
    """Per method variant, protocol and target site: Dice and recovery with intervals and seed spread, the
    unadapted and in-domain Dice, the Wilcoxon p against it, collapsed cases, and why the recovery is outside
    `RECOVERY_RANGE` where it is."""
    rows = []
    for (protocol, _), of_method in group(cells, lambda c: (c.protocol, c.label)).items():
        first = of_method[0]
        for site in site_cases(of_method):
            summary, in_domain = _summary([site], boot), float(stats.nanmean(site.dice_in_domain))
            rows.append({**_method(first), "protocol": protocol, "modality": first.modality, "site": site.site,
                         **summary, "dice_in_domain": in_domain, "collapsed_cases": _collapsed(of_method, site.site),
                         "recovery_flag": recovery_flag(summary["dice"], summary["dice_source"], in_domain)})
    return rows


def recovery_by_modality(cells: list[Cell], boot: Bootstrap) -> list[dict[str, Any]]:
    """Per method variant and modality, over every target site of every protocol of the modality: the headline,
    Dice recovery per modality, with its interval (cases resampled within each site) and seed spread; where the runs
    made the source-site check, the source-site harm over the protocols' source sites."""
    rows = []
    for (modality, _), of_method in group(cells, lambda c: (c.modality, c.label)).items():
        protocols = group(of_method, lambda c: c.protocol).values()
        sites = [s for of_protocol in protocols for s in site_cases(of_protocol)]
        sources = [s for of_protocol in protocols if (s := source_site_cases(of_protocol)) is not None]
        rows.append({**_method(of_method[0]), "modality": modality,
                     "protocols": ",".join(dict.fromkeys(c.protocol for c in of_method)), "sites": len(sites),
                     **_summary(sites, boot), "collapsed_cases": _collapsed(of_method), **_harm(sources, boot)})
    return rows


def source_site(cells: list[Cell], boot: Bootstrap) -> list[dict[str, Any]]:
    """Per method variant and protocol whose runs made the source-site check: Dice adapted and unadapted on the
    source site's test cases, the source-site harm with its interval and seed spread, the Wilcoxon p against the
    unadapted Dice, collapsed cases."""
    rows = []
    for (protocol, _), of_method in group(cells, lambda c: (c.protocol, c.label)).items():
        source = source_site_cases(of_method)
        if source is not None:
            rows.append({**_method(of_method[0]), "protocol": protocol, "modality": of_method[0].modality,
                         "site": source.site, **_dice([source], boot), **_harm([source], boot),
                         "p_vs_source": stats.paired_p([source]),
                         "collapsed_cases": _count_collapsed(c.source_site for c in of_method if c.source_site)})
    return rows


def by_paradigm(modality_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """MedSeg-TTA's Table 3 layout from the per-modality rows (see `medtta.stats.by_paradigm`)."""
    return stats.by_paradigm(modality_rows)


def cost(cells: list[Cell]) -> list[dict[str, Any]]:
    """Per method variant and protocol, means over seeds: seconds per volume adapted and unadapted, their ratio (the
    run's `cost_ratio` when it logs one, else from its per-case timings), peak memory (largest over seeds; n/a for
    runs that did not log it)."""
    rows = []
    for (protocol, _), of_method in group(cells, lambda c: (c.protocol, c.label)).items():
        seconds = [_case_mean(c, "seconds") for c in of_method]
        source = [_case_mean(c, "seconds_source") for c in of_method]
        ratios = [c.metrics.get("cost_ratio", s / u if u > 0 else math.nan)
                  for c, s, u in zip(of_method, seconds, source, strict=True)]
        memory = [c.metrics["peak_memory_mb"] for c in of_method if "peak_memory_mb" in c.metrics]
        rows.append({**_method(of_method[0]), "protocol": protocol, "modality": of_method[0].modality,
                     "seeds": len(of_method), "seconds_per_volume": mean(seconds),
                     "seconds_per_volume_source": mean(source), "cost_ratio": mean(ratios),
                     "peak_memory_mb": max(memory) if memory else math.nan})
    return rows


def recurring(cells: list[Cell]) -> list[dict[str, Any]]:
    """Per method variant and protocol of the recurring setting, means over seeds: the recovery of each round of the
    stream (`round_<k>`) and its slope per round (negative: the model degrades as the stream recurs)."""
    rows = []
    for (protocol, _), of_method in group((c for c in cells if c.setting == "recurring"),
                                          lambda c: (c.protocol, c.label)).items():
        curves = [stats.recovery_per_round([s.rows for s in c.sites], c.metrics.get("dice_in_domain", math.nan))
                  for c in of_method]
        curve = [mean(values) for values in zip(*curves, strict=True)]  # `rounds` is a param: one per variant
        rows.append({**_method(of_method[0]), "protocol": protocol, "seeds": len(of_method), "rounds": len(curve),
                     **{f"round_{k}": v for k, v in enumerate(curve, start=1)}, "slope": stats.slope(curve)})
    return rows


def _case_mean(cell: Cell, key: str) -> float:
    return mean([stats.as_float(r.get(key)) for s in cell.sites for r in s.rows])


COLLAPSE_COLUMNS = ("method", "protocol", "site", "seed", "case_id", "dice", "dice_source", "dice_change",
                    "foreground_ratio", "collapse", "run_id")


def collapses(cells: list[Cell]) -> list[dict[str, Any]]:
    """Every collapsed case of every cell, worst Dice drop first; the source-site check's as site `<site> (source)`
    (listed, but never in a target-site count)."""
    rows = [{**r, "method": c.label, "protocol": c.protocol, "site": _site_name(s), "seed": c.seed,
             "run_id": s.run_id} for c in cells for s in all_sites(c) for r in s.rows]
    return [{k: r.get(k, "") for k in COLLAPSE_COLUMNS} for r in stats.collapses(rows)]


def all_sites(cell: Cell) -> list[SiteRun]:
    """The cell's target sites, then its source-site check's site when it made the check."""
    return [*cell.sites, *([cell.source_site] if cell.source_site else [])]


def _site_name(site: SiteRun) -> str:
    return site.site if site.role != SOURCE_ROLE else f"{site.site} (source)"


def case_changes(cells: list[Cell]) -> list[dict[str, Any]]:
    """Every case that has a qualitative slice, with its Dice change against the unadapted prediction, the worst
    first (the candidates of the qualitative figure)."""
    out = []
    for c in cells:
        for s in c.sites:
            with_slice = {p.rsplit("/", 1)[-1].removesuffix(".npz"): p for p in s.slices}
            for r in s.rows:
                if str(r["case_id"]) in with_slice:
                    change = stats.as_float(r.get("dice")) - stats.as_float(r.get("dice_source"))
                    out.append({"cell": c, "site": s, "row": r, "artifact": with_slice[str(r["case_id"])],
                                "change": change, "collapsed": stats.is_true(r.get("collapsed"))})
    return sorted(out, key=lambda x: x["change"] if np.isfinite(x["change"]) else math.inf)
