"""QSKD (Liu et al., arXiv 2409.06443): Group Query Selection, attention-guided feature and local prediction distillation."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn
from transformers.loss.loss_for_object_detection import HungarianMatcher

from qdetr_hf.box_ops import (
    center_to_corners,
    compute_dtype,
    elementwise_generalized_box_iou,
    pad_targets,
    pairwise_generalized_box_iou,
)
from qdetr_hf.distillers.base import (
    DetectorOutputs,
    Distiller,
    check_non_negative,
    check_positive,
    hidden_state_predictions,
)

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

#: DETR's Hungarian matching costs (class, L1, GIoU), used when neither the constructor nor a model config gives them.
DETR_MATCHER_COSTS: tuple[float, float, float] = (1.0, 5.0, 2.0)

_ATTENTION_REDUCTIONS = ("max", "sum")
_CHANNEL_REDUCTIONS = ("mean", "sum")
_LOGITS_LOSSES = ("kl", "bce")


# ---------------------------------------------------------------------------------------------------------------------
# Validation helpers
# ---------------------------------------------------------------------------------------------------------------------
def _check_predictions(logits: torch.Tensor, boxes: torch.Tensor, who: str) -> None:
    if not isinstance(logits, torch.Tensor) or logits.ndim != 3 or logits.shape[-1] < 2:
        raise ValueError(
            f"{who} logits must have shape (B, Q, num_labels + 1) with at least one class, got "
            f"{tuple(getattr(logits, 'shape', ()))}"
        )
    if not isinstance(boxes, torch.Tensor) or boxes.ndim != 3 or boxes.shape[-1] != 4:
        raise ValueError(
            f"{who} boxes must have shape (B, Q, 4) (normalised cxcywh), got {tuple(getattr(boxes, 'shape', ()))}"
        )
    if boxes.shape[:2] != logits.shape[:2]:
        raise ValueError(f"{who} logits {tuple(logits.shape)} and boxes {tuple(boxes.shape)} disagree on (B, Q)")
    if logits.shape[1] == 0:
        raise ValueError(f"{who} has no queries (Q = 0)")


def _check_groups(groups: torch.Tensor, shape: tuple[int, int], name: str) -> None:
    if (
        not isinstance(groups, torch.Tensor)
        or groups.is_floating_point()
        or groups.is_complex()
        or groups.dtype == torch.bool
        or tuple(groups.shape) != shape
    ):
        raise ValueError(
            f"{name} must be an integer tensor of shape {shape} (-1 = not selected), got "
            f"{getattr(groups, 'dtype', type(groups).__name__)} {tuple(getattr(groups, 'shape', ()))}"
        )


def _check_costs(class_cost: float, bbox_cost: float, giou_cost: float) -> None:
    check_non_negative(class_cost, "class_cost")
    check_non_negative(bbox_cost, "bbox_cost")
    check_non_negative(giou_cost, "giou_cost")
    if class_cost == 0 and bbox_cost == 0 and giou_cost == 0:
        raise ValueError("class_cost, bbox_cost and giou_cost cannot all be 0 (the matching would be arbitrary)")


# ---------------------------------------------------------------------------------------------------------------------
# 1. Group Query Selection
# ---------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GQSResult:
    """Output of :func:`group_query_selection`.

    Attributes:
        group: (B, Q) long, the ground-truth slot (index into the image's ``labels`` boxes) whose group the query joins;
            -1 for queries that are not selected (easy negatives).
        positive: (B, Q) bool, True for queries matched to a ground truth by the Hungarian matcher.
        best_giou: (B, Q) float, the largest GIoU of each query's box with a ground-truth box of its image
            (-2, below any GIoU, for images without ground truth).
    """

    group: torch.Tensor
    positive: torch.Tensor
    best_giou: torch.Tensor

    @property
    def selected(self) -> torch.Tensor:
        """(B, Q) bool: positives and hard negatives."""
        return self.group >= 0

    @property
    def hard_negative(self) -> torch.Tensor:
        """(B, Q) bool: selected queries that the matcher did not match."""
        return (self.group >= 0) & ~self.positive

    @property
    def num_positives(self) -> torch.Tensor:
        """Number of positives in the batch (0-dim long tensor)."""
        return self.positive.sum()

    @property
    def num_hard_negatives(self) -> torch.Tensor:
        """Number of hard negatives in the batch (0-dim long tensor)."""
        return self.hard_negative.sum()


@torch.no_grad()
def group_query_selection(
    logits: torch.Tensor,
    pred_boxes: torch.Tensor,
    labels: Sequence[Mapping[str, torch.Tensor]],
    *,
    class_cost: float = DETR_MATCHER_COSTS[0],
    bbox_cost: float = DETR_MATCHER_COSTS[1],
    giou_cost: float = DETR_MATCHER_COSTS[2],
    tau: float = 0.5,
    top_k: int | None = None,
    validate: bool = True,
) -> GQSResult:
    """QSKD's Group Query Selection (GQS): positives, hard negatives and their ground-truth groups.

    Per image:

    * **Positives**: the queries DETR's Hungarian matcher assigns to a ground truth (transformers'
      ``HungarianMatcher``: cost ``class_cost·(-p[class]) + bbox_cost·L1 + giou_cost·(-GIoU)``, softmax over all
      ``num_labels + 1`` columns). A positive joins the group of its matched ground truth.
    * **Hard negatives**: unmatched queries whose largest GIoU with a ground-truth box is strictly above ``tau``; each
      joins the group of that ground truth (``argmax`` GIoU, ties to the lowest ground-truth index). With ``top_k``,
      only the ``top_k`` hard negatives with the highest GIoU are kept in each group (ties to the lowest query
      index).
    * **Easy negatives**: every other query; ``group = -1``, they get no distillation.

    Images without ground truth select nothing. Runs under ``torch.no_grad`` (one ``linear_sum_assignment`` per image,
    as in DETR) and computes geometry in float32 (float64 stays float64). The matcher's host round trip (scipy) is
    the only host synchronisation with ``validate=False``.

    Args:
        logits: (B, Q, num_labels + 1) final-layer class logits (last column: no object).
        pred_boxes: (B, Q, 4) final-layer boxes, normalised cxcywh.
        labels: One dict per image with ``"class_labels"`` (n,) and ``"boxes"`` (n, 4) normalised cxcywh.
        class_cost: Matcher weight of the class term (DETR config ``class_cost``: 1).
        bbox_cost: Matcher weight of the L1 term (DETR config ``bbox_cost``: 5).
        giou_cost: Matcher weight of the GIoU term (DETR config ``giou_cost``: 2).
        tau: Hard-negative GIoU threshold, in [-1, 1] (project choice 0.5; the paper's value is not public).
        top_k: Keep at most this many hard negatives per ground truth (``None``: all of them).
        validate: Check the label values (class range, finite boxes with non-negative sizes) on the host.

    Returns:
        A :class:`GQSResult`.

    Raises:
        ValueError: On inconsistent shapes, (with ``validate``) a class label outside ``[0, num_labels)`` or a bad
            box, ``tau`` outside [-1, 1], a negative ``top_k``, or bad matcher costs.
    """
    _check_predictions(logits, pred_boxes, "group_query_selection")
    batch, num_queries, num_columns = logits.shape
    if isinstance(labels, Mapping) or len(labels) != batch:
        raise ValueError(
            f"labels must be a list with one target dict per image ({batch}), got "
            f"{type(labels).__name__ if isinstance(labels, Mapping) else len(labels)}"
        )
    if not -1.0 <= tau <= 1.0:
        raise ValueError(f"tau must be in [-1, 1] (a GIoU threshold), got {tau}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
        raise ValueError(f"top_k must be None or an integer >= 0, got {top_k!r}")
    _check_costs(class_cost, bbox_cost, giou_cost)

    device = logits.device
    dtype = compute_dtype(pred_boxes)
    gt_boxes, gt_classes, gt_mask = pad_targets(labels, device=device, validate=validate)
    if validate:
        real_classes = gt_classes[gt_mask]
        if real_classes.numel() and bool(((real_classes < 0) | (real_classes >= num_columns - 1)).any()):
            raise ValueError(
                f"class_labels must lie in [0, {num_columns - 1}) for logits with {num_columns - 1} classes + "
                f"no-object, got {sorted(set(real_classes.tolist()))}"
            )
    boxes = pred_boxes.detach().to(dtype)
    gt_boxes = gt_boxes.to(dtype)
    num_gt = [len(target["boxes"]) for target in labels]  # shapes: known on the host

    # Positives: DETR's Hungarian matcher (per image linear_sum_assignment inside).
    group = torch.full((batch, num_queries), -1, dtype=torch.long, device=device)
    if any(num_gt):
        matcher = HungarianMatcher(class_cost=class_cost, bbox_cost=bbox_cost, giou_cost=giou_cost)
        # pad_targets keeps each image's boxes first, in order: its first n slots are the real ones.
        targets = [{"class_labels": gt_classes[i, :n], "boxes": gt_boxes[i, :n]} for i, n in enumerate(num_gt)]
        # The matcher's assignment is a host step (scipy, as in DETR's own loss): its indices come back from the host.
        indices = matcher({"logits": logits.detach().to(dtype), "pred_boxes": boxes}, targets)
        image = torch.cat([torch.full_like(q, i) for i, (q, _) in enumerate(indices)]).to(device)
        query = torch.cat([q for q, _ in indices]).to(device)
        matched_gt = torch.cat([g for _, g in indices]).to(device)
        group[image, query] = matched_gt
    positive = group >= 0

    # Hard negatives: unmatched queries with max GIoU to a real ground truth above tau.
    giou = pairwise_generalized_box_iou(
        center_to_corners(boxes), center_to_corners(gt_boxes), validate=validate
    )  # (B, Q, G)
    giou = giou.masked_fill(~gt_mask[:, None, :], -2.0)
    best_giou, best_gt = giou.max(dim=-1)  # ties: lowest ground-truth index
    hard = ~positive & (best_giou > tau)
    if top_k is not None:
        slots = torch.arange(gt_mask.shape[1], device=device)
        in_group = hard[:, None, :] & (best_gt[:, None, :] == slots[None, :, None])
        score = torch.where(in_group, best_giou[:, None, :], float("-inf"))  # (B, G, Q)
        order = torch.sort(score, dim=-1, descending=True, stable=True).indices
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(num_queries, device=device).expand_as(order))
        hard = (in_group & (rank < top_k)).any(dim=1)
    group = torch.where(hard, best_gt, group)
    return GQSResult(group=group, positive=positive, best_giou=best_giou)


# ---------------------------------------------------------------------------------------------------------------------
# 2. Attention-Guided Feature Distillation
# ---------------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def attention_foreground_mask(
    cross_attention: torch.Tensor,
    selected: torch.Tensor,
    token_mask: torch.Tensor | None = None,
    reduction: str = "max",
) -> torch.Tensor:
    """QSKD's foreground mask over the encoder tokens from the teacher's decoder cross-attention of selected queries.

    ``A = mean over heads`` of the attention map; ``M_p = reduce_{q selected} A[q, p]`` with ``reduce`` = max (default)
    or sum; padded tokens (``token_mask`` False) are set to 0; then each image is divided by its maximum so ``M`` lies
    in [0, 1] with 1 at the most attended token (project choice: max-normalisation rather than min-max, so tokens
    that no selected query attends to keep weight 0). Images without selected queries get ``M = 0``.

    Args:
        cross_attention: (B, heads, Q, HW) attention probabilities of one decoder layer, or (B, Q, HW) already
            head-averaged.
        selected: (B, Q) bool, the queries whose attention builds the mask (the teacher's GQS selection).
        token_mask: (B, HW) bool, True for real (non-padded) tokens; ``None``: every token is real.
        reduction: ``"max"`` or ``"sum"`` over the selected queries.

    Returns:
        (B, HW) float mask in [0, 1] (detached).

    Raises:
        ValueError: On inconsistent shapes or an unknown ``reduction``.
    """
    if reduction not in _ATTENTION_REDUCTIONS:
        raise ValueError(f"reduction must be one of {_ATTENTION_REDUCTIONS}, got {reduction!r}")
    if not isinstance(cross_attention, torch.Tensor) or cross_attention.ndim not in (3, 4):
        raise ValueError(
            "cross_attention must have shape (B, heads, Q, HW) or (B, Q, HW), got "
            f"{tuple(getattr(cross_attention, 'shape', ()))}"
        )
    attention = cross_attention.detach()
    attention = attention.to(compute_dtype(attention))
    if attention.ndim == 4:
        attention = attention.mean(dim=1)
    batch, num_queries, num_tokens = attention.shape
    if not isinstance(selected, torch.Tensor) or selected.dtype != torch.bool or selected.shape != (batch, num_queries):
        raise ValueError(
            f"selected must be a bool tensor of shape {(batch, num_queries)}, got "
            f"{getattr(selected, 'dtype', type(selected).__name__)} {tuple(getattr(selected, 'shape', ()))}"
        )
    attention = torch.where(selected.to(attention.device)[..., None], attention, 0.0)
    mask = attention.amax(dim=1) if reduction == "max" else attention.sum(dim=1)  # (B, HW)
    if token_mask is not None:
        if token_mask.shape != (batch, num_tokens):
            raise ValueError(f"token_mask must have shape {(batch, num_tokens)}, got {tuple(token_mask.shape)}")
        mask = torch.where(token_mask.to(device=mask.device, dtype=torch.bool), mask, 0.0)
    peak = mask.amax(dim=-1, keepdim=True)
    return torch.where(peak > 0, mask / peak.clamp_min(torch.finfo(mask.dtype).tiny), 0.0)


def attention_guided_feature_loss(
    student_memory: torch.Tensor,
    teacher_memory: torch.Tensor,
    mask: torch.Tensor,
    adapter: nn.Module | None = None,
    channel_reduction: str = "mean",
) -> torch.Tensor:
    """QSKD's attention-guided feature loss ``Σ M·||F_T − φ(F_S)||² / Σ M`` on the encoder memory.

    The per-token distance is the squared L2 norm over channels, **averaged** over the teacher's channels by default
    (``channel_reduction="mean"``, project choice: keeps the term's scale independent of ``d_model``; ``"sum"`` is
    the literal squared norm, ``d_model`` times larger). The sums over tokens run over the whole batch (pooled, so
    the value does not depend on how images are split into batches). Where ``Σ M = 0`` the loss is an exact 0 that
    is still connected to ``student_memory`` in the autograd graph. Tokens with ``M = 0`` never reach the gradient
    (their difference is masked before squaring), so they may hold anything. The teacher memory is detached; computed
    in float32 (float64 stays float64).

    Args:
        student_memory: (B, HW, d_S) student encoder output (``encoder_last_hidden_state``).
        teacher_memory: (B, HW, d_T) teacher encoder output.
        mask: (B, HW) non-negative weights (:func:`attention_foreground_mask`), detached.
        adapter: φ, mapping d_S to d_T (e.g. ``nn.Linear``); ``None`` is the identity (needs d_S = d_T).
        channel_reduction: ``"mean"`` or ``"sum"`` over channels.

    Returns:
        0-dim loss tensor.

    Raises:
        ValueError: On inconsistent shapes, widths that differ without an adapter, or an unknown reduction.
    """
    if channel_reduction not in _CHANNEL_REDUCTIONS:
        raise ValueError(f"channel_reduction must be one of {_CHANNEL_REDUCTIONS}, got {channel_reduction!r}")
    if student_memory.ndim != 3 or teacher_memory.ndim != 3:
        raise ValueError(
            "student_memory and teacher_memory must have shape (B, HW, d), got "
            f"{tuple(student_memory.shape)} and {tuple(teacher_memory.shape)}"
        )
    if student_memory.shape[:2] != teacher_memory.shape[:2]:
        raise ValueError(
            "student and teacher encoder memories must cover the same tokens (same B and HW; same backbone stride "
            f"and input size), got {tuple(student_memory.shape)} and {tuple(teacher_memory.shape)}"
        )
    if mask.shape != student_memory.shape[:2]:
        raise ValueError(f"mask must have shape {tuple(student_memory.shape[:2])}, got {tuple(mask.shape)}")
    projected = adapter(student_memory) if adapter is not None else student_memory
    if projected.shape[-1] != teacher_memory.shape[-1]:
        raise ValueError(
            f"encoder widths differ (student {student_memory.shape[-1]}"
            + (f", adapted to {projected.shape[-1]}" if adapter is not None else "")
            + f", teacher {teacher_memory.shape[-1]}): QSKD needs an adapter φ mapping the student width to the "
            "teacher width (QSKDDistiller(student_dim=..., teacher_dim=...))"
        )
    dtype = compute_dtype(projected)
    weight = mask.detach().to(device=projected.device, dtype=dtype)
    keep = weight > 0
    difference = torch.where(keep[..., None], projected.to(dtype) - teacher_memory.detach().to(dtype), 0.0)
    distance = difference.square().mean(dim=-1) if channel_reduction == "mean" else difference.square().sum(dim=-1)
    total = torch.where(keep, weight, 0.0).sum()
    return (weight * distance).sum() / total.clamp_min(torch.finfo(dtype).tiny)


# ---------------------------------------------------------------------------------------------------------------------
# 3. Local Alignment Prediction Distillation
# ---------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LAPDPairs:
    """Output of :func:`local_alignment_matching`.

    Attributes:
        teacher_index: (B, Qs) long, the teacher query paired with each student query, -1 where unpaired.
    """

    teacher_index: torch.Tensor

    @property
    def paired(self) -> torch.Tensor:
        """(B, Qs) bool, student queries with a teacher partner."""
        return self.teacher_index >= 0

    @property
    def num_pairs(self) -> torch.Tensor:
        """Number of pairs in the batch (0-dim long tensor)."""
        return self.paired.sum()


def _pair_cost(
    student_logits: torch.Tensor,
    student_boxes: torch.Tensor,
    teacher_logits: torch.Tensor,
    teacher_boxes: torch.Tensor,
    class_cost: float,
    bbox_cost: float,
    giou_cost: float,
    validate: bool,
) -> torch.Tensor:
    """(B, Qs, Qt) DETR-style matching cost between student and teacher predictions (teacher as the target)."""
    dtype = compute_dtype(student_boxes)
    student_prob = student_logits.detach().to(dtype).softmax(dim=-1)  # (B, Qs, C + 1)
    teacher_class = teacher_logits.detach().argmax(dim=-1)  # (B, Qt), over all C + 1 columns
    index = teacher_class[:, None, :].expand(-1, student_prob.shape[1], -1)
    class_term = -torch.gather(student_prob, 2, index)  # -p_S[teacher's class]
    student = student_boxes.detach().to(dtype)
    teacher = teacher_boxes.detach().to(device=student.device, dtype=dtype)
    l1 = torch.cdist(student, teacher, p=1)
    giou = pairwise_generalized_box_iou(center_to_corners(student), center_to_corners(teacher), validate=validate)
    return class_cost * class_term + bbox_cost * l1 - giou_cost * giou


@torch.no_grad()
def local_alignment_matching(
    student_logits: torch.Tensor,
    student_boxes: torch.Tensor,
    student_groups: torch.Tensor,
    teacher_logits: torch.Tensor,
    teacher_boxes: torch.Tensor,
    teacher_groups: torch.Tensor,
    *,
    class_cost: float = DETR_MATCHER_COSTS[0],
    bbox_cost: float = DETR_MATCHER_COSTS[1],
    giou_cost: float = DETR_MATCHER_COSTS[2],
    validate: bool = True,
) -> LAPDPairs:
    """QSKD's local alignment: a bipartite match of teacher and student queries **inside each ground-truth group**.

    The cost of pairing student query j with teacher query k is DETR's matching cost with the teacher's prediction
    as the target: ``class_cost·(-p_S,j[ĉ_k]) + bbox_cost·||b_j - b_k||_1 - giou_cost·GIoU(b_j, b_k)``, where
    ``ĉ_k`` is the teacher's arg-max class over all ``num_labels + 1`` columns (no-object included; project choice).
    In every group ``min(#students, #teachers)`` pairs minimise the summed cost; queries of different groups are
    never paired, and no global match is ever made. Implementation: one ``linear_sum_assignment`` per image on the
    selected queries, with every cross-group entry set to a constant large enough that the optimum pairs each group
    maximally and internally (this equals an independent Hungarian match per group, up to ties); cross-group pairs
    the solver had to make are dropped. The assignment runs on the host (scipy, as DETR's matcher), so the call
    copies the cost and the groups to the host once.

    Args:
        student_logits: (B, Qs, C + 1) student final-layer logits.
        student_boxes: (B, Qs, 4) student final-layer boxes (normalised cxcywh).
        student_groups: (B, Qs) integer group of each student query (:attr:`GQSResult.group`; -1 = not selected).
        teacher_logits: (B, Qt, C + 1) teacher final-layer logits.
        teacher_boxes: (B, Qt, 4) teacher final-layer boxes.
        teacher_groups: (B, Qt) integer group of each teacher query.
        class_cost: Weight of the class term (project choice: the matcher's, DETR 1).
        bbox_cost: Weight of the L1 term (DETR 5).
        giou_cost: Weight of the GIoU term (DETR 2).
        validate: Check that no box is degenerate (reads the boxes on the host).

    Returns:
        :class:`LAPDPairs` (``teacher_index`` -1 for unpaired student queries).

    Raises:
        ValueError: On inconsistent shapes, bad costs or (with ``validate``) degenerate boxes.
    """
    _check_predictions(student_logits, student_boxes, "student")
    _check_predictions(teacher_logits, teacher_boxes, "teacher")
    batch, num_student = student_logits.shape[:2]
    if teacher_logits.shape[0] != batch or teacher_logits.shape[-1] != student_logits.shape[-1]:
        raise ValueError(
            "teacher and student predictions must have the same batch size and classes, got logits "
            f"{tuple(teacher_logits.shape)} and {tuple(student_logits.shape)}"
        )
    _check_groups(student_groups, (batch, num_student), "student_groups")
    _check_groups(teacher_groups, tuple(teacher_logits.shape[:2]), "teacher_groups")
    _check_costs(class_cost, bbox_cost, giou_cost)

    cost = _pair_cost(
        student_logits, student_boxes, teacher_logits, teacher_boxes, class_cost, bbox_cost, giou_cost, validate
    )
    teacher_index = _assign_within_groups(cost, student_groups, teacher_groups)
    return LAPDPairs(teacher_index=teacher_index.to(student_logits.device))


def _assign_within_groups(
    cost: torch.Tensor, student_groups: torch.Tensor, teacher_groups: torch.Tensor
) -> torch.Tensor:
    """(B, Qs) long on the host: the teacher query paired with each student query inside its group, -1 if none.

    One ``linear_sum_assignment`` per image on the selected queries, with every cross-group entry set to a constant
    large enough that the optimum pairs each group maximally and internally; cross-group pairs are dropped.
    """
    # The assignment is scipy's, on the host (as in DETR's matcher): the one device-to-host step of LAPD.
    cost, student_groups, teacher_groups = cost.double().cpu(), student_groups.cpu(), teacher_groups.cpu()
    batch, num_student = student_groups.shape
    teacher_index = torch.full((batch, num_student), -1, dtype=torch.long)
    for image in range(batch):  # one small assignment per image, as DETR's matcher does
        rows = (student_groups[image] >= 0).nonzero().squeeze(1)
        cols = (teacher_groups[image] >= 0).nonzero().squeeze(1)
        same = student_groups[image, rows][:, None] == teacher_groups[image, cols][None, :]
        if not bool(same.any()):
            continue
        sub = cost[image][rows][:, cols]
        within = sub[same]
        low, high = within.min(), within.max()
        # Any assignment with one more cross-group pair costs more than every one with fewer.
        cross = high + (high - low + 1.0) * (min(len(rows), len(cols)) + 1)
        sub = torch.where(same, sub, cross)
        row, col = linear_sum_assignment(sub.numpy())
        row, col = torch.as_tensor(row, dtype=torch.long), torch.as_tensor(col, dtype=torch.long)
        keep = same[row, col]
        teacher_index[image, rows[row[keep]]] = cols[col[keep]]
    return teacher_index


def local_alignment_prediction_loss(
    student_logits: torch.Tensor,
    student_boxes: torch.Tensor,
    teacher_logits: torch.Tensor,
    teacher_boxes: torch.Tensor,
    teacher_index: torch.Tensor,
    *,
    temperature: float = 1.0,
    logits_loss: str = "kl",
    validate: bool = True,
) -> dict[str, torch.Tensor]:
    """QSKD's local alignment prediction distillation on the paired queries (unweighted terms).

    For every student decoder layer ``l`` and pair ``(j, k)`` (student j, teacher k, teacher final layer):

    * ``logits``: ``T²·KL(softmax(z_T,k / T) || softmax(z_S,lj / T))`` over all ``num_labels + 1`` columns
      (``logits_loss="kl"``), or the sigmoid binary cross-entropy ``Σ_c BCE(σ(z_S,ljc), σ(z_T,kc))`` over the
      ``num_labels`` object columns (``logits_loss="bce"``, for sigmoid classifiers; the no-object column is dropped and
      ``temperature`` is not used);
    * ``l1``: ``||b_S,lj − b_T,k||_1`` (normalised cxcywh, summed over the 4 coordinates, as DETR's ``loss_bbox``);
    * ``giou``: ``1 − GIoU(b_S,lj, b_T,k)``.

    Each term is averaged over all pairs of the batch (pooled) and over layers. Without pairs every term is an exact
    0 connected to the student tensors. Unpaired rows are replaced by their (detached) teacher values before any
    arithmetic, so they never reach the gradient. Teacher tensors are detached; computed in float32.

    Args:
        student_logits: (L, B, Qs, C + 1) per-layer student logits
            (:func:`~qdetr_hf.distillers.base.hidden_state_predictions`)
            or (B, Qs, C + 1) for one layer.
        student_boxes: (L, B, Qs, 4) or (B, Qs, 4) student boxes, same layout.
        teacher_logits: (B, Qt, C + 1) teacher final-layer logits.
        teacher_boxes: (B, Qt, 4) teacher final-layer boxes.
        teacher_index: (B, Qs) long, paired teacher query per student query, -1 = unpaired (:class:`LAPDPairs`).
        temperature: KL temperature T > 0 (project choice 1).
        logits_loss: ``"kl"`` or ``"bce"``.
        validate: Check ``teacher_index`` against ``[-1, Qt)`` and the boxes for degenerate ones (reads them on the
            host); ``False`` makes no host synchronisation.

    Returns:
        ``{"logits": ..., "l1": ..., "giou": ...}`` 0-dim tensors.

    Raises:
        ValueError: On inconsistent shapes, (with ``validate``) an out-of-range index or a degenerate box, a
            non-positive temperature or an unknown ``logits_loss``.
    """
    if logits_loss not in _LOGITS_LOSSES:
        raise ValueError(f"logits_loss must be one of {_LOGITS_LOSSES}, got {logits_loss!r}")
    check_positive(temperature, "temperature")
    if student_logits.ndim not in (3, 4) or student_boxes.ndim != student_logits.ndim:
        raise ValueError(
            "student_logits and student_boxes must both be (B, Qs, ·) or both (L, B, Qs, ·), got "
            f"{tuple(student_logits.shape)} and {tuple(student_boxes.shape)}"
        )
    logits_s = student_logits if student_logits.ndim == 4 else student_logits.unsqueeze(0)
    boxes_s = student_boxes if student_boxes.ndim == 4 else student_boxes.unsqueeze(0)
    num_layers, batch, num_student, num_columns = logits_s.shape
    if boxes_s.shape != (num_layers, batch, num_student, 4):
        raise ValueError(
            f"student_boxes must have shape {(num_layers, batch, num_student, 4)}, got {tuple(boxes_s.shape)}"
        )
    _check_predictions(teacher_logits, teacher_boxes, "teacher")
    if teacher_logits.shape[0] != batch or teacher_logits.shape[-1] != num_columns:
        raise ValueError(
            f"teacher_logits {tuple(teacher_logits.shape)} must match the student's batch {batch} and "
            f"{num_columns} class columns"
        )
    _check_groups(teacher_index, (batch, num_student), "teacher_index")
    num_teacher = teacher_logits.shape[1]
    device = logits_s.device
    teacher_index = teacher_index.to(device)
    if validate and bool(((teacher_index >= num_teacher) | (teacher_index < -1)).any()):
        raise ValueError(f"teacher_index must lie in [-1, {num_teacher}), got values outside")

    dtype = compute_dtype(boxes_s)
    paired = teacher_index >= 0  # (B, Qs)
    index = teacher_index.clamp_min(0)
    partner_logits = torch.gather(
        teacher_logits.detach().to(device=device, dtype=dtype), 1, index[..., None].expand(-1, -1, num_columns)
    )  # (B, Qs, C + 1)
    partner_boxes = torch.gather(
        teacher_boxes.detach().to(device=device, dtype=dtype), 1, index[..., None].expand(-1, -1, 4)
    )
    keep = paired[None, :, :, None]
    logits_s = torch.where(keep, logits_s.to(dtype), partner_logits)  # (L, B, Qs, C + 1)
    boxes_s = torch.where(keep, boxes_s.to(dtype), partner_boxes)

    if logits_loss == "kl":
        log_student = F.log_softmax(logits_s / temperature, dim=-1)
        log_teacher = F.log_softmax(partner_logits / temperature, dim=-1).expand_as(log_student)
        class_term = F.kl_div(log_student, log_teacher, reduction="none", log_target=True).sum(-1) * temperature**2
    else:
        target = partner_logits[..., :-1].sigmoid().expand_as(logits_s[..., :-1])
        class_term = F.binary_cross_entropy_with_logits(logits_s[..., :-1], target, reduction="none").sum(-1)
    l1_term = (boxes_s - partner_boxes).abs().sum(-1)
    giou_term = 1.0 - elementwise_generalized_box_iou(
        center_to_corners(boxes_s), center_to_corners(partner_boxes), validate=validate
    )

    weight = paired.to(dtype)[None]  # (1, B, Qs)
    normaliser = num_layers * paired.sum().to(dtype).clamp_min(1.0)

    def pooled(term: torch.Tensor) -> torch.Tensor:
        return (term * weight).sum() / normaliser

    return {"logits": pooled(class_term), "l1": pooled(l1_term), "giou": pooled(giou_term)}


# ---------------------------------------------------------------------------------------------------------------------
# The distiller
# ---------------------------------------------------------------------------------------------------------------------
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
