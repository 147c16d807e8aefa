"""QSKDDistiller: GQS, attention-guided feature and local prediction distillation as one distiller."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from qdetr_hf.distillers.base import (
    DetectorOutputs,
    Distiller,
    check_non_negative,
    check_positive,
    hidden_state_predictions,
)
from qdetr_hf.distillers.qskd.features import (
    _ATTENTION_REDUCTIONS,
    _CHANNEL_REDUCTIONS,
    attention_foreground_mask,
    attention_guided_feature_loss,
)
from qdetr_hf.distillers.qskd.predictions import (
    _LOGITS_LOSSES,
    local_alignment_matching,
    local_alignment_prediction_loss,
)
from qdetr_hf.distillers.qskd.selection import (
    DETR_MATCHER_COSTS,
    GQSResult,
    group_query_selection,
)


def _matcher_costs(
    model: nn.Module | None, override: tuple[float | None, float | None, float | None]
) -> dict[str, float]:
    """Matcher costs: the constructor's where given, else the model config's, else DETR's defaults."""
    config: Any = getattr(model, "config", None)
    names = ("class_cost", "bbox_cost", "giou_cost")
    costs = {}
    for name, value, default in zip(names, override, DETR_MATCHER_COSTS):
        costs[name] = float(value if value is not None else getattr(config, name, default))
    return costs


class QSKDDistiller(Distiller):
    """QSKD: Knowledge Distillation via Query Selection for DETR (Liu et al., arXiv 2409.06443).

    Each step:

    1. **Group Query Selection** (:func:`group_query_selection`), run separately for the student (its final
       predictions) and the teacher (its own): Hungarian-matched queries are positives, unmatched queries with
       ``max GIoU(query, gt) > tau`` are hard negatives, each joins the group of its ground truth; the rest get nothing.
    2. **Attention-Guided Feature Distillation**: a mask ``M`` over the encoder tokens from the teacher's decoder
       cross-attention of its selected queries (:func:`attention_foreground_mask`), and
       ``loss_qskd_feature = feature_weight · Σ M·||F_T − φ(F_S)||² / Σ M`` on ``encoder_last_hidden_state``
       (:func:`attention_guided_feature_loss`). φ is the identity when the widths match, else an ``nn.Linear`` owned
       by this module (optimised by the trainer; build it with ``student_dim`` / ``teacher_dim``).
    3. **Local Alignment Prediction Distillation**: inside each ground-truth group, teacher and student members are
       paired by a small bipartite match (:func:`local_alignment_matching`, never a global match); on the pairs every
       student decoder layer's logits and boxes are distilled towards the teacher's final layer
       (:func:`local_alignment_prediction_loss`).

    Returned terms (weighted): ``loss_qskd_feature``, ``loss_qskd_logits``, ``loss_qskd_boxes`` (L1) and
    ``loss_qskd_giou``; statistics: ``qskd_positives`` / ``qskd_hard_negatives`` (student, whole batch),
    ``qskd_teacher_positives`` / ``qskd_teacher_hard_negatives``, ``qskd_pairs`` and ``qskd_mask_mean`` (mean of M over
    real tokens).

    Host synchronisation in ``forward``: only the two Hungarian assignments, which run on the host as in DETR's own
    loss (transformers' ``HungarianMatcher`` for GQS, :func:`local_alignment_matching`'s scipy solver for LAPD). The
    labels and boxes are not re-validated there (``validate=False``): the trainer has run DETR's loss on the same
    batch, whose matcher raises on degenerate boxes. Call the module functions for checked inputs.

    The paper publishes neither code nor constants, so **every value below is a project choice** except where noted:
    ``tau = 0.5`` (the reference notes suggest sweeping 0.3 / 0.5 / 0.7), ``top_k = None``, the attention layer
    (last) and reduction (max), max-normalisation of ``M``, the channel mean in the feature distance,
    ``feature_weight = 1``, ``temperature = 1``, KL as the default class loss, the teacher's arg-max class (no-object
    included) as the pairing class target, the LAPD pairing costs (= the matcher costs), pooled normalisation over the
    batch and averaging over layers. The matcher costs default to the models' configs (``class_cost`` / ``bbox_cost``
    / ``giou_cost``: DETR's 1 / 5 / 2); the LAPD weights 1 / 5 / 2 are DETR's loss coefficients, which the reference
    notes name as the starting point.

    Args:
        tau: Hard-negative GIoU threshold (project choice 0.5).
        top_k: At most this many hard negatives per ground truth (``None``: all).
        class_cost: Matcher class cost for GQS; ``None`` reads each model's ``config.class_cost``.
        bbox_cost: Matcher L1 cost; ``None`` reads ``config.bbox_cost``.
        giou_cost: Matcher GIoU cost; ``None`` reads ``config.giou_cost``.
        pair_class_cost: LAPD pairing class cost; ``None``: the student's matcher class cost.
        pair_bbox_cost: LAPD pairing L1 cost; ``None``: the student's matcher L1 cost.
        pair_giou_cost: LAPD pairing GIoU cost; ``None``: the student's matcher GIoU cost.
        feature_weight: Weight of the feature term (project choice 1).
        logits_weight: Weight of the class term (DETR's class weight 1).
        boxes_weight: Weight of the L1 box term (DETR's 5).
        giou_weight: Weight of the GIoU term (DETR's 2).
        temperature: KL temperature (project choice 1; the KL is scaled by T²).
        logits_loss: ``"kl"`` (softmax KL, default) or ``"bce"`` (sigmoid BCE on the object columns).
        attention_layer: Teacher decoder layer whose cross-attention builds the mask (Python index; default last).
        attention_reduction: ``"max"`` (default) or ``"sum"`` over the selected queries.
        channel_reduction: ``"mean"`` (default) or ``"sum"`` over channels in the feature distance.
        all_layers: Distil every student decoder layer (default) or only the final one.
        student_dim: Student ``d_model``; with ``teacher_dim`` and a different value, creates the adapter φ.
        teacher_dim: Teacher ``d_model``.

    Raises:
        ValueError: On an invalid argument.
    """

    name = "qskd"
    needs_attentions = True
    needs_hidden_states = True
    # Only for the flattened encoder padding mask (``encoder_attention_mask``), so padded tokens leave the mask.
    needs_decoder_inputs = True

    def __init__(
        self,
        tau: float = 0.5,
        top_k: int | None = None,
        class_cost: float | None = None,
        bbox_cost: float | None = None,
        giou_cost: float | None = None,
        pair_class_cost: float | None = None,
        pair_bbox_cost: float | None = None,
        pair_giou_cost: float | None = None,
        feature_weight: float = 1.0,
        logits_weight: float = 1.0,
        boxes_weight: float = 5.0,
        giou_weight: float = 2.0,
        temperature: float = 1.0,
        logits_loss: str = "kl",
        attention_layer: int = -1,
        attention_reduction: str = "max",
        channel_reduction: str = "mean",
        all_layers: bool = True,
        student_dim: int | None = None,
        teacher_dim: int | None = None,
    ) -> None:
        super().__init__()
        if not -1.0 <= tau <= 1.0:
            raise ValueError(f"QSKD tau is a GIoU threshold and must be in [-1, 1], got {tau!r}.")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
            raise ValueError(f"QSKD top_k must be None or an integer >= 0, got {top_k!r}.")
        for name, value in (
            ("class_cost", class_cost),
            ("bbox_cost", bbox_cost),
            ("giou_cost", giou_cost),
            ("pair_class_cost", pair_class_cost),
            ("pair_bbox_cost", pair_bbox_cost),
            ("pair_giou_cost", pair_giou_cost),
        ):
            if value is not None:
                check_non_negative(value, name)
        for name, value in (
            ("feature_weight", feature_weight),
            ("logits_weight", logits_weight),
            ("boxes_weight", boxes_weight),
            ("giou_weight", giou_weight),
        ):
            check_non_negative(value, name)
        check_positive(temperature, "QSKD temperature")
        if logits_loss not in _LOGITS_LOSSES:
            raise ValueError(f"QSKD logits_loss must be one of {_LOGITS_LOSSES}, got {logits_loss!r}.")
        if attention_reduction not in _ATTENTION_REDUCTIONS:
            raise ValueError(
                f"QSKD attention_reduction must be one of {_ATTENTION_REDUCTIONS}, got {attention_reduction!r}."
            )
        if channel_reduction not in _CHANNEL_REDUCTIONS:
            raise ValueError(f"QSKD channel_reduction must be one of {_CHANNEL_REDUCTIONS}, got {channel_reduction!r}.")
        for name, dim in (("student_dim", student_dim), ("teacher_dim", teacher_dim)):
            if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0):
                raise ValueError(f"QSKD {name} must be None or a positive integer, got {dim!r}.")
        self.tau = tau
        self.top_k = top_k
        self.matcher_costs = (class_cost, bbox_cost, giou_cost)
        self.pair_costs = (pair_class_cost, pair_bbox_cost, pair_giou_cost)
        self.feature_weight = feature_weight
        self.logits_weight = logits_weight
        self.boxes_weight = boxes_weight
        self.giou_weight = giou_weight
        self.temperature = temperature
        self.logits_loss = logits_loss
        self.attention_layer = attention_layer
        self.attention_reduction = attention_reduction
        self.channel_reduction = channel_reduction
        self.all_layers = all_layers
        self.adapter: nn.Linear | None = None
        if student_dim is not None and teacher_dim is not None and student_dim != teacher_dim:
            self.adapter = nn.Linear(student_dim, teacher_dim)

    def select(
        self, outputs: DetectorOutputs, labels: Sequence[Mapping[str, torch.Tensor]], validate: bool = False
    ) -> GQSResult:
        """Group Query Selection on one model's final predictions, with this distiller's settings (by default without
        re-validating the labels: see the class docstring)."""
        return group_query_selection(
            outputs.logits,
            outputs.pred_boxes,
            labels,
            **_matcher_costs(outputs.model, self.matcher_costs),
            tau=self.tau,
            top_k=self.top_k,
            validate=validate,
        )

    def foreground_mask(self, teacher: DetectorOutputs, selection: GQSResult) -> torch.Tensor:
        """The (B, HW) attention-guided mask M from the teacher's cross-attention of its selected queries."""
        attentions = getattr(teacher.outputs, "cross_attentions", None)
        if not attentions:
            raise ValueError(
                "QSKD needs the teacher's decoder cross-attention maps: run it with output_attentions=True and eager "
                "attention (the distillation trainer does this when needs_attentions is set)."
            )
        if not -len(attentions) <= self.attention_layer < len(attentions):
            raise ValueError(
                f"QSKD attention_layer {self.attention_layer} is out of range for a teacher with {len(attentions)} "
                "decoder layers."
            )
        attention = attentions[self.attention_layer]
        return attention_foreground_mask(
            attention, selection.selected, _token_mask(teacher, attention.shape[-1]), self.attention_reduction
        )

    def forward(
        self, student: DetectorOutputs, teacher: DetectorOutputs, labels: Sequence[Mapping[str, torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        student_selection = self.select(student, labels)
        teacher_selection = self.select(teacher, labels)

        # Attention-guided feature distillation on the encoder memory.
        student_memory = getattr(student.outputs, "encoder_last_hidden_state", None)
        teacher_memory = getattr(teacher.outputs, "encoder_last_hidden_state", None)
        if student_memory is None or teacher_memory is None:
            raise ValueError("QSKD needs both models' encoder_last_hidden_state (DETR outputs).")
        mask = self.foreground_mask(teacher, teacher_selection)
        feature = attention_guided_feature_loss(
            student_memory, teacher_memory, mask, self.adapter, channel_reduction=self.channel_reduction
        )

        # Local alignment prediction distillation.
        student_costs = _matcher_costs(student.model, self.matcher_costs)
        pair_costs = {
            name: float(value) if value is not None else student_costs[name]
            for name, value in zip(("class_cost", "bbox_cost", "giou_cost"), self.pair_costs)
        }
        pairs = local_alignment_matching(
            student.logits,
            student.pred_boxes,
            student_selection.group,
            teacher.logits,
            teacher.pred_boxes,
            teacher_selection.group,
            **pair_costs,
            validate=False,
        )
        student_logits, student_boxes = self._student_layers(student)
        terms = local_alignment_prediction_loss(
            student_logits,
            student_boxes,
            teacher.logits,
            teacher.pred_boxes,
            pairs.teacher_index,
            temperature=self.temperature,
            logits_loss=self.logits_loss,
            validate=False,
        )
        token_mask = _token_mask(teacher, mask.shape[-1])
        real_tokens = mask.numel() if token_mask is None else token_mask.sum()
        return {
            "loss_qskd_feature": self.feature_weight * feature,
            "loss_qskd_logits": self.logits_weight * terms["logits"],
            "loss_qskd_boxes": self.boxes_weight * terms["l1"],
            "loss_qskd_giou": self.giou_weight * terms["giou"],
            "qskd_positives": student_selection.num_positives.detach().float(),
            "qskd_hard_negatives": student_selection.num_hard_negatives.detach().float(),
            "qskd_teacher_positives": teacher_selection.num_positives.detach().float(),
            "qskd_teacher_hard_negatives": teacher_selection.num_hard_negatives.detach().float(),
            "qskd_pairs": pairs.num_pairs.detach().float(),
            "qskd_mask_mean": (mask.sum() / real_tokens).detach().float(),
        }

    def _student_layers(self, student: DetectorOutputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-layer student logits / boxes (L, B, Qs, ·), or the final layer only."""
        if not self.all_layers:
            return student.logits, student.pred_boxes
        hidden = getattr(student.outputs, "decoder_hidden_states", None)
        if hidden is None or student.model is None:
            raise ValueError(
                "QSKD distils every student decoder layer (all_layers=True) and needs the student's "
                "decoder_hidden_states (output_hidden_states=True) and its model; pass all_layers=False to distil "
                "only the final layer."
            )
        return hidden_state_predictions(student)

    def extra_repr(self) -> str:
        adapter = (
            f", adapter={self.adapter.in_features}->{self.adapter.out_features}" if self.adapter is not None else ""
        )
        return (
            f"tau={self.tau}, top_k={self.top_k}, weights=(feature={self.feature_weight}, logits={self.logits_weight}, "
            f"boxes={self.boxes_weight}, giou={self.giou_weight}), logits_loss={self.logits_loss!r}, "
            f"temperature={self.temperature}{adapter}"
        )


def _token_mask(outputs: DetectorOutputs, num_tokens: int) -> torch.Tensor | None:
    """(B, HW) bool mask of real encoder tokens, from the captured decoder inputs; ``None`` when nothing is padded."""
    captured = (outputs.decoder_inputs or {}).get("encoder_attention_mask")
    if captured is not None:
        if captured.ndim != 2 or captured.shape[-1] != num_tokens:
            raise ValueError(
                f"the captured encoder_attention_mask {tuple(captured.shape)} does not cover the {num_tokens} "
                "encoder tokens"
            )
        return captured.to(torch.bool)
    if outputs.pixel_mask is None or bool(outputs.pixel_mask.bool().all()):
        return None
    raise ValueError(
        "QSKD needs the flattened encoder padding mask of a padded batch: capture the teacher's decoder inputs "
        "(needs_decoder_inputs=True, which the distillation trainer honours)."
    )
