"""Architectures: the registry, the UNet run as encoder and decoder, the auxiliary tasks and corruptions, and one
source-training loop with a cache per network and per post-training stage."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from medtta.adapters.ae_tta import orthogonality_penalty
from medtta.data.datasets import open_dataset
from medtta.data.layout import load_volume
from medtta.data.synthetic.cardiac import generate
from medtta.errors import RegistryError
from medtta.models import ARCHITECTURES, build_network
from medtta.models.norm_net import GaussianActivation, GaussianBump, Normalizer, squares_jigsaw
from medtta.models.training import SourceData, source_model, train_stage
from medtta.protocol import Training, resolve_protocol
from medtta.registry import ADAPTERS

# tiny stages: the DAE on a small grid, a few epochs
TINY = {"unet-normalizer": {"dae_epochs": 2, "prior_size": [8, 32, 32]},
        "unet-autoencoders": {"ae_epochs": 2, "ae_output_epochs": 2}, "sam-tiny": {"image_size": 32}}
UNET_FAMILY = [name for name in ARCHITECTURES.list() if name.startswith("unet")]  # SAM and nnU-Net are their own
TRAINABLE = [*UNET_FAMILY, "sam-tiny"]  # the sam-vit-* need a checkpoint (tests/models/test_sam_models.py)


def test_every_adapter_declares_a_registered_architecture() -> None:
    assert set(ARCHITECTURES.list()) >= {"unet", "unet-normalizer", "unet-rotation", "unet-mae", "unet-autoencoders",
                                         "sam-tiny", "sam-vit-b", "sam-vit-l", "sam-vit-h"}
    assert {a for m in ADAPTERS.list() for a in ADAPTERS.get(m).architectures()} <= set(ARCHITECTURES.list())


@pytest.mark.parametrize("name", UNET_FAMILY)
def test_architectures_keep_the_unet_backbone(name: str) -> None:
    torch.manual_seed(0)
    net = build_network(name, 1, 3).eval()
    x = torch.randn(2, 1, 64, 64)
    assert net(x).shape == (2, 3, 64, 64)
    backbone = build_network("unet", 1, 3).backbone
    assert [p.shape for p in net.backbone.parameters()] == [p.shape for p in backbone.parameters()]
    parts = net.parts()
    assert {"norm", "encoder", "decoder"} <= set(parts)
    stages = {stage.module for stage in net.post_training()}
    assert all(key.split(".", 1)[0] not in stages for key in net.network_state())


def test_encode_decode_is_monai_forward() -> None:
    torch.manual_seed(0)
    net = build_network("unet", 1, 4).eval()
    x = torch.randn(3, 1, 64, 48)
    features = net.encode(x)
    assert [f.shape[1] for f in features] == [16, 32, 64, 128] and features[-1].shape[-2:] == (8, 6)
    assert torch.equal(net.decode(features), net.backbone(x))


def test_unknown_architecture_and_config_key() -> None:
    with pytest.raises(RegistryError, match="unknown architecture 'nope'"):
        build_network("nope", 1, 2)
    with pytest.raises(RegistryError, match=r"NormalizerUNet has no config key dae_epoch \(known: prior_size, dae"):
        build_network("unet-normalizer", 1, 2, dae_epoch=3)


def test_squares_jigsaw_copies_boxes_within_each_volume() -> None:
    labels = torch.zeros(2, 8, 32, 32, dtype=torch.long)
    labels[0, :, 8:24, 8:24] = 1  # volume 0 has classes {0, 1}, volume 1 has {0, 2}
    labels[1, :, 4:20, 10:30] = 2
    onehot = F.one_hot(labels, 3).permute(0, 4, 1, 2, 3).float()
    noisy = squares_jigsaw(onehot, max_boxes=8, max_radius=6, generator=torch.Generator().manual_seed(0))
    assert torch.equal(noisy.sum(1), torch.ones(2, 8, 32, 32))  # still one label per voxel
    assert not torch.equal(noisy, onehot)
    assert noisy[0, 2].sum() == 0 and noisy[1, 1].sum() == 0  # labels only come from the same volume


def test_gaussian_activation_value_and_gradients() -> None:
    """The fused exp(-(x/s)^2): its value, and gradients checked against finite differences."""
    act = GaussianActivation(3).double()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    assert torch.allclose(act(x), torch.exp(-(x / act.scale) ** 2))
    assert torch.autograd.gradcheck(GaussianBump.apply, (x,))


def test_normalizer_folds_the_scales_into_its_convs() -> None:
    """N with each scale folded into the conv before it is conv, exp(-(x/s)^2), conv, ..., + x: the same value and
    the same gradients, the scales' included."""
    torch.manual_seed(0)
    n = Normalizer(channels=4).double()
    x = torch.randn(2, 1, 9, 9, dtype=torch.float64)
    conv1, act1, conv2, act2, conv3 = n.delta
    plain = x + conv3(torch.exp(-(conv2(torch.exp(-(conv1(x) / act1.scale) ** 2)) / act2.scale) ** 2))
    expected = torch.autograd.grad(plain.square().sum(), list(n.parameters()))
    folded = n(x)
    assert torch.allclose(folded, plain)
    got = torch.autograd.grad(folded.square().sum(), list(n.parameters()))
    assert all(torch.allclose(a, b) for a, b in zip(got, expected, strict=True))


def test_mae_masks_the_ratio_of_whole_patches() -> None:
    net = build_network("unet-mae", 1, 2)
    mask = net.patch_mask(torch.zeros(3, 1, 64, 64))
    patches = mask[:, 0, ::8, ::8]
    assert torch.equal(mask, patches.repeat_interleave(8, 1).repeat_interleave(8, 2).unsqueeze(1))
    assert (patches.flatten(1).sum(1) == 48).all()  # 75 % of the 64 patches of each slice


@pytest.mark.parametrize("name", ["unet-rotation", "unet-mae"])
def test_auxiliary_task_shares_the_encoder_and_not_the_decoder(name: str) -> None:
    torch.manual_seed(0)
    net = build_network(name, 1, 2).train()
    x = torch.rand(4, 1, 32, 32)
    assert set(net.source_losses(x, torch.zeros(4, 32, 32, dtype=torch.long))) == {"segmentation", "auxiliary"}
    net.auxiliary_loss(x).backward()
    parts = net.parts()
    assert all(p.grad is not None for p in parts["encoder"] + parts["aux"])
    assert all(p.grad is None for p in parts["decoder"])


@pytest.mark.parametrize("name", ["unet-rotation", "unet-mae"])
def test_auxiliary_pass_leaves_the_running_statistics_to_the_real_slices(name: str) -> None:
    """BatchNorm running statistics after a source-training step are those of the real slices alone: the masked or
    rotated copies of the auxiliary pass normalize with their own batch statistics and are not averaged in."""
    torch.manual_seed(0)
    net = build_network(name, 1, 2).train()
    plain = copy.deepcopy(net)
    x = torch.rand(4, 1, 32, 32)
    net.source_losses(x, torch.zeros(4, 32, 32, dtype=torch.long))
    plain(x)
    assert all(torch.equal(a, b) for a, b in zip(net.backbone.buffers(), plain.backbone.buffers(), strict=True))
    assert {m.momentum for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {0.1}  # restored


def test_orthogonality_penalty_is_zero_exactly_for_orthogonal_weights() -> None:
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=torch.Generator().manual_seed(0)))
    assert orthogonality_penalty(q[:, :, None, None]).item() == pytest.approx(0, abs=1e-10)
    assert orthogonality_penalty(torch.eye(16)[:, :, None, None] * 2).item() == pytest.approx(9.0)  # (4 - 1)^2


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """A tiny cardiac dataset and its protocol with 2 training epochs; the models are trained once per module."""
    root = tmp_path_factory.mktemp("ds") / "tiny-cardiac"
    generate(root, seed=1, cases={"A": 5, "B": 1}, splits={"A": [3, 1]})
    protocol = dataclasses.replace(resolve_protocol(str(root), "A"), training=Training(epochs=2, batch_size=8))
    return protocol, open_dataset(protocol), tmp_path_factory.mktemp("results")


@pytest.mark.parametrize("name", TRAINABLE)
def test_source_training_is_cached_per_network_and_stage(name: str, tiny_source: tuple) -> None:
    protocol, dataset, results = tiny_source
    device = torch.device("cpu")
    model, record = source_model(protocol, dataset, name, 0, results, device, TINY.get(name), progress=False)
    assert not record["cached"] and 0 <= record["val_dice"] <= 1
    stages = [stage.module for stage in model.post_training()]
    assert list(record["stages"]) == stages
    assert record["train_seconds"] == pytest.approx(record["seconds"] + sum(s["seconds"]
                                                                           for s in record["stages"].values()))
    files = sorted(Path(record["checkpoint"]).parent.glob(f"{name}-A-seed0-*.pt"))
    assert len(files) == 1 + len(stages)
    again, cached = source_model(protocol, dataset, name, 0, results, device, TINY.get(name), progress=False)
    assert cached["cached"] and cached["val_dice"] == record["val_dice"] and cached["stages"] == record["stages"]
    for key, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key


@pytest.mark.parametrize(("name", "change", "retrained"), [("unet-normalizer", {"dae_epochs": 3}, "dae"),
                                                           ("unet-autoencoders", {"ae_output_epochs": 3},
                                                            "output_autoencoder")])
def test_changing_a_stage_setting_retrains_only_that_stage(tiny_source: tuple, name: str, change: dict,
                                                           retrained: str) -> None:
    """The network and every other stage (the input and feature autoencoders beside the output's) come from the
    cache, unchanged."""
    protocol, dataset, results = tiny_source
    first_model, first = source_model(protocol, dataset, name, 0, results, torch.device("cpu"), TINY[name],
                                      progress=False)
    network_file = Path(first["checkpoint"])
    mtime = network_file.stat().st_mtime_ns
    model, record = source_model(protocol, dataset, name, 0, results, torch.device("cpu"), {**TINY[name], **change},
                                 progress=False)
    assert not record["cached"] and record["checkpoint"] == str(network_file)
    assert network_file.stat().st_mtime_ns == mtime  # the network came from its cache
    assert json.loads(network_file.with_suffix(".json").read_text())["val_dice"] == record["val_dice"]
    for stage in model.post_training():
        files = list(network_file.parent.glob(f"{network_file.stem}.{stage.module}-*.pt"))
        assert len(files) == (2 if stage.module == retrained else 1), stage.module
        if stage.module != retrained:
            assert record["stages"][stage.module] == first["stages"][stage.module]
            assert all(torch.equal(a, b) for a, b in zip(getattr(first_model, stage.module).state_dict().values(),
                                                         getattr(model, stage.module).state_dict().values(),
                                                         strict=True))
    with pytest.raises(RegistryError, match="has no config key"):
        source_model(protocol, dataset, name, 0, results, torch.device("cpu"), {"dea_epochs": 1})


@pytest.mark.parametrize("stage_index", [0, 1], ids=["input-and-features", "output"])
def test_the_autoencoders_step_on_two_slices_of_one_volume_every_slice_once_per_epoch(tiny_source: tuple,
                                                                                       stage_index: int) -> None:
    """He et al.'s `--batch-size=2` of slices: a 3-volume site gives tens of Adam steps an epoch, not 3; the
    output's autoencoder sees the frozen network's logits of those slices."""
    protocol, dataset, _ = tiny_source
    model = build_network("unet-autoencoders", 1, len(protocol.labels), ae_epochs=1, ae_output_epochs=1).eval()
    stage = model.post_training()[stage_index]
    module = getattr(model, stage.module)
    data = SourceData(protocol, dataset)
    seen: list[torch.Tensor] = []

    def recording_loss(volumes: list) -> torch.Tensor:
        ((inputs, labels),) = volumes
        if module.training:  # a training step, not the validation score of whole volumes
            assert len(inputs) == len(labels) <= 2
            seen.extend(inputs)
        return stage.loss(volumes)

    train_stage(model, dataclasses.replace(stage, loss=recording_loss), data, 0, torch.device("cpu"), progress=False)
    slices = torch.cat([images for images, _ in data.volumes["train"]])
    with torch.no_grad():
        expected = model(slices) if stage.prepare is not None else slices
    assert sorted(s.sum().item() for s in seen) == pytest.approx(sorted(s.sum().item() for s in expected), abs=1e-3)


def test_the_dae_grid_is_no_larger_than_the_source_volumes(tiny_source: tuple) -> None:
    """`prior_size` capped by the smallest source volume (a multiple of 4): recorded, and kept in the checkpoint."""
    protocol, dataset, results = tiny_source
    config = {**TINY["unet-normalizer"], "prior_size": [64, 32, 32]}
    model, record = source_model(protocol, dataset, "unet-normalizer", 0, results, torch.device("cpu"), config,
                                 progress=False)
    slices = min(load_volume(c, dataset.labels).label.shape[protocol.preprocessing.slice_axis]
                 for c in dataset.cases_of(protocol.source_site, "train"))
    assert slices < 64 and record["stages"]["dae"]["grid"] == [slices // 4 * 4, 32, 32]
    assert model.prior_size() == (slices // 4 * 4, 32, 32)
    fresh = build_network("unet-normalizer", 1, len(protocol.labels), **config)
    assert fresh.prior_size() == (64, 32, 32)
    fresh.load_state_dict(model.state_dict())
    assert fresh.prior_size() == model.prior_size()
    probabilities = torch.rand(slices, len(protocol.labels), 40, 40).softmax(1)
    assert model.denoise(probabilities).shape == probabilities.shape
