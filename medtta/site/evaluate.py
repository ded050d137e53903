"""`medtta site-eval`: adapt a bundle's model to a site's own volumes with each method, score it with labels or
with label-free indicators without, and write masks, CSVs, a report and an MLflow store under the output folder.

Offline and read-only by construction: the input folders are only read (the output may not lie inside them), the
MLflow store is a SQLite file in the output, and MLflow's usage telemetry is switched off before MLflow loads.
"""

from __future__ import annotations

import copy
import math
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medtta.data.layout import Volume, read_dataset_json
from medtta.data.pipeline import Pipeline
from medtta.engine import (
    CaseLog,
    adapt_and_predict,
    create_adapter,
    mean_entropy,
    predict_unadapted,
    resolve_device,
    seed_everything,
    timed,
)
from medtta.errors import DataError, MedttaError, MedttaWarning
from medtta.metrics import label_free_indicators, volume_dice, volume_metrics
from medtta.progress import progress_bar
from medtta.protocol import SETTINGS
from medtta.registry import ADAPTERS
from medtta.site.bundle import Bundle
from medtta.site.inputs import SiteCase, SiteVolume, discover, read_case, write_mask
from medtta.stats import case_intervals, summarize_cases

SOURCE = "source"  # the unadapted model: always evaluated, the reference of every label-free indicator
SUMMARIZED = ("dice", "hd95", "entropy", "changed", "volume")  # the per-case columns averaged per method


@dataclass(frozen=True)
class SiteConfig:
    """What a `medtta site-eval` varies besides the bundle and the input folder."""

    methods: tuple[str, ...]
    output: Path
    labels: Path | None = None
    site: str | None = None  # a site of a dataset-layout input (default: every case)
    name: str | None = None  # the site's name in MLflow and the report (default: the input folder's name)
    setting: str = "episodic"
    steps: int | None = None  # None: each method's default
    batch_size: int = 32
    hparams: dict[str, dict[str, Any]] = field(default_factory=dict)  # method -> hyper-parameters
    seed: int = 0
    device: str = "auto"
    progress: bool = True


@dataclass
class SiteEvalResult:
    name: str
    methods: list[str]
    labeled: bool  # some case had a mask: Dice, HD95 and recovery are measured
    rows: list[dict[str, Any]]  # one per (method, case)
    summary: dict[str, dict[str, float]]  # per method
    skipped: list[tuple[Path, str]]
    output: Path
    dice_in_domain: float


def disable_telemetry() -> None:
    """MLflow 3 sends usage events over the network unless told not to; site evaluation never connects anywhere."""
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    os.environ["DO_NOT_TRACK"] = "true"
    if "mlflow" in sys.modules:  # already imported: drop the client it may have set up
        try:
            from mlflow.telemetry.client import set_telemetry_client
        except ImportError:  # an MLflow without telemetry
            return
        set_telemetry_client()


def check_paths(data: Path, config: SiteConfig) -> None:
    """The output must not lie inside an input folder: nothing is ever written under --data or --labels."""
    out = config.output.resolve()
    for option, folder in (("--data", data), ("--labels", config.labels)):
        if folder is not None and out.is_relative_to(folder.resolve()):
            raise MedttaError(f"--output {config.output} lies inside {option} {folder}; site-eval never writes under "
                              "its input: choose an output folder outside it")


def method_list(bundle: Bundle, config: SiteConfig) -> list[str]:
    """`source` first, then the other methods asked for, each checked against the bundle and its settings."""
    if config.setting not in SETTINGS:
        raise MedttaError(f"--setting '{config.setting}': expected one of {', '.join(SETTINGS)}")
    methods = [SOURCE] + [m for m in dict.fromkeys(config.methods) if m != SOURCE]
    for method in methods:
        bundle.check_method(method)
        ADAPTERS.get(method).check_hparams(config.hparams.get(method, {}))
    return methods


class SiteEvaluation:
    """One `medtta site-eval`: every method on every readable case of the input."""

    def __init__(self, bundle: Bundle, data: Path, config: SiteConfig) -> None:
        check_paths(data, config)
        self.bundle, self.data, self.config = bundle, data, config
        self.methods = method_list(bundle, config)
        self.inputs = discover(data, config.labels, config.site)
        if self.inputs.kind == "dataset layout":
            found = read_dataset_json(data / "dataset.json")["labels"]
            if {str(k): int(v) for k, v in found.items()} != bundle.labels:
                raise DataError(f"{data / 'dataset.json'}: labels {found} differ from the bundle's {bundle.labels}")
        self.device = resolve_device(config.device)
        self.prep = bundle.preprocessing
        self.name = config.name or (f"{data.resolve().name}-{config.site}" if config.site else data.resolve().name)

    def run(self) -> SiteEvalResult:
        c = self.config
        c.output.mkdir(parents=True, exist_ok=True)
        seed_everything(c.seed)
        model = self.bundle.model(self.device)
        pipeline = model.pipeline(self.prep)
        adapters = {m: create_adapter(m, copy.deepcopy(model), self.bundle.record(), **c.hparams.get(m, {}))
                    .to(self.device) for m in self.methods if m != SOURCE}
        (c.output / "cases.csv").unlink(missing_ok=True)
        log = CaseLog(c.output / "cases.csv")
        skipped = list(self.inputs.skipped)
        for path, reason in skipped:
            warnings.warn(f"skipped {path}: {reason}", MedttaWarning, stacklevel=2)
        for case in progress_bar(self.inputs.cases, desc=f"site-eval on {self.name}", unit="volume",
                                 disable=not c.progress):
            try:
                volume = read_case(case, self.bundle.labels)
            except DataError as err:  # one bad file must not cost the site the other cases
                skipped.append((case.image, str(err).removeprefix(f"{case.image}: ")))
                warnings.warn(f"skipped {err}", MedttaWarning, stacklevel=2)
                continue
            for row in self._evaluate_case(case, volume, model, adapters, pipeline):
                log.add(row)
        if not log.rows:
            raise DataError(f"--data {self.data}: no volume could be read ({len(skipped)} skipped, see above)")
        labeled = any(r["labeled"] for r in log.rows)
        summary = {m: self._summarize([r for r in log.rows if r["method"] == m]) for m in self.methods}
        return SiteEvalResult(self.name, self.methods, labeled, log.rows, summary, skipped, c.output,
                              self.bundle.dice_in_domain)

    def _evaluate_case(self, case: SiteCase, volume: SiteVolume, model: torch.nn.Module,
                       adapters: dict[str, torch.nn.Module], pipeline: Pipeline) -> list[dict[str, Any]]:
        c, labels = self.config, self.bundle.scored_labels
        placeholder = volume.label if volume.label is not None else np.zeros(volume.image.shape, np.uint8)
        as_volume = Volume(volume.case_id, volume.image, placeholder, volume.spacing)  # to_native reads its shape
        x, meta = pipeline.prepare(as_volume)
        x = x.to(self.device)
        predictions = {SOURCE: timed(lambda: predict_unadapted(model, x, c.batch_size), self.device)}
        for method, adapter in adapters.items():
            steps = ADAPTERS.get(method).default_steps if c.steps is None else c.steps
            predictions[method] = timed(lambda a=adapter, s=steps: adapt_and_predict(a, x, c.setting, s, c.batch_size),
                                        self.device)
        source_pred = pipeline.to_native(predictions[SOURCE][0], as_volume, meta)
        reference = None if volume.label is None else torch.as_tensor(volume.label)
        source_dice = math.nan if reference is None else volume_dice(source_pred, reference, labels)["dice"]
        rows = []
        for method, (logits, seconds) in predictions.items():
            pred = source_pred if method == SOURCE else pipeline.to_native(logits, as_volume, meta)
            write_mask(pred.numpy(), volume.reference, c.output / "masks" / method / f"{case.case_id}.nii.gz")
            row = {"method": method, "case_id": case.case_id, "image": str(case.image),
                   "labeled": reference is not None}
            if reference is not None:
                row.update(volume_metrics(pred, reference, labels, volume.spacing), dice_source=source_dice)
            row.update(entropy=mean_entropy(logits),
                       **label_free_indicators(pred, source_pred, labels, volume.spacing), seconds=seconds)
            rows.append(row)
        return rows

    def _summarize(self, rows: list[dict[str, Any]]) -> dict[str, float]:
        """Means over cases (NaN-aware), Dice recovery of the mean Dice, collapse count, cost; with labels, bootstrap
        intervals of Dice and recovery over cases and the Wilcoxon p-value against the unadapted Dice."""
        summary = summarize_cases(rows, self.bundle.dice_in_domain, SUMMARIZED)
        labeled = [r for r in rows if r["labeled"]]
        if labeled:
            summary.update(case_intervals(labeled, self.bundle.dice_in_domain, seed=self.config.seed))
        return summary
