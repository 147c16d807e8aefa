"""Per-decoder-layer predictions rebuilt by the distillers (QSKD, KD-DETR) against the model's own heads."""

from __future__ import annotations

import pytest
import torch
from conftest import SHAPES, tiny_detr_kwargs
from transformers import DetrConfig, DetrForObjectDetection

from qdetr_hf import QDetrConfig, QDetrForObjectDetection, calibrate
from qdetr_hf.distillers import QSKDDistiller
from qdetr_hf.distillers.base import DetectorOutputs, capture_decoder_inputs, run_decoder, run_decoder_sets

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


@pytest.mark.parametrize("quantized", [False, True], ids=["detr", "qdetr"])
def test_query_sets_decoded_together_equal_one_pass_each_in_values_and_gradients(images, quantized):
    model = _model(quantized, True, images)
    mask = torch.ones(images.shape[0], *images.shape[2:], dtype=torch.long)
    mask[0, :, images.shape[-1] // 2 :] = 0  # a padded image, so the memory's mask matters
    with torch.no_grad(), capture_decoder_inputs(model) as captured:
        model(pixel_values=images, pixel_mask=mask)
    inputs = dict(captured)
    own = model.model.query_position_embeddings.weight
    generator = torch.Generator().manual_seed(1)
    sets = [own, torch.randn(images.shape[0], *own.shape, generator=generator)]  # (N, d) and (B, N, d)
    calls = []
    handle = model.model.decoder.register_forward_hook(lambda *args: calls.append(1))
    try:
        together = run_decoder_sets(model, inputs, sets)
    finally:
        handle.remove()
    assert len(calls) == 1  # one decoder pass for both sets
    apart = [run_decoder(model, inputs, queries) for queries in sets]
    weights = [torch.randn(out[0].shape, generator=generator) for out in apart]

    def grads(outputs):
        model.zero_grad()
        sum((logits * w).sum() + boxes.sum() for (logits, boxes, _), w in zip(outputs, weights)).backward()
        return [p.grad.clone() for p in model.model.decoder.parameters() if p.grad is not None]

    for (t_logits, t_boxes, t_hidden), (a_logits, a_boxes, a_hidden) in zip(together, apart):
        assert t_logits.shape == a_logits.shape == (3, images.shape[0], own.shape[0], len(SHAPES) + 1)
        torch.testing.assert_close(t_logits, a_logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(t_boxes, a_boxes, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(t_hidden, a_hidden, rtol=1e-5, atol=1e-5)
    together_grads, apart_grads = grads(together), grads(apart)
    assert len(together_grads) == len(apart_grads) > 0
    for g_together, g_apart in zip(together_grads, apart_grads):
        torch.testing.assert_close(g_together, g_apart, rtol=1e-4, atol=1e-5)


def test_query_sets_of_different_sizes_are_decoded_one_pass_each(images):
    model = _model(True, True, images)
    with torch.no_grad(), capture_decoder_inputs(model) as captured:
        model(pixel_values=images)
    own = model.model.query_position_embeddings.weight
    sets = [own, own[:3]]
    with torch.no_grad():
        together = run_decoder_sets(model, dict(captured), sets)
        apart = [run_decoder(model, dict(captured), queries) for queries in sets]
    assert [out[0].shape[2] for out in together] == [own.shape[0], 3]
    for (t_logits, t_boxes, _), (a_logits, a_boxes, _) in zip(together, apart):
        torch.testing.assert_close(t_logits, a_logits, rtol=0, atol=0)
        torch.testing.assert_close(t_boxes, a_boxes, rtol=0, atol=0)
