"""QSKD (Liu et al., arXiv 2409.06443): Group Query Selection, attention-guided feature and local prediction
distillation; one module per part, the distiller in ``distiller``."""

from qdetr_hf.distillers.qskd.distiller import QSKDDistiller
from qdetr_hf.distillers.qskd.features import attention_foreground_mask, attention_guided_feature_loss
from qdetr_hf.distillers.qskd.predictions import LAPDPairs, local_alignment_matching, local_alignment_prediction_loss
from qdetr_hf.distillers.qskd.selection import DETR_MATCHER_COSTS, GQSResult, group_query_selection

__all__ = [
    "DETR_MATCHER_COSTS",
    "GQSResult",
    "LAPDPairs",
    "QSKDDistiller",
    "attention_foreground_mask",
    "attention_guided_feature_loss",
    "group_query_selection",
    "local_alignment_matching",
    "local_alignment_prediction_loss",
]
