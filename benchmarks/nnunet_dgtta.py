"""DG-TTA on a trained nnU-Net: medtta's `dg-tta` adapter against the official `dg_tta` package (Weihsbach et al.,
multimodallearning/DG-TTA: `dg_tta/tta/tta.py` `tta_main` and `calc_branch`) on the same model and volumes.

The official side runs the package's own code: `tta_main` with its `TEMPLATE_PLAN` (12 epochs of 16 accumulated
patches, the first epoch evaluation only; AdamW lr 1e-5; every parameter trained; affine warps of strength 0.05 in
both branches, no intensity augmentation; an ensemble of 3), `load_network` and `load_tta_data` reading the nnU-Net
results folder and the volumes (a temporary nnU-Net raw folder of links to the medtta dataset's files), its
`run_inference` predicting with nnU-Net's predictor (mirroring on, logits averaged over the ensemble). The script
records what it draws (training patches, affine matrices) and what it predicts (network-grid logits, native label
maps, the saved parameters). The medtta side is `NnUNet` on the same folder and `create_adapter("dg-tta", ...)` with
the official values (steps = epochs - 1 updates, `patches_per_update` 1 as the official batch of 1).

Figures:
  1. weights and preprocessing: the two networks' weights, the two preprocessed volumes;
  2. ONE update from identical inputs: one patch, two affine matrices, through the official `calc_branch`, the loss
     lines of `tta_main`, its `soft_dice_loss` and AdamW, and through medtta's `DGTTA.consistency` + optimizer step
     (loss, gradient, updated parameters), then with medtta's differences removed one at a time; the official half is
     checked against `tta_main` itself run for that one update;
  3. per volume: unadapted predictions (mirroring as the official predictor, and medtta's default without), adapted
     predictions with medtta's own random draws, with the official run's patches and affine matrices replayed, and
     replayed with the official objective substituted (what medtta computes once fixed; with calc_branch's grid
     arithmetic, so that only rounding is left): probability and label differences, Dice of each against the
     reference label, adapted-parameter differences;
  4. the list of differences, each with its reason and figure.

    python benchmarks/nnunet_dgtta.py --model-folder NNUNET_RESULTS/DatasetX/nnUNetTrainer__nnUNetPlans__3d_fullres
        [--dataset ~/.cache/medtta/data/synth-ct3d] [--site B] [--volumes 2] [--epochs 12] [--patches 16]
        [--ensemble 3] [--seed 0] [--device cpu] [--official-eval] [--threads 1]

Defaults are the official plan's. A quick CPU check: --volumes 1 --epochs 2 --patches 2 --ensemble 2 (one update
per member). Installs nothing: it stops with a message when `dg_tta` (pip install dg-tta) is not importable. The
official code runs as published except where noted at start-up (an nnunetv2 keyword it predates; wandb stubbed only
when installed but broken). Prints figures; asserts nothing.
"""

from __future__ import annotations

import os

os.environ.setdefault("nnUNet_def_n_proc", "1")  # before nnunetv2 loads: its export resampling threads (not values)

import argparse
import contextlib
import copy
import importlib.machinery
import importlib.util
import inspect
import io
import json
import math
import sys
import tempfile
import time
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

import medtta.adapters.dg_tta as medtta_dgtta
from medtta.adapters.dg_tta import DGTTA
from medtta.data.layout import Case, load_volume, read_dataset
from medtta.engine import adapt_and_predict, create_adapter, seed_everything
from medtta.metrics import volume_dice
from medtta.models.base import weights_under_batch_statistics
from medtta.models.nnunet import NnUNet
from medtta.report import format_table

NOTES: list[str] = []  # how the official code was made to run here


# ----------------------------------------------------------------------------------------------- the official package
@dataclass
class Official:
    tta: types.ModuleType
    torch_utils: types.ModuleType
    augmentation_utils: types.ModuleType
    nnunet_utils: types.ModuleType
    config_log_utils: types.ModuleType
    model_utils: types.ModuleType
    version: str


def import_official() -> Official:
    """The official package's modules, or exit naming what is missing (nothing is installed here)."""
    if importlib.util.find_spec("dg_tta") is None:
        sys.exit("benchmarks/nnunet_dgtta.py compares with the official DG-TTA package, `dg_tta`, which is not "
                 "importable in this environment (pip install dg-tta, then rerun); this script installs nothing.")
    if importlib.util.find_spec("wandb") is not None:
        try:
            import wandb  # noqa: F401
        except Exception as err:  # the old wandb dg-tta pins breaks under numpy 2
            stub = types.ModuleType("wandb")
            stub.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
            stub.run = None
            sys.modules["wandb"] = stub
            NOTES.append(f"wandb is installed but does not import ({type(err).__name__}: {err}); a stub with run=None "
                         "stands in, so the official code logs nothing (as its plan's wandb_mode=disabled does)")
    else:
        NOTES.append("wandb is not installed: the official code imports it only when present, and logs nothing")
    try:
        from dg_tta.tta import augmentation_utils, config_log_utils, model_utils, nnunet_utils, torch_utils
        from dg_tta.tta import tta as tta_module
    except Exception as err:
        sys.exit(f"benchmarks/nnunet_dgtta.py: the official package `dg_tta` is installed but does not import "
                 f"({type(err).__name__}: {err}); this script installs and changes nothing")
    try:
        from importlib.metadata import version
        dist_version = version("dg-tta")
    except Exception:
        dist_version = "?"
    official = Official(tta_module, torch_utils, augmentation_utils, nnunet_utils, config_log_utils, model_utils,
                        dist_version)
    _shim_predictor(official)
    return official


def _shim_predictor(official: Official) -> None:
    """dg_tta's `load_network` calls nnUNetPredictor(perform_everything_on_gpu=...), a keyword nnunetv2 since renamed
    perform_everything_on_device: pass it under the new name, nothing else."""
    cls = official.nnunet_utils.nnUNetPredictor
    if "perform_everything_on_gpu" in inspect.signature(cls.__init__).parameters:
        return

    def predictor(*args: Any, perform_everything_on_gpu: bool | None = None, **kwargs: Any) -> Any:
        if perform_everything_on_gpu is not None:
            kwargs.setdefault("perform_everything_on_device", perform_everything_on_gpu)
        return cls(*args, **kwargs)

    official.nnunet_utils.nnUNetPredictor = predictor
    NOTES.append("dg_tta.tta.nnunet_utils.load_network passes nnUNetPredictor(perform_everything_on_gpu=True), which "
                 "this nnunetv2 no longer accepts (TypeError); the script hands it over as "
                 "perform_everything_on_device "
                 "(nnunetv2 turns it off on a CPU). Everything else of the official code runs as published")


@contextlib.contextmanager
def patched(module: Any, name: str, value: Any) -> Iterator[None]:
    original = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, original)


@contextlib.contextmanager
def quiet() -> Iterator[io.StringIO]:
    """Capture stdout and stderr (the official code's prints and progress bars); shown if something fails."""
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
            yield buffer
    except BaseException:
        sys.stderr.write(buffer.getvalue()[-5000:])
        raise


@dataclass
class OfficialRun:
    """What one `tta_main` call drew, saved and predicted, per case."""

    data: dict[str, torch.Tensor] = field(default_factory=dict)  # (1, z, y, x) preprocessed image it predicted
    logits: dict[str, torch.Tensor] = field(default_factory=dict)  # (C, z, y, x), mean over the ensemble
    native: dict[str, torch.Tensor] = field(default_factory=dict)  # (x, y, z), the model's label values
    states: dict[str, list[dict[str, torch.Tensor]]] = field(default_factory=dict)  # per member
    patches: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # training patches, in draw order
    affines: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # R (1, 3, 4), in draw order: a, b, a, ...
    summary_dice: float | None = None
    seconds: float = 0.0


class OfficialSide:
    """The official package pointed at an nnU-Net results folder and a temporary nnU-Net raw folder of the cases."""

    def __init__(self, official: Official, model_folder: Path, fold: int, dataset_labels: dict[str, int],
                 cases: list[Case], work: Path, device: torch.device) -> None:
        self.off, self.device, self.work = official, device, work
        self.weights_file = model_folder / f"fold_{fold}" / "checkpoint_final.pth"
        model_json = json.loads((model_folder / "dataset.json").read_text())
        ending = model_json.get("file_ending", ".nii.gz")
        self.raw = work / "raw" / "Dataset999_DGTTABench"
        for sub in ("imagesTs", "labelsTs"):
            (self.raw / sub).mkdir(parents=True)
        self.images = []
        for case in cases:
            if not case.image.name.endswith(ending):
                sys.exit(f"{case.image}: the model's dataset.json expects files ending {ending}")
            image = self.raw / "imagesTs" / f"{case.case_id}_0000{ending}"
            image.symlink_to(case.image.resolve())
            (self.raw / "labelsTs" / f"{case.case_id}{ending}").symlink_to(case.label.resolve())
            self.images.append(image)
        (self.raw / "dataset.json").write_text(json.dumps({"channel_names": model_json["channel_names"],
                                                           "labels": dataset_labels, "numTraining": 0,
                                                           "file_ending": ending}))
        # what `dgtta prepare_tta` writes (config_log_utils.prepare_tta): the plan, the label mapping, the labels
        pretrained, target = model_json["labels"], dataset_labels
        labels = sorted(set(pretrained) & set(target))
        labels.remove("background")
        self.optimized_labels = ["background", *labels]  # alphabetical after background, as prepare_tta sorts them
        self.label_mapping = official.torch_utils.generate_label_mapping(pretrained, target)
        self.modifier = types.SimpleNamespace(ModifierFunctions=official.config_log_utils.ModifierFunctions)
        self.template = dict(official.config_log_utils.TEMPLATE_PLAN)
        self.results = work / "results"
        self.results.mkdir()
        with quiet():
            predictor, patch_size, network, parameters = official.nnunet_utils.load_network(self.weights_file, device)
        self.patch_size, self.network, self.parameters = list(patch_size), network, parameters
        self.mirroring = (predictor.use_mirroring, predictor.allowed_mirroring_axes)
        self.runs = 0

    def config(self, epochs: int, patches: int, ensemble: int) -> dict[str, Any]:
        config = {**self.template, "epochs": epochs, "patches_to_be_accumulated": patches, "ensemble_count": ensemble,
                  "pretrained_weights_filepath": str(self.weights_file), "optimized_labels": self.optimized_labels,
                  "tta_data_filepaths": [str(p) for p in self.images]}
        return config

    def run(self, epochs: int, patches: int, ensemble: int, seed: int, evaluate: bool = False,
            batch_fn: Callable[..., Any] | None = None, affine_fn: Callable[..., Any] | None = None,
            images: list[Path] | None = None) -> OfficialRun:
        """`tta_main` as `dgtta run_tta` calls it, recording draws and predictions (draws replaced when given)."""
        off, tta, out = self.off, self.off.tta, OfficialRun()
        config = self.config(epochs, patches, ensemble)
        if images is not None:
            config["tta_data_filepaths"] = [str(p) for p in images]
        current: dict[str, str] = {}

        def sample_specs(*args: Any, **kwargs: Any) -> Any:
            specs = original_specs(*args, **kwargs)
            current["case"] = Path(specs[2]).name  # sample_id "tta_outputTs/<case>"
            return specs

        def get_batch(tensor_list: Any, batch_idxs: Any, patch_size: Any, fixed_patch_idx: Any = None,
                      device: Any = "cpu") -> Any:
            imgs, labels = (batch_fn or original_batch)(tensor_list, batch_idxs, patch_size, fixed_patch_idx, device)
            if fixed_patch_idx is None:  # a training patch (the evaluation patches are centred)
                out.patches.setdefault(current["case"], []).append(torch.cat(imgs).detach().cpu().clone())
            return imgs, labels

        def get_rand_affine(batch_size: int, strength: float = 0.05, flip: bool = False) -> Any:
            affine = (affine_fn or original_affine)(batch_size, strength=strength, flip=flip)
            out.affines.setdefault(current["case"], []).append(affine[0].detach().cpu().clone())
            return affine

        def load_network(*args: Any, **kwargs: Any) -> Any:
            predictor, patch_size, network, parameters = off.nnunet_utils.load_network(*args, **kwargs)
            predict = predictor.predict_logits_from_preprocessed_data

            def recorded(data: torch.Tensor) -> torch.Tensor:
                logits = predict(data)
                out.data[current["case"]] = data.detach().cpu().clone()
                out.logits[current["case"]] = logits.detach().float().cpu().clone()
                return logits

            predictor.predict_logits_from_preprocessed_data = recorded
            return predictor, patch_size, network, parameters

        def run_inference(*args: Any, **kwargs: Any) -> Any:
            segmentation = original_inference(*args, **kwargs)
            out.native[current["case"]] = torch.from_numpy(np.ascontiguousarray(np.asarray(segmentation).T)).long()
            return segmentation

        original_specs, original_batch = tta.get_sample_specs, tta.get_batch
        original_affine, original_inference = tta.get_rand_affine, tta.run_inference
        evaluation = tta.compute_metrics_on_folder_simple if evaluate else skipped_evaluation
        self.runs += 1
        name = f"run{self.runs}"
        start = time.perf_counter()
        with contextlib.ExitStack() as stack:
            for attr, value in (("get_sample_specs", sample_specs), ("get_batch", get_batch),
                                ("get_rand_affine", get_rand_affine), ("load_network", load_network),
                                ("run_inference", run_inference), ("compute_metrics_on_folder_simple", evaluation)):
                stack.enter_context(patched(tta, attr, value))
            stack.enter_context(quiet())
            seed_everything(seed)
            tta.tta_main(run_name=name, config=config, tta_data_dir=self.raw, save_base_path=self.results,
                         label_mapping=self.label_mapping, modifier_fn_module=self.modifier, device=self.device)
        out.seconds = time.perf_counter() - start
        folder = self.results / name / "tta_outputTs"
        for case in out.native:
            out.states[case] = [torch.load(folder / f"{case}__ensemble_idx_{i}_tta_parameters.pt",
                                           map_location="cpu")[0] for i in range(ensemble)]
        summary = self.results / name / "summary_Ts.json"
        if evaluate and summary.is_file():
            out.summary_dice = json.loads(summary.read_text())["foreground_mean"]["Dice"]
        return out


def skipped_evaluation(folder_ref: Any = None, folder_pred: Any = None, labels: Any = None, output_file: Any = None,
                       **kwargs: Any) -> None:
    """Stands in for tta_main's final nnU-Net evaluation (a spawned metrics process; --official-eval runs it): the
    summary it reads back, without figures (the script scores the predictions itself)."""
    Path(output_file).write_text(json.dumps({"foreground_mean": {"Dice": None}}))


# ------------------------------------------------------------------------------------------------------ medtta's side
@contextlib.contextmanager
def accumulated_patches(n: int) -> Iterator[None]:
    """medtta's DG-TTA accumulates `ACCUMULATED_PATCHES` (16, the official value) per update: set it to `n`."""
    with patched(medtta_dgtta, "ACCUMULATED_PATCHES", n):
        yield


@contextlib.contextmanager
def replayed_affines(thetas: list[torch.Tensor]) -> Iterator[None]:
    """medtta's `AffineView.random` hands out `thetas` in order instead of drawing."""
    original = medtta_dgtta.AffineView

    class Replayed(original):  # type: ignore[misc, valid-type]
        @classmethod
        def random(cls, n: int, strength: float, device: torch.device | None = None, spatial_dims: int = 2) -> Any:
            theta = thetas.pop(0)
            if tuple(theta.shape) != (n, spatial_dims, spatial_dims + 1):
                raise RuntimeError(f"replayed affine of shape {tuple(theta.shape)} for {n} {spatial_dims}D views")
            return original(theta.to(device))

    with patched(medtta_dgtta, "AffineView", Replayed):
        yield


class OfficialObjective(DGTTA):
    """The objective of medtta's DG-TTA before it was made the official one (branch b under no_grad, MONAI's
    `DiceLoss(squared_pred=True, batch=True)`, the softmax warped back with border padding and masked where both
    views reached), with some of those differences removed (script only, for the attribution): `grad_b`
    backpropagates through branch b too (the official `calc_branch` computes both branches under the same grad
    context, which `have_grad_in="branch_a"` makes `nullcontext`); `official_dice` uses the official
    `soft_dice_loss` (4 sum(ab) / sum((a+b)^2) per patch and class, 1 - its mean over the foreground); `warp_logits`
    warps the logits back with zero padding and takes the softmax after, masked where both warped-back logit sums are
    above 0 (tta_main's `common_content_mask`); `official_grids` (with `warp_logits`) also builds the sampling grids
    with calc_branch's arithmetic, (0 * identity + (affine_grid(R) - identity)) + identity, and the inverse with
    Tensor.inverse of the 4x4 matrix: rounding only. All flags on is what `DGTTA.consistency` now computes (up to the
    grids' rounding); branch a's matrix is drawn first, as DGTTA draws."""

    grad_b = False
    official_dice = False
    warp_logits = False
    official_grids = False
    soft_dice_loss: Callable[..., torch.Tensor] | None = None

    def consistency(self, x: torch.Tensor) -> torch.Tensor:
        logits_a, keep_a = self._official_branch(x, True)  # branch a first, as DGTTA.consistency draws
        logits_b, keep_b = self._official_branch(x, self.grad_b)
        both = (keep_a & keep_b).float()
        if self.warp_logits:
            a, b = logits_a.softmax(1) * both, logits_b.softmax(1) * both
        else:
            a, b = logits_a * both, logits_b * both  # already probabilities
        if self.official_dice:
            return 1 - type(self).soft_dice_loss(a, b)[:, 1:].mean()
        return earlier_dice(a, b)

    def _official_branch(self, x: torch.Tensor, grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
        view = medtta_dgtta.AffineView.random(len(x), self.hparams["strength"], x.device, x.dim() - 2)
        size = tuple(x.shape[2:])
        with contextlib.nullcontext() if grad else torch.no_grad():
            if self.official_grids:
                identity = F.affine_grid(torch.eye(4, device=x.device).repeat(len(x), 1, 1)[:, :3], [len(x), 1, *size],
                                         align_corners=False)
                full = torch.cat([view.theta, torch.tensor([[[0.0, 0.0, 0.0, 1.0]]], device=x.device).expand(
                    len(x), 1, 4)], 1)
                grid = 0.0 * identity + (F.affine_grid(view.theta, [len(x), 1, *size], align_corners=False) - identity)
                warped = F.grid_sample(x, grid + identity, padding_mode="border", align_corners=False)
                inverse = full.inverse()[:, :3]
                grid = 0.0 * identity + (F.affine_grid(inverse, [len(x), 1, *size], align_corners=False) - identity)
                back = F.grid_sample(self.model(warped), grid + identity, align_corners=False)
                return back, back.sum(1, keepdim=True) > 0.0
            out = self.model(view.apply(x))
            if not self.warp_logits:
                return view.invert(out.softmax(1), size), view.seen(size)
            grid = F.affine_grid(view.inverse().to(out.dtype), [len(x), 1, *size], align_corners=False)
            back = F.grid_sample(out, grid, align_corners=False)  # zero padding, as calc_branch
            return back, back.sum(1, keepdim=True) > 0.0


def earlier_dice(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The soft Dice loss medtta's DG-TTA used before: MONAI's, 2 sum(ab) / (sum a^2 + sum b^2), pooled over the
    batch (batch=True), over the foreground."""
    from monai.losses import DiceLoss

    return DiceLoss(include_background=False, squared_pred=True, batch=True)(a, b)


def variant(name: str, grad_b: bool, official_dice: bool, warp_logits: bool, dice: Callable[..., Any],
            official_grids: bool = False) -> type:
    return type(name, (OfficialObjective,), {"grad_b": grad_b, "official_dice": official_dice,
                                             "warp_logits": warp_logits, "official_grids": official_grids,
                                             "soft_dice_loss": staticmethod(dice)})


def fresh(model: NnUNet, mirror: bool | None = None) -> NnUNet:
    """A copy of the pristine model (its cached predictor dropped), optionally with mirroring switched."""
    model.__dict__.pop("_predictor", None)
    copied = copy.deepcopy(model)
    if mirror is not None:
        copied.config = {**copied.config, "mirror": mirror}
    return copied


def make_adapter(base: NnUNet, cls: type | None, hparams: dict[str, Any], patches_per_update: int) -> DGTTA:
    model = fresh(base)
    if cls is None:  # medtta's dg-tta as registered
        adapter = create_adapter("dg-tta", model, {"statistics": {}}, **hparams)
    else:
        adapter = cls(model, **hparams)
    adapter.patches_per_update = patches_per_update
    return adapter


def network_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An NnUNet state dict's network entries under the network's own names (as the official code saves them)."""
    return {k.removeprefix("network."): v.detach().cpu().clone() for k, v in state.items() if k.startswith("network.")}


@dataclass
class Adapted:
    logits: torch.Tensor  # (1, C, z, y, x): logits (an ensemble's: the members' logits averaged)
    states: list[dict[str, torch.Tensor]]
    seconds: float
    adapter: DGTTA
    left: tuple[int, int] = (0, 0)  # replayed patches and matrices not consumed
    predict_error: str = ""  # medtta's own predict failed: the members were averaged here instead


def members_prediction(adapter: DGTTA, x: torch.Tensor, average: str = "softmax") -> torch.Tensor:
    """The log of the members' mean softmax (what DGTTA.predict computed before), or with `average` "logits" the
    members' mean logits (nnUNetPredictor's, what DGTTA.predict computes now), each member's state loaded in turn as
    nnUNetPredictor.predict_logits_from_preprocessed_data does (load_state_dict), the model's state put back after.
    (torch.func.functional_call refuses the members' cloned aliased entries; with tie_weights=False it gives the
    member's logits but leaves the model's own weights changed after the call: the aliases are put back in turn.)"""
    model = adapter.model
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    outputs = []
    with torch.no_grad():
        for state in adapter.members:
            model.load_state_dict(state)
            outputs.append(model(x).float())
        model.load_state_dict(saved)
    if average == "logits":
        return torch.stack(outputs).mean(0)
    return torch.stack([o.softmax(1) for o in outputs]).mean(0).clamp_min(1e-8).log()


def medtta_adapted(base: NnUNet, cls: type | None, hparams: dict[str, Any], x: torch.Tensor, steps: int,
                   patches: int, patches_per_update: int, seed: int,
                   replay: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None) -> Adapted:
    """Episodic DG-TTA on `x` through medtta's engine; with `replay`, the patches of each step and the matrices of
    each view are the given ones instead of medtta's draws."""
    adapter = make_adapter(base, cls, hparams, patches_per_update)
    seed_everything(seed)
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        stack.enter_context(accumulated_patches(patches))
        if replay is not None:
            steps_patches, thetas = list(replay[0]), list(replay[1])
            adapter.patches = lambda volume, n=None: steps_patches.pop(0).to(volume.device)  # type: ignore[method-assign]
            stack.enter_context(replayed_affines(thetas))
        error = ""
        try:
            logits = adapt_and_predict(adapter, x, "episodic", steps, batch_size=patches_per_update)
        except ValueError as err:  # DGTTA.predict's functional_call on the members' cloned state dicts
            if not adapter.members:
                raise
            error = f"{type(err).__name__}: {str(err)[:160]}..."
            logits = members_prediction(adapter, x)
    seconds = time.perf_counter() - start
    states = adapter.members or [adapter.model.state_dict()]
    left = (len(steps_patches), len(thetas)) if replay is not None else (0, 0)
    return Adapted(logits.detach().float().cpu(), [network_state(s) for s in states], seconds, adapter, left, error)


def replay_of(run: OfficialRun, case: str, ensemble: int, epochs: int, start: int, patches: int,
              patches_per_update: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The official run's draws for `case`, in the order medtta consumes them: per member and updating epoch the
    step's patches; per batch of `patches_per_update` patches branch a's matrices, then branch b's."""
    drawn, affines = run.patches[case], run.affines[case]
    steps, thetas = [], []
    for e in range(ensemble):
        for t in range(start, epochs):
            idx = [(e * epochs + t) * patches + k for k in range(patches)]
            steps.append(torch.cat([drawn[i] for i in idx]))
            for batch in (idx[i:i + patches_per_update] for i in range(0, len(idx), patches_per_update)):
                thetas.append(torch.cat([affines[2 * i] for i in batch]))  # branch a
                thetas.append(torch.cat([affines[2 * i + 1] for i in batch]))  # branch b
    return steps, thetas


REPO_LOGITS = NnUNet.logits  # medtta's NnUNet.logits as the repository has it


def channel_fixed_logits(self: NnUNet, x: torch.Tensor) -> torch.Tensor:
    """NnUNet.logits with the crop back applied to the spatial axes only: pad_nd_image's slicer also spans the
    batch and channel axes of the input (1 channel), and `self.network(padded)[revert]` keeps the first output
    channel (background) alone."""
    from acvl_utils.cropping_and_padding.padding import pad_nd_image

    padded, revert = pad_nd_image(x, self.patch_size, "constant", {"value": 0}, True, None)
    return self.network(padded)[(slice(None), slice(None), *revert[2:])]


def drops_channels(model: NnUNet, patch: torch.Tensor) -> tuple[int, int]:
    """(channels of model(patch), channels of the network's own output) on a patch of the plan's size."""
    with torch.no_grad():
        return int(model(patch).shape[1]), int(model.network(patch).shape[1])


# ------------------------------------------------------------------------------------------------------- one update
@dataclass
class Step:
    loss: float
    grads: dict[str, torch.Tensor]
    after: dict[str, torch.Tensor]


def official_step(side: OfficialSide, patch: torch.Tensor, draws: list[Any]) -> tuple[Step, dict[str, float]]:
    """One update as `tta_main` makes it: `get_model_from_network`, every parameter released, AdamW(lr), both
    `calc_branch` calls (their matrices given), the loss lines of `tta_main` (common_content_mask, softmax,
    1 - soft_dice_loss over the foreground), loss / patches_to_be_accumulated (1 patch), backward, step."""
    off, device = side.off, side.device
    config = side.config(2, 1, 1)
    model = off.model_utils.get_model_from_network(side.network, side.modifier, side.parameters).to(device)
    model.apply(off.torch_utils.fix_all)
    model.apply(off.torch_utils.release_all)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config["lr"])
    model.train()
    batch = 1
    identity_grid = F.affine_grid(torch.eye(4, device=device).repeat(batch, 1, 1)[:, :3],
                                  [batch, 1, *side.patch_size], align_corners=False)
    intensity = off.tta.INTENSITY_AUG_FUNCTION_DICT[config["intensity_aug_function"]]
    queue = list(draws)
    with patched(off.tta, "get_rand_affine", lambda batch_size, strength=0.05, flip=False: queue.pop(0)):
        branches = [off.tta.calc_branch(branch, config, model, intensity, identity_grid, side.patch_size, batch,
                                        side.label_mapping, side.optimized_labels, side.modifier, patch.to(device),
                                        device) for branch in ("branch_a", "branch_b")]
    target_a, target_b = branches
    common_content_mask = (target_a.sum(1, keepdim=True) > 0.0).float() * (target_b.sum(1, keepdim=True) > 0.0).float()
    sm_a = target_a.softmax(1) * common_content_mask
    sm_b = target_b.softmax(1) * common_content_mask
    loss = 1 - off.torch_utils.soft_dice_loss(sm_a, sm_b)[:, 1:].mean()  # START_CLASS = 1
    (loss / 1).backward()
    grads = {n: p.grad.detach().cpu().clone() for n, p in model.named_parameters() if p.grad is not None}
    optimizer.step()
    after = {n: p.detach().cpu().clone() for n, p in model.named_parameters()}
    size = tuple(patch.shape[2:])
    seen = torch.ones(1, 1, *size, dtype=torch.bool)
    for affine in draws:
        seen &= medtta_dgtta.AffineView(affine[0].cpu()).seen(size)
    mask = common_content_mask.cpu().bool()
    facts = {"official_mask": float(mask.float().mean()), "medtta_seen": float(seen.float().mean()),
             "seen_not_in_official_mask": float((seen & ~mask).float().mean()),
             "official_mask_not_seen": float((mask & ~seen).float().mean())}
    return Step(float(loss.detach()), grads, after), facts


def medtta_step(base: NnUNet, cls: type | None, hparams: dict[str, Any], patch: torch.Tensor,
                draws: list[Any]) -> Step:
    """One update of medtta's adapter from the same patch and matrices (branch a's first, as DGTTA draws)."""
    adapter = make_adapter(base, cls, hparams, 1)
    device = next(adapter.model.parameters()).device
    thetas = [draws[0][0].to(device), draws[1][0].to(device)]
    with replayed_affines(thetas):
        loss = adapter.accumulate(patch.to(device), 1, lambda _, b: adapter.consistency(b))
    grads = {n: p.grad.detach().cpu().clone() for n, p in adapter.model.network.named_parameters()
             if p.grad is not None}
    adapter.optimizer_step()
    after = {n: p.detach().cpu().clone() for n, p in adapter.model.network.named_parameters()}
    return Step(loss, grads, after)


def compare_steps(mine: Step, theirs: Step, before: dict[str, torch.Tensor], keep: list[str]) -> dict[str, float]:
    """Loss, gradient and updated-parameter figures over the tensors in `keep` that both trained."""
    names = [n for n in keep if n in mine.grads and n in theirs.grads]
    gm = torch.cat([mine.grads[n].flatten().double() for n in names])
    go = torch.cat([theirs.grads[n].flatten().double() for n in names])
    um = torch.cat([(mine.after[n] - before[n]).flatten().double() for n in names])
    uo = torch.cat([(theirs.after[n] - before[n]).flatten().double() for n in names])
    return {"loss": mine.loss, "cosine": float(F.cosine_similarity(gm, go, dim=0)),
            "grad_rel": float((gm - go).abs().max() / go.abs().max()),
            "grad_norm_ratio": float(gm.norm() / go.norm()),
            "param": float((um - uo).abs().max()), "update": float(uo.abs().max()),
            "update_rel": float((um - uo).norm() / uo.norm()),
            "sign": float(((um.sign() != uo.sign()) & (uo != 0)).double().mean()), "tensors": float(len(names))}


# --------------------------------------------------------------------------------------------------------- figures
def fmt(value: float | None, spec: str = ".3g") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def probabilities(logits: torch.Tensor) -> torch.Tensor:
    """(C, ...) probabilities of logits (a log of probabilities gives the probabilities back)."""
    return logits.float().softmax(0)


def max_param_diff(mine: list[dict[str, torch.Tensor]], theirs: list[dict[str, torch.Tensor]],
                   names: list[str]) -> float:
    return max(float((m[n].float() - o[n].float()).abs().max()) for m, o in zip(mine, theirs, strict=True)
               for n in names)


def dice(native: torch.Tensor, label: torch.Tensor, labels: dict[str, int]) -> float:
    return volume_dice(native, label, labels)["dice"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-folder", type=Path, required=True,
                        help="nnU-Net results folder of one 3d_fullres configuration (plans.json, fold_N/)")
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--dataset", type=Path, default=Path("~/.cache/medtta/data/synth-ct3d").expanduser(),
                        help="medtta dataset folder (nnU-Net raw layout + sites.csv)")
    parser.add_argument("--site", default="B", help="target site whose first --volumes cases are adapted to")
    parser.add_argument("--volumes", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=None, help="official epochs (plan: 12; updates: epochs - 1)")
    parser.add_argument("--patches", type=int, default=None, help="patches accumulated per update (plan: 16)")
    parser.add_argument("--ensemble", type=int, default=None, help="ensemble members (plan: 3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--official-eval", action="store_true",
                        help="also run tta_main's own final evaluation (a spawned nnU-Net metrics process)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    wall = time.perf_counter()

    official = import_official()
    plan = official.config_log_utils.TEMPLATE_PLAN
    epochs = plan["epochs"] if args.epochs is None else args.epochs
    patches = plan["patches_to_be_accumulated"] if args.patches is None else args.patches
    ensemble = plan["ensemble_count"] if args.ensemble is None else args.ensemble
    start_epoch, batch = plan["start_tta_at_epoch"], plan["batch_size"]
    steps = max(0, epochs - start_epoch)
    if batch != 1:
        sys.exit(f"the official plan's batch_size is {batch}; this script replays batches of 1")
    hparams = {"lr": plan["lr"], "weight_decay": torch.optim.AdamW([torch.zeros(1)]).defaults["weight_decay"],
               "strength": inspect.signature(official.augmentation_utils.get_rand_affine).parameters[
                   "strength"].default,
               "ensemble": ensemble, "norm": "batch"}

    dataset = read_dataset(args.dataset.expanduser())
    cases = dataset.cases_of(args.site)[:args.volumes]
    if not cases:
        sys.exit(f"{args.dataset}: no cases of site {args.site} (sites: {', '.join(dataset.sites)})")
    volumes = {c.case_id: load_volume(c, dataset.labels) for c in cases}

    base = NnUNet(1, len(dataset.labels), model_folder=str(args.model_folder), fold=args.fold, checkpoint="final",
                  mirror=True).to(device).eval()
    base.check_labels(dataset.labels)
    pipeline = base.pipeline(None)
    with tempfile.TemporaryDirectory(prefix="nnunet-dgtta-") as tmp:
        side = OfficialSide(official, args.model_folder, args.fold, dataset.labels, cases, Path(tmp), device)
        run_figures(args, official, side, base, pipeline, cases, volumes, dataset.labels, hparams, epochs, patches,
                    ensemble, start_epoch, steps)
    print(f"\nwall time {time.perf_counter() - wall:.0f} s (torch threads {torch.get_num_threads()})")


def run_figures(args: argparse.Namespace, official: Official, side: OfficialSide, base: NnUNet, pipeline: Any,
                cases: list[Case], volumes: dict[str, Any], labels: dict[str, int], hparams: dict[str, Any],
                epochs: int, patches: int, ensemble: int, start_epoch: int, steps: int) -> None:
    names = [n for n, _ in base.network.named_parameters()]
    inert = {id(p) for p in base.network.parameters()} - {id(p) for p in weights_under_batch_statistics(base.network)}
    trained_by_default = [n for n, p in base.network.named_parameters() if id(p) not in inert]
    inert_names = [n for n, p in base.network.named_parameters() if id(p) in inert]
    source = {n: p.detach().cpu().clone() for n, p in base.network.named_parameters()}

    print(f"DG-TTA: medtta `dg-tta` against the official dg_tta {official.version} on {args.model_folder}")
    print(f"volumes: {', '.join(c.case_id for c in cases)} (site {args.site} of {args.dataset}); device "
          f"{args.device}; seed {args.seed}")
    print(f"official plan: epochs {epochs} (updates from epoch {start_epoch}: {steps}), "
          f"{patches} patches per update, batch 1, ensemble {ensemble}, lr {hparams['lr']}, AdamW weight decay "
          f"{hparams['weight_decay']} (PyTorch default), affine strength {hparams['strength']}, params "
          f"{side.template['params_with_grad']}, have_grad_in {side.template['have_grad_in']}, spatial aug "
          f"{side.template['spatial_aug_type']} in {side.template['do_spatial_aug_in']}, intensity aug in "
          f"{side.template['do_intensity_aug_in']}; predictor mirroring {side.mirroring[0]} on axes "
          f"{side.mirroring[1]}")
    print(f"medtta: create_adapter('dg-tta', NnUNet(mirror=True), {hparams}), patches_per_update 1, episodic "
          f"{steps} steps, ACCUMULATED_PATCHES {patches}")
    print(f"optimized_labels (as prepare_tta sorts them): {side.optimized_labels}")
    for note in NOTES:
        print(f"note: {note}")

    # 1. weights and preprocessing -------------------------------------------------------------------------------
    official_weights = side.parameters[0]
    weight_diff = max(float((source[n] - official_weights[n].float()).abs().max()) for n in names)
    print(f"\n== 1. weights: max |medtta NnUNet - official load_network| = {weight_diff:.3g} over {len(names)} "
          f"tensors ({sum(p.numel() for p in base.network.parameters())} parameters)")

    unadapted = side.run(0, patches, 1, args.seed, evaluate=args.official_eval)
    print(f"official unadapted run (tta_main, epochs 0, ensemble 1): {unadapted.seconds:.1f} s")
    prepared = {}
    rows = []
    for case in cases:
        volume = volumes[case.case_id]
        x, meta = pipeline.prepare(volume)
        prepared[case.case_id] = (x.to(next(base.network.parameters()).device), meta)
        theirs = unadapted.data[case.case_id]
        same_shape = tuple(x.shape[1:]) == tuple(theirs.shape)
        rows.append([case.case_id, str(tuple(volume.image.shape)), str(tuple(x.shape[2:])),
                     str(tuple(theirs.shape[1:])), fmt(float((x[0] - theirs).abs().max()) if same_shape else None),
                     str(tuple(side.patch_size))])
    print("\n== preprocessing: medtta NnUNetPipeline.prepare (nibabel, run_case_npy) against the official "
          "load_tta_data (SimpleITK, run_case)")
    print(format_table(["case", "native (x,y,z)", "medtta (z,y,x)", "official (z,y,x)", "max |diff|", "plan patch"],
                       rows))

    # 2. one update from identical inputs ----------------------------------------------------------------------
    first = cases[0].case_id
    seed_everything(args.seed)
    imgs, _ = official.torch_utils.get_batch([unadapted.data[first]], [0], side.patch_size, fixed_patch_idx=None,
                                             device=side.device)
    patch = torch.cat(imgs).cpu()
    draws = [official.augmentation_utils.get_rand_affine(1) for _ in range(2)]  # (R, R^-1) of branches a and b
    theirs, mask_facts = official_step(side, patch, draws)
    # the same update through tta_main itself (its patch and matrices given): the official half checked
    loop = side.run(start_epoch + 1, 1, 1, args.seed, batch_fn=lambda *a: ([patch.to(side.device)], [None]),
                    affine_fn=(lambda q: lambda batch_size, strength=0.05, flip=False: q.pop(0))(
                        [d for _ in range(start_epoch + 1) for d in draws]),
                    images=[side.images[0]])
    loop_diff = max(float((loop.states[first][0][n].float() - theirs.after[n]).abs().max()) for n in names)
    dice_fn = official.torch_utils.soft_dice_loss
    all_fixes_grids = variant("AllFixesGrids", True, True, True, dice_fn, official_grids=True)
    variants = [
        ("medtta dg-tta as is (norm=batch)", None, "batch"),
        ("medtta dg-tta as is, norm=source (conv biases trained too)", None, "source"),
        ("earlier medtta objective (norm=batch)", variant("Earlier", False, False, False, dice_fn), "batch"),
        ("  + gradient through branch b", variant("GradB", True, False, False, dice_fn), "batch"),
        ("  + official soft Dice", variant("GradBDice", True, True, False, dice_fn), "batch"),
        ("  + logits warped back, softmax after, logit-sum mask", variant("AllFixes", True, True, True, dice_fn),
         "batch"),
        ("  + conv biases trained too (norm=source)", variant("AllFixesSource", True, True, True, dice_fn), "source"),
        ("  + calc_branch's grid arithmetic (rounding)", all_fixes_grids, "source"),
        ("earlier medtta, official soft Dice only", variant("DiceOnly", False, True, False, dice_fn), "batch"),
        ("earlier medtta, official warp and mask only", variant("WarpOnly", False, False, True, dice_fn), "batch"),
    ]
    rows = [["official (calc_branch, tta_main's loss, AdamW)", fmt(theirs.loss, ".6f"), "1", "0", "1", "0", "0",
             fmt(max(float((theirs.after[n] - source[n]).abs().max()) for n in trained_by_default)), "0",
             str(len([n for n in trained_by_default if n in theirs.grads]))]]
    step_figures = {}
    got, heads = drops_channels(base, patch.to(next(base.network.parameters()).device))
    if got != heads:
        variants.insert(0, ("medtta dg-tta as in the repository", None, "batch"))
    for label, cls, norm in variants:
        if label.startswith("medtta dg-tta as is") and got != heads:
            NnUNet.logits = channel_fixed_logits  # this process only; the repository is left as it is
        mine = medtta_step(base, cls, {**hparams, "ensemble": 1, "norm": norm}, patch, draws)
        c = compare_steps(mine, theirs, source, trained_by_default)
        step_figures[label.strip(" +")] = c
        rows.append([label, fmt(c["loss"], ".6f"), fmt(c["cosine"], ".6f"), fmt(c["grad_rel"]),
                     fmt(c["grad_norm_ratio"], ".4f"), fmt(c["param"]), fmt(c["update_rel"]), fmt(c["update"]),
                     fmt(c["sign"], ".4f"), str(int(c["tensors"]))])
    inert_move = max((float((theirs.after[n] - source[n]).abs().max()) for n in inert_names), default=0.0)
    inert_grad = max((float(theirs.grads[n].abs().max()) for n in inert_names if n in theirs.grads), default=0.0)
    if got != heads:
        print(f"\nWARNING: medtta's NnUNet returns {got} channel(s) on a patch of the plan's size, its network "
              f"{heads}: medtta/models/nnunet.py NnUNet.logits crops the output with pad_nd_image's slicer, which "
              "spans the input's batch and channel axes too, so every adaptation pass sees the background logit "
              "alone (softmax 1, DG-TTA loss 0, zero gradients). Rows 'as in the repository' keep it; every other "
              "medtta row runs with the crop on the spatial axes only (channel_fixed_logits, in this process).")
    print(f"\n== 2. ONE update from identical inputs: patch of {first} drawn by the official get_batch (seed "
          f"{args.seed}), two matrices from the official get_rand_affine, lr {hparams['lr']}; compared over the "
          "tensors both train, the conv biases under InstanceNorm left out (below)")
    print(format_table(["", "loss", "grad cosine", "max|dgrad|/max|grad|", "|grad| ratio", "max|dtheta|",
                        "|dupdate|/|update|", "max|update| official", "update sign differs", "tensors"], rows))
    print("(Adam's first step is lr * g / (|g| + eps): about lr * sign(g) for every entry, so max|dtheta| is 2 lr as "
          "soon as one entry's gradient changes sign, however small it is: read it with the sign and L2 columns.)")
    print(f"official replica against tta_main itself run for that update (epochs {start_epoch + 1}, 1 patch, its "
          f"patch and matrices given): max |dtheta| = {loop_diff:.3g}")
    print(f"masks on the patch: official common_content_mask (both warped-back logit sums > 0) covers "
          f"{mask_facts['official_mask']:.4f} of the voxels, medtta's `seen` (both views reached) "
          f"{mask_facts['medtta_seen']:.4f}; seen but masked out by the logit-sum test "
          f"{mask_facts['seen_not_in_official_mask']:.4f}, in the official mask but not seen "
          f"{mask_facts['official_mask_not_seen']:.4f}")
    print(f"conv biases under InstanceNorm ({len(inert_names)} tensors; medtta norm=batch leaves them): official "
          f"gradient max {inert_grad:.3g}, moved by up to {inert_move:.3g} (no effect on outputs: the norm "
          "subtracts them)")

    # 3. per volume ----------------------------------------------------------------------------------------------
    run = side.run(epochs, patches, ensemble, args.seed, evaluate=args.official_eval)
    print(f"\n== 3. per volume: official adapted run (tta_main, {epochs} epochs x {patches} patches x {ensemble} "
          f"members): {run.seconds:.1f} s")
    rows, closing, dice_table, predict_errors = [], [], [], []
    for case in cases:
        cid, volume = case.case_id, volumes[case.case_id]
        x, meta = prepared[cid]
        reference = torch.as_tensor(volume.label)
        native_o0, native_o = unadapted.native[cid], run.native[cid]
        p_o0, p_o = probabilities(unadapted.logits[cid]), probabilities(run.logits[cid])
        dice_o0, dice_o = dice(native_o0, reference, labels), dice(native_o, reference, labels)

        def row(what: str, logits: torch.Tensor, p_ref: torch.Tensor, native_ref: torch.Tensor,
                logits_ref: torch.Tensor | None, dice_ref: float, states: list[dict] | None = None,
                seconds: float | None = None, cid: str = cid, reference: torch.Tensor = reference,
                volume: Any = volume, meta: Any = meta) -> dict[str, float]:
            p, native = probabilities(logits[0]), pipeline.to_native(logits, volume, meta)
            figures = {"dp": float((p - p_ref).abs().max()),
                       "dlogit": float((logits[0] - logits_ref).abs().max()) if logits_ref is not None else math.nan,
                       "grid": float((p.argmax(0) == p_ref.argmax(0)).float().mean()),
                       "native": float((native == native_ref).float().mean()),
                       "dice": dice(native, reference, labels),
                       "param": (max_param_diff(states, run.states[cid], trained_by_default) if states
                                 else math.nan)}
            rows.append([cid, what, fmt(figures["dlogit"]), fmt(figures["dp"]), fmt(figures["grid"], ".5f"),
                         fmt(figures["native"], ".5f"), fmt(figures["dice"], ".4f"), fmt(dice_ref, ".4f"),
                         fmt(figures["param"]), fmt(seconds, ".1f")])
            return figures

        with torch.no_grad():
            logits_m0 = base(x).float().cpu()
            logits_nomirror = fresh(base, mirror=False)(x).float().cpu()
        f_un = row("unadapted, mirroring (as the official predictor)", logits_m0, p_o0, native_o0,
                   unadapted.logits[cid], dice_o0)
        row("unadapted, no mirroring (medtta's nnunet default)", logits_nomirror, p_o0, native_o0,
            unadapted.logits[cid], dice_o0)
        rows.append([cid, "official adapted against official unadapted",
                     fmt(float((run.logits[cid] - unadapted.logits[cid]).abs().max())),
                     fmt(float((p_o - p_o0).abs().max())),
                     fmt(float((p_o.argmax(0) == p_o0.argmax(0)).float().mean()), ".5f"),
                     fmt(float((native_o == native_o0).float().mean()), ".5f"), fmt(dice_o, ".4f"),
                     fmt(dice_o0, ".4f"), fmt(max_param_diff([source] * ensemble, run.states[cid],
                                                             trained_by_default)), fmt(run.seconds, ".1f")])
        logits_ref = run.logits[cid] if ensemble == 1 else None
        replay = replay_of(run, cid, ensemble, epochs, start_epoch, patches, 1)
        f_repo = None
        if got != heads:
            with patched(NnUNet, "logits", REPO_LOGITS):
                repo = medtta_adapted(base, None, hparams, x, steps, patches, 1, args.seed)
            f_repo = row("adapted: medtta dg-tta as in the repository", repo.logits, p_o, native_o, logits_ref,
                         dice_o, repo.states, repo.seconds)
            predict_errors.append(repo.predict_error)
        free = medtta_adapted(base, None, hparams, x, steps, patches, 1, args.seed)
        f_free = row("adapted: medtta dg-tta, its own draws", free.logits, p_o, native_o, logits_ref, dice_o,
                     free.states, free.seconds)
        same = medtta_adapted(base, None, hparams, x, steps, patches, 1, args.seed, replay=replay)
        f_same = row("adapted: medtta dg-tta, official draws replayed", same.logits, p_o, native_o, logits_ref,
                     dice_o, same.states, same.seconds)
        fixed = medtta_adapted(base, all_fixes_grids, {**hparams, "norm": "source"}, x, steps, patches, 1, args.seed,
                               replay=replay)
        f_fixed = row("adapted: medtta + official objective and grids, replayed", fixed.logits, p_o, native_o,
                      logits_ref, dice_o, fixed.states, fixed.seconds)
        f_fixed_avg = None
        if ensemble > 1:  # the official predictor averages the members' logits, medtta their softmax
            mean_logits = members_prediction(fixed.adapter, x, "logits").cpu()
            f_fixed_avg = row("  same, members' logits averaged (as nnUNetPredictor)", mean_logits, p_o, native_o,
                              run.logits[cid], dice_o)
        predict_errors += [free.predict_error, same.predict_error, fixed.predict_error]
        if same.left != (0, 0) or fixed.left != (0, 0):
            print(f"warning: {cid}: replay left {same.left} / {fixed.left} (patches, matrices) unused")
        dice_table.append([cid, fmt(dice_o0, ".4f"), fmt(dice_o, ".4f"),
                           fmt(f_repo["dice"] if f_repo else None, ".4f"), fmt(f_free["dice"], ".4f"),
                           fmt(f_same["dice"], ".4f"), fmt(f_fixed["dice"], ".4f")])
        closing.append({"un": f_un, "repo": f_repo, "free": f_free, "same": f_same, "fixed": f_fixed,
                        "fixed_avg": f_fixed_avg})
    print(format_table(["case", "against the official prediction", "max|dlogit|", "max|dprob|", "label agree (grid)",
                        "label agree (native)", "Dice", "Dice official", "max|dtheta|", "s"], rows))
    print("(network grid unless native; max|dlogit| only where both sides are logits; max|dtheta|: adapted "
          "parameters against the official saved ones, every member, conv biases under InstanceNorm left out; on the "
          "official row its change from the source)")
    errors = sorted({e for e in predict_errors if e})
    if errors:
        print(f"\nWARNING: medtta's DGTTA.predict failed with ensemble {ensemble} ({errors[0]}); the rows above "
              "average the members as it means to (members_prediction: each member's state loaded in turn)")
    print("\nDice against the reference label (native grid, mean over foreground labels)")
    print(format_table(["case", "official unadapted", "official adapted", "medtta repository", "medtta own draws",
                        "medtta replayed", "medtta + official objective"], dice_table))
    if unadapted.summary_dice is not None or run.summary_dice is not None:
        print(f"official tta_main evaluation (summary_Ts.json foreground mean Dice): unadapted "
              f"{fmt(unadapted.summary_dice, '.4f')}, adapted {fmt(run.summary_dice, '.4f')}")

    # 4. differences and their reasons --------------------------------------------------------------------------
    as_is = step_figures["medtta dg-tta as is (norm=batch)"]
    as_is_source = step_figures["medtta dg-tta as is, norm=source (conv biases trained too)"]
    earlier = step_figures["earlier medtta objective (norm=batch)"]
    fixed3 = step_figures["logits warped back, softmax after, logit-sum mask"]
    floor = step_figures["calc_branch's grid arithmetic (rounding)"]
    items = []
    if got != heads:
        repo_step = step_figures["medtta dg-tta as in the repository"]
        items.append(("medtta bug: NnUNet.logits keeps one output channel",
                      "medtta/models/nnunet.py NnUNet.logits: `self.network(padded)[revert]` with pad_nd_image's "
                      "slicer, which covers the input's (N, 1, ...) axes; the network's C channels are cut to 1, "
                      "so DG-TTA's softmax is 1 everywhere (and every other adapter's patch/slice pass on nnunet sees "
                      "background only); fix: index with (slice(None), slice(None), *revert[2:])",
                      f"one step as in the repository: loss {repo_step['loss']:.3g}, |grad| ratio "
                      f"{repo_step['grad_norm_ratio']:.3g}; the repository's adapted prediction differs from the "
                      "official by max|dprob| " + f"{max(c['repo']['dp'] for c in closing):.3g}"))
    if errors:
        items.append(("medtta bug: ensemble prediction fails on nnunet",
                      "DGTTA.adapt clones every state_dict entry (nnU-Net's state has aliased names: decoder.encoder.* "
                      "and all_modules.* are the encoder's and the blocks' own tensors), and DGTTA.predict's "
                      "torch.func.functional_call refuses the untied duplicates (tie_weights=False computes them but "
                      "leaves the model's weights changed after the call); fix: load each member's state in turn "
                      "(load_state_dict, as nnUNetPredictor does) and put the model's state back",
                      errors[0][:90]))
    items += [
        ("gradient through branch b (fixed)", "official calc_branch takes its grad context from "
         "config['have_grad_in'] alone (nullcontext for 'branch_a'), so both branches backpropagate; the earlier "
         "medtta computed branch b under no_grad, DGTTA.consistency now backpropagates through both",
         f"one step: grad cosine {earlier['cosine']:.4f} earlier, "
         f"{step_figures['gradient through branch b']['cosine']:.4f} with it"),
        ("soft Dice (fixed)", "official 4 sum(ab) / sum((a+b)^2) per patch and class, 1 - its mean over the "
         "foreground; the earlier medtta used MONAI DiceLoss(squared_pred, batch=True), 2 sum(ab) / (sum a^2 + "
         "sum b^2): 2r/(1+r) of it per class, a per-class factor, so the direction of the gradient changed, not only "
         "its scale; now dg_tta.soft_dice (the official form, per sample)",
         f"one step: official Dice alone (earlier otherwise) cosine "
         f"{step_figures['earlier medtta, official soft Dice only']['cosine']:.4f}"),
        ("warp and mask (fixed)", "official warps the logits back (zero padding) and takes the softmax after, "
         "masking where both warped-back logit sums are > 0, which also drops reached voxels whose logits sum to "
         "<= 0; the earlier medtta warped the softmax (border padding) and masked where both views reached; now "
         "dg_tta.warp_back and the official mask",
         f"official mask {mask_facts['official_mask']:.3f} of the patch, the earlier 'seen' mask "
         f"{mask_facts['medtta_seen']:.3f}; official warp/mask alone cosine "
         f"{step_figures['earlier medtta, official warp and mask only']['cosine']:.4f}"),
        ("sampling grids (fixed)", "calc_branch builds its grids as (0 * identity + (affine_grid - identity)) + "
         "identity: rounding apart from affine_grid alone, which the logit-sum mask and Adam's sign-like first step "
         "magnify (the earlier medtta used affine_grid alone); DGTTA now builds them the same way "
         "(dg_tta.branch_grids)",
         f"one step, medtta as is: cosine {as_is['cosine']:.6f}, max|dgrad|/max|grad| {as_is['grad_rel']:.3g}, "
         f"sign differs {as_is['sign']:.4f}, max|dtheta| {as_is['param']:.3g} (norm=source: "
         f"{as_is_source['param']:.3g}); the script's replica with the grid arithmetic too: "
         f"{floor['grad_rel']:.3g}, {floor['sign']:.4f} (earlier medtta: sign differs {earlier['sign']:.4f})"),
        ("updates", f"official {epochs} epochs, the first evaluation only (start_tta_at_epoch {start_epoch}): "
         f"{steps} updates; medtta DGTTA.default_steps {DGTTA.default_steps} (the script passes {steps})",
         "-"),
        ("ensemble", f"official ensemble_count {side.template['ensemble_count']}, the members' logits averaged by "
         f"nnUNetPredictor; medtta ensemble default {DGTTA.defaults['ensemble']}, the members' logits averaged "
         "(each member's state loaded in turn, as nnUNetPredictor does)",
         (f"replayed with the official objective, max|dprob| {max(c['fixed']['dp'] for c in closing):.3g} "
          f"as DGTTA.predict gives it, {max(c['fixed_avg']['dp'] for c in closing):.3g} members' logits "
          "averaged here") if ensemble > 1 else "ensemble 1 in this run"),
        ("patches per update", "official batch 1: Dice per patch, the losses averaged over the 16 patches; medtta "
         "the same (one Dice per patch, losses averaged, whatever the engine's patches_per_update; the script "
         "sets 1)", "-"),
        ("patch sampling", "official get_batch resamples each patch at a continuous random offset (trilinear), "
         "centred and padded with the volume's minimum where the volume is smaller than the patch; medtta crops at "
         "an integer corner and zero-pads at the end; the random draws differ in kind and order",
         "the 'replayed' rows use the official patches and matrices"),
        ("trained parameters", "official trains every parameter ('all'); medtta norm=batch leaves out what "
         "weights_under_batch_statistics does (the conv biases under InstanceNorm, which the norm subtracts, and "
         "nnU-Net's unused deep-supervision heads: no effect on outputs); norm=source trains them too",
         f"official moved them by up to {inert_move:.3g}"),
        ("mirroring", "the official predictor mirrors (nnUNetPredictor's default, the checkpoint's axes); medtta's "
         "nnunet does not unless -a mirror=true (the script sets it)", "the 'no mirroring' rows"),
        ("label order", f"official optimized_labels are sorted by name after background ({side.optimized_labels}): "
         "its outputs and the branch channels are renumbered; the script maps them back (the Dice is permutation-"
         "invariant)", "-"),
        ("the same", "AdamW lr 1e-5, weight decay 0.01 (PyTorch's default there); affine strength 0.05, border "
         "padding of the warped image; no intensity augmentation; InstanceNorm per patch; loss / patches per update; "
         "preprocessing and sliding-window prediction (nnU-Net's own code on both sides)", "-"),
    ]
    print("\n== 4. differences, reasons, figures")
    for i, (what, why, figure) in enumerate(items, 1):
        print(f"{i:2d}. {what}: {why}.\n    figure: {figure}")

    worst = {key: max(c[key]["dp"] for c in closing) for key in ("un", "free", "same", "fixed")}
    repo_text = (f"as in the repository {max(c['repo']['dp'] for c in closing):.3g} (it does not adapt: "
                 "NnUNet.logits bug), " if got != heads else "")
    avg_text = (f", {max(c['fixed_avg']['dp'] for c in closing):.3g} once the members' logits are averaged as the "
                "official predictor does" if ensemble > 1 else "")
    print(f"\nCLOSING: dg-tta against the official package on the same nnU-Net ({len(cases)} volume(s); {steps} "
          f"update(s) x {patches} patch(es) x {ensemble} member(s)). Largest probability difference: unadapted "
          f"{worst['un']:.3g} (same preprocessing and predictor, mirroring on); adapted {repo_text}"
          f"{worst['free']:.3g} with medtta's own draws, {worst['same']:.3g} with the official patches and matrices "
          f"replayed, {worst['fixed']:.3g} replayed with the official objective{avg_text}. ONE update from identical "
          f"inputs: medtta as is: grad cosine {as_is['cosine']:.4f}, update sign differs on {as_is['sign']:.4f} of "
          f"the entries, max |dtheta| {as_is['param']:.3g} (official update size {as_is['update']:.3g}); earlier "
          f"medtta objective: sign differs {earlier['sign']:.4f}, max |dtheta| {earlier['param']:.3g}; the script's "
          f"replica with the three objective differences removed: cosine {fixed3['cosine']:.6f}, max|dgrad|/max|grad| "
          f"{fixed3['grad_rel']:.3g}, sign differs {fixed3['sign']:.4f}, max |dtheta| {fixed3['param']:.3g}; with "
          f"calc_branch's grid arithmetic too: {floor['grad_rel']:.3g}, {floor['sign']:.4f}, {floor['param']:.3g}.")

if __name__ == "__main__":
    main()
