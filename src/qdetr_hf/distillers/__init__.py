"""Distillation methods between a frozen teacher DETR and a quantized student."""

from qdetr_hf.distillers.base import (
    DetectorOutputs,
    Distiller,
    capture_co_attended_features,
    capture_decoder_inputs,
    check_label_spaces,
    decoder_layers,
    layer_predictions,
    resolve_layers,
    run_decoder,
)
from qdetr_hf.distillers.drd import (
    DEFAULT_DRD_WEIGHT,
    DRDDistiller,
    FQMResult,
    compute_drd,
    drd_loss,
    foreground_aware_query_matching,
)

__all__ = [
    "DEFAULT_DRD_WEIGHT",
    "DRDDistiller",
    "DetectorOutputs",
    "Distiller",
    "FQMResult",
    "capture_co_attended_features",
    "capture_decoder_inputs",
    "check_label_spaces",
    "compute_drd",
    "decoder_layers",
    "drd_loss",
    "foreground_aware_query_matching",
    "layer_predictions",
    "resolve_layers",
    "run_decoder",
]
