"""Choosing a method's configuration among those a sweep ran (`medtta bench --sweep`), without the test labels.

A *family* is one method on one protocol in one setting (any other param equal); its configurations differ in
swept hyper-parameters or steps (`medtta.config`). A strategy picks one configuration per target site, from what
it is allowed to see, and the site is scored with the pick:

- `default`: the paper's values (`medtta.config` = default);
- `oracle`: the best on the site's own labels, the upper bound (uses test labels: never a headline);
- `loso`: the best mean recovery on the protocol's other target sites (leave one site out);
- `val-site:SITE`: the best on SITE, a labelled target site used only to choose (SITE is not scored);
- `entropy`: the lowest mean prediction entropy on the site;
- `agreement`: the highest agreement with the unadapted prediction on the site;

both among the configurations that collapsed none of the site's cases by the label-free flag (a label of the
unadapted prediction vanished or shrank, `collapsed_label_free`), not the reported label-based `collapsed`.
Only `oracle` reads the labels of the site it scores (the leakage test checks it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import kendalltau

from medtta import stats
from medtta.errors import MedttaError
from medtta.metrics import mean
from medtta.report.store import Cell
from medtta.report.tables import Bootstrap, site_cases

STRATEGIES = ("default", "loso", "entropy", "agreement", "oracle")
LABEL_FREE = ("entropy", "agreement")
DEFAULT = "default"


def check_strategies(names: Sequence[str]) -> tuple[str, ...]:
    for name in names:
        if name not in STRATEGIES and not (name.startswith("val-site:") and len(name) > len("val-site:")):
            raise MedttaError(f"--select '{name}': expected one of {', '.join(STRATEGIES)} or val-site:SITE")
    return tuple(names)


@dataclass
class Family:
    """One method's configurations on one protocol and setting: per configuration and target site, the site's
    cases over seeds, and the label-free indicators (means over its case rows) and collapses."""

    protocol: str
    setting: str
    method: str
    own_criterion: str  # the label-free criterion that is also the method's loss ("" for none)
    sites: dict[str, dict[str, stats.SiteCases]]  # config -> site -> cases
    indicators: dict[str, dict[str, dict[str, float]]]  # config -> site -> entropy, agreement, collapsed_label_free
    params: dict[str, dict[str, str]]  # config -> the params of its runs

    @property
    def configs(self) -> list[str]:
        """The default first, then by name: ties go to the default."""
        return sorted(self.sites, key=lambda c: (c != DEFAULT, c))

    @property
    def site_names(self) -> list[str]:
        return list(next(iter(self.sites.values())))

    def recovery(self, config: str, site: str) -> float:
        return float(stats.nanmean(self.sites[config][site].seed_recovery()))


def families(cells: list[Cell]) -> list[Family]:
    """The families with more than one configuration, each configuration holding every target site."""
    grouped: dict[tuple, dict[str, list[Cell]]] = {}
    for c in cells:
        fixed = tuple((k, v) for k, v in c.variant[2] if not k.startswith("hp.") and k != "steps")
        grouped.setdefault((c.protocol, c.setting, c.method, fixed), {}).setdefault(c.config, []).append(c)
    out = []
    for (protocol, setting, method, _), by_config in grouped.items():
        if len(by_config) < 2:
            continue
        sites = {config: {s.site: s for s in site_cases(of)} for config, of in by_config.items()}
        common = set.intersection(*(set(s) for s in sites.values()))
        out.append(Family(protocol, setting, method, _own_criterion(method),
                          {k: {s: v[s] for s in v if s in common} for k, v in sites.items()},
                          {config: _indicators(of, common) for config, of in by_config.items()},
                          {config: of[0].params for config, of in by_config.items()}))
    return out


def _indicators(cells: list[Cell], sites: set[str]) -> dict[str, dict[str, float]]:
    out = {}
    for site in sites:
        rows = [r for c in cells for s in c.sites if s.site == site for r in s.rows]
        out[site] = {"entropy": mean([stats.as_float(r.get("entropy")) for r in rows]),
                     "agreement": mean([stats.as_float(r.get("agreement")) for r in rows]),
                     "collapsed_label_free": float(any(stats.is_true(r.get("collapsed_label_free")) for r in rows))}
    return out


def _own_criterion(method: str) -> str:
    from medtta.registry import ADAPTERS

    try:
        return ADAPTERS.get(method).own_criterion
    except MedttaError:  # a plugin no longer installed
        return ""


def _best(configs: Sequence[str], score: Callable[[str], float]) -> str | None:
    """The configuration of highest finite score (the first on ties); None when none has one."""
    scored = [(score(c), c) for c in configs]
    finite = [(v, c) for v, c in scored if math.isfinite(v)]
    return max(finite, key=lambda vc: vc[0])[1] if finite else None


def choose(family: Family, strategy: str, site: str) -> str | None:
    """The configuration `strategy` picks for `site` (None: it cannot pick, or the site is its validation site)."""
    configs = family.configs
    if strategy == DEFAULT:
        return DEFAULT if DEFAULT in family.sites else None
    if strategy == "oracle":
        return _best(configs, lambda c: family.recovery(c, site))
    if strategy == "loso":
        others = [s for s in family.site_names if s != site]
        return _best(configs, lambda c: mean([family.recovery(c, s) for s in others])) if others else None
    if strategy.startswith("val-site:"):
        validation = strategy.partition(":")[2]
        if validation == site or validation not in family.site_names:
            return None
        return _best(configs, lambda c: family.recovery(c, validation))
    indicators = family.indicators
    safe = [c for c in configs if not indicators[c][site]["collapsed_label_free"]] or configs
    if strategy == "entropy":
        return _best(safe, lambda c: -indicators[c][site]["entropy"])
    if strategy == "agreement":
        return _best(safe, lambda c: indicators[c][site]["agreement"])
    raise MedttaError(f"--select '{strategy}': unknown strategy")


def selection_rows(found: list[Family], strategies: Sequence[str], boot: Bootstrap) -> list[dict[str, Any]]:
    """Per family and strategy: the recovery of the picks over the sites it scores, with its bootstrap interval,
    the regret against the oracle on the same sites, and the picks."""
    rows = []
    for family in found:
        oracle = {s: choose(family, "oracle", s) for s in family.site_names}
        for strategy in strategies:
            picks = {s: choose(family, strategy, s) for s in family.site_names}
            scored = {s: c for s, c in picks.items() if c is not None}
            if not scored:
                continue
            chosen = [family.sites[c][s] for s, c in scored.items()]
            estimate = stats.recovery_ci(chosen, boot.resamples, boot.seed, boot.confidence)
            best = mean([family.recovery(oracle[s], s) for s in scored if oracle[s] is not None])
            rows.append({"protocol": family.protocol, "setting": family.setting, "method": family.method,
                         "strategy": strategy, "uses_test_labels": strategy == "oracle",
                         "own_loss": strategy == family.own_criterion, "sites": len(scored),
                         "dice_recovery": mean([family.recovery(c, s) for s, c in scored.items()]),
                         "dice_recovery_ci_low": estimate.low, "dice_recovery_ci_high": estimate.high,
                         "regret": best - mean([family.recovery(c, s) for s, c in scored.items()]),
                         "picks": "; ".join(f"{s}: {c}" for s, c in scored.items())})
    return rows


#: with fewer methods, Kendall's τ is ±1 (or undefined) whatever the strategy: flagged `few_methods`, not evidence
MIN_RANKED = 3


def ranking_agreement(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per protocol, setting and realistic strategy: Kendall's τ between the methods' ranking by it and by the
    oracle (1: the same ranking), flagged `few_methods` below `MIN_RANKED` methods."""
    out = []
    keys = dict.fromkeys((r["protocol"], r["setting"]) for r in rows)
    for protocol, setting in keys:
        mine = [r for r in rows if (r["protocol"], r["setting"]) == (protocol, setting)]
        oracle = {r["method"]: r["dice_recovery"] for r in mine if r["strategy"] == "oracle"}
        for strategy in dict.fromkeys(r["strategy"] for r in mine if r["strategy"] != "oracle"):
            score = {r["method"]: r["dice_recovery"] for r in mine if r["strategy"] == strategy}
            methods = [m for m in score if m in oracle and math.isfinite(score[m]) and math.isfinite(oracle[m])]
            tau = (float(kendalltau([oracle[m] for m in methods], [score[m] for m in methods]).statistic)
                   if len(methods) > 1 else math.nan)
            out.append({"protocol": protocol, "setting": setting, "strategy": strategy, "methods": len(methods),
                        "kendall_tau": tau, "few_methods": len(methods) < MIN_RANKED})
    return out


def criterion_correlation(found: list[Family]) -> list[dict[str, Any]]:
    """Per protocol and label-free criterion: Kendall's τ between the criterion (entropy negated: lower is
    better) and the true recovery across a family's configurations on one site, averaged over families and sites."""
    out = []
    by_protocol: dict[str, list[Family]] = {}
    for family in found:
        by_protocol.setdefault(family.protocol, []).append(family)
    for protocol, of_protocol in by_protocol.items():
        for criterion in LABEL_FREE:
            sign = -1.0 if criterion == "entropy" else 1.0
            taus = []
            for family in of_protocol:
                for site in family.site_names:
                    pairs = [(sign * family.indicators[c][site][criterion], family.recovery(c, site))
                             for c in family.configs]
                    pairs = [p for p in pairs if all(math.isfinite(v) for v in p)]
                    if len(pairs) > 1 and len({p[0] for p in pairs}) > 1 and len({p[1] for p in pairs}) > 1:
                        taus.append(float(kendalltau(*np.asarray(pairs).T).statistic))
            out.append({"protocol": protocol, "criterion": criterion, "method_sites": len(taus),
                        "kendall_tau": mean(taus)})
    return out


#: the run params a sweep varies besides the method's hyper-parameters (`hp.*`)
RUN_KEYS = ("steps", "batch_size")


def swept_keys(family: Family) -> list[str]:
    """The params (`hp.lr`, `steps`, ...) whose values differ between the family's configurations."""
    keys = dict.fromkeys(k for c in family.configs for k in family.params[c] if k.startswith("hp.") or k in RUN_KEYS)
    return [k for k in keys if len({family.params[c].get(k) for c in family.configs}) > 1]


def sensitivity(found: list[Family]) -> list[dict[str, Any]]:
    """Per family, swept key and configuration: the key (`lr`, `steps`, `source_weight`, ...), its value and the
    configuration's recovery (mean over target sites), for the sensitivity figures (one per key)."""
    points = []
    for family in found:
        for key in swept_keys(family):
            for config in family.configs:
                points.append({"protocol": family.protocol, "setting": family.setting, "method": family.method,
                               "key": key.removeprefix("hp."), "value": stats.as_float(family.params[config][key]),
                               "config": config,
                               "dice_recovery": mean([family.recovery(config, s) for s in family.site_names])})
    return points
