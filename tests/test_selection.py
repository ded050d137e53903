"""Choosing a configuration among a sweep's without test labels: what each strategy picks, and that none but the
oracle reads the labels of the site it scores."""

from __future__ import annotations

import copy

import pytest

from medtta.errors import MedttaError
from medtta.report.selection import check_strategies, choose, criterion_correlation, families, selection_rows
from medtta.report.store import Cell, SiteRun, label_variants
from medtta.report.tables import Bootstrap

SITES = ("B", "C", "D")
# config -> site -> (adapted Dice, entropy, agreement); unadapted Dice 0.5, in-domain 0.9 (recovery = (d-0.5)/0.4)
TRUTH = {
    "default": {"B": (0.70, 0.30, 0.90), "C": (0.70, 0.30, 0.90), "D": (0.60, 0.30, 0.95)},
    "lr=0.01": {"B": (0.80, 0.20, 0.70), "C": (0.50, 0.25, 0.60), "D": (0.90, 0.10, 0.80)},
    "lr=0.0001": {"B": (0.60, 0.40, 0.99), "C": (0.75, 0.35, 0.97), "D": (0.55, 0.40, 0.99)},
}
STRATEGIES = ("default", "loso", "val-site:B", "entropy", "agreement", "oracle")


def _cells(truth: dict, method: str = "tent") -> list[Cell]:
    cells = []
    for config, sites in truth.items():
        lr = {"default": "0.001", "lr=0.01": "0.01", "lr=0.0001": "0.0001"}[config]
        runs = [SiteRun("r", site, {}, [{"case_id": f"{site}{k}", "dice": dice, "dice_source": 0.5, "entropy": ent,
                                         "agreement": agr, "collapsed": False} for k in range(3)])
                for site, (dice, ent, agr) in sites.items()]
        cells.append(Cell("id", "medtta/p", "p", "MRI", method, "output", "unet", "episodic", 0,
                          {"seed": "0", "hp.lr": lr}, {"dice_in_domain": 0.9}, 0, runs, config=config))
    label_variants(cells)
    return cells


def _picks(cells: list[Cell]) -> dict[str, dict[str, str | None]]:
    [family] = families(cells)
    return {strategy: {site: choose(family, strategy, site) for site in SITES} for strategy in STRATEGIES}


def test_each_strategy_picks_from_what_it_may_see() -> None:
    picks = _picks(_cells(TRUTH))
    assert picks["default"] == dict.fromkeys(SITES, "default")
    assert picks["oracle"] == {"B": "lr=0.01", "C": "lr=0.0001", "D": "lr=0.01"}
    # loso for B: mean Dice over C, D: default 0.65, lr=0.01 0.70, lr=0.0001 0.65
    assert picks["loso"] == {"B": "lr=0.01", "C": "lr=0.01", "D": "default"}
    assert picks["val-site:B"] == {"B": None, "C": "lr=0.01", "D": "lr=0.01"}  # B chooses, and is not scored
    assert picks["entropy"] == dict.fromkeys(SITES, "lr=0.01")
    assert picks["agreement"] == dict.fromkeys(SITES, "lr=0.0001")


def test_a_collapsed_configuration_is_not_the_entropy_pick() -> None:
    cells = _cells(TRUTH)
    hot = next(c for c in cells if c.config == "lr=0.01")
    hot.sites[0].rows[1]["collapsed"] = True  # site B
    assert _picks(cells)["entropy"]["B"] == "default"


@pytest.mark.parametrize("site", SITES)
def test_no_realistic_strategy_reads_the_labels_of_the_site_it_scores(site: str) -> None:
    """Perturbing a site's labels (its Dice under every configuration) never changes what a non-oracle strategy
    picks for that site; the oracle, which does read them, changes: the check would catch a leaking selector."""
    before = _picks(_cells(TRUTH))
    perturbed = copy.deepcopy(TRUTH)
    for config, dice in (("default", 0.95), ("lr=0.01", 0.51), ("lr=0.0001", 0.52)):
        perturbed[config][site] = (dice, *perturbed[config][site][1:])
    after = _picks(_cells(perturbed))
    for strategy in STRATEGIES:
        if strategy != "oracle":
            assert after[strategy][site] == before[strategy][site], strategy
    assert after["oracle"][site] != before["oracle"][site]


def test_selection_rows_regret_and_flags() -> None:
    rows = {r["strategy"]: r for r in selection_rows(families(_cells(TRUTH)), STRATEGIES, Bootstrap(200, 0))}
    assert rows["oracle"]["regret"] == pytest.approx(0.0) and rows["oracle"]["uses_test_labels"]
    assert rows["oracle"]["dice_recovery"] == pytest.approx((0.75 + 0.625 + 1.0) / 3)
    assert rows["default"]["dice_recovery"] == pytest.approx((0.5 + 0.5 + 0.25) / 3)
    assert rows["default"]["regret"] == pytest.approx((0.75 + 0.625 + 1.0 - 1.25) / 3)
    assert rows["val-site:B"]["sites"] == 2 and rows["val-site:B"]["picks"] == "C: lr=0.01; D: lr=0.01"
    assert rows["val-site:B"]["regret"] == pytest.approx((0.625 + 1.0) / 2 - (0.0 + 1.0) / 2)
    assert rows["entropy"]["own_loss"] and not rows["agreement"]["own_loss"]  # tent minimizes entropy
    assert rows["oracle"]["dice_recovery_ci_low"] <= rows["oracle"]["dice_recovery"]


def test_criterion_correlation_and_one_configuration_is_no_family() -> None:
    [entropy, agreement] = criterion_correlation(families(_cells(TRUTH)))
    assert entropy["criterion"] == "entropy" and entropy["method_sites"] == 3
    # lower entropy, higher Dice on B and D (τ 1), the reverse on C (τ -1); agreement the reverse of that
    assert (entropy["kendall_tau"], agreement["kendall_tau"]) == pytest.approx((1 / 3, -1 / 3))
    assert families(_cells({"default": TRUTH["default"]})) == []


def test_unknown_strategy_names_the_option() -> None:
    assert check_strategies(["loso", "val-site:B"]) == ("loso", "val-site:B")
    with pytest.raises(MedttaError, match="--select 'best': expected one of default, loso"):
        check_strategies(["best"])
