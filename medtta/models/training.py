"""Source-model training on the source site's train split, best checkpoint on its validation split,
cached under the results dir keyed by protocol, architecture and seed."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from monai.losses import DiceCELoss
from torch import nn
from tqdm.auto import tqdm

from medtta.data.layout import Dataset, Volume, load_volume, sha256
from medtta.data.preprocess import image_slices, label_slices, to_native
from medtta.errors import DataError
from medtta.metrics import mean, volume_dice
from medtta.models.networks import build_network
from medtta.protocol import Protocol

TRAINING_VERSION = 1


def checkpoint_path(results: Path, protocol: Protocol, dataset: Dataset, architecture: str, seed: int) -> Path:
    """Cache path; the key covers everything that changes the trained weights, the training files by content
    (so a copied or moved dataset reuses its model, and an edited one does not)."""
    files = sorted((c.case_id, c.split, sha256(c.image), sha256(c.label))
                   for c in dataset.cases_of(protocol.source_site) if c.split in ("train", "val"))
    key = json.dumps([TRAINING_VERSION, architecture, protocol.labels, asdict(protocol.preprocessing),
                      asdict(protocol.training), files], sort_keys=True, default=str)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return results / "models" / protocol.name / f"{architecture}-{protocol.source_site}-seed{seed}-{digest}.pt"


def load_checkpoint(path: Path, architecture: str, n_classes: int) -> nn.Module:
    """Rebuild the network and load its weights safely (`weights_only=True`)."""
    model = build_network(architecture, 1, n_classes)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


@torch.no_grad()
def _validation_dice(model: nn.Module, val: list[tuple[torch.Tensor, Volume]], protocol: Protocol,
                     device: torch.device) -> float:
    """Mean volume Dice at the volumes' own resolution, as the engine measures it."""
    scores = [volume_dice(to_native(model(x.to(device)), v, protocol.preprocessing), torch.as_tensor(v.label),
                          protocol.labels)["dice"] for x, v in val]
    return mean(scores)


def train_source_model(
    train: list[Volume], val: list[Volume], protocol: Protocol, architecture: str, seed: int,
    device: torch.device, progress: bool = True,
) -> tuple[nn.Module, dict[str, float]]:
    """Train with Dice+CE (MONAI) and keep the weights with the best mean validation Dice."""
    cfg = protocol.training
    torch.manual_seed(seed)
    images = torch.cat([image_slices(v, protocol.preprocessing) for v in train])
    targets = torch.cat([label_slices(v, protocol.preprocessing) for v in train]).unsqueeze(1)
    val_inputs = [(image_slices(v, protocol.preprocessing), v) for v in val]
    model = build_network(architecture, 1, len(protocol.labels)).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    rng = np.random.default_rng(seed)
    best = {"val_dice": -1.0, "epoch": -1}
    best_state = None
    start = time.perf_counter()
    bar = tqdm(range(cfg.epochs), desc=f"training source model on site {protocol.source_site}", unit="epoch",
               disable=not progress, leave=False)
    for epoch in bar:
        model.train()
        order = torch.as_tensor(rng.permutation(len(images)))
        for i in range(0, len(order) - 1, cfg.batch_size):  # a batch of one breaks BatchNorm
            idx = order[i : i + cfg.batch_size]
            loss = loss_fn(model(images[idx].to(device)), targets[idx].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        model.eval()
        val_dice = _validation_dice(model, val_inputs, protocol, device)
        if val_dice > best["val_dice"]:
            best = {"val_dice": val_dice, "epoch": epoch}
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        bar.set_postfix(val_dice=f"{val_dice:.3f}", best=f"{best['val_dice']:.3f}")
    model.load_state_dict(best_state)
    best["train_seconds"] = time.perf_counter() - start
    return model.eval(), best


def source_model(
    protocol: Protocol, dataset: Dataset, architecture: str, seed: int, results: Path, device: torch.device,
    progress: bool = True,
) -> tuple[nn.Module, dict]:
    """The source model for (protocol, architecture, seed): loaded from the cache or trained and cached.

    Returns the model on `device` and its training
    record (validation Dice, best epoch, seconds, checkpoint path, whether it came from the cache).
    """
    path = checkpoint_path(results, protocol, dataset, architecture, seed)
    record_path = path.with_suffix(".json")
    if path.is_file() and record_path.is_file():
        record = {**json.loads(record_path.read_text()), "cached": True}
        return load_checkpoint(path, architecture, len(protocol.labels)).to(device), record
    train, val = ([load_volume(c, dataset.labels) for c in dataset.cases_of(protocol.source_site, split)]
                  for split in ("train", "val"))
    if not train or not val:
        raise DataError(f"{dataset.root}: site '{protocol.source_site}' needs train and val cases to train a "
                        f"source model (found {len(train)} train, {len(val)} val)")
    model, record = train_source_model(train, val, protocol, architecture, seed, device, progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    tmp.replace(path)
    record = {**record, "checkpoint": str(path)}
    record_path.write_text(json.dumps(record, indent=2))
    return model, {**record, "cached": False}
