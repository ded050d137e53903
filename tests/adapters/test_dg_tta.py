"""DG-TTA: the affine views invert exactly, the consistency loss vanishes only when the views agree, one update is
the official code's (multimodallearning/DG-TTA, `tta_main` / `calc_branch` / `soft_dice_loss`) to rounding, the
ensemble averages its members' logits on any module, and the hyper-parameters reach the method."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medtta.adapters import dg_tta
from medtta.adapters.base import MixedBatchNorm
from medtta.adapters.dg_tta import DGTTA, soft_dice
from medtta.adapters.views import AffineView
from medtta.errors import RegistryError
from medtta.models import build_network


def _smooth(n: int, size: tuple[int, int] = (32, 32)) -> torch.Tensor:
    y, x = torch.meshgrid(torch.linspace(-1, 1, size[0]), torch.linspace(-1, 1, size[1]), indexing="ij")
    return (torch.sin(3 * x) * torch.cos(2 * y)).expand(n, 1, *size).clone()


def _eroded(mask: torch.Tensor, pixels: int) -> torch.Tensor:
    """`mask` shrunk by `pixels`, the slice's own border counting as outside."""
    inside = F.pad(mask.float(), (pixels,) * 4)
    return -F.max_pool2d(-inside, 2 * pixels + 1, 1) > 0.5


@pytest.fixture
def unet() -> nn.Module:
    torch.manual_seed(0)
    net = build_network("unet", 1, 4)
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(4, 1, 32, 32) * 2 + 1)
    return net.eval()


def test_warping_there_and_back_is_the_identity_on_the_interior() -> None:
    torch.manual_seed(0)
    x = _smooth(8, (32, 24))
    view = AffineView.random(8, strength=0.05)
    back = view.invert(view.apply(x), (32, 24))
    seen = view.seen((32, 24))
    assert 0.6 < seen.float().mean() < 1  # the warps move some pixels out of view
    interior = _eroded(seen, 2)
    error = (back - x).abs()[interior]
    assert error.max() < 0.03 and error.mean() < 0.01  # two bilinear resamplings of a smooth image
    wrong = AffineView(view.inverse()).invert(view.apply(x), (32, 24))  # the warp applied twice
    assert (wrong - x).abs()[interior].max() > 0.05


def test_inverse_of_the_inverse_is_the_map() -> None:
    view = AffineView.random(4, strength=0.2)
    assert torch.allclose(AffineView(view.inverse()).inverse(), view.theta, atol=1e-5)


def test_seen_leaves_out_what_a_translation_moves_out_of_view() -> None:
    theta = torch.tensor([[[1.0, 0.0, 0.5], [0.0, 1.0, 0.0]]])  # the view samples the slice a quarter width right
    seen = AffineView(theta).seen((16, 16))[0, 0]
    assert AffineView(torch.eye(2, 3)[None]).seen((16, 16)).all()
    assert not seen[:, :4].any() and seen[:, 5:].all()  # the slice's left quarter has no view pixel


@torch.no_grad()
def test_consistency_is_zero_without_warps(unet: nn.Module) -> None:
    adapter = DGTTA(unet, strength=0.0)
    x = torch.randn(6, 1, 32, 32)
    assert float(adapter.consistency(x)) < 1e-5


@torch.no_grad()
def test_consistency_is_near_zero_for_an_equivariant_model_and_positive_otherwise(unet: nn.Module) -> None:
    x = _smooth(6) * 3
    torch.manual_seed(0)
    pointwise = float(DGTTA(nn.Conv2d(1, 4, 1), norm="source").consistency(x))  # commutes with any warp
    torch.manual_seed(0)
    network = float(DGTTA(unet, norm="source").consistency(x))
    assert pointwise < 1e-3 and network > 10 * pointwise


def test_soft_dice_is_the_official_per_sample_and_class_ratio() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(3, 4, 5, 6, generator=g), torch.rand(3, 4, 5, 6, generator=g)
    expected = 4 * (a * b).sum((2, 3)) / ((a + b) ** 2).sum((2, 3))
    assert soft_dice(a, b).shape == (3, 4) and torch.allclose(soft_dice(a, b), expected, rtol=1e-6)
    assert torch.allclose(soft_dice(a, a), torch.ones(3, 4))
    a[1], b[1] = 0, 0  # sample 1 empty in both (the official guard: 1); class 2 of sample 0 (official: 0/0)
    a[0, 2], b[0, 2] = 0, 0
    dice = soft_dice(a, b)
    assert torch.equal(dice[1], torch.ones(4)) and dice[0, 2] == 1
    assert torch.equal(dice[2], expected[2]) or torch.allclose(dice[2], expected[2], rtol=1e-6)
    assert torch.equal(soft_dice(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4)), torch.ones(2, 3))


# ------------------------------------------------------------------------------ the official step, from the code
def _official_soft_dice_loss(smp_a: torch.Tensor, smp_b: torch.Tensor) -> torch.Tensor:
    """dg_tta/tta/torch_utils.py `soft_dice_loss`, as published."""
    B, _, D, H, W = smp_a.shape
    d = 2
    nominator = (2.0 * smp_a * smp_b).reshape(B, -1, D * H * W).mean(2)
    denominator = 1 / d * ((smp_a + smp_b) ** d).reshape(B, -1, D * H * W).mean(2)
    if denominator.sum() == 0.0:
        return (nominator * 0.0) + 1.0
    return nominator / denominator


def _official_branch(model: nn.Module, imgs: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """dg_tta/tta/tta.py `calc_branch` for one patch (batch_size 1), the TEMPLATE_PLAN's settings: affine spatial
    augmentation in both branches, no intensity augmentation, gradients on (have_grad_in "branch_a": nullcontext
    for both branches); R (1, 3, 4) is what `get_rand_affine` would return, R_inverse as it computes it."""
    patch_size = list(imgs.shape[2:])
    identity_grid = F.affine_grid(torch.eye(4).repeat(1, 1, 1)[:, :3], [1, 1] + patch_size, align_corners=False)
    R_inverse = torch.cat((R, torch.tensor([0.0, 0, 0, 1]).view(1, 1, 4)), 1).inverse()[:, :3]
    zero_grid = 0.0 * identity_grid
    grid = zero_grid + (F.affine_grid(R, [1, 1] + patch_size, align_corners=False) - identity_grid)
    grid_inverse = zero_grid + (F.affine_grid(R_inverse, [1, 1] + patch_size, align_corners=False) - identity_grid)
    grid = grid + identity_grid
    imgs_aug = F.grid_sample(imgs, grid, padding_mode="border", align_corners=False)
    branch_target = model(imgs_aug)
    grid_inverse = grid_inverse + identity_grid
    return F.grid_sample(branch_target, grid_inverse, align_corners=False)


def _official_update(model: nn.Module, patches: torch.Tensor, R_a: torch.Tensor, R_b: torch.Tensor) -> float:
    """One epoch of `tta_main` after start_tta_at_epoch: AdamW(lr 1e-5, PyTorch's weight decay 0.01) on every
    parameter, per patch both branches, `common_content_mask`, the softmax masked, 1 - soft Dice over the
    foreground (START_CLASS 1), loss / patches_to_be_accumulated backpropagated; one step. Returns the mean loss."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    step_losses = []
    for i in range(len(patches)):
        target_a = _official_branch(model, patches[i:i + 1], R_a[i:i + 1])
        target_b = _official_branch(model, patches[i:i + 1], R_b[i:i + 1])
        common_content_mask = (target_a.sum(1, keepdim=True) > 0.0).float() * (
            target_b.sum(1, keepdim=True) > 0.0).float()
        sm_a = target_a.softmax(1) * common_content_mask
        sm_b = target_b.softmax(1) * common_content_mask
        loss = 1 - _official_soft_dice_loss(sm_a, sm_b)[:, 1:].mean()
        (loss / len(patches)).backward()
        step_losses.append(loss.detach())
    optimizer.step()
    optimizer.zero_grad()
    return float(torch.stack(step_losses).mean())


class _TinyInstanceNormNet(nn.Module):
    """A 3D conv, InstanceNorm (affine), LeakyReLU, a 1x1x1 head of 3 classes: nnU-Net's kind of block. The conv
    before the norm has no bias (the norm would cancel it: its gradient would be rounding, which Adam's first step
    turns into a step of any size)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 4, 3, padding=1, bias=False)
        self.norm = nn.InstanceNorm3d(4, affine=True)
        self.head = nn.Conv3d(4, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.leaky_relu(self.norm(self.conv(x)), 0.01))


def _fixed_affines(n: int, seed: int) -> torch.Tensor:
    """(n, 3, 4) matrices as `get_rand_affine` draws them (identity + 0.05 N(0, 1)), from a fixed seed."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 4, generator=g) * 0.05 + torch.eye(3, 4).unsqueeze(0)


def _injected(monkeypatch: pytest.MonkeyPatch, thetas: list[torch.Tensor]) -> None:
    """medtta's views take `thetas` in order (branch a's, then branch b's) instead of drawing."""

    class Fixed(AffineView):
        @classmethod
        def random(cls, n: int, strength: float, device: torch.device | None = None,
                   spatial_dims: int = 2) -> AffineView:
            theta = thetas.pop(0)
            assert theta.shape == (n, spatial_dims, spatial_dims + 1) and strength == 0.05
            return cls(theta)

    monkeypatch.setattr(dg_tta, "AffineView", Fixed)


@pytest.mark.parametrize("n", [1, 2])
def test_one_update_is_the_official_update(monkeypatch: pytest.MonkeyPatch, n: int) -> None:
    """Same network, patches and matrices: medtta's loss and its parameters after one AdamW step are the official
    ones to rounding (2 patches: the official per-patch losses averaged over the accumulated patches)."""
    torch.manual_seed(0)
    model = _TinyInstanceNormNet()
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 1.5)
        model.norm.bias.uniform_(-0.5, 0.5)
        model.head.bias.copy_(torch.tensor([0.3, -0.6, -0.2]))  # logits that sum below 0 in places: the mask's quirk
    patches = torch.randn(n, 1, 8, 12, 10)  # not cubic: the axes of affine_grid must line up
    patches[:, :, 2:6, 3:9, 2:8] += 2.0
    R_a, R_b = _fixed_affines(n, 1), _fixed_affines(n, 2)
    official, source = copy.deepcopy(model), copy.deepcopy(model)
    official_loss = _official_update(official, patches, R_a, R_b)
    with torch.no_grad():  # the quirk is exercised: reached voxels (sum != 0) whose logits sum below 0
        sums = _official_branch(source, patches[:1], R_a[:1]).sum(1)
        assert (sums < 0).any() and (sums > 0).any()

    adapter = DGTTA(model, norm="source", ensemble=1)  # norm=source: every parameter, as params_with_grad="all"
    assert isinstance(adapter.optimizer, torch.optim.AdamW) and len(adapter.params) == len(list(model.parameters()))
    _injected(monkeypatch, [R_a.clone(), R_b.clone()])
    with torch.enable_grad():
        loss, _ = adapter.objective(patches)
        adapter.backward(loss)
    adapter.optimizer_step()
    assert abs(float(loss.detach()) - official_loss) < 1e-6 and official_loss > 1e-4
    for (name, mine), theirs, before in zip(adapter.model.named_parameters(), official.parameters(),
                                            source.parameters(), strict=True):
        assert torch.allclose(mine, theirs, rtol=0, atol=1e-7), name
        assert (theirs - before).abs().max() > 5e-6, name  # the step moved every tensor (Adam: about lr)


def test_both_branches_carry_a_gradient(monkeypatch: pytest.MonkeyPatch) -> None:
    """The loss is symmetric in the two branches, and so is its gradient once both branches backpropagate: swapping
    the matrices gives the same gradient (with branch b a constant it would not)."""
    torch.manual_seed(0)
    model = _TinyInstanceNormNet()
    patches = torch.randn(1, 1, 8, 8, 8)
    R_a, R_b = _fixed_affines(1, 3), _fixed_affines(1, 4)
    grads = []
    for order in ([R_a, R_b], [R_b, R_a]):
        adapter = DGTTA(copy.deepcopy(model), norm="source")
        _injected(monkeypatch, list(order))
        with torch.enable_grad():
            adapter.objective(patches)[0].backward()
        grads.append(torch.cat([p.grad.flatten() for p in adapter.params]))
    assert grads[0].abs().max() > 1e-6 and torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-9)


def test_an_episodic_pass_is_one_update(unet: nn.Module) -> None:
    adapter = DGTTA(unet, ensemble=1)
    adapter.adapt(torch.randn(6, 1, 32, 32), steps=3, batch_size=4)  # two batches per pass
    assert {int(s["step"]) for s in adapter.optimizer.state.values()} == {3}


def test_defaults_are_the_official_plan() -> None:
    assert DGTTA.default_steps == 11  # 12 epochs, the first evaluation only
    assert dg_tta.ACCUMULATED_PATCHES == 16
    assert DGTTA.defaults == {"lr": 1e-5, "weight_decay": 0.01, "strength": 0.05, "ensemble": 3, "norm": "batch"}
    assert DGTTA.spatial_dims == (2, 3) and DGTTA.other_architectures == ("nnunet",)


@pytest.mark.parametrize("norm", ["batch", "source"])
def test_norm_picks_the_statistics_and_the_weights(unet: nn.Module, norm: str) -> None:
    adapter = DGTTA(unet, norm=norm)
    layers = [m for m in adapter.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert all(isinstance(m, MixedBatchNorm) == (norm == "batch") for m in layers)
    every = len(list(adapter.model.parameters()))
    assert (len(adapter.params) == every) == (norm == "source")  # batch statistics cancel the conv biases


def test_optimizer_hyper_parameters_reach_adamw(unet: nn.Module) -> None:
    adapter = DGTTA(unet, lr=3e-5, weight_decay=0.5)
    assert isinstance(adapter.optimizer, torch.optim.AdamW)
    assert [(g["lr"], g["weight_decay"]) for g in adapter.optimizer.param_groups] == [(3e-5, 0.5)]
    with pytest.raises(RegistryError, match="norm must be one of batch, source"):
        DGTTA(unet, norm="instance")


def _member_logits(adapter: DGTTA, x: torch.Tensor) -> list[torch.Tensor]:
    logits = []
    for state in adapter.members:
        model = copy.deepcopy(adapter.model)
        model.load_state_dict(state)
        with torch.no_grad():
            logits.append(model(x))
    return logits


def test_ensemble_averages_the_logits_of_independent_adaptations(unet: nn.Module) -> None:
    x = torch.randn(6, 1, 32, 32)
    adapter = DGTTA(unet, ensemble=2, lr=1e-3)
    torch.manual_seed(0)
    adapter.adapt(x, steps=1, batch_size=6)
    first, second = adapter.members
    assert any(not torch.equal(first[k], second[k]) for k in first)  # each adapted with its own warps
    adapted = copy.deepcopy(adapter.model.state_dict())
    expected = torch.stack(_member_logits(adapter, x)).mean(0)  # nnUNetPredictor: the members' logits averaged
    assert torch.allclose(adapter.predict(x), expected, atol=1e-5)
    assert all(torch.equal(v, adapter.model.state_dict()[k]) for k, v in adapted.items())  # the model put back
    adapter.reset()
    assert adapter.members == []


class _Aliased(nn.Module):
    """The same submodule under two names, as nnU-Net's decoder.encoder and all_modules: its state dict holds each
    tensor twice."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.InstanceNorm2d(8, affine=True), nn.ReLU())
        self.decoder = nn.Sequential()
        self.decoder.encoder = self.encoder
        self.head = nn.Conv2d(8, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.decoder.encoder(x))


def test_ensemble_predicts_with_aliased_state_and_resets_exactly() -> None:
    torch.manual_seed(0)
    adapter = DGTTA(_Aliased(), ensemble=2, lr=1e-3)
    assert {"encoder.0.weight", "decoder.encoder.0.weight"} <= set(adapter.model.state_dict())
    initial = copy.deepcopy(adapter.state_dict())
    x = torch.randn(4, 1, 16, 16)
    torch.manual_seed(1)
    adapter.adapt(x, steps=2, batch_size=2)
    assert len(adapter.members) == 2
    expected = torch.stack(_member_logits(adapter, x)).mean(0)
    adapted = copy.deepcopy(adapter.model.state_dict())
    prediction = adapter.predict(x)  # functional_call with the cloned aliased state dict raised here
    assert torch.allclose(prediction, expected, atol=1e-6)
    assert all(torch.equal(v, adapter.model.state_dict()[k]) for k, v in adapted.items())
    assert adapter.model.encoder is adapter.model.decoder.encoder  # still one module
    adapter.reset()
    assert adapter.members == [] and adapter.optimizer.state_dict()["state"] == {}
    assert all(torch.equal(v, adapter.state_dict()[k]) for k, v in initial.items())
    assert torch.equal(adapter.predict(x), DGTTA(_reset_source(), ensemble=2).predict(x))


def _reset_source() -> nn.Module:
    torch.manual_seed(0)
    return _Aliased()
