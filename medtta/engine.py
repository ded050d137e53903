"""Runs a protocol: trains or loads the source model, then streams each target site's volumes
through an adapter in the episodic or continual setting, logging everything to MLflow."""

from __future__ import annotations

import copy
import csv
import dataclasses
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from medtta.adapters.base import Adapter
from medtta.data.datasets import Dataset, open_dataset
from medtta.data.layout import Case, load_volume
from medtta.data.preprocess import image_slices, to_native
from medtta.errors import MedttaError
from medtta.metrics import collapsed, dice_recovery, mean, volume_dice, volume_metrics
from medtta.models.training import load_statistics, source_model
from medtta.paths import results_root
from medtta.protocol import SETTINGS, Protocol
from medtta.registry import ADAPTERS, ARCHITECTURES
from medtta.tracking import Tracker, tracking_uri


@dataclass(frozen=True)
class RunConfig:
    """What a `medtta run` varies besides the protocol."""

    method: str
    setting: str | None = None  # None: the protocol's default
    seed: int = 0
    steps: int | None = None  # None: the method's default
    batch_size: int = 32  # slices per batch; a batch never mixes volumes
    hparams: dict[str, Any] = field(default_factory=dict)
    arch_config: dict[str, Any] = field(default_factory=dict)  # overrides of the architecture's defaults
    architecture: str | None = None  # None: the method's default (one of `Adapter.architectures()`)
    device: str = "auto"
    results: Path | None = None
    tracking_uri: str | None = None
    epochs: int | None = None  # None: the protocol's source-training epochs
    progress: bool = True


@dataclass
class SiteResult:
    site: str
    rows: list[dict[str, Any]]
    summary: dict[str, float]


@dataclass
class RunResult:
    protocol: Protocol
    config: RunConfig
    setting: str
    dice_in_domain: float
    in_domain_cases: int  # the source test cases the in-domain Dice rests on
    sites: list[SiteResult]
    run_id: str
    tracking_uri: str
    results: Path


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise MedttaError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    if name not in ("cpu", "cuda"):
        raise MedttaError(f"--device '{name}': expected auto, cpu or cuda")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def timed(fn, device: torch.device) -> tuple[torch.Tensor, float]:
    """`fn()` and its wall-clock seconds, CUDA work included."""
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - start


def _batches(x: torch.Tensor, size: int) -> list[torch.Tensor]:
    return list(torch.split(x, size))


def adapt_and_predict(adapter: Adapter, x: torch.Tensor, setting: str, steps: int, batch_size: int) -> torch.Tensor:
    """Logits for one volume's slices.

    episodic: reset, adapt to the volume (`steps` iterations, as the method defines them), then predict;
    continual: each batch is predicted, then used for one update (predict, then update); no reset.
    """
    if setting == "continual":
        return torch.cat([adapter(b) for b in _batches(x, batch_size)])
    adapter.reset()
    adapter.adapt(x, steps, batch_size)
    return torch.cat([adapter.predict(b) for b in _batches(x, batch_size)])


def method_source_model(method: str, protocol: Protocol, dataset: Dataset, seed: int, results: Path,
                        device: torch.device, config: dict[str, Any] | None = None, progress: bool = True,
                        architecture: str | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The source model `method` adapts (its `architecture`, default the method's own, trained or cached), with the
    source statistics the method asks for cached beside it; returns the model and its training record."""
    cls = ADAPTERS.get(method)
    return source_model(protocol, dataset, method_architecture(method, architecture), seed, results, device, config,
                        progress, cls.statistics_to_compute())


def method_architecture(method: str, architecture: str | None = None) -> str:
    """`architecture` if `method` adapts it, the method's default when None; another fails naming the ones it adapts."""
    known = ADAPTERS.get(method).architectures()
    if architecture is None:
        return known[0]
    if architecture not in known:
        raise MedttaError(f"architecture '{architecture}': {method} adapts {', '.join(known)}")
    return architecture


def create_adapter(method: str, model: torch.nn.Module, record: dict[str, Any], **hparams: Any) -> Adapter:
    """`method` wrapped around `model`, given the source statistics its training `record` points to."""
    cls = ADAPTERS.get(method)
    source_stats = {"source_stats": load_statistics(record, cls.statistics)} if cls.statistics else {}
    return ADAPTERS.create(method, model, **source_stats, **hparams)


def in_domain_dice(model: torch.nn.Module, protocol: Protocol, cases: list[Case], device: torch.device,
                   batch_size: int = 32, progress: bool = True) -> float:
    """Mean Dice of the unadapted `model` on the source site's test `cases`: the reference of Dice recovery."""
    p, scores = protocol, []
    for case in tqdm(cases, desc=f"in-domain Dice on site {p.source_site}", unit="volume", disable=not progress,
                     leave=False):
        volume = load_volume(case, p.labels)
        logits = predict_unadapted(model, image_slices(volume, p.preprocessing).to(device), batch_size)
        scores.append(volume_dice(to_native(logits, volume, p.preprocessing), torch.as_tensor(volume.label),
                                  p.scored_labels)["dice"])
    return mean(scores)


@torch.no_grad()
def predict_unadapted(model: torch.nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([model(b) for b in _batches(x, batch_size)])


class CaseLog:
    """Per-case rows, appended to a CSV as they come so that a failed run keeps what it evaluated."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: list[dict[str, Any]] = []
        path.parent.mkdir(parents=True, exist_ok=True)

    def add(self, row: dict[str, Any]) -> None:
        with self.path.open("a", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(row))
            if fh.tell() == 0:
                writer.writeheader()
            writer.writerow(row)
        self.rows.append(row)


class Engine:
    """One `medtta run`: a method on a protocol's target sites."""

    def __init__(self, protocol: Protocol, config: RunConfig) -> None:
        self.protocol = protocol
        self.config = config
        self.adapter_cls = ADAPTERS.get(config.method)
        self.adapter_cls.check_hparams(config.hparams)
        self.setting = config.setting or protocol.setting
        if self.setting not in SETTINGS:
            raise MedttaError(f"--setting '{self.setting}': expected one of {', '.join(SETTINGS)}")
        self.steps = self.adapter_cls.default_steps if config.steps is None else config.steps
        self.architecture_name = method_architecture(config.method, config.architecture)
        self.architecture = ARCHITECTURES.get(self.architecture_name)
        self.architecture.check_config(config.arch_config)
        self.device = resolve_device(config.device)
        self.results = results_root(config.results)
        if config.epochs is not None:
            training = dataclasses.replace(protocol.training, epochs=config.epochs)
            self.protocol = dataclasses.replace(protocol, training=training)

    def params(self) -> dict[str, Any]:
        p, c = self.protocol, self.config
        hparams = {**self.adapter_cls.defaults, **c.hparams}
        return {"method": c.method, "setting": self.setting, "steps": self.steps, "batch_size": c.batch_size,
                "seed": c.seed, "device": self.device.type, "source_site": p.source_site,
                "target_sites": ",".join(p.target_sites), "architecture": self.architecture_name,
                "train_epochs": p.training.epochs, "train_lr": p.training.lr,
                "input_size": "x".join(map(str, p.preprocessing.size)), "input_spacing": p.preprocessing.spacing,
                **{f"hp.{k}": v for k, v in hparams.items()},
                **{f"arch.{k}": v for k, v in {**self.architecture.defaults, **c.arch_config}.items()}}

    def tags(self) -> dict[str, Any]:
        p = self.protocol
        return {"medtta.method": self.config.method, "medtta.architecture": self.architecture_name,
                "medtta.paradigm": self.adapter_cls.paradigm, "medtta.protocol": p.name, "medtta.modality": p.modality,
                "medtta.setting": self.setting, "medtta.seed": self.config.seed, "medtta.site": p.source_site}

    def run(self) -> RunResult:
        p, c = self.protocol, self.config
        self.results.mkdir(parents=True, exist_ok=True)
        dataset = open_dataset(p)  # a broken dataset fails here, before any run is opened
        uri = tracking_uri(c.tracking_uri, self.results)
        tracker = Tracker(uri, p.name, self.results / "mlartifacts" if uri.startswith("sqlite:") else None)
        tags = self.tags()
        source_tests = dataset.cases_of(p.source_site, "test")
        params = {**self.params(), "in_domain_cases": len(source_tests)}
        with tracker.run(f"{c.method} seed={c.seed}", tags, params) as run_id:
            model, record = method_source_model(c.method, p, dataset, c.seed, self.results, self.device,
                                                c.arch_config, c.progress, self.architecture_name)
            tracker.log_metrics({"source_val_dice": record["val_dice"], "source_train_seconds": record["train_seconds"],
                                 **{f"source_{name}_val_loss": stage["val_loss"]
                                    for name, stage in record["stages"].items()}})
            in_domain = self._in_domain_dice(model, source_tests)
            tracker.log_metrics({"dice_in_domain": in_domain})
            seed_everything(c.seed)
            adapter = create_adapter(c.method, copy.deepcopy(model), record, **c.hparams).to(self.device)
            out_dir = self.results / "runs" / p.name / run_id
            sites = []
            for site in p.target_sites:
                with tracker.run(site, {**tags, "medtta.site": site}, nested=True):
                    log = CaseLog(out_dir / f"cases-{site}.csv")
                    try:
                        for case in tqdm(dataset.cases_of(site, "test"), desc=f"{c.method} on site {site}",
                                         unit="volume", disable=not c.progress, leave=False):
                            log.add(self._evaluate_case(case, site, model, adapter))
                    finally:
                        tracker.log_table(log.rows, "cases")
                    summary = self._summarize(log.rows, in_domain)
                    tracker.log_metrics(summary)
                sites.append(SiteResult(site, log.rows, summary))
            tracker.log_metrics({key: mean([s.summary[key] for s in sites])
                                 for key in ("dice", "dice_source", "dice_recovery", "seconds_per_volume")})
        return RunResult(p, c, self.setting, in_domain, len(source_tests), sites, run_id, uri, out_dir)

    def _in_domain_dice(self, model: torch.nn.Module, cases: list[Case]) -> float:
        return in_domain_dice(model, self.protocol, cases, self.device, self.config.batch_size, self.config.progress)

    def _evaluate_case(self, case: Case, site: str, model: torch.nn.Module, adapter: Adapter) -> dict[str, Any]:
        p, c = self.protocol, self.config
        volume = load_volume(case, p.labels)
        x = image_slices(volume, p.preprocessing).to(self.device)
        source_logits, source_seconds = timed(lambda: predict_unadapted(model, x, c.batch_size), self.device)
        logits, seconds = timed(lambda: adapt_and_predict(adapter, x, self.setting, self.steps, c.batch_size),
                                 self.device)
        reference = torch.as_tensor(volume.label)
        pred = to_native(logits, volume, p.preprocessing)
        source_dice = volume_dice(to_native(source_logits, volume, p.preprocessing), reference, p.scored_labels)["dice"]
        return {"case_id": case.case_id, "site": site, "dice_source": source_dice,
                **volume_metrics(pred, reference, p.scored_labels, volume.spacing),
                "collapsed": collapsed(pred, reference, p.scored_labels), "seconds": seconds,
                "seconds_source": source_seconds}

    def _summarize(self, rows: list[dict[str, Any]], in_domain: float) -> dict[str, float]:
        keys = [k for k in rows[0] if k.startswith(("dice", "hd95"))] if rows else []
        summary = {k: mean([r[k] for r in rows]) for k in keys}
        summary.update(
            dice_in_domain=in_domain,
            dice_recovery=dice_recovery(summary.get("dice", float("nan")), summary.get("dice_source", float("nan")),
                                        in_domain),
            seconds_per_volume=mean([r["seconds"] for r in rows]),
            seconds_per_volume_source=mean([r["seconds_source"] for r in rows]),
            collapsed_cases=float(sum(r["collapsed"] for r in rows)),
            cases=float(len(rows)),
        )
        return summary


def run(protocol: Protocol, config: RunConfig) -> RunResult:
    """Run `config.method` on `protocol` (the Python API behind `medtta run`)."""
    return Engine(protocol, config).run()
