"""An nnU-Net trained by nnunetv2 itself on the protocol's source site, for `--architecture nnunet` without
`--checkpoint`: the site's train and val cases written as an nnU-Net raw dataset (links to the files), nnU-Net's
fingerprint, planner and preprocessing, fold 0 = the protocol's train/val split (splits_final.json), then
`nnUNetTrainer` with a schedule short enough for a CPU (`-a nnunet_epochs` epochs of `-a nnunet_iterations`
iterations; nnU-Net's own: 1000 x 250). The result is an ordinary nnU-Net results folder (`nnUNetv2_predict` reads
it), cached under the results dir by the training files' contents, the labels, the schedule and the seed.

CPU plans: `-a nnunet_features` scales every stage's feature count of the plan by features/32 (nnU-Net's base is
32; 8 makes a 3D step about 9x cheaper); nnU-Net's default is `-a nnunet_features=32`. Everything else is the plan.
`-a source_aug=gin|gin-ipa`: DG pre-training, as DG-TTA's `nnUNetTrainer_GIN` does it, a forward pre-hook on the
network that augments every training batch (`medtta.models.dg_augment`); the trainer stays `nnUNetTrainer`, so the
folder loads anywhere.

nnU-Net's folders (nnUNet_raw, nnUNet_preprocessed, nnUNet_results) are the model's cache folder's own unless the
user set those variables; its console output goes to `nnunet.log` there.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch

from medtta.data.cache import digest
from medtta.data.layout import Dataset, sha256
from medtta.models.dg_augment import source_augmentation
from medtta.progress import progress_bar
from medtta.protocol import Protocol

NNUNET_TRAINING_VERSION = 1
FOLDERS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
PLANS = "nnUNetPlans"


@contextlib.contextmanager
def nnunet_environment(root: Path, data_processes: int) -> Iterator[None]:
    """nnU-Net's folder variables inside `root` unless the user set them, and `data_processes` augmentation workers
    (0: in this process); all restored afterwards."""
    saved = {k: os.environ.get(k) for k in (*FOLDERS, "nnUNet_n_proc_DA")}
    for name in FOLDERS:
        os.environ.setdefault(name, str(root / name))
    os.environ["nnUNet_n_proc_DA"] = str(data_processes)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def training_key(protocol: Protocol, dataset: Dataset, configuration: str, config: dict[str, Any], seed: int
                 ) -> list[Any]:
    """Everything that changes the trained nnU-Net: the source site's train/val files by content, labels, channel
    names, configuration, schedule, feature scale, source augmentation and seed."""
    files = sorted((c.case_id, c.split, sha256(c.image), sha256(c.label))
                   for c in dataset.cases_of(protocol.source_site) if c.split in ("train", "val"))
    schedule = {k: config[k] for k in ("nnunet_epochs", "nnunet_iterations", "nnunet_features", "source_aug")}
    return [NNUNET_TRAINING_VERSION, version("nnunetv2"), configuration, protocol.labels, protocol.modality, schedule,
            seed, files]


def dataset_id(key: list[Any]) -> int:
    """An nnU-Net dataset ID from the key (500-999: out of the way of a user's own datasets)."""
    return 500 + int(digest(key, 8), 16) % 500


def write_raw_dataset(folder: Path, protocol: Protocol, dataset: Dataset) -> dict[str, list[str]]:
    """The source site's train and val cases as an nnU-Net raw dataset in `folder` (links to the files); returns
    the split (fold 0)."""
    cases = [c for c in dataset.cases_of(protocol.source_site) if c.split in ("train", "val")]
    for sub in ("imagesTr", "labelsTr"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    ending = ".nii.gz"
    for case in cases:
        for source, link in ((case.image, folder / "imagesTr" / f"{case.case_id}_0000{ending}"),
                             (case.label, folder / "labelsTr" / f"{case.case_id}{ending}")):
            if not link.exists():
                link.symlink_to(source.resolve())
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": protocol.modality}, "labels": protocol.labels, "numTraining": len(cases),
        "file_ending": ending, "name": folder.name}, indent=2))
    return {split: [c.case_id for c in cases if c.split == split] for split in ("train", "val")}


def plan_and_preprocess(number: int, configuration: str, features: int, split: dict[str, list[str]]) -> dict:
    """nnU-Net's fingerprint, plans (feature counts scaled by `features`/32) and preprocessing of `configuration`,
    and the split as fold 0; returns the plans."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprints,
        plan_experiments,
        preprocess,
    )
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import convert_id_to_dataset_name

    extract_fingerprints([number], num_processes=1, check_dataset_integrity=True)
    plan_experiments([number])
    folder = Path(str(nnUNet_preprocessed)) / convert_id_to_dataset_name(number)
    plans_path = folder / f"{PLANS}.json"
    plans = json.loads(plans_path.read_text())
    for conf in plans["configurations"].values():
        kwargs = conf.get("architecture", {}).get("arch_kwargs", {})
        if "features_per_stage" in kwargs:
            kwargs["features_per_stage"] = [max(1, round(f * features / 32)) for f in kwargs["features_per_stage"]]
    plans_path.write_text(json.dumps(plans, indent=2))
    preprocess([number], PLANS, configurations=(configuration,), num_processes=(1,))
    (folder / "splits_final.json").write_text(json.dumps([split]))
    return plans


def train(plans: dict, configuration: str, dataset_json: dict, config: dict[str, Any], seed: int,
          device: torch.device, bar: Any) -> Path:
    """`nnUNetTrainer` on fold 0 for the configured schedule, `bar` (a progress bar) moved at each epoch's end;
    returns the results folder of the configuration."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from medtta.engine import seed_everything  # here: the engine imports the models

    seed_everything(seed)
    trainer = nnUNetTrainer({**plans, "continue_training": False}, configuration, 0, dataset_json, device)
    trainer.num_epochs = config["nnunet_epochs"]
    trainer.num_iterations_per_epoch = config["nnunet_iterations"]
    trainer.num_val_iterations_per_epoch = max(1, config["nnunet_iterations"] // 5)
    trainer.initialize()
    augment = source_augmentation(config["source_aug"])
    if augment is not None:
        network = trainer.network
        network.register_forward_pre_hook(lambda module, args: (augment(args[0]),) if module.training else None)
    epoch_end = trainer.on_epoch_end

    def on_epoch_end() -> None:
        epoch_end()
        bar.update()

    trainer.on_epoch_end = on_epoch_end
    trainer.run_training()
    return Path(trainer.output_folder_base)


def train_nnunet(protocol: Protocol, dataset: Dataset, configuration: str, config: dict[str, Any], seed: int,
                 results: Path, device: torch.device, progress: bool = True) -> tuple[Path, dict[str, Any]]:
    """The results folder of an nnU-Net trained (or cached) on the protocol's source site, and its record."""
    key = training_key(protocol, dataset, configuration, config, seed)
    root = results / "models" / protocol.name / f"nnunet-{protocol.source_site}-seed{seed}-{digest(key, 12)}"
    record_path = root / "record.json"
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        return Path(record["folder"]), {**record, "record": str(record_path), "cached": True}
    number = dataset_id(key)
    start = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    bar = progress_bar(total=config["nnunet_epochs"], desc=f"training nnU-Net {configuration} on site "
                       f"{protocol.source_site} with nnunetv2", unit="epoch", disable=not progress, leave=False)
    with bar, nnunet_environment(root, data_processes=1), open(root / "nnunet.log", "a") as log, \
            contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        name = f"Dataset{number:03d}_medtta{digest(key, 8)}"
        raw = Path(os.environ["nnUNet_raw"]) / name
        split = write_raw_dataset(raw, protocol, dataset)
        plans = plan_and_preprocess(number, configuration, config["nnunet_features"], split)
        dataset_json = json.loads((raw / "dataset.json").read_text())
        os.environ["nnUNet_n_proc_DA"] = "0"  # augmentation in this process: seeded, and no worker per core
        folder = train(plans, configuration, dataset_json, config, seed, device, bar)
    record = {"folder": str(folder), "seconds": time.perf_counter() - start, "key": digest(key),
              "record": str(record_path)}
    save_record(record)
    return folder, {**record, "cached": False}


def save_record(record: dict[str, Any]) -> None:
    """Write a trained nnU-Net's record (what training measured) to the file it names, without `cached`."""
    Path(record["record"]).write_text(json.dumps({k: v for k, v in record.items() if k != "cached"}, indent=2))
