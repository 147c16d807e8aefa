"""ONNX export: QDQ graph structure, ONNX Runtime against PyTorch (unoptimised and integer-fused), AP, errors, runtime."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, SHAPES, tiny_detr_kwargs
from PIL import Image
from transformers import pipeline

from qdetr_hf import QDetrConfig, QDetrForObjectDetection, calibrate
from qdetr_hf.data import DetrCollator, SyntheticShapesDataset, default_image_processor
from qdetr_hf.onnx_export import _QDQ, export_onnx, integer_kernel_counts
from qdetr_hf.onnx_runtime import OnnxDetector
from qdetr_hf.quantization import LSQActivationQuantizer, quant_range, quantized_layers

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

# Tolerance of ONNX Runtime against PyTorch: both compute the same integer codes and the same float32 scalings, but
# ONNX Runtime's convolution and matrix products accumulate in another order (and, fused, in int32 before one float
# rescale), which moves the float32 outputs by a few units in the last place; 1e-5 absolute on logits and normalised
# boxes is ~100x that and far below anything post-processing can see.
ATOL = 1e-5


def _session(path, optimized: bool):
    options = ort.SessionOptions()
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimized else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A calibrated 4-4-8 tiny Q-DETR (residual stream at 8 bits, integer zero points, non-zero LSQ+ offsets) and its
    ONNX export, with a fixed-size 64 px processor saved beside them."""
    torch.manual_seed(0)
    config = QDetrConfig(
        **tiny_detr_kwargs(id2label=SHAPES, label2id={v: k for k, v in SHAPES.items()}),
        backbone_residual_bits=8,
        integer_zero_points=True,
        activation_offset_init="minmax",
    )
    model = QDetrForObjectDetection(config).eval()
    dataset = SyntheticShapesDataset(num_images=8, image_size=64, seed=3, max_objects=4)
    processor = default_image_processor((64, 64))
    batch = DetrCollator(processor)([dataset[i] for i in range(8)])
    calibrate(model, [batch])
    folder = tmp_path_factory.mktemp("onnx")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    report = export_onnx(model, folder / "model.onnx", 64)
    return model, folder, report, batch


def test_export_is_a_valid_qdq_graph_with_integer_weights(exported):
    model, folder, report, _ = exported
    proto = onnx.load(str(folder / "model.onnx"))
    onnx.checker.check_model(proto)
    inits = {i.name: i for i in proto.graph.initializer}
    producers = {out: node for node in proto.graph.node for out in node.output}
    integer = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
    weight_dqs = [
        n for n in proto.graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] in inits and inits[n.input[0]].data_type in integer
    ]  # fmt: skip
    layers = quantized_layers(model)
    assert len(weight_dqs) == len(layers) == report.quantized_layers
    for dq in weight_dqs:  # per-channel scales, one per output channel
        assert len(inits[dq.input[1]].dims) == 1 and inits[dq.input[1]].dims[0] > 1
    # Only the layers Q-DETR keeps real-valued (input projection, class and box heads) have float weights.
    float_weighted = [n for n in proto.graph.node if n.op_type in ("Conv", "MatMul", "Gemm") and n.input[1] in inits]
    assert len(float_weighted) == sum(type(m) in (torch.nn.Linear, torch.nn.Conv2d) for m in model.modules())
    # Every activation QuantizeLinear has a uint8 zero point; sub-8-bit ranges are clipped to exactly 2^b levels.
    quantize = [n for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    # (quantizers of one tensor with equal constants, e.g. the q and k projections' inputs, are merged by the exporter)
    assert 0.8 * report.activation_quantizers <= len(quantize) <= report.activation_quantizers
    assert all(inits[n.input[2]].data_type == onnx.TensorProto.UINT8 for n in quantize)
    clips = [n for n in proto.graph.node if n.op_type == "Clip"]
    levels = sorted(
        {
            int(onnx.numpy_helper.to_array(inits[c.input[2]]) - onnx.numpy_helper.to_array(inits[c.input[1]]))
            for c in clips
        }
    )
    assert levels == [15] and all(producers[c.input[0]].op_type == "QuantizeLinear" for c in clips)
    # Every frozen BatchNorm after a quantized convolution is folded: no Conv feeds a Mul any more.
    assert report.folded_batch_norms == sum(
        1 for name in layers if ".conv" in name or "downsample" in name or "conv1." in name
    )
    consumers = {name: n for n in proto.graph.node for name in n.input}
    assert not [n for n in proto.graph.node if n.op_type == "Conv" and consumers[n.output[0]].op_type == "Mul"]
    assert report.max_zero_point_rounding == 0.0  # trained with integer zero points: nothing to round


def test_unoptimised_onnx_runtime_reproduces_pytorch(exported):
    model, folder, _, batch = exported
    pixel_values, pixel_mask = batch["pixel_values"][:3], batch["pixel_mask"][:3]  # any batch size
    with torch.no_grad():
        expected = model(pixel_values=pixel_values, pixel_mask=pixel_mask)
    logits, boxes = _session(folder / "model.onnx", optimized=False).run(
        None, {"pixel_values": pixel_values.numpy(), "pixel_mask": pixel_mask.numpy()}
    )
    np.testing.assert_allclose(logits, expected.logits.numpy(), rtol=0, atol=ATOL)
    np.testing.assert_allclose(boxes, expected.pred_boxes.numpy(), rtol=0, atol=ATOL)


def test_optimised_graph_runs_the_quantized_layers_as_integer_kernels(exported):
    model, folder, _, batch = exported
    session = _session(folder / "model.onnx", optimized=True)
    counts = integer_kernel_counts(folder / "model.onnx")
    layers = quantized_layers(model)
    convs = sum(type(layer).__name__ == "QuantConv2d" for layer in layers.values())
    linears = len(layers) - convs
    attention_products = 2 * (model.config.encoder_layers + 2 * model.config.decoder_layers)
    integer_convs = counts.get("QLinearConv", 0)
    integer_matmuls = counts.get("MatMulIntegerToFloat", 0) + counts.get("QLinearMatMul", 0)
    assert integer_matmuls == linears + attention_products  # every linear layer and both attention products
    assert (integer_convs + linears) / len(layers) >= 0.9, counts
    with torch.no_grad():
        expected = model(pixel_values=batch["pixel_values"], pixel_mask=batch["pixel_mask"])
    logits, boxes = session.run(
        None, {"pixel_values": batch["pixel_values"].numpy(), "pixel_mask": batch["pixel_mask"].numpy()}
    )
    np.testing.assert_allclose(logits, expected.logits.numpy(), rtol=0, atol=ATOL)
    np.testing.assert_allclose(boxes, expected.pred_boxes.numpy(), rtol=0, atol=ATOL)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("offset_steps", [-3.4, 0.0, 2.6])
def test_qdq_constants_compute_the_quantizer_exactly(bits, signed, offset_steps):
    quantizer = LSQActivationQuantizer(bits, learn_offset=True, integer_offset=True)
    with torch.no_grad():
        quantizer.signed.fill_(signed)
        quantizer.raw_step.fill_(0.037)
        quantizer.offset.fill_(0.037 * offset_steps)
        quantizer.calibrated.fill_(True)
    x = torch.randn(4, 3, 17, generator=torch.Generator().manual_seed(bits)) * 0.037 * 2**bits
    qdq = _QDQ(quantizer)
    with torch.no_grad():
        assert torch.equal(qdq(x), quantizer(x))
    qn, qp = quant_range(bits, signed)
    assert qdq.low >= 0 and qdq.high <= 255 and qdq.high - qdq.low == qp - qn
    if not signed and offset_steps >= 0 and bits < 8:
        assert int(qdq.zero_point) == 0  # the zero point ONNX Runtime needs to drop a ReLU in front


def test_float_offsets_are_rounded_and_reported(tmp_path):
    torch.manual_seed(0)
    model = QDetrForObjectDetection(QDetrConfig(**tiny_detr_kwargs(activation_offset_init="minmax"))).eval()
    calibrate(model, [torch.randn(2, 3, 64, 64)])
    report = export_onnx(model, tmp_path / "model.onnx", 64)
    assert 0.0 < report.max_zero_point_rounding <= 0.5


def test_export_errors_are_clear(tmp_path, monkeypatch):
    model = QDetrForObjectDetection(QDetrConfig(**tiny_detr_kwargs())).eval()
    with pytest.raises(RuntimeError, match="uncalibrated"):
        export_onnx(model, tmp_path / "m.onnx", 64)
    calibrate(model, [torch.randn(2, 3, 64, 64)])
    layer = next(iter(quantized_layers(model).values()))
    layer.weight_quantizer.bits = 1
    with pytest.raises(ValueError, match="between 2 and 8"):
        export_onnx(model, tmp_path / "m.onnx", 64)
    layer.weight_quantizer.bits = 4
    layer.input_quantizer.enabled = False
    with pytest.raises(ValueError, match="disabled"):
        export_onnx(model, tmp_path / "m.onnx", 64)
    layer.input_quantizer.enabled = True
    with pytest.raises(ValueError, match="image_size"):
        export_onnx(model, tmp_path / "m.onnx", (64, 0))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    with pytest.raises(ImportError, match="pip install"):
        export_onnx(model, tmp_path / "m.onnx", 64)
    assert not (tmp_path / "m.onnx").exists()


def test_onnx_detector_returns_the_pipelines_detections(exported):
    _, folder, _, _ = exported
    dataset = SyntheticShapesDataset(num_images=3, image_size=64, seed=11)
    images = [dataset[i]["image"] for i in range(3)] + [Image.fromarray(np.full((40, 90, 3), 128, np.uint8))]
    detector = OnnxDetector(folder, num_threads=1)
    reference = pipeline("object-detection", model=str(folder))
    batch = detector(images, threshold=0.0)
    for image, detections in zip(images, batch, strict=True):
        expected = reference(image, threshold=0.0)
        assert [d["label"] for d in detections] == [d["label"] for d in expected]
        assert [d["box"] for d in detections] == [d["box"] for d in expected]
        np.testing.assert_allclose([d["score"] for d in detections], [d["score"] for d in expected], atol=1e-5)
    assert detector(images[0], threshold=0.0) == batch[0]  # one image gives one list
    with pytest.raises(ValueError, match="pixel_values must be"):
        detector.run(np.zeros((1, 3, 32, 32), np.float32))
    with pytest.raises(FileNotFoundError, match="No ONNX model"):
        OnnxDetector(folder / "missing")


@pytest.mark.slow
def test_exported_main_job_student_keeps_its_ap(tmp_path):
    """The shipped teacher as a calibrated 4-4-8 student (integer zero points, 8-bit residual stream): the exported
    model's AP on synthetic validation images is within 0.5 AP of the PyTorch model's."""
    from qdetr_hf.metrics import make_compute_metrics

    torch.manual_seed(0)
    teacher = REPO_ROOT / "examples" / "teacher-synthetic"
    student = QDetrForObjectDetection.from_pretrained(
        teacher,
        weight_step_init="mse",
        activation_offset_init="mse",
        distribution_alignment_init="fit",
        integer_zero_points=True,
        backbone_residual_bits=8,
    ).eval()
    processor = default_image_processor(128)
    collator = DetrCollator(processor)
    train = SyntheticShapesDataset(num_images=32, image_size=128, seed=0)
    val = SyntheticShapesDataset(num_images=48, image_size=128, seed=1)
    calibrate(student, [collator([train[i] for i in range(j, j + 8)]) for j in range(0, 32, 8)])
    export_onnx(student, tmp_path / "model.onnx", 128)
    evaluator = make_compute_metrics(id2label=student.config.id2label, area_ranges=val.area_ranges)
    for start in range(0, len(val), 16):
        batch = collator([val[i] for i in range(start, start + 16)])
        with torch.no_grad():
            out = student(pixel_values=batch["pixel_values"], pixel_mask=batch["pixel_mask"])
        evaluator.update(({}, out.logits, out.pred_boxes), batch["labels"])
    torch_ap = evaluator.compute()["AP"]
    onnx_ap = OnnxDetector(tmp_path / "model.onnx", processor).evaluate(val, collator, 16, val.area_ranges)["AP"]
    assert torch_ap > 0.05  # the student detects something, so the comparison means something
    assert abs(onnx_ap - torch_ap) <= 0.005, (onnx_ap, torch_ap)
    metadata = json.loads(onnx.load(str(tmp_path / "model.onnx")).metadata_props[0].value)
    assert metadata["image_size"] == [128, 128] and metadata["bits"] == "4-4-8"
