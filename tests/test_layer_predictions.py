"""Per-decoder-layer predictions rebuilt by the distillers (QSKD, KD-DETR) against the model's own heads."""

from __future__ import annotations

import pytest
import torch
from conftest import SHAPES, tiny_detr_kwargs
from transformers import DetrConfig, DetrForObjectDetection

from qdetr_hf import QDetrConfig, QDetrForObjectDetection, calibrate
from qdetr_hf.distillers import QSKDDistiller
from qdetr_hf.distillers.base import DetectorOutputs, capture_decoder_inputs, run_decoder

LABELS = [
    {"class_labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.3, 0.2]])},
    {"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])},
]


def _model(quantized: bool, auxiliary_loss: bool, images: torch.Tensor) -> DetrForObjectDetection:
    torch.manual_seed(0)
    kwargs = tiny_detr_kwargs(id2label=SHAPES, auxiliary_loss=auxiliary_loss, decoder_layers=3, init_std=0.2)
    model = (
        QDetrForObjectDetection(QDetrConfig(**kwargs)) if quantized else DetrForObjectDetection(DetrConfig(**kwargs))
    )
    with torch.no_grad():
        # A LayerNorm with its default affine (1, 0) is nearly idempotent, which would hide a doubled LayerNorm.
        model.model.decoder.layernorm.weight.uniform_(0.5, 2.0)
        model.model.decoder.layernorm.bias.uniform_(-1.0, 1.0)
        model.model.query_position_embeddings.weight.normal_()
    if quantized:
        calibrate(model, [images])
    return model.eval()


def _outputs(model: torch.nn.Module, images: torch.Tensor) -> DetectorOutputs:
    with torch.no_grad(), capture_decoder_inputs(model) as captured:
        out = model(pixel_values=images, labels=LABELS, output_hidden_states=True)
    return DetectorOutputs(
        logits=out.logits,
        pred_boxes=out.pred_boxes,
        outputs=out,
        model=model,
        pixel_values=images,
        decoder_inputs=dict(captured),
    )


def _check_layers(detector: DetectorOutputs, logits: torch.Tensor, boxes: torch.Tensor) -> None:
    """The last rebuilt layer is the model's own prediction; with auxiliary_loss the others are its auxiliary ones."""
    assert logits.shape[0] == boxes.shape[0] == 3
    torch.testing.assert_close(logits[-1], detector.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(boxes[-1], detector.pred_boxes, rtol=0, atol=1e-5)
    auxiliary = detector.outputs.auxiliary_outputs
    if detector.model.config.auxiliary_loss:
        assert len(auxiliary) == 2
        for layer, aux in enumerate(auxiliary):
            torch.testing.assert_close(logits[layer], aux["logits"], rtol=0, atol=1e-5)
            torch.testing.assert_close(boxes[layer], aux["pred_boxes"], rtol=0, atol=1e-5)
    else:
        assert auxiliary is None


@pytest.mark.parametrize("auxiliary_loss", [False, True], ids=["no-aux", "aux"])
@pytest.mark.parametrize("quantized", [False, True], ids=["detr", "qdetr"])
def test_qskd_student_layers_end_with_the_models_own_predictions(images, quantized, auxiliary_loss):
    # transformers 5 ties decoder_hidden_states[-1] to last_hidden_state, already through the final LayerNorm (twice
    # with auxiliary_loss); the other entries are the layers' raw outputs.
    detector = _outputs(_model(quantized, auxiliary_loss, images), images)
    logits, boxes = QSKDDistiller()._student_layers(detector)
    _check_layers(detector, logits, boxes)


@pytest.mark.parametrize("auxiliary_loss", [False, True], ids=["no-aux", "aux"])
@pytest.mark.parametrize("quantized", [False, True], ids=["detr", "qdetr"])
def test_kd_detr_decoder_pass_with_the_models_queries_reproduces_its_predictions(images, quantized, auxiliary_loss):
    model = _model(quantized, auxiliary_loss, images)
    detector = _outputs(model, images)
    with torch.no_grad():
        logits, boxes, _ = run_decoder(model, detector.decoder_inputs, model.model.query_position_embeddings.weight)
    _check_layers(detector, logits, boxes)
