"""Q-DETR's quantization in one import: the LSQ quantizers (``quantizers``), the quantized layers (``quant_layers``)
and the model-level tools (``calibration``)."""

from .calibration import (
    activation_quantizers,
    calibrate,
    is_calibrated,
    quantization_disabled,
    quantized_layers,
    quantizers,
)
from .quant_layers import DistributionAlignment, QuantAttention, QuantConv2d, QuantLinear
from .quantizers import (
    MSE_SAMPLES_PER_BATCH,
    MSE_STEP_MULTIPLIERS,
    STEP_EPS,
    AlignmentInit,
    LSQActivationQuantizer,
    LSQWeightQuantizer,
    OffsetInit,
    WeightStepInit,
    _Quantizer,
    check_bits,
    integer_shift,
    lsq_fake_quantize,
    quant_range,
)

__all__ = [
    "MSE_SAMPLES_PER_BATCH",
    "MSE_STEP_MULTIPLIERS",
    "STEP_EPS",
    "AlignmentInit",
    "DistributionAlignment",
    "LSQActivationQuantizer",
    "LSQWeightQuantizer",
    "OffsetInit",
    "QuantAttention",
    "QuantConv2d",
    "QuantLinear",
    "WeightStepInit",
    "_Quantizer",
    "activation_quantizers",
    "calibrate",
    "check_bits",
    "integer_shift",
    "is_calibrated",
    "lsq_fake_quantize",
    "quant_range",
    "quantization_disabled",
    "quantized_layers",
    "quantizers",
]
