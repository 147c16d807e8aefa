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
from qdetr_hf.distillers.ida import (
    DEFAULT_IDA_GAMMA,
    DEFAULT_IDA_WEIGHT,
    IDaDetDistiller,
    entropy_distillation_loss,
    hungarian_query_pairs,
    information_discrepancy,
    select_top_discrepancy,
)
from qdetr_hf.distillers.kd_detr import (
    GENERAL_DISTRIBUTIONS,
    QUERY_WEIGHTINGS,
    KDDETRDistiller,
    kd_detr_query_weights,
    kd_detr_set_loss,
    sample_general_queries,
)
from qdetr_hf.distillers.qskd import (
    DETR_MATCHER_COSTS,
    GQSResult,
    LAPDPairs,
    QSKDDistiller,
    attention_foreground_mask,
    attention_guided_feature_loss,
    group_query_selection,
    local_alignment_matching,
    local_alignment_prediction_loss,
)

DISTILLERS: dict[str, type[Distiller]] = {
    DRDDistiller.name: DRDDistiller,
    QSKDDistiller.name: QSKDDistiller,
    KDDETRDistiller.name: KDDETRDistiller,
    IDaDetDistiller.name: IDaDetDistiller,
}
"""Distiller classes by method name (``"drd"``, ``"qskd"``, ``"kd_detr"``, ``"ida"``)."""

__all__ = [
    "DEFAULT_DRD_WEIGHT",
    "DEFAULT_IDA_GAMMA",
    "DEFAULT_IDA_WEIGHT",
    "DETR_MATCHER_COSTS",
    "DISTILLERS",
    "GENERAL_DISTRIBUTIONS",
    "QUERY_WEIGHTINGS",
    "DRDDistiller",
    "DetectorOutputs",
    "Distiller",
    "FQMResult",
    "GQSResult",
    "IDaDetDistiller",
    "KDDETRDistiller",
    "LAPDPairs",
    "QSKDDistiller",
    "attention_foreground_mask",
    "attention_guided_feature_loss",
    "capture_co_attended_features",
    "capture_decoder_inputs",
    "check_label_spaces",
    "compute_drd",
    "decoder_layers",
    "drd_loss",
    "entropy_distillation_loss",
    "foreground_aware_query_matching",
    "group_query_selection",
    "hungarian_query_pairs",
    "information_discrepancy",
    "kd_detr_query_weights",
    "kd_detr_set_loss",
    "layer_predictions",
    "local_alignment_matching",
    "local_alignment_prediction_loss",
    "resolve_layers",
    "run_decoder",
    "sample_general_queries",
    "select_top_discrepancy",
]
