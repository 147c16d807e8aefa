"""Distillation methods between a frozen teacher DETR and a quantized student."""

from qdetr_hf.distillers.drd import (
    DEFAULT_DRD_WEIGHT,
    FQMResult,
    compute_drd,
    drd_loss,
    foreground_aware_query_matching,
)

__all__ = [
    "DEFAULT_DRD_WEIGHT",
    "FQMResult",
    "compute_drd",
    "drd_loss",
    "foreground_aware_query_matching",
]
