"""QSKD's Local Alignment Prediction Distillation: queries paired within their groups, predictions distilled."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from qdetr_hf.box_ops import (
    center_to_corners,
    compute_dtype,
    elementwise_generalized_box_iou,
    pairwise_generalized_box_iou,
)
from qdetr_hf.distillers.base import check_positive, layer_stack
from qdetr_hf.distillers.qskd.selection import DETR_MATCHER_COSTS, _check_costs, _check_groups, _check_predictions

_LOGITS_LOSSES = ("kl", "bce")


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
    logits_s, boxes_s = layer_stack(student_logits, student_boxes)
    num_layers, batch, num_student, num_columns = logits_s.shape
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
