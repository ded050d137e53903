"""EATA: the Fisher information cached beside the source checkpoint, the Fisher penalty, and which pixels count."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from test_adapters import _source_like, _source_stats
from torch import nn

from medtta.adapters.eata import EATA, pixel_weights, redundancy_threshold
from medtta.adapters.sar import pixel_entropy
from medtta.data.datasets import open_dataset
from medtta.data.synthetic.cardiac import generate
from medtta.engine import RunConfig, run
from medtta.models.base import norm_params
from medtta.models.training import SourceData, load_statistics, source_model
from medtta.protocol import resolve_protocol

E_MARGIN = 0.4 * math.log(4)
pytestmark = pytest.mark.filterwarnings("ignore::medtta.errors.MedttaWarning")  # one in-domain test case is enough


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """A tiny cardiac dataset, its protocol with one training epoch, and a results folder shared by this module."""
    root = tmp_path_factory.mktemp("ds") / "tiny-cardiac"
    generate(root, seed=1, cases={"A": 4, "B": 1}, splits={"A": [2, 1]})
    protocol = resolve_protocol(str(root), "A")
    protocol = dataclasses.replace(protocol, training=dataclasses.replace(protocol.training, epochs=1))
    return protocol, open_dataset(protocol), tmp_path_factory.mktemp("results")


def _never(model: nn.Module, volumes) -> dict[str, torch.Tensor]:
    raise AssertionError("recomputed the cached statistics")


def test_fisher_is_computed_on_the_validation_split_once_and_cached_beside_the_checkpoint(tiny_source: tuple) -> None:
    protocol, dataset, results = tiny_source
    cpu = torch.device("cpu")
    seen = []

    def fisher(model: nn.Module, volumes) -> dict[str, torch.Tensor]:
        volumes = list(volumes)
        seen.extend(x for x, _ in volumes)
        return EATA.source_statistics(model, volumes)

    model, record = source_model(protocol, dataset, "unet", 0, results, cpu, progress=False,
                                 statistics={"eata-fisher": fisher})
    val = [x for x, _ in SourceData(protocol, dataset).volumes["val"]]
    assert len(seen) == len(val) and all(torch.equal(a, b) for a, b in zip(seen, val, strict=True))
    checkpoint, stats_file = Path(record["checkpoint"]), Path(record["statistics"]["eata-fisher"]["path"])
    assert stats_file.parent == checkpoint.parent and stats_file.name.startswith(f"{checkpoint.stem}.eata-fisher-")
    assert stats_file.is_file() and stats_file.with_suffix(".json").is_file() and not record["cached"]
    stats = load_statistics(record, "eata-fisher")
    names = {id(p): n for n, p in model.named_parameters()}
    assert set(stats) == {names[id(p)] for p in norm_params(model)}
    assert all((f >= 0).all() for f in stats.values()) and any((f > 0).any() for f in stats.values())

    mtime = stats_file.stat().st_mtime_ns
    _, again = source_model(protocol, dataset, "unet", 0, results, cpu, progress=False,
                            statistics={"eata-fisher": _never})
    assert again["cached"] and again["statistics"]["eata-fisher"]["path"] == str(stats_file)
    assert stats_file.stat().st_mtime_ns == mtime
    assert all(torch.equal(v, load_statistics(again, "eata-fisher")[k]) for k, v in stats.items())
    _, plain = source_model(protocol, dataset, "unet", 0, results, cpu, progress=False)
    assert plain["cached"] and plain["statistics"] == {}  # methods without statistics: nothing computed or read


def test_engine_hands_the_cached_fisher_to_eata(tiny_source: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    protocol, _, results = tiny_source
    source_model(protocol, open_dataset(protocol), "unet", 0, results, torch.device("cpu"), progress=False,
                 statistics={"eata-fisher": EATA.source_statistics})
    monkeypatch.setattr(EATA, "source_statistics", classmethod(_never))  # adaptation never reads source data
    result = run(protocol, RunConfig("eata", setting="continual", epochs=1, device="cpu", results=results,
                                     progress=False))
    assert [s.site for s in result.sites] == ["B"] and 0 <= result.sites[0].summary["dice"] <= 1


@pytest.fixture
def eata() -> EATA:
    model = _source_like("unet")
    return EATA(model, source_stats=_source_stats(EATA, model))


def test_fisher_penalty_is_zero_at_the_source_weights_and_grows_away_from_them(eata: EATA) -> None:
    assert eata.fisher_penalty().item() == 0
    assert eata.fisher.sum() > 0 and eata.fisher.numel() == sum(p.numel() for p in eata.params)
    p = eata.params[0]
    with torch.no_grad():
        p.add_(0.1)
    expected = 2000 * (eata.fisher[: p.numel()] * 0.01).sum()
    assert eata.fisher_penalty().item() == pytest.approx(expected.item(), rel=1e-4) and expected > 0


def test_fisher_that_does_not_match_the_model_fails() -> None:
    model = _source_like("unet")
    stats = _source_stats(EATA, model)
    stats.pop(next(iter(stats)))
    with pytest.raises(Exception, match="Fisher information does not match the model"):
        EATA(model, source_stats=stats)


def test_redundancy_threshold_is_the_official_one_at_1000_classes() -> None:
    assert redundancy_threshold(0.05, 1000) == pytest.approx(0.05)
    assert redundancy_threshold(0.05, 10) == pytest.approx(0.368, abs=1e-3)
    assert 0.05 < redundancy_threshold(0.05, 4) < redundancy_threshold(0.05, 2) < 1


def test_only_reliable_non_redundant_pixels_count_weighted_by_their_confidence() -> None:
    logits = torch.zeros(1, 4, 1, 3)
    logits[0, 0, 0, 0] = 8  # confident background
    logits[0, :, 0, 1] = torch.tensor([1.0, 0.5, 0.0, 0.2])  # unsure: entropy above the margin
    logits[0, 2, 0, 2] = 8  # confident class 2
    entropy = pixel_entropy(logits)[0, 0]
    assert entropy[0] < E_MARGIN < entropy[1]
    first = pixel_weights(logits, torch.zeros(4), E_MARGIN, 0.55)[0, 0]  # no average yet: nothing redundant
    assert torch.allclose(first, torch.stack([1 / torch.exp(entropy[0] - E_MARGIN), torch.tensor(0.0),
                                              1 / torch.exp(entropy[2] - E_MARGIN)]))
    average = torch.tensor([0.9, 0.03, 0.03, 0.04])  # mostly background so far
    later = pixel_weights(logits, average, E_MARGIN, 0.55)[0, 0]
    assert later[0] == 0 and later[1] == 0 and later[2] == first[2]


def test_the_average_follows_the_pixels_that_counted(eata: EATA) -> None:
    x = torch.randn(4, 1, 32, 32, generator=torch.Generator().manual_seed(1)) * 3 - 2
    threshold = redundancy_threshold(0.05, 4)
    expected = torch.zeros(4)
    for step in range(2):
        average = eata.average.clone()
        logits = eata.update(x)  # the logits before the step
        counted = pixel_weights(logits, average, E_MARGIN, threshold) > 0
        assert counted.any()
        mean = logits.softmax(1).movedim(1, -1)[counted].mean(0)
        expected = mean if step == 0 else 0.9 * expected + 0.1 * mean
        assert torch.allclose(eata.average, expected, atol=1e-6)


def test_a_batch_where_no_pixel_counts_changes_nothing() -> None:
    model = _source_like("unet")
    eata = EATA(model, source_stats=_source_stats(EATA, model), margin=1e-6)  # no pixel is that certain
    before = {k: v.clone() for k, v in eata.state_dict().items()}
    eata.update(torch.randn(4, 1, 32, 32))
    assert all(torch.equal(v, eata.state_dict()[k]) for k, v in before.items())
    assert eata.optimizer.state_dict()["state"] == {}
