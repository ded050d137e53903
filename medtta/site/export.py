"""`medtta export`: the source model of a protocol (trained if not cached) written as a self-contained bundle."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from medtta.data.plans import plan_3d
from medtta.engine import SourcePredictions, network_dims, prepare_dataset, resolve_device
from medtta.models.training import load_statistics, source_model
from medtta.paths import results_root
from medtta.protocol import Protocol
from medtta.registry import ARCHITECTURES
from medtta.site.bundle import statistics_of, write_bundle


def export_bundle(protocol: Protocol, out: Path, architecture: str = "unet", seed: int = 0,
                  arch_config: dict[str, Any] | None = None, epochs: int | None = None, device: str = "auto",
                  results: Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Train or load the source model of `protocol` for `architecture`, with the source statistics of every
    registered adapter of that architecture, measure its in-domain Dice and write the bundle into `out`.
    Returns the bundle's manifest."""
    protocol, arch_config = network_dims(protocol, arch_config or {}, architecture)
    ARCHITECTURES.get(architecture).check_config(arch_config)
    if epochs is not None:
        protocol = dataclasses.replace(protocol, training=dataclasses.replace(protocol.training, epochs=epochs))
    protocol = plan_3d(protocol)  # the bundle ships the planned preprocessing
    torch_device = resolve_device(device)
    results, statistics = results_root(results), statistics_of(architecture)
    dataset, volumes = prepare_dataset(protocol, results / "cache", progress)
    model, record = source_model(protocol, dataset, architecture, seed, results, torch_device, arch_config, progress,
                                 statistics)
    tests = dataset.cases_of(protocol.source_site, "test")
    volumes = volumes.with_pipeline(model.pipeline(protocol.preprocessing))
    unadapted = SourcePredictions(model, record, protocol, volumes, torch_device, cache=results / "cache")
    source = {"dice_in_domain": unadapted.in_domain_dice(tests, progress),
              "in_domain_cases": len(tests), "source_val_dice": record["val_dice"]}
    shipped = {name: load_statistics(record, name) for name in statistics}
    return write_bundle(out, model.cpu(), architecture, protocol, seed, shipped, source)
