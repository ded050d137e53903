"""sam-lora and sam-tent: only the LoRA (and curves) train at test time, identity-initialized curves, exact reset
in every variant, the source LoRA of a big SAM left alone, and `medtta run --method sam-lora` end to end."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from medtta.adapters.sam import BezierCurves, SamLora, block_indices, soft_dice
from medtta.cli.main import main
from medtta.data.synthetic.cardiac import generate
from medtta.engine import method_architecture
from medtta.errors import MedttaError
from medtta.models.sam import SPECS, SamModel, SamTiny
from medtta.registry import ADAPTERS


def _model() -> SamTiny:
    torch.manual_seed(0)
    return SamTiny(1, 4, image_size=32).eval()


@pytest.fixture
def batch() -> torch.Tensor:
    return torch.randn(4, 1, 32, 32, generator=torch.Generator().manual_seed(1))


def _changed(before: dict, after: dict) -> set[str]:
    return {k for k in before if not torch.equal(before[k], after[k])}


@pytest.mark.parametrize("hparams", [{}, {"objective": "entropy"}, {"input_transform": "bezier", "blocks": "1,3"},
                                     {"objective": "entropy", "input_transform": "bezier", "blocks": [0]}])
def test_only_the_lora_and_curves_train_and_reset_is_exact(hparams: dict, batch: torch.Tensor) -> None:
    adapter = ADAPTERS.create("sam-lora", _model(), **hparams)
    lora = {n for n, p in adapter.named_parameters() if ".tta." in n}
    curves = {"curves.points"} if hparams.get("input_transform") == "bezier" else set()
    assert len(lora) == 2 * len(block_indices(hparams.get("blocks", "all"), 4))
    assert {n for n, p in adapter.named_parameters() if p.requires_grad} == lora | curves
    initial = copy.deepcopy(adapter.state_dict())
    torch.manual_seed(0)
    first = adapter(batch)
    for _ in range(2):
        adapter.update(batch)
    changed = _changed(initial, adapter.state_dict())  # every tensor of the model and the adapter compared
    teacher = {n for n in initial if ".teacher." in n} | {"w_max"} if "objective" not in hparams else set()
    assert changed - teacher == lora | curves and teacher <= changed
    adapter.reset()
    assert _changed(initial, adapter.state_dict()) == set() and adapter.optimizer.state_dict()["state"] == {}
    torch.manual_seed(0)
    assert torch.equal(adapter(batch), first)


def test_curves_start_at_the_identity_and_the_adapter_as_the_source_model(batch: torch.Tensor) -> None:
    grey = torch.rand(2, 1, 16, 16)
    assert torch.allclose(BezierCurves()(grey), grey.expand(-1, 3, -1, -1), atol=1e-6)
    model = _model()
    with torch.no_grad():
        source = model(batch)
    adapter = ADAPTERS.create("sam-lora", copy.deepcopy(model), input_transform="bezier")
    assert torch.allclose(adapter.predict(batch), source, atol=1e-5)  # LoRA B = 0 and identity curves


def test_bezier_curves_are_cubic_in_their_control_points() -> None:
    curves = BezierCurves()
    with torch.no_grad():
        curves.points.copy_(torch.tensor([[0.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [1.0, 2 / 3, 1 / 3, 0.0]]))
    t = torch.linspace(0, 1, 11).view(1, 1, 1, 11)
    assert torch.allclose(curves(t), torch.cat([t**3, torch.ones_like(t), 1 - t], 1), atol=1e-6)


def test_soft_dice_is_zero_only_against_its_own_confident_masks() -> None:
    teacher = torch.zeros(1, 2, 4, 4)
    teacher[:, 1, :2] = 1
    teacher[:, 0, 2:] = 1  # one-hot: label 1 on the top half
    assert soft_dice(teacher * 100, teacher).max() < 1e-2
    assert soft_dice(-teacher * 100, teacher).min() > 0.5


def test_a_big_sam_keeps_its_source_lora(batch: torch.Tensor, tmp_path: Path) -> None:
    class FrozenTiny(SamModel):  # sam-tiny's shape with the big SAMs' source training: encoder frozen + LoRA
        spec = SPECS["tiny"]

    torch.manual_seed(0)
    torch.save(SamTiny(1, 4, image_size=32).sam.state_dict(), tmp_path / "sam.pth")
    model = FrozenTiny(1, 4, checkpoint=str(tmp_path / "sam.pth"), image_size=32).eval()
    with torch.no_grad():
        for p in model.parts()["lora"]:
            p.normal_(std=0.1)  # a trained source LoRA, B != 0
        source = model(batch)
    adapter = ADAPTERS.create("sam-lora", model)
    assert torch.allclose(adapter.predict(batch), source, atol=1e-5)  # the source LoRA stays active
    before = copy.deepcopy(adapter.state_dict())
    adapter.update(batch)
    adapter.update(batch)
    changed = _changed(before, adapter.state_dict())
    assert changed and all(".tta." in k or ".teacher." in k or k == "w_max" for k in changed)


def test_sam_tent_updates_exactly_the_layernorm_affine_parameters(batch: torch.Tensor) -> None:
    adapter = ADAPTERS.create("sam-tent", _model())
    norms = {id(p) for p in adapter.model.parts()["norm"]}
    expected = {n for n, p in adapter.named_parameters() if id(p) in norms}
    assert expected and all(n.endswith(("weight", "bias")) for n in expected)
    before = copy.deepcopy(adapter.state_dict())
    adapter.update(batch)
    assert _changed(before, adapter.state_dict()) == expected


def test_bad_hyper_parameters_and_architectures_fail() -> None:
    with pytest.raises(MedttaError, match="sam-lora objective='kl': expected one of consistency, entropy"):
        ADAPTERS.create("sam-lora", _model(), objective="kl")
    with pytest.raises(MedttaError, match="the image encoder has blocks 0 to 3"):
        ADAPTERS.create("sam-lora", _model(), blocks=[4])
    assert method_architecture("sam-lora", "sam-vit-h") == "sam-vit-h" and method_architecture("tent") == "unet"
    with pytest.raises(MedttaError, match="architecture 'unet': sam-lora adapts sam-tiny, sam-vit-b, sam-vit-l"):
        method_architecture("sam-lora", "unet")
    assert SamLora.architectures()[0] == "sam-tiny"


def test_cli_run_sam_lora_end_to_end(tmp_path: Path) -> None:
    root = tmp_path / "tiny-cardiac"
    generate(root, seed=1, cases={"A": 4, "B": 1}, splits={"A": [2, 1]})
    results = tmp_path / "results"
    result = CliRunner().invoke(main, ["run", "--method", "sam-lora", "--dataset", str(root), "--source-site", "A",
                                       "--epochs", "2", "--results", str(results), "-q", "-a", "image_size=32"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    assert "sam-lora on synth-mri" in result.stdout
    client = MlflowClient(tracking_uri=f"sqlite:///{results / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    assert parent.data.tags["medtta.architecture"] == "sam-tiny" and parent.data.params["arch.image_size"] == "32"
    assert parent.data.params["hp.objective"] == "consistency" and "dice" in parent.data.metrics
