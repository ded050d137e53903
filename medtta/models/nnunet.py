"""`nnunet`: a trained nnU-Net v2 (Isensee et al., Nature Methods 2021; MIC-DKFZ/nnUNet, package `nnunetv2`) as the
source network: the results folder of one configuration (plans.json, dataset.json, fold_N/checkpoint_*.pth) that a
hospital team already has, or one medtta trains through nnunetv2 itself (`medtta.models.nnunet_training`).

Everything nnU-Net decides is nnunetv2's own code: the network (the trainer's `build_network_architecture` from the
plans), the preprocessing (the plan's preprocessor: transpose, crop to the non-zero box, the plan's normalization
scheme, resampling to the plan's spacing), prediction of whole inputs (`nnUNetPredictor`'s sliding window, Gaussian
weighting, step 0.5; mirroring off unless `-a mirror=true`, so that adaptation is compared with the same inference)
and the way back to the volume's own grid. Adaptation passes on patches of the plan's size run the network itself.

Arrays: nnU-Net is trained on images as SimpleITK reads them, (z, y, x) with the spacing reversed; medtta loads
NIfTI with nibabel as (x, y, z), the same voxels in reversed axis order. The pipeline reverses them, and a 2D image
gets nnU-Net's leading slice axis of spacing 999, as its SimpleITK reader does.

Checkpoints are read with `torch.load(weights_only=True)`: nnU-Net stores its training log's numbers as numpy
scalars, so numpy's scalar and dtype classes (and nothing else) are allowed besides tensors and plain containers.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from medtta.data.layout import Dataset, Volume, load_volume, sha256
from medtta.data.pipeline import Pipeline
from medtta.errors import MedttaError, MedttaWarning
from medtta.metrics import mean, volume_dice
from medtta.models.base import Architecture, norm_params
from medtta.models.volumetric import window_statistics
from medtta.protocol import Preprocessing, Protocol

CONFIGURATIONS = {2: "2d", 3: "3d_fullres"}  # -a spatial_dims -> the nnU-Net configuration trained or expected
CHECKPOINTS = ("final", "best")
EXPORTED = "medtta-nnunet.json"  # a bundle's stand-in for the checkpoint: configuration, trainer, mirror axes
INSTALL_HINT = "pip install 'medtta[nnunet]'"


def nnunetv2_required() -> None:
    """Fail with the install command when nnunetv2 is missing."""
    try:
        import nnunetv2  # noqa: F401
    except ImportError:
        raise MedttaError(f"architecture nnunet needs nnunetv2, which is not installed ({INSTALL_HINT})") from None


def _numpy_globals() -> list[Any]:
    """The numpy classes nnU-Net's checkpoints pickle (scalars of its training log)."""
    core = getattr(np, "_core", None) or np.core
    dtypes = [type(np.dtype(t)) for t in (np.float16, np.float32, np.float64, np.int32, np.int64, np.bool_)]
    return [core.multiarray.scalar, np.dtype, *dtypes]


def read_checkpoint(path: Path) -> dict[str, Any]:
    """An nnU-Net checkpoint, read without running arbitrary pickled code (`weights_only=True`)."""
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a pickle needing other classes is refused, not run
        raise MedttaError(f"nnU-Net checkpoint {path} cannot be read as weights only: {err}") from None
    if not isinstance(checkpoint, dict) or "network_weights" not in checkpoint:
        raise MedttaError(f"{path} is not an nnU-Net checkpoint (no network_weights)")
    return checkpoint


@dataclass(frozen=True)
class ModelFolder:
    """What medtta reads from an nnU-Net results folder of one configuration, for one fold and checkpoint."""

    path: Path
    plans: dict[str, Any]
    dataset_json: dict[str, Any]
    configuration: str
    trainer: str
    weights: dict[str, torch.Tensor] | None  # None: a bundle's folder, whose weights come with the bundle
    mirror_axes: tuple[int, ...] | None
    checkpoint: Path

    @property
    def dims(self) -> int:
        return 2 if self.configuration == "2d" else 3


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise MedttaError(f"{path}: missing (--checkpoint must be an nnU-Net results folder of one configuration, "
                          "e.g. nnUNet_results/Dataset001_X/nnUNetTrainer__nnUNetPlans__3d_fullres)")
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise MedttaError(f"{path}: not readable JSON ({err})") from None


def read_model_folder(folder: str | Path, fold: Any = 0, checkpoint: str = "final") -> ModelFolder:
    """The plans, dataset.json and checkpoint of `fold` (a number or `all`) and `checkpoint` (final or best) of an
    nnU-Net results folder; each missing piece is named."""
    folder = Path(folder)
    if (folder / EXPORTED).is_file():  # written by `export_files` into a bundle: no pickle, weights elsewhere
        exported = _read_json(folder / EXPORTED)
        axes = exported["mirror_axes"]
        return ModelFolder(folder, _read_json(folder / "plans.json"), _read_json(folder / "dataset.json"),
                           exported["configuration"], exported["trainer"], None,
                           tuple(axes) if axes is not None else None, folder / EXPORTED)
    if checkpoint not in CHECKPOINTS:
        raise MedttaError(f"-a checkpoint={checkpoint}: expected one of {', '.join(CHECKPOINTS)}")
    plans, dataset_json = _read_json(folder / "plans.json"), _read_json(folder / "dataset.json")
    path = folder / f"fold_{fold}" / f"checkpoint_{checkpoint}.pth"
    if not path.is_file():
        found = ", ".join(sorted(str(p.relative_to(folder)) for p in folder.glob("fold_*/checkpoint_*.pth")))
        raise MedttaError(f"{path}: missing (-a fold={fold} -a checkpoint={checkpoint}; the folder has "
                          f"{found or 'no fold_*/checkpoint_*.pth'})")
    saved = read_checkpoint(path)
    configuration = saved.get("init_args", {}).get("configuration") or folder.name.rsplit("__", 1)[-1]
    if configuration not in plans.get("configurations", {}):
        raise MedttaError(f"{path}: configuration '{configuration}' is not in {folder / 'plans.json'}")
    axes = saved.get("inference_allowed_mirroring_axes")
    return ModelFolder(folder, plans, dataset_json, configuration, saved.get("trainer_name", "nnUNetTrainer"),
                       saved["network_weights"], tuple(axes) if axes is not None else None, path)


def build_nnunet_network(folder: ModelFolder) -> nn.Module:
    """The network as nnU-Net builds it for inference: its trainer's `build_network_architecture` from the plans
    (nnUNetTrainer's where the trainer class is not installed here), without deep supervision."""
    import nnunetv2
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.find_objects import recursive_find_python_class
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans = PlansManager(folder.plans)
    config = plans.get_configuration(folder.configuration)
    trainer = recursive_find_python_class(str(Path(nnunetv2.__path__[0]) / "training" / "nnUNetTrainer"),
                                          folder.trainer, "nnunetv2.training.nnUNetTrainer")
    if trainer is None:
        warnings.warn(f"{folder.checkpoint}: trainer {folder.trainer} is not installed here; building the network "
                      "from the plans as nnUNetTrainer does", MedttaWarning, stacklevel=2)
        trainer = nnUNetTrainer
    heads = plans.get_label_manager(folder.dataset_json).num_segmentation_heads
    network = trainer.build_network_architecture(plans, config, determine_num_input_channels(
        plans, config, folder.dataset_json), heads, enable_deep_supervision=False)
    try:
        if folder.weights is not None:
            network.load_state_dict(folder.weights)
    except RuntimeError as err:
        raise MedttaError(f"{folder.checkpoint}: weights do not fit the network its plans describe: {err}") from None
    return network


class NnUNet(Architecture):
    """A trained nnU-Net v2 (`--checkpoint <results folder>`, `-a fold`, `-a checkpoint=final|best`), or one trained
    here through nnunetv2 on the protocol's source site (`-a nnunet_epochs`, `-a nnunet_iterations`; InstanceNorm).

    Prediction of whole volumes (3d_fullres) or slices (2d) is nnU-Net's sliding-window predictor; patches of the
    plan's size (adaptation updates) run the network itself. `parts`: `norm` (InstanceNorm affine parameters),
    `encoder`, `decoder`.
    """

    defaults: ClassVar[dict[str, Any]] = {"spatial_dims": 3, "model_folder": "", "fold": 0, "checkpoint": "final",
                                          "mirror": False, "nnunet_epochs": 40, "nnunet_iterations": 25,
                                          "nnunet_features": 8, "source_aug": "none"}

    def __init__(self, in_channels: int, n_classes: int, **config: Any) -> None:
        super().__init__(in_channels, n_classes, **config)
        nnunetv2_required()
        if not self.config["model_folder"]:
            raise MedttaError("architecture nnunet needs a trained model: --checkpoint <nnU-Net results folder>, or "
                              "let `medtta run` train one (medtta.models.training.source_model)")
        self.folder = read_model_folder(self.config["model_folder"], self.config["fold"], self.config["checkpoint"])
        self.spatial_dims = self.folder.dims
        asked = self.config["spatial_dims"]
        if asked != self.spatial_dims:
            raise MedttaError(f"{self.folder.path} holds a {self.folder.configuration} nnU-Net, a {self.spatial_dims}D "
                              f"network, not {asked}D (-a spatial_dims={self.spatial_dims})")
        self.check_data(in_channels, n_classes)
        self.network = build_nnunet_network(self.folder)
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        self.plans = PlansManager(self.folder.plans)
        self.configuration = self.plans.get_configuration(self.folder.configuration)
        self.patch_size = tuple(self.configuration.patch_size)
        self.window = self.patch_size if self.spatial_dims == 3 else None

    def check_data(self, in_channels: int, n_classes: int) -> None:
        """Refuse a dataset of other channels or labels than the model's dataset.json, naming both."""
        labels = self.folder.dataset_json.get("labels", {})
        channels = self.folder.dataset_json.get("channel_names", self.folder.dataset_json.get("modality", {}))
        if len(channels) != in_channels:
            raise MedttaError(f"{self.folder.path / 'dataset.json'}: the model takes {len(channels)} channel(s) "
                              f"{channels}, the dataset has {in_channels}")
        if len(labels) != n_classes:
            raise MedttaError(f"{self.folder.path / 'dataset.json'}: the model segments labels {labels}, the dataset "
                              f"has {n_classes} classes")

    @classmethod
    def dims_of(cls, config: dict[str, Any]) -> int | None:
        """The dimensions of the given results folder's configuration (None when medtta trains the model)."""
        folder = config.get("model_folder")
        return None if not folder else 2 if Path(folder).name.endswith("__2d") else 3

    def export_files(self, out: Path) -> dict[str, Any]:
        """Write plans.json, dataset.json and the checkpoint's facts (no pickle) into `out`/nnunet for a bundle;
        returns the config that loads them from there (the weights travel in the bundle's safetensors)."""
        folder = out / "nnunet"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "plans.json").write_text(json.dumps(self.folder.plans, indent=2))
        (folder / "dataset.json").write_text(json.dumps(self.folder.dataset_json, indent=2))
        (folder / EXPORTED).write_text(json.dumps({"configuration": self.folder.configuration,
                                                   "trainer": self.folder.trainer,
                                                   "mirror_axes": self.folder.mirror_axes}, indent=2))
        return {"model_folder": "nnunet"}

    @classmethod
    def norm_of(cls, config: dict[str, Any]) -> str:
        """nnU-Net's plans normalize with InstanceNorm (a given folder's plans may name BatchNorm)."""
        folder = config.get("model_folder")
        if folder and (Path(folder) / "plans.json").is_file():
            plans = json.loads((Path(folder) / "plans.json").read_text())
            ops = {str(c.get("architecture", {}).get("arch_kwargs", {}).get("norm_op", ""))
                   for c in plans.get("configurations", {}).values()}
            if any("BatchNorm" in op for op in ops):
                return "batch"
        return "instance"

    def check_labels(self, labels: dict[str, int]) -> None:
        """Refuse a protocol whose labels (name -> value) differ from the model's dataset.json."""
        model = {name: int(value) for name, value in self.folder.dataset_json.get("labels", {}).items()}
        if model != labels:
            raise MedttaError(f"{self.folder.path / 'dataset.json'}: the model segments labels {model}, the dataset "
                              f"has {labels}")

    @classmethod
    def own_source(cls, protocol: Protocol, dataset: Dataset, seed: int, results: Path, device: torch.device,
                   config: dict[str, Any], progress: bool = True) -> tuple[NnUNet, dict[str, Any]]:
        """The given results folder (`-a model_folder`, `--checkpoint`), or an nnU-Net trained through nnunetv2 on
        the protocol's source site (cached), checked against the protocol's labels; and its training record."""
        from medtta.models.nnunet_training import save_record, train_nnunet

        nnunetv2_required()
        config = {**cls.defaults, **config}
        if config["model_folder"]:
            folder, record = Path(config["model_folder"]), {"seconds": 0.0, "cached": True}
        else:
            folder, record = train_nnunet(protocol, dataset, CONFIGURATIONS[config["spatial_dims"]], config, seed,
                                          results, device, progress)
        model = cls(1, len(protocol.labels), **{**config, "model_folder": str(folder)}).to(device).eval()
        model.check_labels(protocol.labels)
        given = bool(config["model_folder"])
        model_id = f"nnunet-{sha256(model.folder.checkpoint)[:16]}{'-mirror' if config['mirror'] else ''}"
        if "val_dice" not in record:  # measured once, kept in the trained model's record; a given model's split is
            record["val_dice"] = math.nan if given else validation_dice(model, protocol, dataset)  # unknown
            if not given:
                save_record(record)
        return model, {**record, "epoch": -1, "checkpoint": str(model.folder.checkpoint), "model_id": model_id}

    def use_window(self, window: Any) -> None:
        """The plan's patch is the window: the protocol's 3D patch does not apply."""

    def pipeline(self, prep: Preprocessing) -> Pipeline:
        return NnUNetPipeline(self)

    def predictor(self) -> Any:
        """nnUNetPredictor on this network, as it is now (adapted or not); made again when the network moved."""
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        device = next(self.network.parameters()).device
        made = self.__dict__.get("_predictor")
        if made is not None and made.network is self.network and made.device == device:
            return made
        with contextlib.redirect_stdout(io.StringIO()):  # it prints that a CPU keeps results on the CPU
            predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True,
                                        use_mirroring=bool(self.config["mirror"]),
                                        perform_everything_on_device=device.type == "cuda", device=device,
                                        allow_tqdm=False)
        predictor.manual_initialization(self.network, self.plans, self.configuration, None, self.folder.dataset_json,
                                        self.folder.trainer, self.folder.mirror_axes)
        self.__dict__["_predictor"] = predictor  # not a submodule: the network is registered once, as `network`
        return predictor

    def sliding_window(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of whole inputs by nnU-Net's predictor: a 3D volume (1, C, D, H, W), or slices (S, C, H, W)."""
        mode = self.network.training
        image = x[0] if x.dim() == 5 else x.movedim(0, 1)  # nnU-Net's (c, z, y, x); slices: z is the slice axis
        logits = self.predictor().predict_sliding_window_return_logits(image).float().clone()
        self.network.train(mode)  # the predictor switches it to eval
        return logits[None] if x.dim() == 5 else logits.movedim(1, 0)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The network on patches of the plan's size as they are (2D: slices zero-padded up to the patch, as the
        predictor pads them, then cropped back)."""
        from acvl_utils.cropping_and_padding.padding import pad_nd_image

        padded, revert = pad_nd_image(x, self.patch_size, "constant", {"value": 0}, True, None)
        return self.network(padded)[(slice(None), slice(None), *revert[2:])]  # every sample and class

    def windows_with_gradients(self, x: torch.Tensor) -> torch.Tensor:
        """The predictor's computation with gradients (the predictor runs without): its windows (`tile_step_size`
        0.5) and Gaussian weights, accumulated in fp32, for a pass that backpropagates through a whole volume
        (EATA's Fisher information on source volumes)."""
        from acvl_utils.cropping_and_padding.padding import pad_nd_image
        from nnunetv2.inference.sliding_window_prediction import compute_gaussian

        image = x[0] if x.dim() == 5 else x.movedim(0, 1)
        data, revert = pad_nd_image(image, self.patch_size, "constant", {"value": 0}, True, None)
        gaussian = compute_gaussian(self.patch_size, 1 / 8, 10, device=x.device).clone()  # an inference tensor?
        logits = data.new_zeros((self.n_classes, *data.shape[1:]))
        weights = data.new_zeros(data.shape[1:])
        for window in self.predictor()._internal_get_sliding_window_slicers(data.shape[1:]):
            logits[window] += self.network(data[window][None])[0] * gaussian
            weights[window[1:]] += gaussian
        logits = (logits / weights)[(slice(None), *revert[1:])]
        return logits[None] if x.dim() == 5 else logits.movedim(1, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """A 3D patch of the plan's size: the network; a whole volume, or slices, without gradients: nnU-Net's
        predictor; with gradients: slices within the patch are padded to it, anything else goes by windows."""
        if x.dim() == 5 and tuple(x.shape[2:]) == self.patch_size:
            return self.logits(x)
        if not (torch.is_grad_enabled() and any(p.requires_grad for p in self.network.parameters())):
            return self.sliding_window(x)
        if x.dim() == 4 and all(n <= p for n, p in zip(x.shape[2:], self.patch_size, strict=True)):
            return self.logits(x)
        return self.windows_with_gradients(x)

    def window_statistics(self, x: torch.Tensor) -> Any:
        """No test-batch-statistics layer in an InstanceNorm network: a context that changes nothing, unless an
        adapter swapped one in."""
        return window_statistics(self, self.network, x, self.window)

    @property
    def encoder_blocks(self) -> list[nn.Module]:
        """The encoder's stages, top to bottom (SAR leaves the deepest one's norms out)."""
        return list(self.network.encoder.stages)

    def parts(self) -> dict[str, list[nn.Parameter]]:
        return {"norm": norm_params(self.network), "encoder": list(self.network.encoder.parameters()),
                "decoder": list(self.network.decoder.parameters())}


def _plain(value: Any) -> Any:
    """nnU-Net's properties as plain Python (what the volume cache stores)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_plain(v) for v in value]
    return value.item() if isinstance(value, np.generic) else value


@torch.no_grad()
def validation_dice(model: NnUNet, protocol: Protocol, dataset: Dataset) -> float:
    """Mean volume Dice of `model` on the source site's val cases, on their own grid (as the engine scores)."""
    pipeline, device = model.pipeline(protocol.preprocessing), next(model.parameters()).device
    scores = []
    for case in dataset.cases_of(protocol.source_site, "val"):
        volume = load_volume(case, dataset.labels)
        x, meta = pipeline.prepare(volume)
        pred = pipeline.to_native(model(x.to(device)), volume, meta)
        scores.append(volume_dice(pred, torch.as_tensor(volume.label), protocol.scored_labels)["dice"])
    return mean(scores)


class NnUNetPipeline(Pipeline):
    """nnU-Net's preprocessing of the model's plans and configuration, and its way back to the volume's grid."""

    def __init__(self, model: NnUNet) -> None:
        self.model = model
        self.plans, self.configuration = model.plans, model.configuration
        self.dataset_json = model.folder.dataset_json

    def key(self) -> Any:
        plans = self.model.folder.plans
        return ["nnunet", self.model.folder.configuration, plans["configurations"][self.model.folder.configuration],
                plans.get("transpose_forward"), plans.get("foreground_intensity_properties_per_channel"),
                self.dataset_json.get("labels")]

    def _run(self, volume: Volume, with_label: bool) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
        image = volume.image.T[None]  # (c, z, y, x), as nnU-Net's SimpleITK reader gives it
        spacing = list(reversed(volume.spacing))
        if volume.image.ndim == 2:
            image, spacing = image[:, None], [999.0, *spacing]
        label = None
        if with_label:
            label = volume.label.T[None]
            label = label[:, None] if volume.label.ndim == 2 else label
        preprocessor = self.configuration.preprocessor_class(verbose=False)
        data, seg, properties = preprocessor.run_case_npy(image, label, {"spacing": spacing}, self.plans,
                                                          self.configuration, self.dataset_json)
        return data, seg, properties

    def _as_input(self, data: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(np.ascontiguousarray(data)).float()
        return tensor[None] if self.model.spatial_dims == 3 else tensor.movedim(1, 0).contiguous()

    def prepare(self, volume: Volume) -> tuple[torch.Tensor, dict[str, Any]]:
        data, _, properties = self._run(volume, with_label=False)
        return self._as_input(data), _plain({k: properties[k] for k in (
            "spacing", "shape_before_cropping", "bbox_used_for_cropping",
            "shape_after_cropping_and_before_resampling")})

    def source_volume(self, volume: Volume) -> tuple[torch.Tensor, torch.Tensor]:
        data, seg, _ = self._run(volume, with_label=True)
        labels = torch.from_numpy(seg.astype(np.int64)).clamp_min(0)  # -1: outside the non-zero box, background
        return self._as_input(data), labels if self.model.spatial_dims == 3 else labels[0]

    def to_native(self, logits: torch.Tensor, volume: Volume, meta: dict[str, Any]) -> torch.Tensor:
        from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape

        logits = logits[0] if logits.dim() == 5 else logits.movedim(1, 0)  # (C, z, y, x)
        segmentation = convert_predicted_logits_to_segmentation_with_correct_shape(
            logits.detach().cpu().half(), self.plans, self.configuration,  # half: as nnunetv2 exports the predictor's
            self.plans.get_label_manager(self.dataset_json), dict(meta), num_threads_torch=torch.get_num_threads())
        segmentation = np.asarray(segmentation)
        if volume.label.ndim == 2:
            segmentation = segmentation[0]
        return torch.from_numpy(np.ascontiguousarray(segmentation.T)).long()
