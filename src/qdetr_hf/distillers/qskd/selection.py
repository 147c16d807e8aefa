"""QSKD's Group Query Selection (GQS), and the checks of predictions and matching costs its parts share."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from transformers.loss.loss_for_object_detection import HungarianMatcher

from qdetr_hf.box_ops import (
    center_to_corners,
    compute_dtype,
    pad_targets,
    pairwise_generalized_box_iou,
)
from qdetr_hf.distillers.base import (
    check_non_negative,
)

#: DETR's Hungarian matching costs (class, L1, GIoU), used when neither the constructor nor a model config gives them.
DETR_MATCHER_COSTS: tuple[float, float, float] = (1.0, 5.0, 2.0)


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
