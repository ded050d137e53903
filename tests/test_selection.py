"""Choosing a configuration among a sweep's without test labels: what each strategy picks, and that none but the
oracle reads the labels of the site it scores."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from medtta.engine import case_row, unadapted_result
from medtta.errors import MedttaError
from medtta.metrics import mean
from medtta.report import selection
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
    hot.sites[0].rows[1]["collapsed_label_free"] = True  # site B
    assert _picks(cells)["entropy"]["B"] == "default"
    assert _picks(cells)["agreement"]["B"] == "lr=0.0001"  # the most agreeing one is still safe
    hot.sites[0].rows[1].update(collapsed_label_free=False, collapsed=True)  # the label-based flag is not read
    assert _picks(cells)["entropy"]["B"] == "lr=0.01"


# The leakage check: a sweep's case rows made through the engine's own `case_row` from seeded logits, unadapted
# predictions and references; then one site's reference changes and every row of that site is recomputed.
LABELS = {"a": 1, "b": 2}
SHARPNESS = {"default": 1.0, "lr=0.01": 4.0, "lr=0.0001": 0.5}  # logit scale: the sharper, the lower the entropy
CASES = 2


def _reference(site: str, case: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(SITES.index(site) * 10 + case)
    return torch.randint(0, 3, (8, 8), generator=generator)


def _predictions(site: str, case: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The unadapted prediction and each configuration's logits on a case: each partly right, by its own seed. On
    site B the unadapted model and the sharpest configuration never predict b (the label-free flag stays off)."""
    generator = torch.Generator().manual_seed(100 + SITES.index(site) * 10 + case)
    truth = torch.nn.functional.one_hot(_reference(site, case), 3).permute(2, 0, 1).float()
    source = torch.randn(3, 8, 8, generator=generator) + truth
    logits = {c: scale * (torch.randn(3, 8, 8, generator=generator) + 1.5 * torch.rand(1, generator=generator) * truth)
              for c, scale in SHARPNESS.items()}
    if site == "B":
        source[2] = logits["lr=0.01"][2] = -20.0
    return source.argmax(0), logits


def _rows(site: str, config: str, references: dict[tuple[str, int], torch.Tensor]) -> list[dict]:
    rows = []
    for case in range(CASES):
        source_pred, logits = _predictions(site, case)
        reference = references[site, case]
        source = unadapted_result(source_pred, reference, LABELS, 0.1)
        pred = logits[config].argmax(0)
        rows.append(case_row(f"{site}{case}", site, logits[config][None], pred, reference, source, LABELS,
                             (1.0, 1.0), 0.1))
    return rows


def _sweep(references: dict[tuple[str, int], torch.Tensor], configs: list[str]) -> list[Cell]:
    cells = []
    for config in configs:
        lr = {"default": "0.001", "lr=0.01": "0.01", "lr=0.0001": "0.0001"}[config]
        runs = [SiteRun("r", site, {}, _rows(site, config, references)) for site in SITES]
        cells.append(Cell("id", "medtta/p", "p", "MRI", "tent", "output", "unet", "episodic", 0,
                          {"seed": "0", "hp.lr": lr}, {"dice_in_domain": 0.9}, 0, runs, config=config))
    label_variants(cells)
    return cells


def _perturbations(site: str) -> dict[str, dict[int, torch.Tensor]]:
    """New references for `site`'s cases: each configuration's own prediction (it becomes the site's best), b
    removed (the label-based collapse flag of site B's sharpest configuration goes), and other random labels."""
    out = {f"{config}'s prediction": {k: _predictions(site, k)[1][config].argmax(0) for k in range(CASES)}
           for config in SHARPNESS}
    out["without b"] = {k: _reference(site, k).masked_fill(_reference(site, k) == 2, 0) for k in range(CASES)}
    out["random"] = {k: torch.randint(0, 3, (8, 8), generator=torch.Generator().manual_seed(999 + k))
                     for k in range(CASES)}
    return out


def _changed_picks(configs: list[str]) -> set[tuple[str, str]]:
    """The (strategy, site) whose pick changed when only that site's labels changed, over every perturbation."""
    original = {(s, k): _reference(s, k) for s in SITES for k in range(CASES)}
    [before] = selection.families(_sweep(original, configs))
    changed = set()
    for site in SITES:
        for references in _perturbations(site).values():
            [after] = selection.families(_sweep({**original, **{(site, k): r for k, r in references.items()}},
                                                configs))
            changed |= {(strategy, site) for strategy in STRATEGIES
                        if selection.choose(before, strategy, site) != selection.choose(after, strategy, site)}
    return changed


def _leaks(configs: list[str]) -> set[tuple[str, str]]:
    changed = _changed_picks(configs)
    assert {s for strategy, s in changed if strategy == "oracle"} == set(SITES)  # the labels did matter
    return {(strategy, site) for strategy, site in changed if strategy != "oracle"}


def test_no_realistic_strategy_reads_the_labels_of_the_site_it_scores() -> None:
    """Changing a site's labels, and every field derived from them, never changes what a non-oracle strategy picks
    for that site (with the paper's default among the configurations, and without it)."""
    assert _leaks(list(SHARPNESS)) == set()
    assert _leaks(["lr=0.01", "lr=0.0001"]) == set()


def _mutant_choose(mutation: Callable) -> Callable:
    real = selection.choose

    def choose(family: selection.Family, strategy: str, site: str) -> str | None:
        return mutation(real, family, strategy, site)
    return choose


def _entropy_reads_dice(real, family, strategy, site):
    if strategy == "entropy":
        return selection._best(family.configs,
                               lambda c: family.recovery(c, site) - family.indicators[c][site]["entropy"])
    return real(family, strategy, site)


def _loso_with_itself(real, family, strategy, site):
    if strategy == "loso":
        return selection._best(family.configs, lambda c: mean([family.recovery(c, s) for s in family.site_names]))
    return real(family, strategy, site)


def _val_site_on_scored(real, family, strategy, site):
    if strategy.startswith("val-site:") and real(family, strategy, site) is not None:
        return selection._best(family.configs, lambda c: family.recovery(c, site))
    return real(family, strategy, site)


def _agreement_drops_regressions(real, family, strategy, site):
    if strategy == "agreement":  # keeps configurations with recovery > 0 on the site
        kept = [c for c in family.configs if family.recovery(c, site) > 0]
        return selection._best(kept, lambda c: family.indicators[c][site]["agreement"])
    return real(family, strategy, site)


def _default_falls_back_to_oracle(real, family, strategy, site):
    if strategy == "default" and real(family, strategy, site) is None:
        return real(family, "oracle", site)
    return real(family, strategy, site)


def _agreement_reads_dice(real, family, strategy, site):
    if strategy == "agreement":
        return selection._best(family.configs, lambda c: family.indicators[c][site]["agreement"]
                               + family.recovery(c, site))
    return real(family, strategy, site)


def _label_based_collapse(real_indicators, cells, sites):
    """The leak this test missed: selection filtering on the label-based `collapsed` flag."""
    out = real_indicators(cells, sites)
    for site in sites:
        rows = [r for c in cells for s in c.sites if s.site == site for r in s.rows]
        out[site]["collapsed_label_free"] = float(any(r["collapsed"] for r in rows))
    return out


MUTANTS = {"entropy adds recovery": ("choose", _entropy_reads_dice),
           "loso counts the scored site": ("choose", _loso_with_itself),
           "val-site chooses on the scored site": ("choose", _val_site_on_scored),
           "agreement keeps recovery > 0": ("choose", _agreement_drops_regressions),
           "default falls back to the oracle": ("choose", _default_falls_back_to_oracle),
           "agreement adds recovery": ("choose", _agreement_reads_dice),
           "collapse flag from the labels": ("_indicators", _label_based_collapse)}


@pytest.mark.parametrize("mutant", MUTANTS)
def test_the_leakage_check_catches_a_leaking_selector(mutant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    attribute, mutation = MUTANTS[mutant]
    real = getattr(selection, attribute)
    if attribute == "choose":
        monkeypatch.setattr(selection, "choose", _mutant_choose(mutation))
    else:
        monkeypatch.setattr(selection, attribute, lambda *args: mutation(real, *args))
    assert _leaks(list(SHARPNESS)) | _leaks(["lr=0.01", "lr=0.0001"]), mutant


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
