"""Distillation methods between a frozen teacher DETR and a quantized student."""

from qdetr_hf.distillers.base import (
    DetectorOutputs,
    Distiller,
    capture_co_attended_features,
    check_label_spaces,
    decoder_layers,
    resolve_layers,
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
    "check_label_spaces",
    "compute_drd",
    "decoder_layers",
    "drd_loss",
    "foreground_aware_query_matching",
    "resolve_layers",
]
