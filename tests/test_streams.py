"""The order in which each setting streams target volumes to the adapter, and when it resets."""

from __future__ import annotations

import pytest

from medtta.bench import select_settings
from medtta.errors import MedttaError
from medtta.streams import SETTINGS, check_stream_hparams, parse_site_order, target_stream

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


LONG = {"B": [f"b{k:02d}" for k in range(12)], "C": [f"c{k:02d}" for k in range(12)]}


def test_gradual_ramps_from_one_site_into_the_next() -> None:
    stream = target_stream("gradual", LONG, seed=0, ramp=6)
    sites = "".join(v.site for v in stream)
    assert sorted(visits(stream)) == sorted(visits(target_stream("continual", LONG, seed=0)))  # each volume once
    assert not any(v.reset for v in stream)
    assert sites[:9] == "B" * 9 and sites[15:] == "C" * 9 and sites[9:15].count("C") == 3  # the ramp: 6 volumes
    assert target_stream("gradual", LONG, seed=0, ramp=6) == stream and target_stream(
        "gradual", LONG, seed=1, ramp=6) != stream
    assert visits(target_stream("gradual", LONG, seed=0, ramp=0)) == visits(target_stream("continual", LONG, 0))
    ramps = ["".join(v.site for v in target_stream("gradual", LONG, seed=s, ramp=6))[9:15] for s in range(300)]
    share = [sum(r[j] == "C" for r in ramps) / len(ramps) for j in range(6)]
    assert share == sorted(share) and share[0] < 0.2 and share[-1] > 0.7  # the next site's share rises
    small = target_stream("gradual", {"B": ["b1", "b2"], "C": ["c1"], "D": ["d1", "d2", "d3"]}, seed=0, ramp=8)
    assert sorted(visits(small)) == sorted([("B", "b1"), ("B", "b2"), ("C", "c1"), ("D", "d1"), ("D", "d2"),
                                            ("D", "d3")])  # small sites: at most half of each mixes


def test_shuffle_within_site_keeps_the_sites_in_order() -> None:
    stream = target_stream("continual", LONG, seed=0, shuffle_within_site=True)
    assert [v.site for v in stream] == ["B"] * 12 + ["C"] * 12
    assert [v.case for v in stream[:12]] != LONG["B"] and sorted(v.case for v in stream[:12]) == LONG["B"]
    assert target_stream("continual", LONG, seed=0, shuffle_within_site=True) == stream
    assert target_stream("continual", LONG, seed=1, shuffle_within_site=True) != stream
    per_site = target_stream("per-site", LONG, seed=0, shuffle_within_site=True)
    assert visits(per_site) == visits(stream) and [v.reset for v in per_site].count(True) == 2


@pytest.mark.parametrize("setting", ["continual", "per-site", "mixed", "recurring", "gradual"])
def test_reset_every_resets_the_stream_every_n_volumes(setting: str) -> None:
    plain = target_stream(setting, LONG, seed=0, rounds=2)
    stream = target_stream(setting, LONG, seed=0, rounds=2, reset_every=10)
    assert visits(stream) == visits(plain)
    resets = {k for k, v in enumerate(stream) if v.reset}
    assert resets == set(range(10, len(stream), 10)) | {k for k, v in enumerate(plain) if v.reset}


def test_reset_every_is_checked() -> None:
    check_stream_hparams("continual", {"reset_every": 10})
    for value in (-1, 2.5, True):
        with pytest.raises(MedttaError, match=f"-p reset_every={value}: expected a whole number of volumes"):
            check_stream_hparams("continual", {"reset_every": value})
    with pytest.raises(MedttaError, match="-p reset_every resets an online stream"):
        check_stream_hparams("episodic", {"reset_every": 10})
