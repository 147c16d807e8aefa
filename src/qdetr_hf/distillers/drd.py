"""Q-DETR's Distribution Rectification Distillation: Foreground-aware Query Matching and the DRD loss."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from qdetr_hf.box_ops import (
    center_to_corners,
    check_corners,
    compute_dtype,
    constant_box,
    pad_targets,
    pairwise_generalized_box_iou,
)
from qdetr_hf.distillers.base import DetectorOutputs, Distiller, check_non_negative, stacked_co_attended_features

__all__ = [
    "DEFAULT_DRD_WEIGHT",
    "DRDDistiller",
    "FQMResult",
    "compute_drd",
    "drd_loss",
    "foreground_aware_query_matching",
]

#: λ of the paper's total loss ``L = L_GT + λ·L_DRD`` (applied by the trainer, not in this module).
DEFAULT_DRD_WEIGHT: float = 2.5

# The padded ground-truth slots are replaced by this (valid, non-degenerate) xyxy box before any GIoU is computed.
_DUMMY_GT_XYXY = (0.0, 0.0, 1.0, 1.0)


@dataclass(frozen=True)
class FQMResult:
    """Output of :func:`foreground_aware_query_matching`.

    Attributes:
        selected: (B, Qs) bool, True for student queries kept for distillation.
        teacher_index: (B, Qs) long, index into the teacher queries of the pair of each student query. It is computed
            (and a valid index) for every query; it is only meaningful where ``selected`` is True.
        gt_giou_max: (B, G) float, ``G_i = max_j GIoU(gt_i, student_j)``; 0 for padded ground-truth slots.
        pair_score: (B, Qs) float, the maximised matching score
            ``μ1·GIoU(student_j, teacher_k) - μ2·L1(student_j, teacher_k)`` at ``k = teacher_index[j]``.
    """

    selected: torch.Tensor
    teacher_index: torch.Tensor
    gt_giou_max: torch.Tensor
    pair_score: torch.Tensor

    @property
    def num_selected(self) -> torch.Tensor:
        """Number of kept student queries in the whole batch (0-dim long tensor, no host sync)."""
        return self.selected.sum()


def _check_boxes(boxes: torch.Tensor, name: str, ndim: int = 3) -> None:
    if not isinstance(boxes, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(boxes).__name__}")
    if boxes.ndim != ndim or boxes.shape[-1] != 4:
        raise ValueError(f"{name} must have shape (B, N, 4) (normalised cxcywh), got {tuple(boxes.shape)}")


@torch.no_grad()
def foreground_aware_query_matching(
    student_boxes: torch.Tensor,
    teacher_boxes: torch.Tensor,
    gt_boxes: torch.Tensor,
    gt_mask: torch.Tensor,
    tau: float = 0.6,
    match_giou_weight: float = 2.0,
    match_l1_weight: float = 5.0,
    *,
    validate: bool = True,
) -> FQMResult:
    """Q-DETR's Foreground-aware Query Matching (FQM): pick foreground student queries and pair them with teacher ones.

    Per image, with student boxes ``b^S_j``, teacher boxes ``b^T_k`` and ground truth ``b^GT_i``:

    1. ``G_i = max_j GIoU(b^GT_i, b^S_j)``.
    2. Student query j is kept if ``GIoU(b^GT_i, b^S_j) > τ·G_i`` for **at least one** real ground truth i
       (project decision: the paper's printed equation says "for all i", its prose "around at least one ground
       truth").
    3. Each student query j is paired with the teacher query
       ``argmax_k [μ1·GIoU(b^S_j, b^T_k) - μ2·||b^S_j - b^T_k||_1]`` (μ1 = ``match_giou_weight``,
       μ2 = ``match_l1_weight``, the L1 on normalised cxcywh as in DETR's matcher cost). The argmax is taken per
       student query (teacher queries may be reused; this is not a Hungarian matching); ties go to the lowest k.

    The inequality of step 2 is implemented literally (strict ``>``). Consequences, for ``0 <= τ < 1``:

    * if ``G_i > 0`` the best student query for gt i is always kept, plus every query with GIoU above ``τ·G_i``;
    * if ``G_i <= 0`` (no student box overlaps gt i well enough for a positive GIoU; GIoU is negative for every
      disjoint pair) then ``τ·G_i >= G_i >= GIoU(gt_i, b^S_j)`` for every j, so gt i keeps **no** query: a ground truth
      that no query covers contributes nothing rather than pulling in the "least bad" queries;
    * ``τ = 0`` therefore keeps the queries with a positive GIoU to some ground truth, not every query;
      ``τ = 1`` keeps nothing.

    Images without ground truth (all of ``gt_mask`` False, or G = 0) keep nothing. Runs under ``torch.no_grad``, is
    vectorised over the batch and computes in float32 (float64 stays float64). With ``validate=False`` it reads no
    tensor value on the host (no device synchronisation).

    Args:
        student_boxes: (B, Qs, 4) student predicted boxes, normalised cxcywh (normally the last decoder layer).
        teacher_boxes: (B, Qt, 4) teacher predicted boxes, normalised cxcywh; Qt may differ from Qs.
        gt_boxes: (B, G, 4) padded ground-truth boxes, normalised cxcywh (see :func:`qdetr_hf.box_ops.pad_targets`);
            padded slots may hold any value.
        gt_mask: (B, G) bool, True for real ground-truth boxes.
        tau: Selection threshold τ in [0, 1] (paper: 0.6; 0.5 ties).
        match_giou_weight: μ1, weight of the GIoU term of the pairing score (DETR: 2).
        match_l1_weight: μ2, weight of the L1 term of the pairing score (DETR: 5).
        validate: Check that no box (predicted or real ground truth) is degenerate; reads the boxes on the host.

    Returns:
        An :class:`FQMResult` with ``selected``, ``teacher_index``, ``gt_giou_max`` and ``pair_score``.

    Raises:
        ValueError: On inconsistent shapes, a non-bool mask, ``tau`` outside [0, 1], negative or non-finite weights,
            no student/teacher queries, or (with ``validate``) degenerate boxes (negative width or height, NaN).
    """
    _check_boxes(student_boxes, "student_boxes")
    _check_boxes(teacher_boxes, "teacher_boxes")
    _check_boxes(gt_boxes, "gt_boxes")
    batch = student_boxes.shape[0]
    if teacher_boxes.shape[0] != batch or gt_boxes.shape[0] != batch:
        raise ValueError(
            "batch sizes differ: student_boxes "
            f"{tuple(student_boxes.shape)}, teacher_boxes {tuple(teacher_boxes.shape)}, gt_boxes {tuple(gt_boxes.shape)}"
        )
    if student_boxes.shape[1] == 0 or teacher_boxes.shape[1] == 0:
        raise ValueError(
            f"need at least one student and one teacher query, got Qs={student_boxes.shape[1]}, "
            f"Qt={teacher_boxes.shape[1]}"
        )
    if not isinstance(gt_mask, torch.Tensor) or gt_mask.dtype != torch.bool or gt_mask.shape != gt_boxes.shape[:2]:
        raise ValueError(
            f"gt_mask must be a bool tensor of shape {tuple(gt_boxes.shape[:2])}, got "
            f"{getattr(gt_mask, 'dtype', type(gt_mask).__name__)} {tuple(getattr(gt_mask, 'shape', ()))}"
        )
    if not 0.0 <= tau <= 1.0:
        raise ValueError(f"tau must be in [0, 1], got {tau}")
    check_non_negative(match_giou_weight, "match_giou_weight")
    check_non_negative(match_l1_weight, "match_l1_weight")

    dtype = compute_dtype(student_boxes)
    student = student_boxes.detach().to(dtype)
    teacher = teacher_boxes.detach().to(device=student.device, dtype=dtype)
    gt_mask = gt_mask.to(student.device)
    gt = gt_boxes.detach().to(device=student.device, dtype=dtype)

    student_xyxy = center_to_corners(student)
    teacher_xyxy = center_to_corners(teacher)
    dummy = constant_box(_DUMMY_GT_XYXY, dtype, student.device)
    gt_xyxy = torch.where(gt_mask[..., None], center_to_corners(gt), dummy)
    if validate:
        check_corners(student_xyxy, "student_boxes")
        check_corners(teacher_xyxy, "teacher_boxes")
        check_corners(gt_xyxy, "gt_boxes")

    # Steps 1-2: foreground selection.
    giou_gt_student = pairwise_generalized_box_iou(gt_xyxy, student_xyxy, validate=False)  # (B, G, Qs)
    gt_giou_max = giou_gt_student.amax(dim=-1)  # (B, G)
    keep = (giou_gt_student > tau * gt_giou_max[..., None]) & gt_mask[..., None]  # (B, G, Qs)
    selected = keep.any(dim=1)  # (B, Qs)
    gt_giou_max = gt_giou_max.masked_fill(~gt_mask, 0.0)

    # Step 3: per-student argmax pairing with the teacher queries.
    giou_student_teacher = pairwise_generalized_box_iou(student_xyxy, teacher_xyxy, validate=False)  # (B, Qs, Qt)
    l1_student_teacher = torch.cdist(student, teacher, p=1)  # (B, Qs, Qt)
    score = match_giou_weight * giou_student_teacher - match_l1_weight * l1_student_teacher
    pair_score, teacher_index = score.max(dim=-1)
    return FQMResult(selected=selected, teacher_index=teacher_index, gt_giou_max=gt_giou_max, pair_score=pair_score)


def drd_loss(
    student_features: torch.Tensor,
    teacher_features: torch.Tensor,
    selected: torch.Tensor,
    teacher_index: torch.Tensor,
    *,
    validate: bool = True,
) -> torch.Tensor:
    """Q-DETR's Distribution Rectification Distillation loss on the co-attended features of the kept queries.

    ``L_DRD = mean over kept j of ||D~^S_j - D~^T_pair(j)||_2`` (Euclidean norm, not squared), pooled over all kept
    queries of the batch (not a mean of per-image means) and averaged over decoder layers when several are given.
    ``D~`` is the *co-attended feature*: the decoder cross-attention output ``softmax(q·kᵀ)·v`` with the heads
    concatenated, before the output projection, i.e. the input of ``encoder_attn.o_proj`` in a Transformers DETR
    decoder layer. The paper's total loss is ``L = L_GT + λ·L_DRD`` with λ = 2.5 (:data:`DEFAULT_DRD_WEIGHT`); that
    combination is done by the trainer, not here.

    The teacher features are detached. When no query is selected the result is an exact 0 that is still connected to
    ``student_features`` in the autograd graph (so DDP sees no unused parameters) and never NaN. No epsilon is
    needed: ``torch.linalg.vector_norm`` has a zero (sub)gradient at an exactly-zero difference, and unselected
    queries are masked to a zero difference before the norm so non-kept rows never reach the gradient. The loss is
    computed in float32 (float64 stays float64).

    Args:
        student_features: (B, Qs, D) or, for L decoder layers, (L, B, Qs, D).
        teacher_features: (B, Qt, D) or (L, B, Qt, D), same layout and L, B, D as the student; Qt may differ from Qs.
        selected: (B, Qs) bool, kept student queries (``FQMResult.selected``).
        teacher_index: (B, Qs) integer, paired teacher query per student query (``FQMResult.teacher_index``); only
            read where ``selected`` is True.
        validate: Check that every selected ``teacher_index`` lies in ``[0, Qt)`` (reads it on the host);
            ``False`` makes no host synchronisation (FQM's argmax always gives a valid index).

    Returns:
        0-dim loss tensor.

    Raises:
        ValueError: On inconsistent shapes or dtypes, or (with ``validate``) a selected ``teacher_index`` outside
            ``[0, Qt)``.
    """
    if student_features.ndim not in (3, 4) or teacher_features.ndim != student_features.ndim:
        raise ValueError(
            "student_features and teacher_features must both be (B, Q, D) or both (L, B, Q, D), got "
            f"{tuple(student_features.shape)} and {tuple(teacher_features.shape)}"
        )
    student = student_features if student_features.ndim == 4 else student_features.unsqueeze(0)
    teacher = teacher_features if teacher_features.ndim == 4 else teacher_features.unsqueeze(0)
    num_layers, batch, num_student, dim = student.shape
    num_teacher = teacher.shape[2]
    if teacher.shape[0] != num_layers or teacher.shape[1] != batch or teacher.shape[3] != dim:
        raise ValueError(
            "teacher_features must match student_features in layers, batch and feature size, got "
            f"{tuple(teacher_features.shape)} vs {tuple(student_features.shape)}"
        )
    if num_teacher == 0:
        raise ValueError("teacher_features has no queries (Qt = 0)")
    if selected.dtype != torch.bool or selected.shape != (batch, num_student):
        raise ValueError(
            f"selected must be a bool tensor of shape {(batch, num_student)}, got {selected.dtype} "
            f"{tuple(selected.shape)}"
        )
    if teacher_index.shape != (batch, num_student) or teacher_index.is_floating_point() or teacher_index.is_complex():
        raise ValueError(
            f"teacher_index must be an integer tensor of shape {(batch, num_student)}, got {teacher_index.dtype} "
            f"{tuple(teacher_index.shape)}"
        )

    device = student.device
    selected = selected.to(device)
    index = torch.where(selected, teacher_index.to(device=device, dtype=torch.long), 0)
    if validate and index.numel() > 0 and bool(((index < 0) | (index >= num_teacher)).any()):
        raise ValueError(f"teacher_index of a selected query is outside [0, {num_teacher})")

    dtype = compute_dtype(student)
    student = student.to(dtype)
    teacher = teacher.detach().to(device=device, dtype=dtype)
    paired = torch.gather(teacher, 2, index[None, :, :, None].expand(num_layers, batch, num_student, dim))
    keep = selected[None, :, :, None]
    difference = torch.where(keep, student - paired, 0.0)  # (L, B, Qs, D); exactly 0 for non-kept queries
    distance = torch.linalg.vector_norm(difference, dim=-1)  # (L, B, Qs)
    num_selected = selected.sum().to(dtype)
    # Mean over kept queries per layer, then over layers == total / (L * num_selected); 0 / 1 = 0 when none kept.
    return distance.sum() / (num_layers * num_selected.clamp(min=1.0))


def compute_drd(
    student_boxes: torch.Tensor,
    teacher_boxes: torch.Tensor,
    student_features: torch.Tensor,
    teacher_features: torch.Tensor,
    labels: Sequence[Mapping[str, torch.Tensor]] | tuple[torch.Tensor, torch.Tensor],
    tau: float = 0.6,
    match_giou_weight: float = 2.0,
    match_l1_weight: float = 5.0,
    *,
    validate: bool = True,
) -> dict[str, torch.Tensor]:
    """FQM followed by the DRD loss, for users' own training loops.

    The selection and pairing are computed once from the given boxes (normally the final-layer predictions) and
    applied to every decoder layer of the features. The result is the unweighted ``L_DRD``; the paper adds
    ``λ·L_DRD`` with λ = 2.5 (:data:`DEFAULT_DRD_WEIGHT`) to the detection loss.

    Args:
        student_boxes: (B, Qs, 4) student predicted boxes, normalised cxcywh.
        teacher_boxes: (B, Qt, 4) teacher predicted boxes, normalised cxcywh.
        student_features: (B, Qs, D) or (L, B, Qs, D) student co-attended features (see :func:`drd_loss`).
        teacher_features: (B, Qt, D) or (L, B, Qt, D) teacher co-attended features.
        labels: Either the DETR-style list of per-image dicts (``"class_labels"``, ``"boxes"`` normalised cxcywh) or a
            ready ``(gt_boxes (B, G, 4), gt_mask (B, G))`` pair.
        tau: Selection threshold τ (paper: 0.6).
        match_giou_weight: μ1 of the pairing score.
        match_l1_weight: μ2 of the pairing score.
        validate: Check the box values (labels, predictions) on the host; ``False`` (what :class:`DRDDistiller`
            passes) makes the whole computation free of host synchronisation.

    Returns:
        ``{"loss_drd": 0-dim loss, "num_selected": 0-dim long tensor (kept queries in the batch)}``.

    Raises:
        ValueError: On bad inputs (see :func:`foreground_aware_query_matching`, :func:`drd_loss`,
            :func:`qdetr_hf.box_ops.pad_targets`).
    """
    if isinstance(labels, tuple) and len(labels) == 2 and all(isinstance(t, torch.Tensor) for t in labels):
        gt_boxes, gt_mask = labels
    else:
        gt_boxes, _, gt_mask = pad_targets(
            labels,  # type: ignore[arg-type]
            device=student_boxes.device,
            validate=validate,
        )
    matching = foreground_aware_query_matching(
        student_boxes,
        teacher_boxes,
        gt_boxes,
        gt_mask,
        tau=tau,
        match_giou_weight=match_giou_weight,
        match_l1_weight=match_l1_weight,
        validate=validate,
    )
    # FQM's argmax always gives valid indices: nothing to check on the host.
    loss = drd_loss(student_features, teacher_features, matching.selected, matching.teacher_index, validate=False)
    return {"loss_drd": loss, "num_selected": matching.num_selected}


class DRDDistiller(Distiller):
    """Q-DETR's Distribution Rectification Distillation as a :class:`~qdetr_hf.distillers.base.Distiller`.

    Foreground-aware Query Matching on the final-layer boxes selects student queries near the ground truth and pairs
    each with a teacher query; the loss is the mean Euclidean distance between their co-attended features, averaged
    over ``layers``, and is returned as ``loss_drd = weight * L_DRD`` (so the total is ``L_GT + λ L_DRD``).

    ``forward`` makes no host synchronisation: it calls :func:`compute_drd` with ``validate=False`` (the trainer has
    run DETR's own loss on the same batch, whose matcher raises on degenerate ground-truth or predicted boxes).

    Args:
        tau: Selection threshold τ relative to ``G_i`` (paper: 0.6; 0.5 tied).
        weight: λ of ``L = L_GT + λ L_DRD`` (paper: 2.5).
        match_giou_weight: μ1 of the teacher pairing score (paper: 2, DETR's GIoU matching cost).
        match_l1_weight: μ2 of the teacher pairing score (paper: 5, DETR's L1 matching cost).
        layers: Decoder layers whose co-attended features are distilled (Python indices; project decision, the paper
            does not say: the last layer by default).
    """

    name = "drd"

    def __init__(
        self,
        tau: float = 0.6,
        weight: float = DEFAULT_DRD_WEIGHT,
        match_giou_weight: float = 2.0,
        match_l1_weight: float = 5.0,
        layers: Sequence[int] = (-1,),
    ) -> None:
        super().__init__()
        if not 0.0 <= tau <= 1.0:
            raise ValueError(f"DRD tau must be in [0, 1], got {tau!r}.")
        check_non_negative(weight, "weight")
        check_non_negative(match_giou_weight, "match_giou_weight")
        check_non_negative(match_l1_weight, "match_l1_weight")
        if not layers:
            raise ValueError("DRD needs at least one decoder layer to distil (layers=()).")
        self.tau = tau
        self.weight = weight
        self.match_giou_weight = match_giou_weight
        self.match_l1_weight = match_l1_weight
        self.co_attended_layers = tuple(layers)

    def forward(
        self, student: DetectorOutputs, teacher: DetectorOutputs, labels: Sequence[Mapping[str, torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        student_features, teacher_features = stacked_co_attended_features(student, teacher, "DRD")
        terms = compute_drd(
            student.pred_boxes,
            teacher.pred_boxes.detach(),
            student_features,
            teacher_features,
            labels,
            tau=self.tau,
            match_giou_weight=self.match_giou_weight,
            match_l1_weight=self.match_l1_weight,
            validate=False,
        )
        return {"loss_drd": self.weight * terms["loss_drd"], "drd_selected": terms["num_selected"].float()}

    def extra_repr(self) -> str:
        return f"tau={self.tau}, weight={self.weight}, layers={self.co_attended_layers}"
