"""Runs a protocol: trains or loads the source model, then streams the target sites' volumes through an adapter
in one of the settings of `medtta.streams`, logging everything to MLflow."""

from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import math
import os
import random
import resource
import socket
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from medtta.adapters.base import Adapter
from medtta.adapters.sar import pixel_entropy
from medtta.data.cache import PreparedVolume, VolumeCache, digest, save_atomic, validated_checksums
from medtta.data.datasets import Dataset, open_dataset
from medtta.data.layout import Case, load_volume
from medtta.data.pipeline import Pipeline
from medtta.data.plans import plan_3d
from medtta.errors import MedttaError, MedttaWarning
from medtta.metrics import (
    collapse_reason,
    foreground_voxels,
    label_free_indicators,
    mean,
    site_recovery_flag,
    volume_dice,
    volume_metrics,
)
from medtta.models.training import load_statistics, source_model
from medtta.paths import results_root
from medtta.precision import autocast, check_precision, use_tf32
from medtta.progress import progress_bar
from medtta.protocol import Protocol
from medtta.registry import ADAPTERS, ARCHITECTURES
from medtta.stats import mean_dice_change, recovery_per_round, slope, summarize_cases
from medtta.streams import (
    DEFAULT_RAMP,
    DEFAULT_ROUNDS,
    ORDERED,
    STREAM_HPARAMS,
    Visit,
    check_setting,
    check_stream_hparams,
    parse_site_order,
    pass_labels,
    target_stream,
    with_resets,
)
from medtta.tracking import Tracker, parent_runs, previous, stale_message, tracking_uri

if TYPE_CHECKING:
    from mlflow.entities import Run


@dataclass(frozen=True)
class RunConfig:
    """What a `medtta run` varies besides the protocol."""

    method: str
    setting: str | None = None  # None: the protocol's default
    seed: int = 0
    steps: int | None = None  # None: the method's default
    batch_size: int | None = None  # slices per batch (a batch never mixes volumes), 3D: patches; None: 32, 3D: 2
    patch_updates: int | None = None  # 3D: updates per pass over a volume; None: one per batch of its windows' count
    hparams: dict[str, Any] = field(default_factory=dict)
    arch_config: dict[str, Any] = field(default_factory=dict)  # overrides of the architecture's defaults
    architecture: str | None = None  # None: the method's default (one of `Adapter.architectures()`)
    device: str = "auto"
    results: Path | None = None
    tracking_uri: str | None = None
    epochs: int | None = None  # None: the protocol's source-training epochs
    progress: bool = True
    source_site_check: bool = False  # also adapt on the source site's test cases, as a stream of their own
    precision: str = "fp32"  # of source training, adaptation and inference: fp32, bf16 or fp16 (see medtta.precision)
    rounds: int = DEFAULT_ROUNDS  # passes over the target sites in the recurring setting
    site_order: str = "fixed"  # or `shuffled:N`: the continual and recurring figures averaged over N site orders
    rerun: bool = False  # run again though an identical run (same cell, same data) finished in the store
    shuffle_within_site: bool = False  # each site's volumes in a seeded order instead of case order
    ramp: int = DEFAULT_RAMP  # gradual: volumes over which one site's stream turns into the next's


#: `medtta.site_role` of a child run: a target site, or the source site of the "do no harm" check
TARGET, SOURCE = "target", "source"
#: what a site's and a parent run's summary hold (MLflow keeps no NaN: a run read back lacks the undefined ones)
SUMMARY_KEYS = ("cases", "dice", "dice_source", "dice_recovery", "seconds_per_volume", "collapsed_cases",
                "source_site_harm")
PARENT_KEYS = ("seconds_per_volume", "seconds_per_volume_source", "cost_ratio", "peak_memory_mb")


@dataclass
class SiteResult:
    site: str
    rows: list[dict[str, Any]]
    summary: dict[str, float]
    role: str = TARGET


@dataclass
class RunResult:
    protocol: Protocol
    config: RunConfig
    setting: str
    dice_in_domain: float
    in_domain_cases: int  # the source test cases the in-domain Dice rests on
    sites: list[SiteResult]  # the target sites
    run_id: str
    tracking_uri: str
    results: Path
    source_site: SiteResult | None = None  # the source-site check, when `config.source_site_check`
    metrics: dict[str, float] = field(default_factory=dict)  # the parent run's: cost ratio, peak memory, ...
    device: str = "cpu"  # where it ran (what peak memory measures)
    reused: bool = False  # an identical run finished before: this is its record, read back from the store
    data_changed: bool = False  # it finished before only on other data, so it ran again


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
    any other setting is online: each batch is predicted, then used for one update; the stream resets.
    """
    if setting != "episodic":
        return torch.cat([adapter(b) for b in _batches(x, batch_size)])
    adapter.reset()
    adapter.adapt(x, steps, batch_size)
    return torch.cat([adapter.predict(b) for b in _batches(x, batch_size)])


def method_source_model(method: str, protocol: Protocol, dataset: Dataset, seed: int, results: Path,
                        device: torch.device, config: dict[str, Any] | None = None, progress: bool = True,
                        architecture: str | None = None, precision: str = "fp32"
                        ) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The source model `method` adapts (its `architecture`, default the method's own, trained in `precision` or
    cached), with the source statistics the method asks for cached beside it; returns the model and its training
    record."""
    cls = ADAPTERS.get(method)
    return source_model(protocol, dataset, method_architecture(method, architecture), seed, results, device, config,
                        progress, cls.statistics_to_compute(), precision)


def requested_dims(protocol: Protocol, arch_config: dict[str, Any], architecture: str | None = None) -> Any:
    """The network dimensions a run asks for: `-a spatial_dims`, else those the architecture's config fixes (a given
    nnU-Net's), else the protocol's `dims` (not yet checked)."""
    fixed = ARCHITECTURES.get(architecture).dims_of(arch_config) if architecture else None
    return arch_config.get("spatial_dims", fixed or protocol.preprocessing.dims)


def network_dims(protocol: Protocol, arch_config: dict[str, Any], architecture: str
                 ) -> tuple[Protocol, dict[str, Any]]:
    """The protocol and architecture config in the dimensions the network runs in: `-a spatial_dims`, else the
    protocol's `dims`; the architecture gets `spatial_dims` when it has that key. Fails when it is 2D only."""
    dims = requested_dims(protocol, arch_config, architecture)
    arch_config = {k: v for k, v in arch_config.items() if k != "spatial_dims"}
    if dims not in (2, 3):
        raise MedttaError(f"-a spatial_dims={dims}: expected 2 (slices) or 3 (volumes)")
    if "spatial_dims" in ARCHITECTURES.get(architecture).defaults:
        arch_config["spatial_dims"] = dims
    elif dims == 3:
        raise MedttaError(f"architecture {architecture} is 2D only ({_dims_hint(protocol, dims)})")
    return protocol.with_dims(dims), arch_config


def _dims_hint(protocol: Protocol, dims: int) -> str:
    return ("-a spatial_dims=2 runs it on slices" if dims == 3 else
            f"protocol {protocol.name} or -a spatial_dims=3 runs it on volumes")


def resolve_dims(protocol: Protocol, config: RunConfig, architecture: str) -> tuple[Protocol, RunConfig]:
    """`network_dims` for a run, which also fails when the method does not adapt networks of those dimensions, or
    of the normalization `-a norm` builds; the batch size defaults to 32 slices or 2 patches."""
    cls = ADAPTERS.get(config.method)
    dims = requested_dims(protocol, config.arch_config, architecture)
    if dims in (2, 3) and dims not in cls.spatial_dims:
        raise MedttaError(f"{config.method} adapts {' and '.join(f'{d}D' for d in cls.spatial_dims)} networks, not "
                          f"{dims}D ({_dims_hint(protocol, dims)})")
    protocol, arch_config = network_dims(protocol, config.arch_config, architecture)
    norm = ARCHITECTURES.get(architecture).norm_of(arch_config)
    refusal = cls.norm_refusal(norm)
    if refusal:
        raise MedttaError(f"{config.method} {refusal} (use -a norm={cls.norms[0]})")
    batch_size = config.batch_size or (32 if protocol.preprocessing.dims == 2 else 2)
    return protocol, dataclasses.replace(config, arch_config=arch_config, batch_size=batch_size)


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


@dataclass(frozen=True)
class Unadapted:
    """The unadapted model on one case: its prediction (native label map), Dice and seconds."""

    pred: torch.Tensor
    dice: float
    seconds: float


def unadapted_result(pred: torch.Tensor, reference: torch.Tensor, labels: dict[str, int], seconds: float
                     ) -> Unadapted:
    """The unadapted model's result on a case from its native prediction and the reference."""
    return Unadapted(pred, volume_dice(pred, reference, labels)["dice"], seconds)


def case_row(case_id: str, site: str, logits: torch.Tensor, pred: torch.Tensor, reference: torch.Tensor,
             source: Unadapted, labels: dict[str, int], spacing: tuple[float, ...], seconds: float) -> dict[str, Any]:
    """A case's row from the adapted logits and native prediction, the reference and the unadapted result: metrics
    against the reference, the label-free indicators (`entropy`, `agreement`, and `collapsed_label_free` with its
    reason, which configuration selection may read) and the label-based collapse flag (`collapsed`, reported)."""
    unsupervised = label_free_indicators(pred, source.pred, labels, spacing)
    reason = collapse_reason(pred, reference, labels, source.pred)
    return {"case_id": case_id, "site": site, "dice_source": source.dice,
            **volume_metrics(pred, reference, labels, spacing),
            "foreground_source": foreground_voxels(source.pred, labels), "foreground": foreground_voxels(pred, labels),
            "seconds": seconds, "seconds_source": source.seconds, **label_free(logits, pred, source.pred),
            "collapsed_label_free": unsupervised["collapsed"], "collapse_label_free": unsupervised["collapse"],
            "collapsed": bool(reason), "collapse": reason}


def prepare_dataset(protocol: Protocol, cache: Path, progress: bool = True) -> tuple[Dataset, VolumeCache]:
    """The protocol's dataset, checked (once per fingerprint of its files, cached in `cache`) before anything is
    trained or logged, and its cases preprocessed on demand (cached too)."""
    dataset = open_dataset(protocol)
    checksums = validated_checksums(dataset, cache, progress)
    return dataset, VolumeCache(dataset, checksums, Pipeline(protocol.preprocessing), cache)


class SourcePredictions:
    """The unadapted model's prediction of each case, computed once per (model, device, case) and cached in
    `<cache>/unadapted/`: every method adapting the same source model compares against the same predictions,
    and the in-domain Dice is their mean over the source test cases."""

    def __init__(self, model: torch.nn.Module, record: dict[str, Any], protocol: Protocol, volumes: VolumeCache,
                 device: torch.device, batch_size: int = 32, cache: Path | None = None,
                 precision: str = "fp32") -> None:
        """`record`: the model's training record (`source_model`), whose `model_id` (else checkpoint name) identifies
        the model; `volumes` are prepared by the model's pipeline (`VolumeCache.with_pipeline`)."""
        self.model, self.protocol, self.volumes = model, protocol, volumes
        self.device, self.batch_size, self.precision = device, batch_size, precision
        name = record.get("model_id") or Path(record["checkpoint"]).stem
        model_id = f"{name}-{device.type}{'' if precision == 'fp32' else '-' + precision}"
        self.dir = cache / "unadapted" / model_id if cache is not None else None

    def of(self, case: Case) -> tuple[PreparedVolume, Unadapted]:
        """The case prepared for the network, and the unadapted model's result on it."""
        prepared = self.volumes.get(case)
        path = self.dir / f"{self.volumes.key(case)}.pt" if self.dir is not None else None
        if path is not None and path.is_file():
            saved = torch.load(path, weights_only=True)
            return prepared, Unadapted(saved["pred"].long(), float(saved["dice"]), float(saved["seconds"]))
        p, x = self.protocol, prepared.x.to(self.device)
        with autocast(self.precision, self.device):
            logits, seconds = timed(lambda: predict_unadapted(self.model, x, self.batch_size), self.device)
        pred = self.volumes.pipeline.to_native(logits, prepared.volume, prepared.meta)
        result = unadapted_result(pred, torch.as_tensor(prepared.volume.label), p.scored_labels, seconds)
        if path is not None:
            save_atomic({"pred": pred.to(torch.int16), "dice": result.dice, "seconds": seconds}, path)
        return prepared, result

    def in_domain_dice(self, cases: list[Case], progress: bool = True) -> float:
        """Mean Dice of the unadapted model on the source site's test `cases`: the reference of Dice recovery."""
        return mean([self.of(case)[1].dice for case in progress_bar(
            cases, desc=f"in-domain Dice on site {self.protocol.source_site}", unit="volume", disable=not progress,
            leave=False)])


def reset_peak_memory(device: torch.device) -> None:
    """Start measuring `peak_memory_mb` afresh (on Linux, writing 5 to clear_refs resets the peak resident set)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif Path("/proc/self/clear_refs").exists():
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: the most memory allocated since `reset_peak_memory`; CPU: the peak resident set of this process
    (since the reset on Linux, else since it started)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    status = Path("/proc/self/status")
    if status.exists():
        line = next(line for line in status.read_text().splitlines() if line.startswith("VmHWM:"))
        return int(line.split()[1]) / 2**10  # kB
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


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
        with self.path.open("a", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(row))
            if fh.tell() == 0:
                writer.writeheader()
            writer.writerow(row)
        self.rows.append(row)


#: per target site, the cases whose middle slices are saved for the report's qualitative grid: the one adaptation
#: harmed most (adapted minus unadapted Dice) and the collapsed ones, up to this many
QUALITATIVE_CASES = 4


def run_name(method: str, protocol: str, seed: int, setting: str, config: str = "default", dims: int = 2) -> str:
    """How a parent run reads in the MLflow runs table, e.g. `tent · synth-mri · seed 0 · lr=0.01` (`· 3D` for a 3D
    network)."""
    return " · ".join([method, protocol, f"seed {seed}", *([setting] if setting != "episodic" else []),
                       *([config] if config != "default" else []), *(["3D"] if dims == 3 else [])])


class Engine:
    """One `medtta run`: a method on a protocol's target sites."""

    def __init__(self, protocol: Protocol, config: RunConfig) -> None:
        self.protocol = protocol
        self.config = config
        self.adapter_cls = ADAPTERS.get(config.method)
        self.setting = config.setting or protocol.setting
        check_setting(self.setting, config.rounds)
        check_stream_hparams(self.setting, config.hparams)
        self.method_hparams = {k: v for k, v in config.hparams.items() if k not in STREAM_HPARAMS}
        self.adapter_cls.check_hparams(self.method_hparams)
        parse_site_order(config.site_order)
        self.steps = self.adapter_cls.default_steps if config.steps is None else config.steps
        self.architecture_name = method_architecture(config.method, config.architecture)
        self.architecture = ARCHITECTURES.get(self.architecture_name)
        protocol, config = self.protocol, self.config = resolve_dims(protocol, config, self.architecture_name)
        self.architecture.check_config(config.arch_config)
        self.device = resolve_device(config.device)
        self.precision = check_precision(config.precision)
        use_tf32(self.precision, self.device)
        self.results = results_root(config.results)
        self.cache = self.results / "cache"
        if config.epochs is not None:
            training = dataclasses.replace(protocol.training, epochs=config.epochs)
            self.protocol = dataclasses.replace(protocol, training=training)
        self.protocol = plan_3d(self.protocol)  # before `params()` and `cell()`, which hold the planned values
        self._data: tuple[Dataset, VolumeCache] | None = None

    @property
    def reset_every(self) -> int:
        return self.config.hparams.get("reset_every", STREAM_HPARAMS["reset_every"])

    def data(self) -> tuple[Dataset, VolumeCache]:
        """The protocol's dataset, checked, and its volume cache (prepared once per engine)."""
        if self._data is None:
            self._data = prepare_dataset(self.protocol, self.cache, self.config.progress)
        return self._data

    def data_fingerprint(self) -> str:
        """The contents and splits of every case this run reads: the source site's (training, in-domain Dice and
        the source-site check) and the target sites' test cases. A run on other data is another result."""
        dataset, volumes = self.data()
        p = self.protocol
        return volumes.fingerprint([*dataset.cases_of(p.source_site),
                                    *(c for site in p.target_sites for c in dataset.cases_of(site, "test"))])

    def params(self) -> dict[str, Any]:
        p, c = self.protocol, self.config
        hparams = {**self.adapter_cls.defaults, **c.hparams}
        return {"method": c.method, "setting": self.setting, "steps": self.steps, "batch_size": c.batch_size,
                "seed": c.seed, "device": self.device.type, "source_site": p.source_site,
                "target_sites": ",".join(p.target_sites), "architecture": self.architecture_name,
                "train_epochs": p.training.epochs, "train_lr": p.training.lr,
                "input_size": "x".join(map(str, p.preprocessing.size)), "input_spacing": p.preprocessing.spacing,
                **({"patch_size": "x".join(map(str, p.preprocessing.patch)),
                    "slice_spacing": p.preprocessing.slice_spacing, "train_batch_size": p.training.batch_size,
                    "patch_updates": c.patch_updates or self.adapter_cls.updates_per_pass_3d or "windows"}
                   if p.preprocessing.dims == 3 else {}),
                "source_site_check": c.source_site_check, "precision": self.precision, **self._stream_params(),
                **{f"hp.{k}": v for k, v in hparams.items()},
                **{f"arch.{k}": v for k, v in {**self.architecture.defaults, **c.arch_config}.items()}}

    def _stream_params(self) -> dict[str, Any]:
        """`rounds` of a recurring run, the `site_order` of shuffled orders, the `ramp` of a gradual stream and
        `shuffle_within_site`, where they change the figures (and only then: older cells keep their identity)."""
        c = self.config
        return {**({"rounds": c.rounds} if self.setting == "recurring" else {}),
                **({"site_order": c.site_order} if self.setting in ORDERED and c.site_order != "fixed" else {}),
                **({"ramp": c.ramp} if self.setting == "gradual" else {}),
                **({"shuffle_within_site": True} if c.shuffle_within_site and self.setting != "mixed" else {})}

    def cell(self) -> str:
        """The identity of what this run computes: a finished run with the same cell need not run again."""
        params = self.params()
        for key, default in (("source_site_check", False), ("precision", "fp32"), ("arch.source_aug", "none")):
            if params.get(key) == default:  # the identity cells had before the option existed: old stores resume
                del params[key]
        return digest([params, dataclasses.asdict(dataclasses.replace(self.protocol, source=""))])

    def config_tag(self) -> str:
        return self.adapter_cls.config_tag(self.config.hparams, self.steps)

    def tags(self) -> dict[str, Any]:
        p = self.protocol
        source_aug = {**self.architecture.defaults, **self.config.arch_config}.get("source_aug", "none")
        return {"medtta.method": self.config.method, "medtta.architecture": self.architecture_name,
                "medtta.paradigm": self.adapter_cls.paradigm, "medtta.protocol": p.name, "medtta.modality": p.modality,
                "medtta.setting": self.setting, "medtta.seed": self.config.seed,
                "medtta.dims": p.preprocessing.dims, "medtta.site": p.source_site,
                "medtta.source_aug": source_aug,
                "medtta.cell": self.cell(), "medtta.data": self.data_fingerprint(), "medtta.config": self.config_tag(),
                "medtta.host": socket.gethostname(),
                "medtta.pid": os.getpid()}

    def source(self, dataset: Dataset, volumes: VolumeCache) -> tuple[torch.nn.Module, dict[str, Any],
                                                                        SourcePredictions]:
        """The source model (trained or cached), its training record and its cached unadapted predictions."""
        c = self.config
        model, record = method_source_model(c.method, self.protocol, dataset, c.seed, self.results, self.device,
                                            c.arch_config, c.progress, self.architecture_name, self.precision)
        volumes = volumes.with_pipeline(model.pipeline(self.protocol.preprocessing))
        return model, record, SourcePredictions(model, record, self.protocol, volumes, self.device, c.batch_size,
                                                self.cache, self.precision)

    def run(self) -> RunResult:
        p, c = self.protocol, self.config
        self.results.mkdir(parents=True, exist_ok=True)
        dataset, volumes = self.data()  # fails before any run is opened
        uri = tracking_uri(c.tracking_uri, self.results)
        tracker = Tracker(uri, p.name, self.results / "mlartifacts" if uri.startswith("sqlite:") else None)
        for stale in tracker.close_stale_runs():  # a run killed with kill -9 would stay RUNNING for ever
            warnings.warn(stale_message(stale), MedttaWarning, stacklevel=2)
        tags = self.tags()
        found = previous(parent_runs(tracker.client, [tracker.experiment_id], tags["medtta.cell"]).get(
            tags["medtta.cell"], []), tags["medtta.data"])
        if found.finished and not c.rerun:
            return self.stored_result(found.finished, tracker)
        source_tests = dataset.cases_of(p.source_site, "test")
        params = {**self.params(), "in_domain_cases": len(source_tests)}
        reset_peak_memory(self.device)
        name = run_name(c.method, p.name, c.seed, self.setting, self.config_tag(), p.preprocessing.dims)
        with tracker.run(name, tags, params) as run_id:
            model, record, unadapted = self.source(dataset, volumes)
            tracker.log_metrics({"source_val_dice": record["val_dice"], "source_train_seconds": record["train_seconds"],
                                 **{f"source_{name}_val_loss": stage["val_loss"]
                                    for name, stage in record["stages"].items()}})
            in_domain = unadapted.in_domain_dice(source_tests, c.progress)
            tracker.log_metrics({"dice_in_domain": in_domain})
            seed_everything(c.seed)
            adapter = create_adapter(c.method, copy.deepcopy(model), record, **self.method_hparams).to(self.device)
            adapter.use_precision(self.precision, self.device)
            adapter.patches_per_update = c.batch_size
            if c.patch_updates is not None:
                adapter.updates_per_pass = c.patch_updates
            out_dir = self.results / "runs" / p.name / run_id
            cases = {site: dataset.cases_of(site, "test") for site in p.target_sites}
            stream = target_stream(self.setting, cases, c.seed, c.rounds, c.site_order, c.shuffle_within_site, c.ramp,
                                   self.reset_every)
            sites = self._run_sites(stream, TARGET, dataset, unadapted, adapter, tracker, tags, in_domain, out_dir)
            metrics = {**self._parent_metrics(sites), **self._round_metrics(sites, in_domain, tracker)}
            check = self._source_site_check(dataset, unadapted, adapter, tracker, tags, out_dir)
            if check is not None:
                metrics["source_site_harm"] = check.summary["source_site_harm"]
            tracker.log_metrics(metrics)
        return RunResult(p, c, self.setting, in_domain, len(source_tests), sites, run_id, uri, out_dir, check, metrics,
                         self.device.type, data_changed=found.other_data)

    def stored_result(self, run: Run, tracker: Tracker) -> RunResult:
        """The result of a finished identical run, read back from the store: its sites' summaries and case rows."""
        from medtta.report.store import SOURCE_ROLE, site_runs

        sites = [SiteResult(s.site, s.rows, {**dict.fromkeys(SUMMARY_KEYS, math.nan), **s.metrics}, s.role)
                 for s in site_runs(tracker.client, run)]
        params, metrics = run.data.params, run.data.metrics
        return RunResult(self.protocol, self.config, self.setting, metrics.get("dice_in_domain", math.nan),
                         int(params.get("in_domain_cases", 0)), [s for s in sites if s.role != SOURCE_ROLE],
                         run.info.run_id, tracker.uri, self.results / "runs" / self.protocol.name / run.info.run_id,
                         next((s for s in sites if s.role == SOURCE_ROLE), None),
                         {**dict.fromkeys(PARENT_KEYS, math.nan), **metrics}, params.get("device", "cpu"), reused=True)

    def _source_site_check(self, dataset: Dataset, unadapted: SourcePredictions, adapter: Adapter, tracker: Tracker,
                           tags: dict[str, Any], out_dir: Path) -> SiteResult | None:
        """"Do no harm": the source site's test cases as a stream of their own, after the target sites, from the
        reset adapter and the run's seed, so that neither stream depends on the other (None without the check)."""
        if not self.config.source_site_check:
            return None
        adapter.reset()
        seed_everything(self.config.seed)
        site = self.protocol.source_site
        stream = with_resets([Visit(site, case) for case in dataset.cases_of(site, "test")], self.reset_every)
        return self._run_sites(stream, SOURCE, dataset, unadapted, adapter, tracker, tags, math.nan, out_dir)[0]

    def _run_sites(self, stream: list[Visit], role: str, dataset: Dataset, unadapted: SourcePredictions,
                   adapter: Adapter, tracker: Tracker, tags: dict[str, Any], in_domain: float, out_dir: Path
                   ) -> list[SiteResult]:
        """The stream's volumes through the adapter, then one child run per site (`role`: target sites, or the
        source site of the check) with its cases and summary. A failure keeps the rows evaluated so far (each
        site's CSV, also logged to the parent run)."""
        c = self.config
        logs = {v.site: CaseLog(out_dir / f"cases-{v.site}.csv") for v in stream}
        shown: dict[str, dict[str, Any]] = {site: {} for site in logs}
        try:
            for visit in progress_bar(stream, desc=f"{c.method} on site {', '.join(logs)}", unit="volume",
                                      disable=not c.progress, leave=False):
                if visit.reset:
                    adapter.reset()
                row, shown[visit.site][visit.case.case_id] = self._evaluate_case(visit.case, visit.site, unadapted,
                                                                                 adapter)
                logs[visit.site].add({**row, **pass_labels(self.setting, visit, c.site_order)})
        except BaseException:
            for log in logs.values():
                if log.rows:
                    tracker.log_artifact(log.path, "cases-partial")
            raise
        return [self._log_site(site, role, log.rows, shown[site], dataset, tracker, tags, in_domain, out_dir)
                for site, log in logs.items()]

    def _log_site(self, site: str, role: str, rows: list[dict[str, Any]], shown: dict[str, dict[str, np.ndarray]],
                  dataset: Dataset, tracker: Tracker, tags: dict[str, Any], in_domain: float, out_dir: Path
                  ) -> SiteResult:
        """One site's child run: its case table, chosen slices and summary."""
        with tracker.run(site, {**tags, "medtta.site": site, "medtta.site_role": role}, nested=True):
            tracker.log_table(rows, "cases")
            self._log_qualitative(dataset, rows, shown, out_dir / "slices" / site, tracker)
            summary = site_summary(rows, role, in_domain)
            tracker.log_metrics(summary)
            flag = site_recovery_flag(summary, in_domain)
            if role == TARGET and flag:
                tracker.set_tags({"medtta.recovery_flag": flag})
        return SiteResult(site, rows, summary, role)

    def _round_metrics(self, sites: list[SiteResult], in_domain: float, tracker: Tracker) -> dict[str, float]:
        """Recurring: the recovery of each round (the metric's history, one step per round) and its slope per
        round (negative: the model degrades as the stream recurs)."""
        if self.setting != "recurring":
            return {}
        per_round = recovery_per_round([s.rows for s in sites], in_domain)
        for k, value in enumerate(per_round, start=1):
            tracker.log_metrics({"dice_recovery_round": value}, step=k)
        return {"dice_recovery_first_round": per_round[0], "dice_recovery_last_round": per_round[-1],
                "dice_recovery_slope": slope(per_round)}

    def _parent_metrics(self, sites: list[SiteResult]) -> dict[str, float]:
        """Means over target sites; the recovery again as `dice_recovery_<MODALITY>`, so MLflow ranks methods per
        modality over every protocol of it; cost against unadapted inference and peak memory."""
        out = {key: mean([s.summary[key] for s in sites])
               for key in ("dice", "dice_source", "dice_recovery", "seconds_per_volume", "seconds_per_volume_source")}
        source_seconds = out["seconds_per_volume_source"]
        return {**out, f"dice_recovery_{self.protocol.modality}": out["dice_recovery"],
                "cost_ratio": out["seconds_per_volume"] / source_seconds if source_seconds > 0 else float("nan"),
                "collapsed_cases": float(sum(s.summary["collapsed_cases"] for s in sites)),
                "peak_memory_mb": peak_memory_mb(self.device)}

    def _evaluate_case(self, case: Case, site: str, unadapted: SourcePredictions, adapter: Adapter
                       ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """The case's row, and its most-foreground slice (reference, unadapted and adapted) for the report."""
        p, c = self.protocol, self.config
        prepared, source = unadapted.of(case)
        x = prepared.x.to(self.device)
        with autocast(self.precision, self.device):
            logits, seconds = timed(lambda: adapt_and_predict(adapter, x, self.setting, self.steps, c.batch_size),
                                    self.device)
        reference = torch.as_tensor(prepared.volume.label)
        pred = unadapted.volumes.pipeline.to_native(logits, prepared.volume, prepared.meta)
        row = case_row(case.case_id, site, logits, pred, reference, source, p.scored_labels, prepared.volume.spacing,
                       seconds)
        index = most_foreground_slice(reference, p.preprocessing.slice_axis)
        shown = {name: take_slice(a.numpy(), index, p.preprocessing.slice_axis)
                 for name, a in (("reference", reference), ("source", source.pred), ("adapted", pred))}
        return row, {**shown, "index": np.asarray(index)}

    def _log_qualitative(self, dataset: Dataset, rows: list[dict[str, Any]], shown: dict[str, dict[str, np.ndarray]],
                         folder: Path, tracker: Tracker) -> None:
        """Saves the image, reference, unadapted and adapted slice of the chosen cases as `slices/<case>.npz`."""
        axis, cases = self.protocol.preprocessing.slice_axis, {c.case_id: c for c in dataset.cases}
        for case_id in qualitative_cases(rows):
            arrays = shown[case_id]
            image = load_volume(cases[case_id], dataset.labels).image
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{case_id}.npz"
            np.savez_compressed(path, image=take_slice(image, int(arrays["index"]), axis).astype(np.float32),
                                **{k: v.astype(np.int16) for k, v in arrays.items() if k != "index"})
            tracker.log_artifact(path, "slices")


def mean_entropy(logits: torch.Tensor) -> float:
    """Mean softmax entropy per pixel (nats) of a volume's logits."""
    return float(pixel_entropy(logits.float()).mean())


def label_free(logits: torch.Tensor, pred: torch.Tensor, source_pred: torch.Tensor) -> dict[str, float]:
    """What a hospital can compute without labels, to choose a configuration (`medtta report --select`): the mean
    softmax entropy per pixel of the adapted logits, and the fraction of voxels whose label the adaptation kept."""
    return {"entropy": mean_entropy(logits), "agreement": float((pred == source_pred).float().mean())}


def site_summary(rows: list[dict[str, Any]], role: str, in_domain: float) -> dict[str, float]:
    """What a site's child run logs. On the source site there is no gap to recover: no recovery, but
    `source_site_harm`, the mean over cases of adapted minus unadapted Dice (negative: adaptation harms)."""
    if role == TARGET:
        return {**summarize_cases(rows, in_domain), "dice_in_domain": in_domain}
    summary = summarize_cases(rows, math.nan)
    del summary["dice_recovery"]
    return {**summary, "source_site_harm": mean_dice_change(rows)}


def most_foreground_slice(reference: torch.Tensor, axis: int) -> int:
    """The index along `axis` of the slice with the most reference foreground (0 for a 2D image)."""
    if reference.ndim == 2:
        return 0
    return int((reference > 0).movedim(axis, 0).flatten(1).sum(1).argmax())


def take_slice(array: np.ndarray, index: int, axis: int) -> np.ndarray:
    return array if array.ndim == 2 else np.take(array, index, axis=axis)


def qualitative_cases(rows: list[dict[str, Any]]) -> list[str]:
    """The case adaptation harmed most, then the collapsed ones, at most `QUALITATIVE_CASES`."""
    if not rows:
        return []
    worst = min(rows, key=lambda r: r["dice"] - r["dice_source"] if not np.isnan(r["dice"]) else np.inf)
    chosen = [worst["case_id"], *(r["case_id"] for r in rows if r["collapsed"])]
    return list(dict.fromkeys(chosen))[:QUALITATIVE_CASES]


def run(protocol: Protocol, config: RunConfig) -> RunResult:
    """Run `config.method` on `protocol` (the Python API behind `medtta run`)."""
    return Engine(protocol, config).run()
