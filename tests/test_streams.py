"""The order in which each setting streams target volumes to the adapter, and when it resets."""

from __future__ import annotations

import pytest

from medtta.bench import select_settings
from medtta.errors import MedttaError
from medtta.streams import SETTINGS, parse_site_order, target_stream

CASES = {"B": ["b1", "b2"], "C": ["c1", "c2", "c3"], "D": ["d1"]}
IN_ORDER = [("B", "b1"), ("B", "b2"), ("C", "c1"), ("C", "c2"), ("C", "c3"), ("D", "d1")]


def visits(stream) -> list[tuple[str, str]]:
    return [(v.site, v.case) for v in stream]


@pytest.mark.parametrize("setting", ["episodic", "continual", "per-site"])
def test_sites_one_after_another(setting: str) -> None:
    stream = target_stream(setting, CASES, seed=0)
    assert visits(stream) == IN_ORDER
    resets = [(v.site, v.case) for v in stream if v.reset]
    assert resets == ([("B", "b1"), ("C", "c1"), ("D", "d1")] if setting == "per-site" else [])


def test_mixed_is_a_seeded_shuffle_of_every_volume_without_reset() -> None:
    stream = target_stream("mixed", CASES, seed=0)
    assert sorted(visits(stream)) == sorted(IN_ORDER) and visits(stream) != IN_ORDER
    assert visits(target_stream("mixed", CASES, seed=0)) == visits(stream)
    assert visits(target_stream("mixed", CASES, seed=1)) != visits(stream)
    assert not any(v.reset for v in stream)


def test_recurring_repeats_the_continual_stream_per_round() -> None:
    stream = target_stream("recurring", CASES, seed=0, rounds=3)
    assert visits(stream) == IN_ORDER * 3 and [v.round for v in stream] == [1] * 6 + [2] * 6 + [3] * 6
    assert not any(v.reset for v in stream)


@pytest.mark.parametrize("setting", ["continual", "recurring"])
def test_shuffled_site_orders_reset_before_each_order(setting: str) -> None:
    stream = target_stream(setting, CASES, seed=0, rounds=2, site_order="shuffled:4")
    passes = 2 if setting == "recurring" else 1
    assert len(stream) == 4 * passes * 6
    orders = []
    for k in range(1, 5):
        mine = [v for v in stream if v.order == k]
        assert sorted(visits(mine)) == sorted(IN_ORDER * passes)
        assert [v.reset for v in mine].count(True) == (k > 1) and mine[0].reset == (k > 1)
        orders.append(tuple(dict.fromkeys(v.site for v in mine)))
    assert len(set(orders)) > 1  # 4 draws of 6 orders: not all the same for this seed
    assert target_stream(setting, CASES, seed=0, rounds=2, site_order="shuffled:4") == stream


@pytest.mark.parametrize("setting", ["episodic", "per-site", "mixed"])
def test_site_order_leaves_order_free_settings_alone(setting: str) -> None:
    assert target_stream(setting, CASES, 0, site_order="shuffled:3") == target_stream(setting, CASES, 0)


@pytest.mark.parametrize("spec", ["shuffled", "shuffled:0", "random:3", "shuffled:x"])
def test_bad_site_order_names_the_option(spec: str) -> None:
    with pytest.raises(MedttaError, match=f"--site-order '{spec}': expected fixed or shuffled:N"):
        parse_site_order(spec)


def test_bench_settings() -> None:
    assert select_settings("all") == SETTINGS and select_settings("both") == ("episodic", "continual")
    assert select_settings("mixed, per-site") == ("mixed", "per-site")
    with pytest.raises(MedttaError, match="--setting 'online': expected all or comma-separated settings of"):
        select_settings("episodic,online")
