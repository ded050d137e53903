"""DG pre-training (`-a source_aug`): a property of the source model, checked, cached apart, applied to every training
batch from the run's seed, recorded as a param and a tag; the models trained without it keep their cache and cells."""

from __future__ import annotations

import pytest
import torch

from medtta.engine import Engine, RunConfig
from medtta.errors import RegistryError
from medtta.models import build_network
from medtta.models.training import cache_key, source_augmentation_of
from medtta.protocol import resolve_protocol


def test_an_unknown_source_augmentation_names_the_known_ones() -> None:
    with pytest.raises(RegistryError, match="none, gin, gin-ipa"):
        build_network("unet", 1, 4, source_aug="randconv")


def test_gin_ipa_is_cached_apart_and_none_keeps_the_old_key(dataset) -> None:
    from medtta.engine import prepare_dataset

    protocol = resolve_protocol(str(dataset), "A")
    data, _ = prepare_dataset(protocol, dataset.parent / "cache", progress=False)
    keys = {aug: cache_key(protocol, data, "unet", build_network("unet", 1, 4, **({"source_aug": aug} if aug else {})))
            for aug in (None, "none", "gin-ipa")}
    assert keys[None] == keys["none"] != keys["gin-ipa"]
    assert all(k[2].get("source_aug") is None for k in (keys[None], keys["none"]))


def test_the_augmentation_is_seeded_and_changes_every_batch() -> None:
    x = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    assert source_augmentation_of(build_network("unet", 1, 4), seed=0)(x) is x
    first, again = (source_augmentation_of(build_network("unet", 1, 4, source_aug="gin-ipa"), seed=3)
                    for _ in range(2))
    a, b = first(x), first(x)
    assert not torch.equal(a, x) and not torch.equal(a, b)  # a new draw per batch
    assert torch.equal(again(x), a)  # the same seed, the same draws


def test_the_run_records_it_and_cells_without_it_are_unchanged(dataset) -> None:
    protocol = resolve_protocol(str(dataset), "A")
    plain, default, dg = (Engine(protocol, RunConfig(method="tent", arch_config=config))
                          for config in ({}, {"source_aug": "none"}, {"source_aug": "gin-ipa"}))
    assert plain.cell() == default.cell() != dg.cell()
    assert dg.tags()["medtta.source_aug"] == "gin-ipa" and plain.tags()["medtta.source_aug"] == "none"
    assert dg.params()["arch.source_aug"] == "gin-ipa"
