"""Oscillation in QAT (Nagel et al. 2022): dampening loss and gradient, tracking, freezing, on hand-built weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qdetr_hf.oscillation import OscillationDampening, OscillationTracker, dampening_loss, layer_group
from qdetr_hf.quantization import QuantLinear


def _layer(weights: list[float], bits: int = 4) -> nn.Module:
    model = nn.Module()
    model.fc = QuantLinear(len(weights), 1, bias=False, weight_bits=bits)
    with torch.no_grad():
        model.fc.weight.copy_(torch.tensor([weights]))
        model.fc.weight_quantizer.raw_step.fill_(1.0)
    return model


def test_dampening_pulls_each_weight_to_the_centre_of_its_level():
    model = _layer([0.4, 0.6, 2.2, 9.5])  # 4 bits, step 1: levels -8..7, so 9.5 is clipped to 7 (its own level)
    loss = dampening_loss(model)
    # centres 0, 1, 2, 7; clipped weights 0.4, 0.6, 2.2, 7: squared distances 0.16, 0.16, 0.04, 0.
    torch.testing.assert_close(loss, torch.tensor(0.36 / 4))
    loss.backward()
    # d/dw of mean((c - clip(w))^2): 2 (w - c) / 4 inside the range, 0 for the clipped weight.
    torch.testing.assert_close(model.fc.weight.grad, torch.tensor([[0.2, -0.2, 0.1, 0.0]]))
    assert OscillationDampening(0.5)  # a positive weight
    with pytest.raises(ValueError, match="positive"):
        OscillationDampening(0.0)


def test_tracker_counts_code_reversals_and_freezes_at_the_average_code():
    model = _layer([0.4, 0.4, -3.0])
    tracker = OscillationTracker(model, momentum=0.5, freeze_threshold=0.6)
    tracker.update()  # first step: the reference codes 0, 0, -3
    trajectory = [
        [0.6, 1.4, -2.9],  # codes 1, 1, -3: first changes, no reversal yet
        [0.4, 2.4, -2.9],  # codes 0, 2, -3: weight 0 reverses (oscillation), weight 1 keeps moving up
        [0.6, 3.4, -2.9],  # codes 1, 3, -3: weight 0 reverses again
    ]
    frequencies = []
    for weights in trajectory:
        with torch.no_grad():
            model.fc.weight.copy_(torch.tensor([weights]))
        tracker.update()
        frequencies.append(tracker.state["fc"]["frequency"].clone())
    # EMA with momentum 0.5 of the reversals of weight 0: 0, 0.5, 0.75; weights 1 and 2 never reverse.
    torch.testing.assert_close(frequencies[-1], torch.tensor([[0.75, 0.0, 0.0]]))
    # Weight 0 passed the threshold at the last step: frozen at its average code (EMA of 0, 1, 0, 1 -> 0.625 -> 1).
    assert tracker.state["fc"]["frozen"].tolist() == [[True, False, False]]
    assert model.fc.weight[0, 0].item() == 1.0 and model.fc.weight[0, 1].item() == pytest.approx(3.4)
    with torch.no_grad():
        model.fc.weight[0, 0] = -5.0  # an optimizer step moves it ...
    tracker.update()
    assert model.fc.weight[0, 0].item() == 1.0  # ... and it goes back to its frozen value
    # A layer outside backbone, encoder and decoder counts with the heads.
    assert tracker.summary() == {"heads": {"oscillating": pytest.approx(1 / 3), "frozen": pytest.approx(1 / 3)}}


@pytest.mark.parametrize("freeze_threshold", [None, 0.99], ids=["measuring", "freezing-nothing"])
def test_tracker_statistics_follow_the_code_trajectory(freeze_threshold):
    # Without freezing the statistics update in place; with a threshold no weight reaches, they must be the same.
    model = _layer([0.4, 0.4, -3.0, 5.0])
    tracker = OscillationTracker(model, momentum=0.5, freeze_threshold=freeze_threshold)
    for weights in ([0.4, 0.4, -3.0, 5.0], [0.6, 1.4, -2.9, 4.4], [0.4, 2.4, -2.9, 4.6], [0.6, 3.4, -2.9, 4.4]):
        with torch.no_grad():
            model.fc.weight.copy_(torch.tensor([weights]))
        tracker.update()
    state = tracker.state["fc"]
    # codes: w0 0 1 0 1 (reverses twice), w1 0 1 2 3, w2 -3 throughout, w3 5 4 5 4 (reverses twice)
    torch.testing.assert_close(state["frequency"], torch.tensor([[0.75, 0.0, 0.0, 0.75]]))
    assert state["direction"].tolist() == [[1, 1, 0, -1]]
    assert state["codes"].tolist() == [[1, 3, -3, 4]]
    # EMA (momentum 0.5) of the codes from the first one: w0 0 -> 0.5 -> 0.25 -> 0.625, w1 0 -> 0.5 -> 1.25 -> 2.125
    torch.testing.assert_close(state["ema_code"], torch.tensor([[0.625, 2.125, -3.0, 4.375]]))
    assert not state["frozen"].any()


def test_layer_groups():
    assert layer_group("model.backbone.model.layer1.0.conv1") == "backbone"
    assert layer_group("model.encoder.layers.0.mlp.fc1") == "encoder FFN"
    assert layer_group("model.decoder.layers.1.encoder_attn.q_proj") == "decoder attention"
    assert layer_group("model.input_projection") == layer_group("bbox_predictor.layers.0") == "heads"
