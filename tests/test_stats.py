"""`medtta.stats` on numbers whose answer is known."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import bootstrap as scipy_bootstrap

from medtta import stats
from medtta.metrics import dice_recovery


def _rows(dice: list[float], source: list[float]) -> list[dict]:
    return [{"case_id": f"c{i}", "dice": d, "dice_source": s}
            for i, (d, s) in enumerate(zip(dice, source, strict=True))]


def test_interval_contains_the_mean_and_narrows_with_more_cases() -> None:
    rng = np.random.default_rng(7)
    few, many = rng.normal(0.6, 0.1, 10), rng.normal(0.6, 0.1, 400)
    small, large = stats.mean_ci(few), stats.mean_ci(many)
    assert small.low < few.mean() < small.high and large.low < many.mean() < large.high
    assert small.value == pytest.approx(few.mean())
    assert large.high - large.low < (small.high - small.low) / 3  # ~ 1 / sqrt(n)


def test_seeded_bootstrap_is_reproducible_and_is_scipys_percentile_bootstrap() -> None:
    values = np.random.default_rng(1).normal(0.5, 0.2, 25)
    first, again, other = stats.mean_ci(values, seed=3), stats.mean_ci(values, seed=3), stats.mean_ci(values, seed=4)
    assert first == again and first != other
    reference = scipy_bootstrap((values,), np.mean, n_resamples=1000, method="percentile",
                                rng=np.random.default_rng(3)).confidence_interval
    assert (first.low, first.high) == pytest.approx((reference.low, reference.high))


def test_interval_edge_cases() -> None:
    assert math.isnan(stats.mean_ci([]).value)
    one = stats.mean_ci([0.4, math.nan])  # NaN left out: one case, nothing to resample
    assert one.value == 0.4 and math.isnan(one.low) and one.format() == "0.400"
    assert stats.Estimate(0.5, 0.25, 0.75).format(2) == "0.50 [0.25, 0.75]"
    assert stats.Estimate.of({"dice": 0.5, "dice_ci_low": 0.4, "dice_ci_high": 0.6}, "dice").format() == \
        "0.500 [0.400, 0.600]"


def test_wilcoxon_small_on_a_clear_shift_and_one_without_change() -> None:
    base = np.random.default_rng(2).uniform(0.4, 0.7, 20)
    assert stats.wilcoxon_p(base + 0.05, base) < 0.001
    assert stats.wilcoxon_p(base, base) == 1.0
    jitter = np.array([0.01, -0.01, 0.02, -0.02, 0.03, -0.03] * 3)
    assert stats.wilcoxon_p(base[:18] + jitter, base[:18]) > 0.9
    assert stats.wilcoxon_p([0.5, math.nan], [0.4, 0.3]) == 1.0  # one pair left: no evidence
    assert math.isnan(stats.wilcoxon_p([math.nan], [0.1]))


def test_recovery_on_a_known_case() -> None:
    site = stats.SiteCases.from_runs("B", {0: (_rows([0.6, 0.8], [0.5, 0.5]), 0.9)})
    estimate = stats.recovery_ci([site])
    assert estimate.value == pytest.approx(dice_recovery(0.7, 0.5, 0.9)) == pytest.approx(0.5)
    assert estimate.low == pytest.approx(0.25) and estimate.high == pytest.approx(0.75)  # cases (0.6, 0.6)…(0.8, 0.8)
    assert stats.dice_ci([site]).value == pytest.approx(0.7)
    unchanged = stats.SiteCases.from_runs("C", {0: (_rows([0.5, 0.5], [0.5, 0.5]), 0.9)})
    assert stats.recovery_ci([unchanged]).value == 0 and stats.recovery_ci([unchanged]).high == 0
    # over sites (a modality): the mean of the sites' recoveries, every site weighing the same
    assert stats.recovery_ci([site, unchanged]).value == pytest.approx(0.25)
    no_gap = stats.SiteCases.from_runs("D", {0: (_rows([0.6], [0.5]), 0.5)})
    assert math.isnan(stats.recovery_ci([no_gap]).value)


def test_seeds_are_averaged_and_their_spread_reported() -> None:
    # seed 1 lists its cases in another order and has one case seed 0 lacks: cases are matched by id
    seed0 = _rows([0.6, 0.8], [0.5, 0.5])
    seed1 = [{"case_id": "c1", "dice": 0.9, "dice_source": 0.6}, {"case_id": "c0", "dice": 0.7, "dice_source": 0.6},
             {"case_id": "extra", "dice": 0.0, "dice_source": 0.0}]
    site = stats.SiteCases.from_runs("B", {1: (seed1, 1.0), 0: (seed0, 0.9)})
    assert site.seeds == (0, 1) and site.case_ids == ("c0", "c1")
    np.testing.assert_allclose(site.case_means("dice"), [0.65, 0.85])
    recoveries = [dice_recovery(0.7, 0.5, 0.9), dice_recovery(0.8, 0.6, 1.0)]
    np.testing.assert_allclose(site.seed_recovery(), recoveries)
    assert stats.recovery_ci([site]).value == pytest.approx(np.mean(recoveries))
    assert stats.seed_spread(recoveries) == pytest.approx((np.mean(recoveries), np.std(recoveries, ddof=1)))
    assert math.isnan(stats.seed_spread([0.3])[1]) and math.isnan(stats.seed_spread([])[0])
    other = stats.SiteCases.from_runs("C", {0: (_rows([0.5], [0.5]), 0.9)})
    assert stats.seed_values([site, other], stats.SiteCases.seed_dice) == pytest.approx([(0.7 + 0.5) / 2, 0.8])


def test_by_paradigm_table() -> None:
    methods = [{"modality": "MRI", "method": "source", "paradigm": "none", "dice": 0.5, "dice_source": 0.5},
               {"modality": "MRI", "method": "tent", "paradigm": "output", "dice": 0.6, "dice_source": 0.5},
               {"modality": "MRI", "method": "sar", "paradigm": "output", "dice": 0.7, "dice_source": 0.5},
               {"modality": "MRI", "method": "norm-net", "paradigm": "input", "dice": 0.6, "dice_source": 0.4},
               {"modality": "CT", "method": "tent", "paradigm": "output", "dice": 0.3, "dice_source": 0.2}]
    rows = {(r["modality"], r["paradigm"]): r for r in stats.by_paradigm(methods)}
    assert list(rows) == [("MRI", "none"), ("MRI", "input"), ("MRI", "output"), ("CT", "none"), ("CT", "output")]
    assert rows["MRI", "none"]["dice"] == pytest.approx(0.475)  # mean unadapted Dice of the four methods
    assert rows["MRI", "output"]["dice"] == pytest.approx(0.65) and rows["MRI", "output"]["methods"] == "tent,sar"
    assert rows["MRI", "input"]["delta"] == pytest.approx(0.2)


def test_collapses_listed_worst_first() -> None:
    rows = [{"case_id": "a", "dice": 0.5, "dice_source": 0.6, "collapsed": True},
            {"case_id": "b", "dice": 0.1, "dice_source": 0.7, "collapsed": "True", "collapse": "LV vanished",
             "foreground": 10, "foreground_source": 100},
            {"case_id": "c", "dice": 0.0, "dice_source": 0.9, "collapsed": False}]
    listed = stats.collapses(rows)
    assert [r["case_id"] for r in listed] == ["b", "a"]
    assert listed[0]["dice_change"] == pytest.approx(-0.6) and listed[0]["foreground_ratio"] == 0.1
    assert listed[0]["collapse"] == "LV vanished" and math.isnan(listed[1]["foreground_ratio"])


def test_summarize_cases() -> None:
    rows = [{"case_id": "a", "dice_source": 0.4, "dice_LV": 0.5, "dice": 0.5, "hd95": 3.0, "collapsed": False,
             "seconds": 2.0, "seconds_source": 1.0},
            {"case_id": "b", "dice_source": 0.6, "dice_LV": math.nan, "dice": 0.7, "hd95": 5.0, "collapsed": True,
             "seconds": 4.0, "seconds_source": 1.0}]
    summary = stats.summarize_cases(rows, 0.8)
    assert summary == pytest.approx({"dice_source": 0.5, "dice_LV": 0.5, "dice": 0.6, "hd95": 4.0,
                                     "dice_recovery": dice_recovery(0.6, 0.5, 0.8), "collapsed_cases": 1.0,
                                     "cases": 2.0, "passes": 2.0, "seconds_per_volume": 3.0,
                                     "seconds_per_volume_source": 1.0})
    recurring = stats.summarize_cases([{**r, "round": k} for k in (1, 2, 3) for r in rows], 0.8)
    assert (recurring["cases"], recurring["passes"]) == (2.0, 6.0)  # volumes, and visits of them
    unlabeled = stats.summarize_cases([{"entropy": 0.2, "collapsed": False, "seconds": 1.0}], 0.8, ("entropy",))
    assert unlabeled["entropy"] == 0.2 and math.isnan(unlabeled["dice_recovery"])
    assert "seconds_per_volume_source" not in unlabeled
    intervals = stats.case_intervals(_rows([0.6, 0.8, 0.7], [0.5, 0.5, 0.5]), 0.9)
    assert intervals["dice_ci_low"] < 0.7 < intervals["dice_ci_high"] and 0 < intervals["p_vs_source"] <= 0.25


def test_dice_change_is_the_mean_per_case_difference_over_seeds_and_sites() -> None:
    rows = _rows([0.9, 0.7, math.nan, 0.8], [0.9, 0.8, 0.5, 0.6])
    assert stats.mean_dice_change(rows) == pytest.approx((0.0 - 0.1 + 0.2) / 3)  # a pair with a NaN left out
    seeds = {0: (_rows([0.8, 0.6], [0.9, 0.7]), math.nan), 1: (_rows([0.9, 0.5], [0.9, 0.7]), math.nan)}
    site = stats.SiteCases.from_runs("A", seeds)
    assert site.seed_change() == pytest.approx([-0.1, -0.1])
    other = stats.SiteCases.from_runs("X", {0: (_rows([0.5, 0.5, 0.5], [0.4, 0.5, 0.6]), math.nan)})
    change = stats.change_ci([site, other])
    assert change.value == pytest.approx((-0.1 + 0.0) / 2)  # sites weigh equally
    assert change.low <= change.value <= change.high
