"""Source-model training on the source site's train split, best checkpoint on its validation split, cached under
the results dir keyed by protocol, architecture, config and seed.

One loop (`fit`) trains every architecture: first the network on its `source_losses`, then each post-training
stage (a DAE, autoencoders) with the network frozen, each stage in its own cached checkpoint. Source statistics an
adapter asks for (computed from the trained model on the validation split, not trained) are cached the same way.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from medtta.data.cache import digest, save_atomic
from medtta.data.layout import Dataset, load_volume, sha256
from medtta.data.pipeline import Pipeline
from medtta.data.preprocess import to_native
from medtta.errors import DataError
from medtta.metrics import mean, volume_dice
from medtta.models import ARCHITECTURES, build_network
from medtta.models.base import Architecture, SourceStatistics, SourceVolume, Stage
from medtta.models.dg_augment import source_augmentation
from medtta.models.patches import training_patches
from medtta.precision import autocast, grad_scaler
from medtta.progress import progress_bar
from medtta.protocol import Protocol

TRAINING_VERSION = 9  # 3: auxiliary passes keep the BatchNorm running statistics; 4: the fused Gaussian of N;
# 5: N's Gaussian scales folded into its convs, the DAE grid no larger than the source volumes, the DAE's Dice loss
# with the background; 6: TTT heads on horizontal flips only, TTT-MAE's per-patch normalized target, He et al.'s
# output autoencoder; 7: TTT flips mirror the lateral axis (H), not depth (W); 8: He et al.'s output autoencoder
# trained in a stage of its own, on logits computed once; 9: a third of the 3D training patches centred on foreground


def fit(module: nn.Module, params: list[nn.Parameter], epochs: int, lr: float,
        batch_losses: Callable[[int], Iterator[torch.Tensor]], score: Callable[[], float], desc: str,
        progress: bool, precision: str = "fp32") -> dict[str, float]:
    """Adam on `params` for `epochs` passes of `batch_losses(epoch)`, `module` in train mode; after each epoch
    `score()` (higher is better) with `module` in eval mode, and the state of `module` with the best score kept.
    Losses and scores are computed in `precision`."""
    optimizer = torch.optim.Adam(params, lr=lr)
    device = params[0].device
    scaler = grad_scaler(precision, device)
    best = {"score": -float("inf"), "epoch": -1}
    best_state = None
    start = time.perf_counter()
    bar = progress_bar(range(epochs), desc=desc, unit="epoch", disable=not progress, leave=False)
    for epoch in bar:
        module.train()
        with autocast(precision, device):
            for loss in batch_losses(epoch):
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
        module.eval()
        with autocast(precision, device):
            value = score()
        if value > best["score"]:
            best = {"score": value, "epoch": epoch}
            best_state = {k: v.detach().clone() for k, v in module.state_dict().items()}
        bar.set_postfix(score=f"{value:.4f}", best=f"{best['score']:.4f}")
    if best_state is not None:  # zero epochs: the module as it was
        module.load_state_dict(best_state)
    return {**best, "seconds": time.perf_counter() - start}


@dataclass
class SourceData:
    """The source site's train and val volumes, loaded and preprocessed only when something needs training."""

    protocol: Protocol
    dataset: Dataset
    pipeline: Pipeline | None = None  # how volumes become network input and labels; None: the protocol's

    def _volumes(self, split: str) -> list:
        return [load_volume(c, self.dataset.labels) for c in self.dataset.cases_of(self.protocol.source_site, split)]

    @cached_property
    def raw(self) -> dict[str, list]:
        splits = {split: self._volumes(split) for split in ("train", "val")}
        if not splits["train"] or not splits["val"]:
            raise DataError(f"{self.dataset.root}: site '{self.protocol.source_site}' needs train and val cases to "
                            f"train a source model (found {len(splits['train'])} train, {len(splits['val'])} val)")
        return splits

    @cached_property
    def volumes(self) -> dict[str, list[SourceVolume]]:
        pipeline = self.pipeline or Pipeline(self.protocol.preprocessing)
        return {split: [pipeline.source_volume(v) for v in volumes] for split, volumes in self.raw.items()}


def _batches(n: int, size: int, rng: np.random.Generator, min_size: int = 1) -> Iterator[torch.Tensor]:
    """Shuffled index batches; a last batch smaller than `min_size` is dropped."""
    order = torch.as_tensor(rng.permutation(n))
    for i in range(0, n - min_size + 1, size):
        yield order[i : i + size]


def _slice_batches(volumes: list[SourceVolume], size: int, rng: np.random.Generator) -> Iterator[SourceVolume]:
    """Every slice of every volume once, `size` random slices of one volume at a time, the batches in random order
    (slices of different volumes may differ in size)."""
    batches = [(v, idx) for v, (images, _) in enumerate(volumes) for idx in _batches(len(images), size, rng)]
    for b in rng.permutation(len(batches)):
        v, idx = batches[b]
        yield volumes[v][0][idx], volumes[v][1][idx]


@torch.no_grad()
def _validation_dice(model: nn.Module, data: SourceData, device: torch.device) -> float:
    """Mean volume Dice at the volumes' own resolution, as the engine measures it."""
    prep, labels = data.protocol.preprocessing, data.protocol.labels
    return mean([volume_dice(to_native(model(x.to(device)), v, prep), torch.as_tensor(v.label), labels)["dice"]
                 for (x, _), v in zip(data.volumes["val"], data.raw["val"], strict=True)])


def train_network(model: Architecture, data: SourceData, seed: int, device: torch.device,
                  progress: bool = True, precision: str = "fp32") -> dict[str, float]:
    """Train everything but the post-training stages on the architecture's source losses, in slice batches;
    keep the weights with the best mean validation Dice."""
    cfg = data.protocol.training
    rng = np.random.default_rng(seed)
    augment = source_augmentation_of(model, seed)
    if data.protocol.preprocessing.dims == 3:
        batch_losses = _patch_losses(model, data.volumes["train"], cfg.batch_size, seed, device, augment)
    else:
        images = torch.cat([x for x, _ in data.volumes["train"]])
        labels = torch.cat([y for _, y in data.volumes["train"]])

        def batch_losses(epoch: int) -> Iterator[torch.Tensor]:
            for idx in _batches(len(images), cfg.batch_size, rng, min_size=2):  # a batch of one breaks BatchNorm
                yield sum(model.source_losses(augment(images[idx]).to(device), labels[idx].to(device)).values())

    best = fit(model, model.network_parameters(), cfg.epochs, cfg.lr, batch_losses,
               lambda: _validation_dice(model, data, device),
               f"training {type(model).__name__} on site {data.protocol.source_site}", progress, precision)
    return {"val_dice": best["score"], "epoch": best["epoch"], "seconds": best["seconds"]}


def source_augmentation_of(model: Architecture, seed: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The DG pre-training augmentation of the model's `source_aug` (`medtta.models.dg_augment`), drawn from a
    generator of the seed; the identity without one."""
    augment = source_augmentation(model.config.get("source_aug", "none"))
    if augment is None:
        return lambda x: x
    generator = torch.Generator().manual_seed(seed)
    return lambda x: augment(x, generator)


def _patch_losses(model: Architecture, volumes: list[SourceVolume], batch_size: int, seed: int,
                  device: torch.device, augment: Callable[[torch.Tensor], torch.Tensor]
                  ) -> Callable[[int], Iterator[torch.Tensor]]:
    """3D source training: each epoch, every train volume gives one patch of the model's window (`training_patches`:
    a third centred on foreground), in batches of `batch_size` patches (a last batch of one is dropped: it breaks
    BatchNorm)."""
    generator = torch.Generator().manual_seed(seed)

    def batch_losses(epoch: int) -> Iterator[torch.Tensor]:
        order = torch.randperm(len(volumes), generator=generator).tolist()
        for start in range(0, len(order) - 1, batch_size):
            x, y = training_patches([volumes[i] for i in order[start:start + batch_size]], model.window, generator)
            yield sum(model.source_losses(augment(x).to(device), y.to(device)).values())

    return batch_losses


def train_stage(model: Architecture, stage: Stage, data: SourceData, seed: int, device: torch.device,
                progress: bool = True, precision: str = "fp32") -> dict[str, float]:
    """Train one post-training stage on batches of source volumes, the network frozen in eval mode; keep the
    state with the lowest validation loss (its random corruptions drawn from a fixed seed). The stage's `setup` and
    `prepare` run first, within the stage's seconds."""
    start = time.perf_counter()
    module = getattr(model, stage.module)
    model.eval().requires_grad_(False)
    module.requires_grad_(True)
    rng = np.random.default_rng(seed)
    fitted = stage.setup(data.volumes["train"]) if stage.setup is not None else {}

    def on_device(volumes: list[SourceVolume]) -> list[SourceVolume]:
        return [(x.to(device), y.to(device)) for x, y in volumes]

    if stage.prepare is None:  # the volumes themselves, moved to the device a batch at a time
        train, val, fetch = data.volumes["train"], data.volumes["val"], on_device
    else:  # what the loss takes, made once on the device
        with torch.no_grad():
            train, val = ([stage.prepare(on_device([v])[0]) for v in data.volumes[split]] for split in ("train", "val"))
        fetch = list

    def batch_losses(epoch: int) -> Iterator[torch.Tensor]:
        if stage.slices_per_batch is not None:
            for batch in _slice_batches(train, stage.slices_per_batch, rng):
                yield stage.loss(fetch([batch]))
            return
        for idx in _batches(len(train), stage.volumes_per_batch, rng):
            yield stage.loss(fetch([train[i] for i in idx]))

    @torch.no_grad()
    def score() -> float:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            return -mean([float(stage.loss(fetch([v]))) for v in val])

    torch.manual_seed(seed)
    best = fit(module, list(module.parameters()), stage.epochs, stage.lr, batch_losses, score,
               f"training {stage.module} on site {data.protocol.source_site}", progress, precision)
    model.requires_grad_(True)
    return {"val_loss": -best["score"], "epoch": best["epoch"], "seconds": time.perf_counter() - start, **fitted}


def cache_key(protocol: Protocol, dataset: Dataset, architecture: str, model: Architecture) -> list[Any]:
    """Everything that changes the trained network: the training files by content (so a copied or moved dataset
    reuses its model, and an edited one does not), the architecture and the config it trains with."""
    files = sorted((c.case_id, c.split, sha256(c.image), sha256(c.label))
                   for c in dataset.cases_of(protocol.source_site) if c.split in ("train", "val"))
    config = {k: v for k, v in model.network_config().items() if (k, v) != ("source_aug", "none")}  # older keys
    return [TRAINING_VERSION, architecture, config, protocol.labels, asdict(protocol.preprocessing),
            asdict(protocol.training), files]


def _save(path: Path, state: dict[str, torch.Tensor], record: dict[str, Any]) -> None:
    save_atomic(state, path)
    path.with_suffix(".json").write_text(json.dumps(record, indent=2))


def _cached(path: Path) -> dict[str, Any] | None:
    record = path.with_suffix(".json")
    return json.loads(record.read_text()) if path.is_file() and record.is_file() else None


def _load(module: nn.Module, path: Path) -> None:
    """Load weights safely (`weights_only=True`) over the module's own (a network file lacks the stages)."""
    module.load_state_dict({**module.state_dict(), **torch.load(path, map_location="cpu", weights_only=True)})


def compute_statistics(model: Architecture, compute: SourceStatistics, data: SourceData,
                       device: torch.device) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Source statistics of the trained model on the validation volumes, moved to `device` one at a time;
    returns them on the CPU and their record (seconds)."""
    start = time.perf_counter()
    volumes = ((x.to(device), y.to(device)) for x, y in data.volumes["val"])
    stats = {k: v.detach().cpu() for k, v in compute(model.eval(), volumes).items()}
    return stats, {"seconds": time.perf_counter() - start}


def load_statistics(record: dict[str, Any], name: str) -> dict[str, torch.Tensor]:
    """The source statistics `name` that `source_model` cached (or a bundle ships as safetensors), from the file
    its record names."""
    path = record["statistics"][name]["path"]
    if str(path).endswith(".safetensors"):
        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def source_model(
    protocol: Protocol, dataset: Dataset, architecture: str, seed: int, results: Path, device: torch.device,
    config: dict[str, Any] | None = None, progress: bool = True,
    statistics: dict[str, SourceStatistics] | None = None, precision: str = "fp32",
) -> tuple[Architecture, dict[str, Any]]:
    """The source model for (protocol, architecture, config, seed): every part loaded from the cache or trained
    and cached (or loaded or trained the architecture's own way, `Architecture.own_source`: an nnU-Net), and the
    source `statistics` asked for (name -> how to compute them) loaded from the cache or computed on the validation
    split and cached, each in a file beside the checkpoint.

    Returns the model on `device` and its training record: validation Dice, best epoch, seconds (network and all
    stages in `train_seconds`), one entry per stage, one entry per statistic (seconds and the `path` of its file,
    read by `load_statistics`), checkpoint path, and whether everything came from the cache. Network and stages
    train in `precision` (part of the cache key unless fp32); the statistics are computed in fp32.
    """
    torch.manual_seed(seed)  # the same initial weights, whichever parts come from the cache
    own = ARCHITECTURES.get(architecture).own_source(protocol, dataset, seed, results, device, config or {}, progress)
    if own is not None:
        model, record = own
        base = results / "models" / protocol.name / f"{record['model_id']}.pt"  # the statistics' file names
        key: list[Any] = [record["model_id"]]
        record = {**record, "stages": {}, "statistics": {}}
    else:
        model, record, base, key = _medtta_source(protocol, dataset, architecture, seed, results, device, config,
                                                  progress, precision)
    cached = record.pop("cached")
    data = SourceData(protocol, dataset, model.pipeline(protocol.preprocessing))
    for name, compute in (statistics or {}).items():  # of the whole model: the network and its stages
        stats_path = base.with_suffix(f".{name}-{digest([*key, name], 12)}.pt")
        stats_record = _cached(stats_path)
        if stats_record is None:
            cached = False
            stats, stats_record = compute_statistics(model, compute, data, device)
            _save(stats_path, stats, stats_record)
        record["statistics"][name] = {**stats_record, "path": str(stats_path)}
    record["train_seconds"] = record["seconds"] + sum(s["seconds"] for s in record["stages"].values())
    return model.eval(), {**record, "cached": cached}


def _medtta_source(protocol: Protocol, dataset: Dataset, architecture: str, seed: int, results: Path,
                   device: torch.device, config: dict[str, Any] | None, progress: bool, precision: str
                   ) -> tuple[Architecture, dict[str, Any], Path, list[Any]]:
    """The network and its post-training stages, trained by medtta's loop or loaded from the cache; with the record,
    the checkpoint path and the key the statistics are cached under."""
    model = build_network(architecture, 1, len(protocol.labels), **(config or {})).to(device)
    if protocol.preprocessing.dims == 3:
        model.use_window(protocol.preprocessing.patch_shape)
    key = cache_key(protocol, dataset, architecture, model) + ([precision] if precision != "fp32" else [])
    path = results / "models" / protocol.name / f"{architecture}-{protocol.source_site}-seed{seed}-{digest(key, 12)}.pt"
    data = SourceData(protocol, dataset)
    record = _cached(path)
    cached = record is not None
    if cached:
        _load(model, path)
    else:
        record = {**train_network(model, data, seed, device, progress, precision), "checkpoint": str(path)}
        _save(path, model.network_state(), record)
    record = {**record, "stages": {}, "statistics": {}}
    stage_keys = []
    for stage in model.post_training():
        stage_key = [key, stage.module, stage.epochs, stage.lr, {k: model.config[k] for k in stage.config_keys}]
        stage_keys.append(stage_key)
        stage_path = path.with_suffix(f".{stage.module}-{digest(stage_key, 12)}.pt")
        module = getattr(model, stage.module)
        stage_record = _cached(stage_path)
        if stage_record is None:
            cached = False
            stage_record = train_stage(model, stage, data, seed, device, progress, precision)
            _save(stage_path, module.state_dict(), stage_record)
        else:
            _load(module, stage_path)
        record["stages"][stage.module] = stage_record
    return model, {**record, "cached": cached}, path, [key, stage_keys]
