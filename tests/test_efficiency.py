"""Efficiency accounting against numbers computed by hand for a tiny model."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_detr_kwargs
from torch.utils.flop_counter import FlopCounterMode
from transformers import DetrConfig, DetrForObjectDetection

from qdetr_hf import QDetrConfig, QDetrForObjectDetection, QuantConv2d, quantization_disabled
from qdetr_hf.efficiency import BIT_OPS_FACTOR, MB, efficiency_report

# Tiny model: d = 32, FFN f = 64, 1 encoder and 2 decoder layers, Q = 8 queries, 3 labels, backbone output
# 192 channels at stride 16, so a 64 x 64 image gives T = 4 x 4 = 16 tokens.
D, F, Q, T, C_BACKBONE, LABELS = 32, 64, 8, 16, 192, 3

ENCODER_LINEAR = T * 4 * D * D + 2 * T * D * F  # q, k, v, o on T tokens + fc1, fc2 = 131072
DECODER_LINEAR = 2 * (Q * 4 * D * D + Q * 2 * D * D + T * 2 * D * D + 2 * Q * D * F)  # self, cross q/o, cross k/v, FFN
ENCODER_ATTENTION = 2 * T * T * D  # q k^T and softmax . v = 16384
DECODER_ATTENTION = 2 * (2 * Q * Q * D + 2 * Q * T * D)  # self + cross, both products, 2 layers = 24576
INPUT_PROJECTION = T * C_BACKBONE * D  # 98304
HEADS = Q * D * (LABELS + 1) + Q * (D * D + D * D + D * 4)  # class head + 3-layer box MLP = 18432


def _backbone_macs(model) -> tuple[int, int]:
    """(first conv MACs, other backbone conv MACs) from torch's FLOP counter, an independent reference."""
    convs = [m for m in model.model.backbone.model.modules() if isinstance(m, torch.nn.Conv2d)]
    counts = []
    hooks = [c.register_forward_hook(lambda m, a, o: counts.append((m, a[0]))) for c in convs]
    model.eval()
    with torch.no_grad(), quantization_disabled(model):
        model(pixel_values=torch.zeros(1, 3, 64, 64))
    for h in hooks:
        h.remove()
    macs = []
    for module, inputs in counts:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            torch.nn.functional.conv2d(inputs, module.weight, None, module.stride, module.padding, module.dilation)
        macs.append(counter.get_total_flops() // 2)
    return macs[0], sum(macs[1:])


def test_hand_computed_numbers_for_a_tiny_4_bit_model():
    assert DECODER_LINEAR == 229376 and ENCODER_LINEAR == 131072
    model = QDetrForObjectDetection(QDetrConfig(**tiny_detr_kwargs(weight_bits=4, activation_bits=4)))
    report = efficiency_report(model, image_size=64)
    first_conv, other_convs = _backbone_macs(model)

    assert report.macs_by_bits["4bit"] == ENCODER_LINEAR + DECODER_LINEAR + other_convs
    assert report.macs_by_bits["8bit"] == ENCODER_ATTENTION + DECODER_ATTENTION + first_conv
    assert report.macs_by_bits["fp32"] == INPUT_PROJECTION + HEADS
    total = ENCODER_LINEAR + DECODER_LINEAR + other_convs + ENCODER_ATTENTION + DECODER_ATTENTION + first_conv
    total += INPUT_PROJECTION + HEADS
    assert report.ops_real_g == pytest.approx(total / 1e9)
    ops = (INPUT_PROJECTION + HEADS) + (ENCODER_ATTENTION + DECODER_ATTENTION + first_conv) / 4
    ops += (ENCODER_LINEAR + DECODER_LINEAR + other_convs) / 8
    assert report.ops_g == pytest.approx(ops / 1e9)
    assert report.speedup == pytest.approx(total / ops)

    # Memory: 4-bit transformer weights (encoder 4d^2 + 2df, decoder 8d^2 + 2df per layer), 4-bit backbone convs
    # except the first (8-bit), everything else 32-bit. Quantizer steps/offsets are not part of the detector size
    # of the real-valued reference but are stored at 32 bits in the quantized one.
    convs = [m for m in model.model.backbone.model.modules() if isinstance(m, QuantConv2d)]
    n8 = convs[0].weight.numel()
    n4 = (4 * D * D + 2 * D * F) + 2 * (8 * D * D + 2 * D * F) + sum(c.weight.numel() for c in convs[1:])
    total_params = sum(p.numel() for p in model.parameters())
    detector_params = sum(p.numel() for p in DetrForObjectDetection(DetrConfig(**tiny_detr_kwargs())).parameters())
    assert report.num_parameters == detector_params
    assert report.parameters_by_bits == {"fp32": total_params - n4 - n8, "8bit": n8, "4bit": n4}
    assert report.size_mb == pytest.approx((32 * (total_params - n4 - n8) + 8 * n8 + 4 * n4) / 8 / MB)
    assert report.size_mb_real == pytest.approx(32 * detector_params / 8 / MB)
    assert report.memory_saving == pytest.approx(report.size_mb_real / report.size_mb)


def test_real_valued_detr_has_speedup_one():
    detr = DetrForObjectDetection(DetrConfig(**tiny_detr_kwargs()))
    report = efficiency_report(detr, image_size=(64, 64))
    assert set(report.macs_by_bits) == {"fp32"}
    assert report.speedup == pytest.approx(1.0)
    assert report.size_mb == pytest.approx(report.size_mb_real)


def test_lower_bits_give_more_speedup_and_the_paper_factors():
    assert BIT_OPS_FACTOR[8] == 1 / 4 and BIT_OPS_FACTOR[4] == 1 / 8
    assert BIT_OPS_FACTOR[3] == 1 / 16 and BIT_OPS_FACTOR[2] == 1 / 32
    speedups = [
        efficiency_report(
            QDetrForObjectDetection(QDetrConfig(**tiny_detr_kwargs(weight_bits=b, activation_bits=b))), 64
        ).speedup
        for b in (4, 3, 2)
    ]
    assert speedups[0] < speedups[1] < speedups[2]


def test_report_serialises_and_rejects_bad_sizes():
    model = QDetrForObjectDetection(QDetrConfig(**tiny_detr_kwargs()))
    report = efficiency_report(model, 64)
    as_dict = report.to_dict()
    assert as_dict["image_size"] == [64, 64] and "layers" not in as_dict
    assert "Theoretical speed-up" in report.to_markdown()
    with pytest.raises(ValueError, match="image_size"):
        efficiency_report(model, (0, 64))
