"""ONNX export of a calibrated Q-DETR as a QDQ graph that ONNX Runtime's CPU provider runs with integer kernels."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .quantization import (
    LSQActivationQuantizer,
    QuantConv2d,
    QuantLinear,
    _Quantizer,
    activation_quantizers,
    check_bits,
    integer_shift,
    is_calibrated,
)

ONNX_OPSET = 21
"""ONNX opset of the export: per-axis QuantizeLinear/DequantizeLinear (13+) and int8/uint8 Clip."""
INTEGER_KERNELS = ("QLinearConv", "QLinearMatMul", "MatMulIntegerToFloat", "ConvInteger", "MatMulInteger", "QGemm")
"""Operators of ONNX Runtime's optimised graph that compute a quantized layer with integer arithmetic."""
METADATA_KEY = "qdetr_hf"
"""Key of the JSON record (image size, bits, label names, ...) stored in the ONNX model's ``metadata_props``."""


# ------------------------------------------------------------------------------------------------------------------
# Custom ops: the eager numbers of ONNX's QuantizeLinear -> Clip -> DequantizeLinear, and of a weight DequantizeLinear
# ------------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("qdetr::quantize_dequantize", mutates_args=())
def quantize_dequantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, low: int, high: int
) -> torch.Tensor:
    """``(clip(round(x / scale) + zero_point, low, high) - zero_point) * scale``: ONNX's QuantizeLinear, a Clip to the
    b-bit range inside the 8-bit container, and DequantizeLinear, in float32 (round half to even, as both do)."""
    zp = zero_point.float()
    return ((torch.round(x / scale) + zp).clamp(low, high) - zp) * scale


@quantize_dequantize.register_fake
def _(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, low: int, high: int) -> torch.Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("qdetr::dequantize_weight", mutates_args=())
def dequantize_weight(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int) -> torch.Tensor:
    """ONNX's per-axis DequantizeLinear of integer weight codes: ``(codes - zero_point) * scale`` along ``axis``."""
    shape = [1] * codes.dim()
    shape[axis] = -1
    return (codes.float() - zero_point.float().reshape(shape)) * scale.reshape(shape)


@dequantize_weight.register_fake
def _(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int) -> torch.Tensor:
    return torch.empty(codes.shape, dtype=torch.float32, device=codes.device)


def _translation_table() -> dict:
    """ONNX translations of the two custom ops (onnxscript functions, for ``torch.onnx.export(dynamo=True)``)."""
    from onnxscript import opset21 as op

    def quantize_dequantize_onnx(x, scale, zero_point, low: int, high: int):
        quantized = op.QuantizeLinear(x, scale, zero_point)
        if (low, high) != (0, 255):  # a sub-8-bit range inside the uint8 container
            quantized = op.Clip(quantized, op.CastLike(low, zero_point), op.CastLike(high, zero_point))
        return op.DequantizeLinear(quantized, scale, zero_point)

    def dequantize_weight_onnx(codes, scale, zero_point, axis: int):
        return op.DequantizeLinear(codes, scale, zero_point, axis=axis)

    return {
        torch.ops.qdetr.quantize_dequantize.default: quantize_dequantize_onnx,
        torch.ops.qdetr.dequantize_weight.default: dequantize_weight_onnx,
    }


# ------------------------------------------------------------------------------------------------------------------
# Export-time modules: each quantizer as constants in ONNX's integer form
# ------------------------------------------------------------------------------------------------------------------
def activation_qparams(quantizer: LSQActivationQuantizer) -> tuple[float, int, int, int, float]:
    """``(scale, zero_point, low, high, rounding)`` of an activation quantizer in a uint8 container.

    The quantizer computes ``s * (clip(round(x / s) - k, Qn, Qp) + k)`` with ``k`` its offset in whole steps
    (:func:`~qdetr_hf.quantization.integer_shift`). ONNX zero points are integers, so a real-valued offset is rounded
    (``rounding`` = ``|z / s - k|``, 0 for a model trained with ``integer_zero_points``). The codes ``L + c`` are
    stored with ``c`` chosen so that ``[Qn + c, Qp + c]`` and the zero point ``c - k`` fit ``[0, 255]``; when ``k >=
    0`` the zero point is 0 where possible, which lets ONNX Runtime drop a ReLU in front of the quantizer.
    """
    qn, qp = quantizer._calibrated_range()
    step_tensor = quantizer.step.detach().float()
    offset = quantizer.offset.detach().float() if quantizer.learn_offset else torch.zeros(())
    k = int(integer_shift(offset, step_tensor, qn, qp))  # the forward's own float32 rounding of z / s
    c = min(max(k, -qn), 255 - qp)  # codes L + c in [Qn + c, Qp + c], zero point c - k, all within [0, 255]
    rounding = 0.0 if quantizer.integer_offset else abs(float(offset / step_tensor) - k)
    return float(step_tensor), c - k, qn + c, qp + c, rounding


class _QDQ(nn.Module):
    """An activation quantizer as ONNX QuantizeLinear -> Clip -> DequantizeLinear constants."""

    def __init__(self, quantizer: LSQActivationQuantizer) -> None:
        super().__init__()
        scale, zero_point, self.low, self.high, self.rounding = activation_qparams(quantizer)
        self.name = quantizer.name
        self.register_buffer("scale", torch.tensor(scale, dtype=torch.float32))
        self.register_buffer("zero_point", torch.tensor(zero_point, dtype=torch.uint8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quantize_dequantize(x.float(), self.scale, self.zero_point, self.low, self.high)


def _weight_qparams(layer: QuantConv2d | QuantLinear) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(codes, scale, zero_point)`` of a layer's weight: int8 codes for up to 7 bits, uint8 codes offset by 128
    (zero point 128) at 8 bits, so that no u8 x s8 product pair can overflow AVX2's 16-bit accumulation."""
    quantizer = layer.weight_quantizer
    codes = quantizer.codes(layer.weight)
    scale = quantizer.step.detach().float().reshape(-1)
    if quantizer.bits == 8:
        return (codes.to(torch.int16) + 128).to(torch.uint8), scale, torch.full_like(scale, 128, dtype=torch.uint8)
    return codes, scale, torch.zeros_like(scale, dtype=torch.int8)


class _QDQConv2d(nn.Module):
    """A quantized convolution as QDQ input, integer weight initializer with per-channel DequantizeLinear, float Conv."""

    def __init__(self, layer: QuantConv2d) -> None:
        super().__init__()
        self.input_quantizer = _QDQ(layer.input_quantizer)
        codes, scale, zero_point = _weight_qparams(layer)
        self.register_buffer("codes", codes)
        self.register_buffer("scale", scale)
        self.register_buffer("zero_point", zero_point)
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().float().clone())
        self.stride, self.padding, self.dilation, self.groups = (
            layer.stride,
            layer.padding,
            layer.dilation,
            layer.groups,
        )
        if layer.padding_mode != "zeros":
            raise ValueError(
                f"ONNX export supports zero-padded convolutions only, got padding_mode={layer.padding_mode!r}."
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = dequantize_weight(self.codes, self.scale, self.zero_point, 0)
        x = self.input_quantizer(x)
        return nn.functional.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class _QDQLinear(nn.Module):
    """A quantized linear layer as QDQ input and ``x @ DequantizeLinear(codes^T) + bias`` (the weight transposed
    offline, per-channel axis 1), the MatMul form ONNX Runtime fuses into an integer kernel."""

    def __init__(self, layer: QuantLinear) -> None:
        super().__init__()
        self.input_quantizer = _QDQ(layer.input_quantizer)
        codes, scale, zero_point = _weight_qparams(layer)
        self.register_buffer("codes", codes.t().contiguous())
        self.register_buffer("scale", scale)
        self.register_buffer("zero_point", zero_point)
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.matmul(self.input_quantizer(x), dequantize_weight(self.codes, self.scale, self.zero_point, 1))
        return out if self.bias is None else out + self.bias


def _replace_quantized_modules(model: nn.Module) -> list[_QDQ]:
    """Swap every quantized layer and remaining activation quantizer of ``model`` (a copy) for its export form."""
    replaced: list[_QDQ] = []
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantConv2d):
            new: nn.Module = _QDQConv2d(module)
        elif isinstance(module, QuantLinear):
            new = _QDQLinear(module)
        elif isinstance(module, LSQActivationQuantizer) and not name.endswith("input_quantizer"):
            new = _QDQ(module)
        else:
            continue
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, new)
    for module in model.modules():
        if isinstance(module, _QDQ):
            replaced.append(module)
    return replaced


class _DetectorGraph(nn.Module):
    """``(pixel_values, pixel_mask) -> (logits, pred_boxes)``: the part of DETR's output that post-processing reads."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outputs = self.model(pixel_values=pixel_values, pixel_mask=pixel_mask)
        return outputs.logits, outputs.pred_boxes


# ------------------------------------------------------------------------------------------------------------------
# Graph pass: fold DETR's frozen BatchNorm (Conv -> Mul -> Add with constants) into the integer convolution
# ------------------------------------------------------------------------------------------------------------------
def _fold_batch_norms(model_proto: Any) -> int:
    """Fold every ``Conv -> Mul(c) -> Add(d)`` whose weight is a constant per-channel DequantizeLinear into the
    DequantizeLinear's scale (``scale * c``) and the convolution's bias (``bias * c + d``); returns the count.

    Hand-written: ONNX Runtime folds BatchNorm only into float initializer weights, not into a DequantizeLinear, and
    its QDQ fusion needs the Conv's output to reach the next QuantizeLinear directly.
    """
    import numpy as np
    from onnx import numpy_helper

    graph = model_proto.graph
    inits = {init.name: init for init in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    graph_outputs = {o.name for o in graph.output}

    def constant(name: str) -> np.ndarray | None:
        return numpy_helper.to_array(inits[name]) if name in inits else None

    def single_consumer(name: str, op_type: str) -> Any | None:
        users = consumers.get(name, [])
        if len(users) != 1 or users[0].op_type != op_type or name in graph_outputs:
            return None
        return users[0]

    removed, folded = [], 0
    for conv in [n for n in graph.node if n.op_type == "Conv"]:
        dq = producers.get(conv.input[1])
        mul = single_consumer(conv.output[0], "Mul")
        add = single_consumer(mul.output[0], "Add") if mul is not None else None
        if dq is None or dq.op_type != "DequantizeLinear" or add is None or len(consumers[dq.output[0]]) != 1:
            continue
        scale = constant(dq.input[1])
        out_channels = scale.shape[0] if scale is not None and scale.ndim == 1 else None
        mul_c = next((constant(i) for i in mul.input if i != conv.output[0]), None)
        add_c = next((constant(i) for i in add.input if i != mul.output[0]), None)
        if out_channels is None or mul_c is None or add_c is None:
            continue
        if mul_c.size != out_channels or add_c.size != out_channels:
            continue
        mul_c, add_c = mul_c.reshape(-1).astype(np.float32), add_c.reshape(-1).astype(np.float32)
        bias = constant(conv.input[2]) if len(conv.input) > 2 and conv.input[2] else np.zeros(out_channels, np.float32)
        if bias is None:
            continue
        prefix = conv.output[0]
        new_scale = numpy_helper.from_array((scale * mul_c).astype(np.float32), f"{prefix}_folded_scale")
        new_bias = numpy_helper.from_array((bias * mul_c + add_c).astype(np.float32), f"{prefix}_folded_bias")
        graph.initializer.extend([new_scale, new_bias])
        dq.input[1] = new_scale.name
        while len(conv.input) < 3:
            conv.input.append("")
        conv.input[2] = new_bias.name
        conv.output[0] = add.output[0]
        removed += [mul, add]
        folded += 1
    for node in removed:
        graph.node.remove(node)
    used = {name for node in graph.node for name in node.input}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)
    return folded


# ------------------------------------------------------------------------------------------------------------------
# Public API
# ------------------------------------------------------------------------------------------------------------------
@dataclass
class OnnxExportReport:
    """What :func:`export_onnx` wrote."""

    path: str
    image_size: tuple[int, int]
    quantized_layers: int
    activation_quantizers: int
    folded_batch_norms: int
    max_zero_point_rounding: float
    """Largest ``|z / s - round(z / s)|`` over the activation offsets (0 when trained with integer zero points)."""
    file_mb: float
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def require_onnx() -> None:
    """Raise a clear ``ImportError`` unless ``onnx``, ``onnxscript`` and ``onnxruntime`` are installed."""
    missing = [name for name in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(
            f"ONNX export and inference need {', '.join(missing)}: `pip install onnx onnxscript onnxruntime` (they "
            "are dependencies of qdetr-hf; reinstall it with `pip install -e .`)."
        )


def _check_exportable(model: nn.Module) -> None:
    for name, quantizer in [(n, m) for n, m in model.named_modules() if isinstance(m, _Quantizer)]:
        check_bits(quantizer.bits, f"bits of quantizer '{name}'")
        if not quantizer.enabled:
            raise ValueError(
                f"Quantizer '{name}' is disabled (quantization_disabled or enabled=False): export the model with every "
                "quantizer enabled, so that the ONNX graph computes what the model computes."
            )
    if not is_calibrated(model):
        names = [q.name for q in activation_quantizers(model) if not bool(q.calibrated)]
        raise RuntimeError(
            f"Cannot export an uncalibrated model ({len(names)} activation quantizers not calibrated, e.g. "
            f"{names[:3]}): run qdetr_hf.calibrate(model, batches) first."
        )


def _image_size(image_size: int | Sequence[int]) -> tuple[int, int]:
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(int(v) for v in image_size)
    if len(size) != 2 or min(size) <= 0:
        raise ValueError(f"image_size must be a positive int or (height, width), got {image_size!r}.")
    return size  # type: ignore[return-value]


@torch.no_grad()
def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    image_size: int | Sequence[int],
    *,
    batch_size: int = 2,
    opset: int = ONNX_OPSET,
    check: bool = True,
) -> OnnxExportReport:
    """Export a calibrated ``QDetrForObjectDetection`` to ONNX with its quantization in integer (QDQ) form (a
    real-valued ``DetrForObjectDetection`` exports as the float graph it is, the reference to compare against).

    The graph takes ``pixel_values`` ``(batch, 3, H, W)`` float32 and ``pixel_mask`` ``(batch, H, W)`` int64 at the
    fixed ``image_size`` (any batch size) and returns ``logits`` and ``pred_boxes`` exactly like the PyTorch model, so
    the image processor's ``post_process_object_detection`` applies unchanged. Every quantized convolution and linear
    layer appears as QuantizeLinear -> Clip -> DequantizeLinear on its input (uint8 container, the Clip keeping the
    b-bit range) and an integer weight initializer with per-channel DequantizeLinear scales (int8 codes, uint8 with
    zero point 128 at 8 bits) in front of a float Conv / MatMul: the form ONNX Runtime's CPU provider fuses into
    QLinearConv / MatMulIntegerToFloat / QLinearMatMul. Attention q, k, v and softmax quantizers appear the same way at
    ``attention_bits``. DETR's frozen BatchNorms are folded into the convolutions' weight scales and biases.

    LSQ+ offsets become integer zero points: exact for a model trained with ``integer_zero_points=True``, rounded to the
    nearest step otherwise (``max_zero_point_rounding`` in the report says by how much).

    Args:
        model: A calibrated ``QDetrForObjectDetection`` (any device; exported from a float32 CPU copy).
        path: Output ``.onnx`` file (weights inside the file).
        image_size: ``(height, width)`` of the network input, or one int for a square input.
        batch_size: Batch size of the example input used for tracing, at least 2 (torch.export specialises a size-1
            dimension); the exported batch dimension is dynamic.
        opset: ONNX opset (at least 21).
        check: Run ``onnx.checker.check_model`` on the result.

    Raises:
        ImportError: If onnx, onnxscript or onnxruntime is missing.
        RuntimeError: If the model is not calibrated.
        ValueError: If the model has a disabled quantizer or a bit width outside ``[2, 8]``.
    """
    require_onnx()
    import onnx

    height, width = _image_size(image_size)
    if opset < ONNX_OPSET:
        raise ValueError(
            f"opset must be at least {ONNX_OPSET} (int8/uint8 Clip, per-axis DequantizeLinear), got {opset}."
        )
    target = model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model
    _check_exportable(target)
    export_model = copy.deepcopy(target).float().cpu().eval()
    num_layers = sum(isinstance(m, (QuantConv2d, QuantLinear)) for m in export_model.modules())
    qdqs = _replace_quantized_modules(export_model)
    graph = _DetectorGraph(export_model).eval()
    pixel_values = torch.zeros(batch_size, 3, height, width)
    pixel_mask = torch.ones(batch_size, height, width, dtype=torch.long)
    batch = torch.export.Dim("batch", min=1)
    program = torch.onnx.export(
        graph,
        (pixel_values, pixel_mask),
        dynamo=True,
        opset_version=opset,
        input_names=["pixel_values", "pixel_mask"],
        output_names=["logits", "pred_boxes"],
        dynamic_shapes={"pixel_values": {0: batch}, "pixel_mask": {0: batch}},
        custom_translation_table=_translation_table(),
        external_data=False,
    )
    proto = program.model_proto
    folded = _fold_batch_norms(proto)
    config = getattr(target, "config", None)
    metadata = {
        "image_size": [height, width],
        "bits": getattr(config, "bit_notation", None),
        "id2label": {str(k): v for k, v in (getattr(config, "id2label", None) or {}).items()},
        "qdetr_hf_version": _package_version(),
    }
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(metadata)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    onnx.save_model(proto, str(tmp))
    if check:
        onnx.checker.check_model(str(tmp))
    os.replace(tmp, path)
    return OnnxExportReport(
        path=str(path),
        image_size=(height, width),
        quantized_layers=num_layers,
        activation_quantizers=len(qdqs),
        folded_batch_norms=folded,
        max_zero_point_rounding=max((q.rounding for q in qdqs), default=0.0),
        file_mb=path.stat().st_size / 2**20,
        metadata=metadata,
    )


def _package_version() -> str:
    from . import __version__

    return __version__


def integer_kernel_counts(model_path: str | os.PathLike, num_threads: int | None = None) -> dict[str, int]:
    """Let ONNX Runtime optimise an exported model (CPU provider, every optimisation) and count, in the graph it then
    runs, the integer kernels (:data:`INTEGER_KERNELS`) and the float ``Conv`` / ``MatMul`` / ``Gemm`` left."""
    require_onnx()
    import tempfile

    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        if num_threads is not None:
            options.intra_op_num_threads = num_threads
        ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        nodes = onnx.load(options.optimized_model_filepath).graph.node
    counts: dict[str, int] = {}
    for node in nodes:
        if node.op_type in (*INTEGER_KERNELS, "Conv", "MatMul", "Gemm", "FusedConv", "FusedMatMul"):
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


__all__ = [
    "INTEGER_KERNELS",
    "METADATA_KEY",
    "OnnxExportReport",
    "activation_qparams",
    "export_onnx",
    "integer_kernel_counts",
    "require_onnx",
]
