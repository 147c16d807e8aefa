"""qdetr-hf: low-bit quantized DETR detectors trained by distillation, as Hugging Face Transformers models.

Importing the package registers ``QDetrConfig`` / ``QDetrForObjectDetection`` with ``AutoConfig`` and
``AutoModelForObjectDetection`` (model type ``"qdetr"``), and marks both classes for ``auto_map`` so that saved folders
load with ``trust_remote_code=True`` where this package is not installed.
"""

from transformers import AutoConfig, AutoModelForObjectDetection

from .annealing import BitWidthAnnealing
from .configuration_qdetr import QDetrConfig
from .mixed_precision import LayerSensitivity, allocate_bits, choose_bit_widths, layer_sensitivity
from .modeling_qdetr import QDetrForObjectDetection
from .onnx_export import OnnxExportReport, export_onnx
from .onnx_runtime import OnnxDetector
from .quantization import (
    DistributionAlignment,
    LSQActivationQuantizer,
    LSQWeightQuantizer,
    QuantAttention,
    QuantConv2d,
    QuantLinear,
    calibrate,
    is_calibrated,
    lsq_fake_quantize,
    quantization_disabled,
)

__version__ = "0.1.0"

AutoConfig.register(QDetrConfig.model_type, QDetrConfig, exist_ok=True)
AutoModelForObjectDetection.register(QDetrConfig, QDetrForObjectDetection, exist_ok=True)
QDetrConfig.register_for_auto_class()
QDetrForObjectDetection.register_for_auto_class("AutoModelForObjectDetection")

__all__ = [
    "BitWidthAnnealing",
    "DistributionAlignment",
    "LSQActivationQuantizer",
    "LSQWeightQuantizer",
    "LayerSensitivity",
    "OnnxDetector",
    "OnnxExportReport",
    "QDetrConfig",
    "QDetrForObjectDetection",
    "QuantAttention",
    "QuantConv2d",
    "QuantLinear",
    "__version__",
    "allocate_bits",
    "calibrate",
    "choose_bit_widths",
    "export_onnx",
    "is_calibrated",
    "layer_sensitivity",
    "lsq_fake_quantize",
    "quantization_disabled",
]
