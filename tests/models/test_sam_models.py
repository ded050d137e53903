"""SAM architectures: checkpoints in SAM's key format at another input size or label count, the errors naming a bad
key, the cache key by checkpoint content, the automatic multi-class pass, and what source training updates."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from segment_anything.modeling.image_encoder import get_rel_pos

from medtta.errors import MedttaError
from medtta.models import build_network
from medtta.models.sam import SPECS, SamModel, SamTiny, checkpoint_architecture, mask_iou, to_unit


class FrozenTiny(SamModel):
    """sam-tiny's shape trained as the big SAMs are: from a checkpoint, encoder frozen, decoder + LoRA trained."""

    spec = SPECS["tiny"]
    name = "frozen-tiny"
    defaults: ClassVar[dict] = {**SamModel.defaults, "image_size": 32}


def _saved(tmp_path: Path, name: str = "sam.pth", seed: int = 0, **config) -> Path:
    """A sam-tiny at random weights saved as SAM's own state dict (keys `image_encoder.*`, no wrapper)."""
    torch.manual_seed(seed)
    path = tmp_path / name
    sam = SamTiny(1, config.pop("n_classes", 4), **config).sam
    with torch.no_grad():  # SAM initializes its position embeddings to zero: make them worth interpolating
        for key, p in sam.named_parameters():
            if "pos" in key:
                p.normal_()
    torch.save(sam.state_dict(), path)
    return path


def test_checkpoint_loads_at_its_own_size_exactly_and_at_another_interpolated(tmp_path: Path) -> None:
    path = _saved(tmp_path, image_size=64)
    saved = torch.load(path, weights_only=True)
    same = SamTiny(1, 4, checkpoint=str(path), image_size=64).sam.state_dict()
    assert same.keys() == saved.keys() and all(torch.equal(same[k], saved[k]) for k in saved)

    larger = SamTiny(1, 4, checkpoint=str(path), image_size=128).sam.state_dict()
    resized = set()
    for key, value in saved.items():
        if larger[key].shape != value.shape:
            resized.add(key)
        else:
            assert torch.equal(larger[key], value), key
    # the token grid (8 -> 16) and the global blocks' relative positions (15 -> 31); windowed blocks keep theirs
    assert resized == {"image_encoder.pos_embed", *(f"image_encoder.blocks.{i}.attn.rel_pos_{a}" for i in (1, 3)
                                                   for a in "hw")}
    assert larger["image_encoder.pos_embed"].shape == (1, 16, 16, 96)
    grid = saved["image_encoder.pos_embed"].permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(16, 16), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
    assert torch.allclose(larger["image_encoder.pos_embed"], expected)
    for key in ("image_encoder.blocks.1.attn.rel_pos_h", "image_encoder.blocks.3.attn.rel_pos_w"):
        assert larger[key].shape == (31, 32)  # resized as SAM itself resizes a table of another length at run time
        assert torch.allclose(get_rel_pos(16, 16, larger[key]), get_rel_pos(16, 16, saved[key]))


def test_checkpoint_of_another_label_count_repeats_its_mask_heads(tmp_path: Path) -> None:
    path = _saved(tmp_path, n_classes=2, image_size=32)  # 3 mask tokens (num_multimask_outputs + 1)
    saved = torch.load(path, weights_only=True)
    safetensors = tmp_path / "sam.safetensors"
    save_file(saved, str(safetensors))
    for source in (path, safetensors):
        state = SamTiny(1, 4, checkpoint=str(source), image_size=32).sam.state_dict()  # 5 mask tokens
        tokens = saved["mask_decoder.mask_tokens.weight"]
        assert torch.equal(state["mask_decoder.mask_tokens.weight"], tokens[[0, 1, 2, 0, 1]])
        assert torch.equal(state["mask_decoder.output_hypernetworks_mlps.4.layers.0.weight"],
                           saved["mask_decoder.output_hypernetworks_mlps.1.layers.0.weight"])


def test_bad_checkpoints_fail_naming_the_file_or_key(tmp_path: Path) -> None:
    saved = torch.load(_saved(tmp_path, image_size=32), weights_only=True)

    def load(state: dict) -> None:
        torch.save(state, tmp_path / "bad.pth")
        SamTiny(1, 4, checkpoint=str(tmp_path / "bad.pth"), image_size=32)

    missing = dict(saved)
    del missing["image_encoder.blocks.1.attn.qkv.weight"]
    with pytest.raises(MedttaError, match=r"bad.pth lacks 1 key\(s\) the model needs: "
                                          r"'image_encoder.blocks.1.attn.qkv.weight'"):
        load(missing)
    with pytest.raises(MedttaError, match=r"bad.pth has 1 unexpected key\(s\): 'image_encoder.blocks.9.attn.qkv."):
        load({**saved, "image_encoder.blocks.9.attn.qkv.weight": torch.zeros(1)})
    with pytest.raises(MedttaError, match=r"'image_encoder.patch_embed.proj.weight' has shape \(96, 3, 4, 4\), the "
                                          r"model expects \(96, 3, 8, 8\) \(a checkpoint of another SAM size\?\)"):
        load({**saved, "image_encoder.patch_embed.proj.weight": torch.zeros(96, 3, 4, 4)})
    with pytest.raises(MedttaError, match="nope.pth: no such file"):
        SamTiny(1, 4, checkpoint=str(tmp_path / "nope.pth"))
    torch.save({"model": torch.nn.Linear(2, 2)}, tmp_path / "pickled.pth")  # a pickled module, not weights
    with pytest.raises(MedttaError, match="pickled.pth cannot be read as a weights-only state dict"):
        SamTiny(1, 4, checkpoint=str(tmp_path / "pickled.pth"))
    with pytest.raises(MedttaError, match=r"sam-vit-b needs a SAM or MedSAM checkpoint: -a checkpoint=PATH"):
        build_network("sam-vit-b", 1, 4)


def test_cache_key_holds_the_checkpoint_content_not_its_path(tmp_path: Path) -> None:
    first = _saved(tmp_path, "a.pth", seed=0, image_size=32)
    moved = tmp_path / "elsewhere" / "b.pth"
    moved.parent.mkdir()
    shutil.copy(first, moved)
    other = _saved(tmp_path, "c.pth", seed=1, image_size=32)
    keys = [SamTiny(1, 4, checkpoint=str(p), image_size=32).network_config() for p in (first, moved, other)]
    assert keys[0] == keys[1] != keys[2]
    assert str(first) not in str(keys[0]) and len(keys[0]["checkpoint"]) == 64  # the sha256


def test_checkpoint_architecture_reads_the_encoder_width(tmp_path: Path) -> None:
    with pytest.raises(MedttaError, match="width 96 is none of vit-b, vit-l, vit-h"):
        checkpoint_architecture(_saved(tmp_path, image_size=32))


def test_automatic_masks_one_per_label_batch_as_single_slices() -> None:
    torch.manual_seed(0)
    net = SamTiny(1, 3, image_size=32).eval()
    x = torch.randn(3, 1, 24, 40)
    with torch.no_grad():
        out = net.outputs(x)
        single = torch.cat([net.decode(out.embeddings[i : i + 1])[0] for i in range(3)])
    assert out.logits.shape == (3, 3, 24, 40) and out.masks.shape == (3, 3, 16, 16) and out.iou.shape == (3, 3)
    assert torch.allclose(out.masks, single, atol=1e-5)  # the no-prompt embeddings broadcast over the batch


def test_intensity_mapping_to_unit_range() -> None:
    window = torch.rand(2, 1, 8, 8)  # ct/oct slices, already in [0, 1]: kept
    assert torch.equal(to_unit(window, "auto"), window)
    zscores = torch.randn(2, 1, 8, 8) * 2  # mr: min-max per slice
    unit = to_unit(zscores, "auto")
    assert torch.allclose(unit.amin((1, 2, 3)), torch.zeros(2)) and torch.allclose(unit.amax((1, 2, 3)), torch.ones(2))
    assert torch.equal(to_unit(zscores, "unit"), zscores.clamp(0, 1))


def test_mask_iou_of_argmax_masks() -> None:
    labels = torch.tensor([[[0, 1], [1, 1]]])
    logits = F.one_hot(torch.tensor([[[0, 1], [0, 1]]]), 3).permute(0, 3, 1, 2).float()
    assert torch.equal(mask_iou(logits, labels), torch.tensor([[0.5, 2 / 3, 1.0]]))  # label 2: empty in both


def test_big_configurations_train_the_decoder_and_a_lora_only(tmp_path: Path) -> None:
    path = _saved(tmp_path, image_size=32)
    torch.manual_seed(0)
    net = FrozenTiny(1, 4, checkpoint=str(path))
    parts = net.parts()
    lora = {id(p) for p in parts["lora"]}
    assert len(parts["lora"]) == 2 * 4  # A and B of the qkv of 4 blocks
    assert {id(p) for p in net.network_parameters()} == lora | {id(p) for p in parts["decoder"]}
    assert {id(p) for p in net.parameters() if p.requires_grad} == {id(p) for p in net.network_parameters()}
    assert all(not k.startswith("sam.image_encoder.") or ".lora_" in k for k in net.network_state())
    rgb = torch.rand(1, 3, 32, 32)
    with torch.no_grad():  # B = 0: the LoRA starts as the identity, so the checkpoint's encoder is what runs
        plain = SamTiny(1, 4, checkpoint=str(path), image_size=32).eval()
        assert torch.allclose(net.eval().embed(rgb), plain.embed(rgb), atol=1e-6)
    x, labels = torch.randn(2, 1, 32, 32), torch.randint(0, 4, (2, 32, 32))
    losses = net.train().source_losses(x, labels)
    assert set(losses) == {"segmentation", "iou"}
    sum(losses.values()).backward()
    assert all(p.grad is None for p in parts["encoder"]) and all(p.grad is not None for p in parts["lora"])
