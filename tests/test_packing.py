"""Packed checkpoints: dense b-bit codes on hand-built values, bit-identical reloads, sizes against the accounting."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import REPO_ROOT, tiny_detr_kwargs
from safetensors import safe_open

from qdetr_hf import QDetrConfig, QDetrForObjectDetection, calibrate
from qdetr_hf.efficiency import efficiency_report
from qdetr_hf.packing import pack_codes, packed_numel, unpack_codes
from qdetr_hf.quantization import quantized_layers


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("shape", [(1,), (7,), (13, 1), (5, 3, 3, 3), (3, 11)])
def test_every_level_round_trips_at_every_width(bits, shape):
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    numel = math.prod(shape)
    levels = torch.arange(low, high + 1)
    codes = levels.repeat(math.ceil(numel / levels.numel()) + 1)[:numel]
    codes = codes[torch.randperm(numel)].reshape(shape).to(torch.int8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_numel(numel, bits) == math.ceil(numel * bits / 8)
    assert torch.equal(unpack_codes(packed, bits, shape), codes)
    every_level = levels.to(torch.int8)
    assert torch.equal(unpack_codes(pack_codes(every_level, bits), bits, every_level.shape), every_level)


def test_byte_layout_is_lsb_first_with_offset_codes():
    # 3-bit codes -4, 3, 0 are stored as 0, 7, 4: bits 000 111 001 (LSB first) -> 0b00111000, 0b00000001.
    packed = pack_codes(torch.tensor([-4, 3, 0], dtype=torch.int8), 3)
    assert packed.tolist() == [0b00111000, 0b00000001]
    # 4-bit: two codes per byte, the first in the low nibble.
    assert pack_codes(torch.tensor([-8, 7], dtype=torch.int8), 4).tolist() == [0xF0]


def test_out_of_range_codes_and_wrong_sizes_are_errors():
    with pytest.raises(ValueError, match=r"\[-2, 1\]"):
        pack_codes(torch.tensor([2], dtype=torch.int8), 2)
    with pytest.raises(ValueError, match="needs 2 uint8 values"):
        unpack_codes(torch.zeros(3, dtype=torch.uint8), 4, (4,))


def _tiny_calibrated(images, **overrides):
    model = QDetrForObjectDetection(QDetrConfig(**tiny_detr_kwargs(**overrides)))
    calibrate(model, [images])
    with torch.no_grad():  # move steps off their init so the reload must really carry them
        for layer in quantized_layers(model).values():
            layer.weight_quantizer.raw_step.mul_(1.07)
    return model.eval()


def test_save_pretrained_packs_every_quantized_weight(tmp_path, images):
    model = _tiny_calibrated(images, weight_bits=3, activation_bits=3)
    layers = quantized_layers(model)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["weight_packing"]["layers"] == {name: layer.weight_quantizer.bits for name, layer in layers.items()}
    assert set(config["weight_packing"]["layers"].values()) == {3, 8}  # the stem convolution keeps 8 bits
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        names = f.keys()
        packed = {k: f.get_tensor(k) for k in names if k.endswith(".weight_packed")}
        floats = {k for k in names if f.get_tensor(k).is_floating_point()}
    assert len(packed) == len(layers) and all(t.dtype == torch.uint8 for t in packed.values())
    numels = sorted(packed_numel(layer.weight.numel(), layer.weight_quantizer.bits) for layer in layers.values())
    assert sorted(t.numel() for t in packed.values()) == numels
    # No quantized layer's float weight is written; its per-channel steps are.
    assert not any(k.replace("weight_packed", "weight") in floats for k in packed)
    assert sum(k.endswith("weight_quantizer.raw_step") for k in floats) == len(layers)
    assert model.config.weight_packing is None  # saving leaves the model's own config unpacked


def test_packed_reload_is_bit_identical_and_holds_float_weights(tmp_path, images):
    model = _tiny_calibrated(images, weight_bits=2, activation_bits=2)
    expected = model(pixel_values=images)
    model.save_pretrained(tmp_path)
    reloaded = QDetrForObjectDetection.from_pretrained(tmp_path).eval()
    out = reloaded(pixel_values=images)
    assert torch.equal(out.logits, expected.logits) and torch.equal(out.pred_boxes, expected.pred_boxes)
    assert reloaded.config.weight_packing is None
    assert not any(k.endswith("weight_packed") for k in reloaded.state_dict())
    # The float weights are the dequantized codes: each lies exactly on its channel's grid.
    for layer in quantized_layers(reloaded).values():
        quantizer = layer.weight_quantizer
        assert torch.equal(quantizer.dequantize(quantizer.codes(layer.weight)), layer.weight)
    # Saving the reloaded model again writes the same codes (a packed model re-packs losslessly).
    reloaded.save_pretrained(tmp_path / "again")
    again = QDetrForObjectDetection.from_pretrained(tmp_path / "again").eval()
    assert torch.equal(again(pixel_values=images).logits, expected.logits)


def test_float_checkpoints_still_load_and_keep_latent_weights(tmp_path, images):
    model = _tiny_calibrated(images)
    model.save_pretrained(tmp_path, pack_weights=False)
    assert json.loads((tmp_path / "config.json").read_text()).get("weight_packing") is None
    reloaded = QDetrForObjectDetection.from_pretrained(tmp_path)
    for key, value in model.state_dict().items():
        assert torch.equal(value, reloaded.state_dict()[key]), key


def test_a_packed_model_fine_tunes_from_its_dequantized_weights(tmp_path, images):
    model = _tiny_calibrated(images)
    model.save_pretrained(tmp_path)
    reloaded = QDetrForObjectDetection.from_pretrained(tmp_path).train()
    labels = [{"class_labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}] * 2
    reloaded(pixel_values=images, labels=labels).loss.backward()
    grads = [layer.weight.grad for layer in quantized_layers(reloaded).values()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_a_packed_checkpoint_refuses_other_bit_widths(tmp_path, images):
    _tiny_calibrated(images, weight_bits=4).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="weight_bits 4 -> 2"):
        QDetrForObjectDetection.from_pretrained(tmp_path, weight_bits=2)


def _main_job_student(bits: int) -> tuple[QDetrForObjectDetection, int]:
    config = json.loads((REPO_ROOT / "examples" / "teacher-synthetic" / "config.json").read_text())
    config = {k: v for k, v in config.items() if k not in ("architectures", "model_type", "transformers_version")}
    return QDetrForObjectDetection(QDetrConfig(**config, weight_bits=bits, activation_bits=bits)), 128


def _detr_r50(bits: int) -> tuple[QDetrForObjectDetection, tuple[int, int]]:
    config = QDetrConfig(use_pretrained_backbone=False, weight_bits=bits, activation_bits=bits)
    return QDetrForObjectDetection(config), (800, 1333)


@pytest.mark.slow
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("build", [_main_job_student, _detr_r50], ids=["main_job_student", "detr_r50"])
def test_packed_size_on_disk_is_within_15_percent_of_the_accounting(tmp_path, build, bits):
    model, image_size = build(bits)
    model.save_pretrained(tmp_path)
    on_disk = (tmp_path / "model.safetensors").stat().st_size / 2**20
    accounted = efficiency_report(model, image_size).size_mb
    assert abs(on_disk / accounted - 1) <= 0.15, (on_disk, accounted)


def test_a_packed_first_stage_loads_into_a_model_that_quantizes_more(tmp_path, images):
    stage1 = _tiny_calibrated(images, quantize_encoder=False, quantize_decoder=False)
    stage1.save_pretrained(tmp_path)
    stage2 = QDetrForObjectDetection.from_pretrained(tmp_path, quantize_encoder=True, quantize_decoder=True)
    for name, layer in quantized_layers(stage1).items():  # packed: the dequantized codes
        reloaded = stage2.get_submodule(name)
        assert torch.equal(
            reloaded.weight, layer.weight_quantizer.dequantize(layer.weight_quantizer.codes(layer.weight))
        )
    saved = stage1.state_dict()
    for name in quantized_layers(stage2):
        if name not in quantized_layers(stage1):  # newly quantized: the float weights of the checkpoint
            assert torch.equal(stage2.get_submodule(name).weight, saved[f"{name}.weight"]), name
    assert not stage2.is_calibrated  # the new transformer quantizers still need calibration
    with pytest.raises(ValueError, match="packed layers do not match"):
        _tiny_calibrated(images).save_pretrained(tmp_path / "full")
        QDetrForObjectDetection.from_pretrained(tmp_path / "full", quantize_decoder=False)
