"""Mixed precision: per-layer weight bits in the config, sensitivity, allocation under a budget, re-quantization."""

from __future__ import annotations

import json
import random

import pytest
import torch
from conftest import tiny_detr_kwargs

from qdetr_hf import QDetrConfig, QDetrForObjectDetection, calibrate
from qdetr_hf.efficiency import efficiency_report
from qdetr_hf.mixed_precision import (
    LayerSensitivity,
    allocate_bits,
    average_weight_bits,
    choose_bit_widths,
    layer_sensitivity,
)
from qdetr_hf.quantization import quantized_layers


def test_allocation_on_a_hand_built_case_takes_the_cheap_layer_down_first():
    # Layer a loses a lot below 4 bits, layer b almost nothing: b gives up its bits first.
    a = LayerSensitivity("a", 100, {2: 10.0, 3: 1.0, 4: 0.0})
    b = LayerSensitivity("b", 100, {2: 0.5, 3: 0.1, 4: 0.0})
    assert allocate_bits([a, b], budget_bits=800) == {"a": 4, "b": 4}
    assert allocate_bits([a, b], budget_bits=700) == {"a": 4, "b": 3}
    # 500 bits: (a 3, b 2) costs 1.5, the only other fit (a 2, b 3) 10.1.
    assert allocate_bits([a, b], budget_bits=500) == {"a": 3, "b": 2}
    with pytest.raises(ValueError, match="No choice fits"):
        allocate_bits([a, b], budget_bits=399)


def test_allocation_never_exceeds_the_budget():
    rng = random.Random(0)
    for _ in range(200):
        layers = [
            LayerSensitivity(f"l{i}", rng.randint(1, 1000), {b: rng.random() / b for b in (2, 3, 4, 8)})
            for i in range(rng.randint(1, 12))
        ]
        narrowest = sum(2 * s.numel for s in layers)
        widest = sum(8 * s.numel for s in layers)
        budget = rng.uniform(narrowest, widest * 1.1)
        chosen = allocate_bits(layers, budget)
        assert sum(chosen[s.name] * s.numel for s in layers) <= budget
        assert all(chosen[s.name] in s.costs for s in layers)


def test_per_layer_bits_build_save_and_load(tmp_path, images):
    fc1 = "model.encoder.layers.0.mlp.fc1"
    model = QDetrForObjectDetection(QDetrConfig(**tiny_detr_kwargs(layer_weight_bits={fc1: 2})))
    layers = quantized_layers(model)
    assert layers[fc1].weight_quantizer.bits == 2
    assert {layer.weight_quantizer.bits for name, layer in layers.items() if name != fc1} == {4, 8}
    calibrate(model, [images])
    model.eval()
    expected = model(pixel_values=images).logits
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["weight_packing"]["layers"][fc1] == 2
    reloaded = QDetrForObjectDetection.from_pretrained(tmp_path).eval()
    assert quantized_layers(reloaded)[fc1].weight_quantizer.bits == 2
    assert torch.equal(reloaded(pixel_values=images).logits, expected)
    with pytest.raises(ValueError, match="layers this model does not quantize"):
        QDetrForObjectDetection(QDetrConfig(**tiny_detr_kwargs(layer_weight_bits={"model.no.such.layer": 2})))
    with pytest.raises(ValueError, match="layer_weight_bits"):
        QDetrConfig(**tiny_detr_kwargs(layer_weight_bits={fc1: 9}))


def test_sensitivity_measures_every_layer_and_leaves_the_model_unchanged(images):
    model = QDetrForObjectDetection(QDetrConfig(**tiny_detr_kwargs())).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sensitivities = layer_sensitivity(model, [images], candidate_bits=(2, 8))
    assert [s.name for s in sensitivities] == list(quantized_layers(model))
    assert all(s.costs[2] >= 0 and s.costs[8] >= 0 for s in sensitivities)
    # Two bits cost more than eight, summed over the layers.
    assert sum(s.costs[2] for s in sensitivities) > 10 * sum(s.costs[8] for s in sensitivities)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_chosen_widths_meet_the_size_and_average_targets(images):
    model = QDetrForObjectDetection(QDetrConfig(**tiny_detr_kwargs())).eval()
    sensitivities = layer_sensitivity(model, [images], candidate_bits=(2, 3, 4))
    by_average = choose_bit_widths(model, None, target_average_bits=3.0, sensitivities=sensitivities)
    assert average_weight_bits(by_average, model) <= 3.0 and len(set(by_average.values())) > 1
    uniform_3bit = efficiency_report(
        QDetrForObjectDetection(QDetrConfig(**tiny_detr_kwargs(weight_bits=3))), 64
    ).size_mb
    by_size = choose_bit_widths(model, None, target_size_mb=uniform_3bit, image_size=64, sensitivities=sensitivities)
    mixed = QDetrForObjectDetection(QDetrConfig(**tiny_detr_kwargs(layer_weight_bits=by_size)))
    assert efficiency_report(mixed, 64).size_mb <= uniform_3bit + 1e-9
    with pytest.raises(ValueError, match="exactly one"):
        choose_bit_widths(model, None, sensitivities=sensitivities)


def test_requantize_continues_a_trained_model_at_fewer_bits(images):
    model = QDetrForObjectDetection(QDetrConfig(**tiny_detr_kwargs()))
    calibrate(model, [images])
    stem = next(iter(quantized_layers(model).values()))
    changed = model.requantize(weight_bits=3, activation_bits=3)
    layers = quantized_layers(model)
    assert stem.weight_quantizer.bits == 8 and stem.input_quantizer.bits == 8  # the first convolution keeps 8 bits
    assert {layer.weight_quantizer.bits for layer in list(layers.values())[1:]} == {3}
    assert len(changed) == 2 * (len(layers) - 1)
    assert not model.is_calibrated  # the changed activation quantizers must be calibrated again
    calibrate(model, [images], only_uncalibrated=True)
    assert model.is_calibrated and model.config.bit_notation == "3-3-8"
    model.eval()
    assert torch.isfinite(model(pixel_values=images).logits).all()


def assert_onnx_runtime_matches(path, model, images) -> None:
    """ONNX Runtime's outputs of the exported ``path`` equal ``model``'s to 1e-5 (the same integer codes)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    pixel_mask = torch.ones(images.shape[0], *images.shape[2:], dtype=torch.long)
    logits, boxes = session.run(None, {"pixel_values": images.numpy(), "pixel_mask": pixel_mask.numpy()})
    with torch.no_grad():
        expected = model(pixel_values=images, pixel_mask=pixel_mask)
    torch.testing.assert_close(torch.from_numpy(logits), expected.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.from_numpy(boxes), expected.pred_boxes, rtol=0, atol=1e-5)


def test_per_layer_bits_export_to_onnx(tmp_path, images):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from qdetr_hf import export_onnx

    fc1 = "model.encoder.layers.0.mlp.fc1"
    config = QDetrConfig(**tiny_detr_kwargs(layer_weight_bits={fc1: 2}), integer_zero_points=True)
    model = QDetrForObjectDetection(config).eval()
    calibrate(model, [images])
    export_onnx(model, tmp_path / "model.onnx", 64)
    # The 2-bit layer's weight codes are stored in its own range [-2, 1]; the 4-bit layers use [-8, 7].
    shape = tuple(quantized_layers(model)[fc1].weight.shape)
    int8 = [
        onnx.numpy_helper.to_array(t)
        for t in onnx.load(tmp_path / "model.onnx").graph.initializer
        if t.data_type == onnx.TensorProto.INT8 and t.dims
    ]
    ranges = {(int(a.min()), int(a.max())) for a in int8 if a.shape[:2] in (shape, shape[::-1])}
    assert (-2, 1) in ranges and any(low < -2 for low, _ in ranges), ranges
    assert_onnx_runtime_matches(tmp_path / "model.onnx", model, images)


HEADS = ("model.input_projection", "class_labels_classifier", "bbox_predictor.layers.0", "bbox_predictor.layers.2")


def test_head_bits_quantize_the_projection_and_heads_and_shrink_the_size_by_their_share(tmp_path, images):
    real = QDetrForObjectDetection(QDetrConfig(**tiny_detr_kwargs()))
    assert not set(HEADS) & set(quantized_layers(real))
    model = QDetrForObjectDetection(
        QDetrConfig(**tiny_detr_kwargs(head_bits=8, layer_weight_bits={"class_labels_classifier": 2}))
    )
    layers = quantized_layers(model)
    assert layers["model.input_projection"].weight_quantizer.bits == 8
    assert layers["model.input_projection"].input_quantizer.bits == 8
    assert layers["class_labels_classifier"].weight_quantizer.bits == 2  # layer_weight_bits still wins
    assert layers["class_labels_classifier"].input_quantizer.bits == 8
    # Paper-convention size: each head weight counts 8 (or 2) bits instead of 32; its new (real-valued) steps and
    # offsets count 32.
    heads = [layers[n] for n in model.head_layer_names()]
    saved_bits = sum((32 - layer.weight_quantizer.bits) * layer.weight.numel() for layer in heads)
    added_bits = 32 * sum(p.numel() for layer in heads for n, p in layer.named_parameters() if "_quantizer." in n)
    expected_mb = efficiency_report(real, 64).size_mb - (saved_bits - added_bits) / 8 / 2**20
    assert efficiency_report(model, 64).size_mb == pytest.approx(expected_mb, abs=1e-9)
    # Trained widths survive re-quantization, packing and reloading bit for bit.
    model.requantize(weight_bits=3, activation_bits=3)
    assert layers["model.input_projection"].weight_quantizer.bits == 8
    assert model.quantized_modules()["bbox_predictor.layers.0"].input_quantizer.bits == 8
    calibrate(model, [images])
    model.eval()
    expected = model(pixel_values=images)
    model.save_pretrained(tmp_path)
    assert (
        json.loads((tmp_path / "config.json").read_text())["weight_packing"]["layers"]["bbox_predictor.layers.1"] == 8
    )
    reloaded = QDetrForObjectDetection.from_pretrained(tmp_path).eval()
    out = reloaded(pixel_values=images)
    assert torch.equal(out.logits, expected.logits) and torch.equal(out.pred_boxes, expected.pred_boxes)
    with pytest.raises(ValueError, match="head_bits"):
        QDetrForObjectDetection.from_pretrained(tmp_path, head_bits=4)


def test_head_bits_export_to_onnx_as_integer_layers(tmp_path, images):
    pytest.importorskip("onnxruntime")
    from qdetr_hf import export_onnx
    from qdetr_hf.onnx_export import integer_kernel_counts

    model = QDetrForObjectDetection(QDetrConfig(**tiny_detr_kwargs(head_bits=8), integer_zero_points=True)).eval()
    calibrate(model, [images])
    report = export_onnx(model, tmp_path / "model.onnx", 64)
    assert report.quantized_layers == len(quantized_layers(model))
    # Without head_bits the four head linears (class, three box layers) are the graph's only float MatMuls.
    counts = integer_kernel_counts(tmp_path / "model.onnx")
    assert "MatMul" not in counts and "Gemm" not in counts, counts
    assert_onnx_runtime_matches(tmp_path / "model.onnx", model, images)
