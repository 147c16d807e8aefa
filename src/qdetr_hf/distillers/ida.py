"""IDa-Det's information-discrepancy-aware distillation (Xu et al., ECCV 2022) transferred to DETR query pairs."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from itertools import accumulate
from typing import Literal

import torch
from torch import nn
from transformers.loss.loss_for_object_detection import HungarianMatcher

from qdetr_hf.box_ops import compute_dtype, pad_targets
from qdetr_hf.distillers.base import (
    DetectorOutputs,
    Distiller,
    check_non_negative,
    check_positive,
    stacked_co_attended_features,
)
from qdetr_hf.distillers.drd import foreground_aware_query_matching

__all__ = [
    "DEFAULT_IDA_GAMMA",
    "DEFAULT_IDA_WEIGHT",
    "IDaDetDistiller",
    "entropy_distillation_loss",
    "hungarian_query_pairs",
    "information_discrepancy",
    "select_top_discrepancy",
]

#: γ, the fraction of candidate pairs kept for distillation (authors' code: ``round(0.6 * N)`` proposals per image).
DEFAULT_IDA_GAMMA: float = 0.6

#: λ of ``L = L_GT + λ L_IDa`` (authors' code: ``hint_neck_w = 0.5`` on the entropy loss of the neck features).
DEFAULT_IDA_WEIGHT: float = 0.5

#: The per-channel variance of the discrepancy score is floored at this fraction of its mean over channels (project
#: choice), so a channel that is (numerically) constant over the pairs cannot dominate the score.
_VARIANCE_FLOOR = 1e-6

Scope = Literal["batch", "image"]
Pairing = Literal["fqm", "hungarian"]


def _as_layers(features: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(features, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(features).__name__}")
    if features.ndim not in (3, 4):
        raise ValueError(f"{name} must have shape (B, Q, D) or (L, B, Q, D), got {tuple(features.shape)}")
    return features if features.ndim == 4 else features.unsqueeze(0)


def _check_paired(
    student_features: torch.Tensor, teacher_features: torch.Tensor, mask: torch.Tensor, mask_name: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    student = _as_layers(student_features, "student_features")
    teacher = _as_layers(teacher_features, "teacher_features")
    if student_features.ndim != teacher_features.ndim or student.shape != teacher.shape:
        raise ValueError(
            "student_features and teacher_features must be paired row by row (same shape, the teacher already "
            f"gathered at each student query's partner), got {tuple(student_features.shape)} and "
            f"{tuple(teacher_features.shape)}"
        )
    _, batch, queries, _ = student.shape
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (batch, queries):
        raise ValueError(
            f"{mask_name} must be a bool tensor of shape {(batch, queries)}, got "
            f"{getattr(mask, 'dtype', type(mask).__name__)} {tuple(getattr(mask, 'shape', ()))}"
        )
    return student, teacher, mask.to(student.device)


def _check_scope(scope: str) -> None:
    if scope not in ("batch", "image"):
        raise ValueError(f"scope must be 'batch' or 'image', got {scope!r}")


@torch.no_grad()
def information_discrepancy(
    student_features: torch.Tensor,
    teacher_features: torch.Tensor,
    candidates: torch.Tensor,
    scope: Scope = "batch",
) -> torch.Tensor:
    """IDa-Det's inner-level score: the information discrepancy of each (student, teacher) query pair.

    A diagonal (channel-wise) Mahalanobis distance between the paired co-attended features, averaged over channels
    and decoder layers::

        ε_n = mean_{l, c} (s_{l,n,c} - t_{l,n,c})² / v_{l,c}

    where ``v_{l,c}`` is the variance of channel c of layer l over the pooled teacher **and** student features of the
    candidate pairs (the paper's Σ_{n;c}, "the covariance of the teacher and the student in channel c", restricted to
    its diagonal because a DETR query feature has no spatial extent to estimate a full covariance from). With
    ``scope="batch"`` the variance pools every candidate pair of the batch, with ``scope="image"`` only the pairs of
    the same image (so an image's scores do not depend on the rest of the batch). The variance is floored at
    ``1e-6 ×`` its channel mean, so a (near-)constant channel cannot dominate.

    The paper uses a full per-channel Mahalanobis distance over each proposal's spatial crop; the authors' code uses
    ``Σ_c |μ_t²/var_t - μ_s²/var_s|`` of softmaxed crops. Neither applies to one feature vector per query, so the
    statistic here is a project choice. Runs under ``torch.no_grad``; float32 (float64 stays float64).

    Args:
        student_features: ``(B, Q, D)`` or ``(L, B, Q, D)`` student co-attended features.
        teacher_features: Same shape: the teacher feature paired with each student query (gathered beforehand).
        candidates: ``(B, Q)`` bool, the pairs that exist (e.g. FQM-selected student queries).
        scope: ``"batch"`` (variance over the batch's candidates) or ``"image"`` (per image).

    Returns:
        ``(B, Q)`` scores >= 0; exactly 0 for non-candidates.

    Raises:
        ValueError: On inconsistent shapes, a non-bool mask or an unknown scope.
    """
    _check_scope(scope)
    student, teacher, candidates = _check_paired(student_features, teacher_features, candidates, "candidates")
    dtype = compute_dtype(student)
    student = student.detach().to(dtype)
    teacher = teacher.detach().to(device=student.device, dtype=dtype)
    weight = candidates.to(dtype)[None, :, :, None]  # (1, B, Q, 1)
    dims = (1, 2) if scope == "batch" else (2,)
    count = 2.0 * weight.sum(dim=dims, keepdim=True)  # teacher and student samples per pooled set
    total = ((student + teacher) * weight).sum(dim=dims, keepdim=True)
    mean = total / count.clamp(min=1.0)
    variance = (((student - mean) ** 2 + (teacher - mean) ** 2) * weight).sum(dim=dims, keepdim=True)
    variance = variance / count.clamp(min=1.0)  # (L, 1, 1, D) or (L, B, 1, D)
    floor = _VARIANCE_FLOOR * variance.mean(dim=-1, keepdim=True) + torch.finfo(dtype).tiny
    standardised = (student - teacher) ** 2 / torch.maximum(variance, floor)
    scores = standardised.mean(dim=(0, 3))  # (B, Q)
    return torch.where(candidates, scores, 0.0)


@torch.no_grad()
def select_top_discrepancy(
    scores: torch.Tensor, candidates: torch.Tensor, gamma: float = DEFAULT_IDA_GAMMA, scope: Scope = "batch"
) -> torch.Tensor:
    """Keep the γ fraction of candidate pairs with the largest information discrepancy (IDa-Det's inner level).

    With ``N`` candidates in the pool, ``k = max(1, floor(γ·N + 0.5))`` pairs are kept (round half up; at least one
    whenever a candidate exists; the authors' code keeps ``round(0.6·N)``). ``scope="batch"`` ranks all candidates of
    the batch together (project choice: an image whose pairs all agree with the teacher may keep none);
    ``scope="image"`` ranks each image on its own, as the authors' code does. Ties go to the lower flat index. Fully
    vectorised and free of host synchronisation (a stable sort over the masked scores replaces ``topk``).

    Args:
        scores: ``(B, Q)`` discrepancy scores (see :func:`information_discrepancy`).
        candidates: ``(B, Q)`` bool, the pairs that exist.
        gamma: Kept fraction γ in (0, 1].
        scope: ``"batch"`` or ``"image"``.

    Returns:
        ``(B, Q)`` bool, True for kept pairs (a subset of ``candidates``).

    Raises:
        ValueError: On inconsistent shapes, a non-bool mask, ``gamma`` outside (0, 1] or an unknown scope.
    """
    _check_scope(scope)
    if not isinstance(gamma, (int, float)) or not 0.0 < gamma <= 1.0:
        raise ValueError(f"gamma must be in (0, 1], got {gamma!r}")
    if not isinstance(scores, torch.Tensor) or scores.ndim != 2:
        raise ValueError(f"scores must be a (B, Q) tensor, got {tuple(getattr(scores, 'shape', ()))}")
    if not isinstance(candidates, torch.Tensor) or candidates.dtype != torch.bool or candidates.shape != scores.shape:
        raise ValueError(
            f"candidates must be a bool tensor of shape {tuple(scores.shape)}, got "
            f"{getattr(candidates, 'dtype', type(candidates).__name__)} {tuple(getattr(candidates, 'shape', ()))}"
        )
    candidates = candidates.to(scores.device)
    rows = scores.reshape(1, -1) if scope == "batch" else scores
    valid = candidates.reshape(rows.shape)
    masked = torch.where(valid, rows.to(torch.float64 if rows.dtype == torch.float64 else torch.float32), -math.inf)
    order = torch.sort(masked, dim=-1, descending=True, stable=True).indices
    positions = torch.arange(rows.shape[-1], device=rows.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(-1, order, positions)
    num = valid.sum(dim=-1, keepdim=True)
    keep_count = torch.floor(gamma * num.to(torch.float64) + 0.5).long().clamp(min=1)
    kept = (rank < keep_count) & valid
    return kept.reshape(scores.shape)


def _entropy_terms(
    student_features: torch.Tensor,
    teacher_features: torch.Tensor,
    kept: torch.Tensor,
    log_variance: torch.Tensor,
    squared_weight: float,
    log_variance_weight: float,
    regularizer: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The entropy distillation loss and the (detached) mean squared residual ``m`` of the kept pairs."""
    student, teacher, kept = _check_paired(student_features, teacher_features, kept, "kept")
    if not isinstance(log_variance, torch.Tensor) or log_variance.numel() != 1:
        raise ValueError(f"log_variance must be a one-element tensor, got {getattr(log_variance, 'shape', None)}")
    check_non_negative(squared_weight, "squared_weight")
    check_positive(log_variance_weight, "log_variance_weight")
    check_non_negative(regularizer, "regularizer")
    dtype = compute_dtype(student)
    student = student.to(dtype)
    teacher = teacher.detach().to(device=student.device, dtype=dtype)
    num_layers, _, _, dim = student.shape
    residual = torch.where(kept[None, :, :, None], student - teacher, 0.0)  # exactly 0 outside the kept pairs
    num_kept = kept.sum()
    elements = (num_kept * num_layers * dim).to(dtype).clamp(min=1.0)
    mean_square = (residual**2).sum() / elements
    log_var = log_variance.reshape(()).to(device=student.device, dtype=dtype)
    active = (num_kept > 0).to(dtype)  # the σ terms vanish (value and gradient) when there is nothing to distil
    loss = (
        squared_weight * mean_square
        + mean_square * torch.exp(-log_var)
        + active * (log_variance_weight * log_var + regularizer * log_var**2)
    )
    return loss, mean_square.detach()


def entropy_distillation_loss(
    student_features: torch.Tensor,
    teacher_features: torch.Tensor,
    kept: torch.Tensor,
    log_variance: torch.Tensor,
    squared_weight: float = 1.0,
    log_variance_weight: float = 1.0,
    regularizer: float = 1e-4,
) -> torch.Tensor:
    """IDa-Det's upper level: a Gaussian negative log-likelihood with one learned variance on the kept pairs.

    With the residual ``r = s - t`` over the kept pairs, ``m = mean(r²)`` over kept pairs, channels and layers, and
    ``ℓ = log σ²`` (the learned parameter)::

        L = squared_weight · m  +  m / σ²  +  log_variance_weight · ℓ  +  regularizer · ℓ²

    * ``m / σ² + ℓ`` is the Gaussian NLL ``(R_S - R_T)²/σ² + log σ²`` averaged per element (so the loss does not grow
      with the number of channels, pairs or layers); its minimum over σ is at ``σ² = m / log_variance_weight``.
    * ``squared_weight · m`` is the plain squared term of the paper's Eq. and the authors' code (``mse + mse/σ² ...``).
    * ``regularizer · ℓ²`` is a weak pull of σ² towards 1 (project choice; the value 1e-4 is the paper's μ, which the
      paper puts on a regulariser of the 1-bit student's weights rather than on σ).

    Parametrising ``ℓ = log σ²`` keeps σ² > 0. The teacher is detached. The pooled mean runs over the whole batch (a
    mean over kept pairs, not a mean of per-image means). When nothing is kept the result is an exact 0 that is still
    connected to ``student_features`` and ``log_variance`` in the autograd graph, never NaN. Computed in float32
    (float64 stays float64).

    Args:
        student_features: ``(B, Q, D)`` or ``(L, B, Q, D)`` student features.
        teacher_features: Same shape, the teacher feature paired with each student query.
        kept: ``(B, Q)`` bool, the pairs to distil.
        log_variance: 0-dim tensor ``log σ²`` (normally an ``nn.Parameter``).
        squared_weight: Weight of the plain squared term (paper and authors' code: 1).
        log_variance_weight: Weight of ``log σ²`` (Gaussian NLL: 1; the authors' code: 1e-3 summed over every feature
            map element, masked or not).
        regularizer: Weight of ``(log σ²)²`` (project choice, default 1e-4).

    Returns:
        0-dim loss tensor.

    Raises:
        ValueError: On inconsistent shapes, a non-bool mask, a non-scalar ``log_variance`` or bad weights.
    """
    return _entropy_terms(
        student_features, teacher_features, kept, log_variance, squared_weight, log_variance_weight, regularizer
    )[0]


@torch.no_grad()
def hungarian_query_pairs(
    student_logits: torch.Tensor,
    student_boxes: torch.Tensor,
    teacher_logits: torch.Tensor,
    teacher_boxes: torch.Tensor,
    labels: Sequence[Mapping[str, torch.Tensor]],
    class_cost: float = 1.0,
    bbox_cost: float = 5.0,
    giou_cost: float = 2.0,
    validate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pair the student and teacher queries that DETR's Hungarian matcher assigns to the same ground-truth box.

    Each model is matched to the ground truth on its own (transformers' ``HungarianMatcher``, one
    ``linear_sum_assignment`` per image under ``no_grad``, as DETR's loss does); student query j is a candidate when it
    is matched to some ground truth g, and its partner is the teacher query matched to g.

    Args:
        student_logits: ``(B, Qs, C + 1)`` student class logits.
        student_boxes: ``(B, Qs, 4)`` student boxes (normalised cxcywh).
        teacher_logits: ``(B, Qt, C + 1)`` teacher class logits.
        teacher_boxes: ``(B, Qt, 4)`` teacher boxes.
        labels: DETR-style targets, one dict per image (``class_labels``, ``boxes``).
        class_cost: Class cost of the matching (DETR: 1).
        bbox_cost: L1 box cost (DETR: 5).
        giou_cost: GIoU cost (DETR: 2).
        validate: Check the label values on the host (:func:`~qdetr_hf.box_ops.pad_targets`) before matching.

    Returns:
        ``(candidates (B, Qs) bool, teacher_index (B, Qs) long)``; ``teacher_index`` is 0 where not a candidate. When
        an image has more ground truths than one model has queries, only ground truths matched by both are paired.

    Raises:
        ValueError: On inconsistent batch sizes or bad labels.
    """
    batch, num_student = student_boxes.shape[:2]
    if student_logits.shape[:2] != student_boxes.shape[:2] or teacher_logits.shape[:2] != teacher_boxes.shape[:2]:
        raise ValueError(
            f"logits and boxes disagree: student {tuple(student_logits.shape)} vs {tuple(student_boxes.shape)}, "
            f"teacher {tuple(teacher_logits.shape)} vs {tuple(teacher_boxes.shape)}"
        )
    if teacher_boxes.shape[0] != batch or len(labels) != batch:
        raise ValueError(
            f"batch sizes differ: student {batch}, teacher {teacher_boxes.shape[0]}, labels {len(labels)} images"
        )
    if validate:
        pad_targets(labels)
    device = student_boxes.device
    targets = [
        {"class_labels": t["class_labels"].to(device).long(), "boxes": t["boxes"].to(device).float()} for t in labels
    ]
    matcher = HungarianMatcher(class_cost=class_cost, bbox_cost=bbox_cost, giou_cost=giou_cost)
    # The assignments are the matcher's host step (scipy, as in DETR's own loss); its indices are host tensors.
    student_match = matcher(
        {"logits": student_logits.detach().float(), "pred_boxes": student_boxes.detach().float()}, targets
    )
    teacher_match = matcher(
        {"logits": teacher_logits.detach().float().to(device), "pred_boxes": teacher_boxes.detach().float().to(device)},
        targets,
    )
    # Ground truths numbered across the batch: image i's are offsets[i], ..., offsets[i + 1] - 1.
    offsets = [0, *accumulate(len(target["boxes"]) for target in targets)]
    gt_to_teacher = torch.full((offsets[-1],), -1, dtype=torch.long)
    gt_to_teacher[torch.cat([g + offset for (_, g), offset in zip(teacher_match, offsets)])] = torch.cat(
        [q for q, _ in teacher_match]
    )
    image = torch.cat([torch.full_like(q, i) for i, (q, _) in enumerate(student_match)])
    query = torch.cat([q for q, _ in student_match])
    partner = gt_to_teacher[torch.cat([g + offset for (_, g), offset in zip(student_match, offsets)])]
    candidates = torch.zeros(batch, num_student, dtype=torch.bool)
    teacher_index = torch.zeros(batch, num_student, dtype=torch.long)
    candidates[image, query] = partner >= 0
    teacher_index[image, query] = partner.clamp(min=0)
    return candidates.to(device), teacher_index.to(device)


class IDaDetDistiller(Distiller):
    """IDa-Det (Xu et al., ECCV 2022) for DETR, as a :class:`~qdetr_hf.distillers.base.Distiller`.

    IDa-Det distils a 1-bit Faster R-CNN from a real-valued one in two levels: the inner level ranks teacher/student
    proposal pairs by the information discrepancy of their features and keeps the top γ; the upper level applies an
    entropy distillation loss (a Gaussian NLL with a learned variance) to the kept pairs. For DETR:

    1. **Proposal pairs = query pairs.** ``pairing="fqm"`` (default): Q-DETR's Foreground-aware Query Matching on the
       final-layer boxes (student queries near a ground truth, each paired with its best teacher query; Q-DETR is
       IDa-Det's DETR successor). ``pairing="hungarian"``: the student and teacher queries that DETR's Hungarian
       matcher assigns to the same ground-truth box.
    2. **Inner level.** Each pair is scored by :func:`information_discrepancy` of the co-attended features of
       ``layers`` (a diagonal Mahalanobis distance: squared difference over the per-channel variance of the pooled
       teacher and student features of the candidate pairs), and :func:`select_top_discrepancy` keeps the top γ.
    3. **Upper level.** :func:`entropy_distillation_loss` on the kept pairs with one learned scalar ``log σ²``
       (``self.log_variance``, an ``nn.Parameter`` the trainer optimises without weight decay, averages across
       processes and checkpoints).

    Returns ``{"loss_ida": weight · L, "ida_residual": mean squared residual m of the kept pairs, "ida_pairs": kept
    pairs, "ida_candidates": candidate pairs, "ida_sigma": σ}`` (all but ``loss_ida`` are detached statistics).

    ``forward`` does not re-validate the labels (the trainer has run DETR's loss, whose matcher raises on degenerate
    boxes) and, with ``pairing="fqm"``, makes no host synchronisation; ``"hungarian"`` adds the matcher's host step
    (scipy), as DETR's own loss has.

    **Batch dependence.** With ``selection_scope="batch"`` (default, project choice) the variance of the score and the
    top-γ ranking pool all candidate pairs of the (per-device micro-)batch, so which pairs of an image are kept
    depends on the other images in the batch, and ``k = round(γ N)`` over the batch differs from the sum of per-image
    ``round(γ N_b)``. ``selection_scope="image"`` ranks each image on its own (as the authors' code does), which makes
    the selection independent of the batch; the loss is then a mean over all kept pairs of the batch (as DRD's).

    **Learning σ.** Adam moves ``log σ²`` by about the learning rate per step, so at lr 1e-4 σ² needs thousands of
    steps to reach the residual scale of the co-attended features (far below 1 in small models); until then the NLL
    term acts like a squared loss weighted ``1/σ²``. ``init_sigma`` can start it closer.

    Choices that are ours (not the paper's or the authors' code): the query-pair proposals; the diagonal Mahalanobis
    score on co-attended features; batch-level ranking by default; a per-element mean normalisation; the log σ²
    parametrisation; the ``(log σ²)²`` regulariser; the last decoder layer by default. From the authors' code: γ = 0.6,
    λ = 0.5 (``hint_neck_w``), the plain squared term, σ initialised at 1. The Gaussian NLL has its coefficient 1 on
    ``log σ²`` here (the authors' code: 1e-3, see :func:`entropy_distillation_loss`).

    Args:
        gamma: γ, the kept fraction of candidate pairs (authors' code: 0.6).
        weight: λ of ``L = L_GT + λ L_IDa`` (authors' code: 0.5).
        squared_weight: Weight of the plain squared term (paper and authors' code: 1).
        log_variance_weight: Coefficient of ``log σ²`` (Gaussian NLL: 1; authors' code 1e-3).
        regularizer: Weight of ``(log σ²)²`` (project choice: 1e-4, the paper's μ value).
        init_sigma: Initial σ (authors' code: 1.000001, i.e. 1).
        pairing: ``"fqm"`` (default) or ``"hungarian"``.
        selection_scope: ``"batch"`` (default) or ``"image"``.
        layers: Decoder layers whose co-attended features are scored and distilled (project choice: the last).
        tau: FQM selection threshold τ (Q-DETR paper: 0.6).
        match_giou_weight: FQM pairing GIoU weight μ1 (Q-DETR: 2).
        match_l1_weight: FQM pairing L1 weight μ2 (Q-DETR: 5).
        class_cost: Hungarian class cost (DETR: 1), for ``pairing="hungarian"``.
        bbox_cost: Hungarian L1 cost (DETR: 5).
        giou_cost: Hungarian GIoU cost (DETR: 2).

    Raises:
        ValueError: On an out-of-range argument; in ``forward``, when the models' feature widths differ or their
            co-attended layers were not captured.
    """

    name = "ida"

    def __init__(
        self,
        gamma: float = DEFAULT_IDA_GAMMA,
        weight: float = DEFAULT_IDA_WEIGHT,
        squared_weight: float = 1.0,
        log_variance_weight: float = 1.0,
        regularizer: float = 1e-4,
        init_sigma: float = 1.0,
        pairing: Pairing = "fqm",
        selection_scope: Scope = "batch",
        layers: Sequence[int] = (-1,),
        tau: float = 0.6,
        match_giou_weight: float = 2.0,
        match_l1_weight: float = 5.0,
        class_cost: float = 1.0,
        bbox_cost: float = 5.0,
        giou_cost: float = 2.0,
    ) -> None:
        super().__init__()
        if not isinstance(gamma, (int, float)) or not 0.0 < gamma <= 1.0:
            raise ValueError(f"IDa-Det gamma must be in (0, 1], got {gamma!r}.")
        check_non_negative(weight, "weight")
        check_non_negative(squared_weight, "squared_weight")
        check_positive(log_variance_weight, "log_variance_weight")
        check_non_negative(regularizer, "regularizer")
        check_positive(init_sigma, "init_sigma")
        if pairing not in ("fqm", "hungarian"):
            raise ValueError(f"IDa-Det pairing must be 'fqm' or 'hungarian', got {pairing!r}.")
        _check_scope(selection_scope)
        if not 0.0 <= tau <= 1.0:
            raise ValueError(f"FQM tau must be in [0, 1], got {tau!r}.")
        for value, label in (
            (match_giou_weight, "match_giou_weight"),
            (match_l1_weight, "match_l1_weight"),
            (class_cost, "class_cost"),
            (bbox_cost, "bbox_cost"),
            (giou_cost, "giou_cost"),
        ):
            check_non_negative(value, label)
        if not layers:
            raise ValueError("IDa-Det needs at least one decoder layer to distil (layers=()).")
        self.gamma = float(gamma)
        self.weight = float(weight)
        self.squared_weight = float(squared_weight)
        self.log_variance_weight = float(log_variance_weight)
        self.regularizer = float(regularizer)
        self.pairing = pairing
        self.selection_scope = selection_scope
        self.tau = tau
        self.match_giou_weight = match_giou_weight
        self.match_l1_weight = match_l1_weight
        self.class_cost = class_cost
        self.bbox_cost = bbox_cost
        self.giou_cost = giou_cost
        self.co_attended_layers = tuple(layers)
        #: ``log σ²`` of the entropy distillation loss (one learned scalar).
        self.log_variance = nn.Parameter(torch.tensor(2.0 * math.log(init_sigma), dtype=torch.float32))

    @property
    def sigma(self) -> torch.Tensor:
        """The learned σ (detached, 0-dim)."""
        return torch.exp(0.5 * self.log_variance.detach())

    def query_pairs(
        self, student: DetectorOutputs, teacher: DetectorOutputs, labels: Sequence[Mapping[str, torch.Tensor]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The candidate pairs: ``(candidates (B, Qs) bool, teacher_index (B, Qs) long)`` from ``self.pairing``."""
        if self.pairing == "hungarian":
            return hungarian_query_pairs(
                student.logits,
                student.pred_boxes,
                teacher.logits,
                teacher.pred_boxes,
                labels,
                class_cost=self.class_cost,
                bbox_cost=self.bbox_cost,
                giou_cost=self.giou_cost,
                validate=False,
            )
        gt_boxes, _, gt_mask = pad_targets(labels, device=student.pred_boxes.device, validate=False)
        matching = foreground_aware_query_matching(
            student.pred_boxes,
            teacher.pred_boxes,
            gt_boxes,
            gt_mask,
            tau=self.tau,
            match_giou_weight=self.match_giou_weight,
            match_l1_weight=self.match_l1_weight,
            validate=False,
        )
        return matching.selected, matching.teacher_index

    def forward(
        self, student: DetectorOutputs, teacher: DetectorOutputs, labels: Sequence[Mapping[str, torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        # (L, B, Qs, D) and (L, B, Qt, D)
        student_features, teacher_features = stacked_co_attended_features(student, teacher, "IDa-Det")
        candidates, teacher_index = self.query_pairs(student, teacher, labels)
        num_layers, batch, num_student, dim = student_features.shape
        index = teacher_index.to(teacher_features.device)[None, :, :, None].expand(num_layers, batch, num_student, dim)
        paired_teacher = torch.gather(teacher_features.detach(), 2, index)
        scores = information_discrepancy(student_features, paired_teacher, candidates, scope=self.selection_scope)
        kept = select_top_discrepancy(scores, candidates, gamma=self.gamma, scope=self.selection_scope)
        loss, mean_square = _entropy_terms(
            student_features,
            paired_teacher,
            kept,
            self.log_variance,
            self.squared_weight,
            self.log_variance_weight,
            self.regularizer,
        )
        return {
            "loss_ida": self.weight * loss,
            "ida_residual": mean_square.float(),
            "ida_pairs": kept.sum().float(),
            "ida_candidates": candidates.sum().float(),
            "ida_sigma": self.sigma,
        }

    def extra_repr(self) -> str:
        return (
            f"gamma={self.gamma}, weight={self.weight}, pairing={self.pairing!r}, "
            f"selection_scope={self.selection_scope!r}, layers={self.co_attended_layers}"
        )
