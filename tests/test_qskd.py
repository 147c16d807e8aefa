"""Tests for QSKD: Group Query Selection, the attention-guided feature loss and local alignment prediction distillation."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from conftest import tiny_detr_kwargs, tiny_training_args
from scipy.optimize import linear_sum_assignment
from torch import nn
from transformers import DetrConfig, DetrForObjectDetection
from transformers.loss.loss_for_object_detection import generalized_box_iou as hf_generalized_box_iou

from qdetr_hf import QDetrForObjectDetection
from qdetr_hf.box_ops import center_to_corners, corners_to_center
from qdetr_hf.distillers.base import DetectorOutputs, capture_decoder_inputs
from qdetr_hf.distillers.qskd import (
    GQSResult,
    QSKDDistiller,
    attention_foreground_mask,
    attention_guided_feature_loss,
    group_query_selection,
    local_alignment_matching,
    local_alignment_prediction_loss,
)
from qdetr_hf.trainer import QDetrDistillationTrainer, load_teacher

QSKD_LOSSES = ("loss_qskd_feature", "loss_qskd_logits", "loss_qskd_boxes", "loss_qskd_giou")


def _cxcywh(xyxy: list[list[float]]) -> torch.Tensor:
    return corners_to_center(torch.tensor(xyxy, dtype=torch.float32))


def _target(classes: list[int], xyxy: list[list[float]]) -> dict[str, torch.Tensor]:
    boxes = _cxcywh(xyxy) if xyxy else torch.zeros(0, 4)
    return {"class_labels": torch.tensor(classes, dtype=torch.long), "boxes": boxes}


EMPTY = {"class_labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}

# ---------------------------------------------------------------------------------------------------------------------
# GQS main scene (3 classes + no-object; uniform class logits, so the Hungarian match is decided by the boxes).
# Ground truth (xyxy): gt0 = [0.1, 0.1, 0.3, 0.3] (area 0.04), gt1 = [0.6, 0.6, 0.9, 0.9] (area 0.09).
# Queries (all nested in their gt, so GIoU = IoU = area ratio):
#   q0 = gt0                       GIoU(gt0) = 1
#   q1 = [0.1, 0.1, 0.3, 0.25]     GIoU(gt0) = 0.03 / 0.04 = 0.75
#   q2 = [0.1, 0.1, 0.3, 0.18]     GIoU(gt0) = 0.016 / 0.04 = 0.4
#   q3 = gt1                       GIoU(gt1) = 1
#   q4 = [0.6, 0.6, 0.85, 0.9]     GIoU(gt1) = 0.075 / 0.09 = 0.8333
#   q5 = [0.0, 0.8, 0.1, 0.9]      far from both (negative GIoU)
#   q6 = [0.1, 0.1, 0.3, 0.28]     GIoU(gt0) = 0.036 / 0.04 = 0.9
# Hungarian (class 1, L1 5, GIoU 2): gt0 -> q0 (cost -2 beats q6: 5 * 0.03 - 2 * 0.9 = -1.65), gt1 -> q3.
# tau = 0.5: hard negatives q1 (0.75, group 0), q4 (0.8333, group 1), q6 (0.9, group 0); q2 (0.4) and q5 are easy.
# Image 1: the same queries, no ground truth -> nothing selected.
# ---------------------------------------------------------------------------------------------------------------------
GT_XYXY = [[0.1, 0.1, 0.3, 0.3], [0.6, 0.6, 0.9, 0.9]]
QUERIES_XYXY = [
    [0.1, 0.1, 0.3, 0.3],
    [0.1, 0.1, 0.3, 0.25],
    [0.1, 0.1, 0.3, 0.18],
    [0.6, 0.6, 0.9, 0.9],
    [0.6, 0.6, 0.85, 0.9],
    [0.0, 0.8, 0.1, 0.9],
    [0.1, 0.1, 0.3, 0.28],
]
NONE = [-1] * 7


def _gqs_scene() -> tuple[torch.Tensor, torch.Tensor, list[dict[str, torch.Tensor]]]:
    boxes = _cxcywh(QUERIES_XYXY).expand(2, -1, -1).clone()
    logits = torch.zeros(2, 7, 4)
    return logits, boxes, [_target([0, 1], GT_XYXY), EMPTY]


def test_gqs_main_scene_positives_hard_negatives_and_groups() -> None:
    logits, boxes, labels = _gqs_scene()
    result = group_query_selection(logits, boxes, labels, tau=0.5)
    assert isinstance(result, GQSResult)
    assert result.group.dtype == torch.long and result.positive.dtype == torch.bool
    assert result.group.tolist() == [[0, 0, -1, 1, 1, -1, 0], NONE]
    assert result.positive.tolist() == [[True, False, False, True, False, False, False], [False] * 7]
    assert result.hard_negative[0].tolist() == [False, True, False, False, True, False, True]
    assert result.num_positives.item() == 2 and result.num_hard_negatives.item() == 3
    torch.testing.assert_close(
        result.best_giou[0, [0, 1, 2, 4, 6]], torch.tensor([1.0, 0.75, 0.4, 0.075 / 0.09, 0.9]), atol=1e-5, rtol=0
    )
    assert (result.best_giou[1] == -2.0).all()  # no ground truth: below any GIoU


def test_gqs_tau_and_top_k_change_the_hard_negatives_as_designed() -> None:
    logits, boxes, labels = _gqs_scene()
    # tau 0.3: q2 (0.4) joins group 0. tau 0.8: q1 (0.75) drops out, q4 (0.8333) and q6 (0.9) stay.
    assert group_query_selection(logits, boxes, labels, tau=0.3).group[0].tolist() == [0, 0, 0, 1, 1, -1, 0]
    assert group_query_selection(logits, boxes, labels, tau=0.8).group[0].tolist() == [0, -1, -1, 1, 1, -1, 0]
    # top_k = 1 per ground truth: group 0 keeps q6 (0.9) over q1 (0.75); group 1 keeps its only one, q4.
    assert group_query_selection(logits, boxes, labels, tau=0.3, top_k=1).group[0].tolist() == [0, -1, -1, 1, 1, -1, 0]
    # top_k = 2: group 0 keeps q6 and q1 (0.4 of q2 is the third); top_k = 0: positives only.
    assert group_query_selection(logits, boxes, labels, tau=0.3, top_k=2).group[0].tolist() == [0, 0, -1, 1, 1, -1, 0]
    assert group_query_selection(logits, boxes, labels, top_k=0).group[0].tolist() == [0, -1, -1, 1, -1, -1, -1]


def test_gqs_threshold_is_strict() -> None:
    # gt = the whole image; q1 = its left half: GIoU exactly 0.5 (all values exact in binary floating point).
    boxes = _cxcywh([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.5, 1.0]])[None]
    labels = [_target([0], [[0.0, 0.0, 1.0, 1.0]])]
    result = group_query_selection(torch.zeros(1, 2, 2), boxes, labels, tau=0.5)
    assert result.best_giou[0, 1].item() == 0.5
    assert result.group.tolist() == [[0, -1]]
    assert group_query_selection(torch.zeros(1, 2, 2), boxes, labels, tau=0.49).group.tolist() == [[0, 0]]


def test_gqs_class_cost_decides_the_positive_and_the_duplicate_is_a_hard_negative() -> None:
    # Two queries on exactly the gt box; q0 predicts class 2, q1 the gt class 1. Class cost -p[1]: q1 is matched.
    boxes = _cxcywh([[0.2, 0.2, 0.5, 0.6], [0.2, 0.2, 0.5, 0.6], [0.7, 0.7, 0.8, 0.8]])[None]
    logits = torch.tensor([[[0.0, 0.0, 5.0, 0.0], [0.0, 5.0, 0.0, 0.0], [0.0, 0.0, 0.0, 5.0]]])
    result = group_query_selection(logits, boxes, [_target([1], [[0.2, 0.2, 0.5, 0.6]])])
    assert result.positive.tolist() == [[False, True, False]]
    assert result.group.tolist() == [[0, 0, -1]]  # q0 (GIoU 1 > 0.5, unmatched) is a hard negative of the same gt
    # With class_cost = 0 the tie between the identical boxes goes to the lower query index instead.
    result = group_query_selection(logits, boxes, [_target([1], [[0.2, 0.2, 0.5, 0.6]])], class_cost=0.0)
    assert result.positive.tolist() == [[True, False, False]]


def test_gqs_hard_negative_joins_the_group_of_its_best_overlapping_gt() -> None:
    # gtA = [0.2, 0.2, 0.6, 0.6], gtB = [0.4, 0.2, 0.8, 0.6]; q2 = [0.32, 0.2, 0.72, 0.6]:
    #   vs A: inter 0.28 * 0.4 = 0.112, union 0.208, hull 0.52 * 0.4 = 0.208 -> GIoU 0.5385
    #   vs B: inter 0.32 * 0.4 = 0.128, union 0.192, hull 0.48 * 0.4 = 0.192 -> GIoU 0.6667  => group B (index 1)
    gts = [[0.2, 0.2, 0.6, 0.6], [0.4, 0.2, 0.8, 0.6]]
    boxes = _cxcywh([gts[1], gts[0], [0.32, 0.2, 0.72, 0.6]])[None]
    result = group_query_selection(torch.zeros(1, 3, 4), boxes, [_target([0, 0], gts)])
    assert result.positive.tolist() == [[True, True, False]]
    assert result.group.tolist() == [[1, 0, 1]]
    assert result.best_giou[0, 2].item() == pytest.approx(0.128 / 0.192, abs=1e-5)


def _reference_gqs(logits, boxes, gt_classes, gt_boxes, tau, costs=(1.0, 5.0, 2.0)) -> list[list[int]]:
    """Per-image loops: DETR's cost from its definition, scipy's assignment, then the hard-negative rule."""
    groups = []
    for image in range(logits.shape[0]):
        row = [-1] * logits.shape[1]
        classes, gts = gt_classes[image], gt_boxes[image]
        if len(gts):
            prob = logits[image].softmax(-1)
            giou = hf_generalized_box_iou(center_to_corners(boxes[image]), center_to_corners(gts))
            cost = costs[0] * -prob[:, classes] + costs[1] * torch.cdist(boxes[image], gts, p=1) - costs[2] * giou
            for query, gt in zip(*linear_sum_assignment(cost.numpy())):
                row[query] = int(gt)
            for query in range(logits.shape[1]):
                best = max(range(len(gts)), key=lambda g: giou[query, g].item())
                if row[query] == -1 and giou[query, best].item() > tau:
                    row[query] = best
        groups.append(row)
    return groups


@pytest.mark.parametrize("tau", [0.3, 0.5])
def test_gqs_matches_a_naive_reference(tau: float) -> None:
    generator = torch.Generator().manual_seed(0)

    def boxes(*shape: int) -> torch.Tensor:
        centre = torch.rand(*shape, 2, generator=generator) * 0.6 + 0.2
        return torch.cat([centre, torch.rand(*shape, 2, generator=generator) * 0.3 + 0.1], dim=-1)

    num_gt = [3, 0, 1, 6]
    gts = [boxes(n) for n in num_gt]
    # Queries jittered around the ground truth so that hard negatives exist.
    pred = boxes(4, 12)
    for image, gt in enumerate(gts):
        for index in range(min(len(gt) * 2, 12)):
            pred[image, index] = gt[index % len(gt)] + 0.03 * torch.randn(4, generator=generator)
    classes = [torch.randint(0, 3, (n,), generator=generator) for n in num_gt]
    logits = torch.randn(4, 12, 4, generator=generator)
    labels = [{"class_labels": c, "boxes": b} for c, b in zip(classes, gts)]
    result = group_query_selection(logits, pred, labels, tau=tau)
    assert result.group.tolist() == _reference_gqs(logits, pred, classes, gts, tau)
    assert result.num_positives.item() == 3 + 1 + 6
    assert result.num_hard_negatives.item() > 0


def test_gqs_validates_inputs() -> None:
    logits, boxes, labels = _gqs_scene()
    with pytest.raises(ValueError, match="tau"):
        group_query_selection(logits, boxes, labels, tau=1.5)
    with pytest.raises(ValueError, match="top_k"):
        group_query_selection(logits, boxes, labels, top_k=-1)
    with pytest.raises(ValueError, match="one target dict per image"):
        group_query_selection(logits, boxes, labels[:1])
    with pytest.raises(ValueError, match="class_labels must lie"):
        group_query_selection(logits, boxes, [_target([0, 3], GT_XYXY), EMPTY])  # 3 = the no-object column
    with pytest.raises(ValueError, match="cannot all be 0"):
        group_query_selection(logits, boxes, labels, class_cost=0.0, bbox_cost=0.0, giou_cost=0.0)
    with pytest.raises(ValueError, match="disagree"):
        group_query_selection(logits[:, :5], boxes, labels)


# ---------------------------------------------------------------------------------------------------------------------
# Attention mask. Image 0, 2 heads, 3 queries, 4 tokens; query 2 is not selected.
#   q0: head0 [0.1, 0.6, 0.2, 0.1], head1 [0.3, 0.2, 0.4, 0.1] -> mean [0.2, 0.4, 0.3, 0.1]
#   q1: head0 [0.7, 0.1, 0.1, 0.1], head1 [0.5, 0.1, 0.3, 0.1] -> mean [0.6, 0.1, 0.2, 0.1]
#   q2: [0, 0, 0, 1] in both heads (ignored: not selected)
# max over q0, q1: [0.6, 0.4, 0.3, 0.1] / 0.6 = [1, 2/3, 1/2, 1/6]
# sum:             [0.8, 0.5, 0.5, 0.2] / 0.8 = [1, 0.625, 0.625, 0.25]
# token 0 padded, max: [0, 0.4, 0.3, 0.1] / 0.4 = [0, 1, 0.75, 0.25]
# Image 1 selects nothing -> all zeros.
# ---------------------------------------------------------------------------------------------------------------------
def _attention() -> tuple[torch.Tensor, torch.Tensor]:
    image0 = torch.tensor(
        [
            [[0.1, 0.6, 0.2, 0.1], [0.7, 0.1, 0.1, 0.1], [0.0, 0.0, 0.0, 1.0]],
            [[0.3, 0.2, 0.4, 0.1], [0.5, 0.1, 0.3, 0.1], [0.0, 0.0, 0.0, 1.0]],
        ]
    )
    attention = torch.stack([image0, image0.flip(-1)])  # (B=2, heads=2, Q=3, HW=4)
    selected = torch.tensor([[True, True, False], [False, False, False]])
    return attention, selected


def test_attention_mask_on_a_hand_made_map() -> None:
    attention, selected = _attention()
    mask = attention_foreground_mask(attention, selected)
    torch.testing.assert_close(mask, torch.tensor([[1.0, 2 / 3, 0.5, 1 / 6], [0.0] * 4]))
    summed = attention_foreground_mask(attention, selected, reduction="sum")
    torch.testing.assert_close(summed, torch.tensor([[1.0, 0.625, 0.625, 0.25], [0.0] * 4]))
    token_mask = torch.tensor([[False, True, True, True], [True] * 4])
    padded = attention_foreground_mask(attention, selected, token_mask=token_mask)
    torch.testing.assert_close(padded, torch.tensor([[0.0, 1.0, 0.75, 0.25], [0.0] * 4]))
    # Already head-averaged input gives the same mask; the mask is never differentiated.
    averaged = attention.mean(dim=1).requires_grad_(True)
    again = attention_foreground_mask(averaged, selected)
    torch.testing.assert_close(again, mask)
    assert again.grad_fn is None
    with pytest.raises(ValueError, match="reduction"):
        attention_foreground_mask(attention, selected, reduction="mean")
    with pytest.raises(ValueError, match="selected"):
        attention_foreground_mask(attention, selected[:, :2])
    with pytest.raises(ValueError, match="token_mask"):
        attention_foreground_mask(attention, selected, token_mask=token_mask[:, :3])


# ---------------------------------------------------------------------------------------------------------------------
# Feature loss, B = 1, HW = 3, d = 2:
#   teacher [[0, 0], [1, 1], [2, 0]], student [[3, 4], [1, 1], [2, 2]] -> squared distances (sum) 25, 0, 4
#   mask [1, 0.5, 0.5]: sum over channels  (25 + 0 + 2) / 2 = 13.5;  mean over channels (12.5 + 0 + 1) / 2 = 6.75
#   gradient (sum): 2 M (s - t) / ΣM -> token 0: 2 * (3, 4) / 2 = (3, 4), token 2: 2 * 0.5 * (0, 2) / 2 = (0, 1)
# ---------------------------------------------------------------------------------------------------------------------
FEATURE_TEACHER = [[[0.0, 0.0], [1.0, 1.0], [2.0, 0.0]]]
FEATURE_STUDENT = [[[3.0, 4.0], [1.0, 1.0], [2.0, 2.0]]]
FEATURE_MASK = [[1.0, 0.5, 0.5]]


def test_feature_loss_known_answer_and_gradient() -> None:
    student = torch.tensor(FEATURE_STUDENT, requires_grad=True)
    teacher = torch.tensor(FEATURE_TEACHER, requires_grad=True)
    mask = torch.tensor(FEATURE_MASK)
    loss = attention_guided_feature_loss(student, teacher, mask, channel_reduction="sum")
    assert loss.item() == pytest.approx(13.5)
    loss.backward()
    torch.testing.assert_close(student.grad, torch.tensor([[[3.0, 4.0], [0.0, 0.0], [0.0, 1.0]]]))
    assert teacher.grad is None
    mean = attention_guided_feature_loss(torch.tensor(FEATURE_STUDENT), torch.tensor(FEATURE_TEACHER), mask)
    assert mean.item() == pytest.approx(6.75)  # the default averages over channels


def test_feature_loss_ignores_masked_tokens_and_is_zero_without_mask() -> None:
    student = torch.tensor(FEATURE_STUDENT)
    student[0, 1] = float("nan")  # a token with M = 0 may hold anything
    mask = torch.tensor([[1.0, 0.0, 0.5]])
    student.requires_grad_(True)
    loss = attention_guided_feature_loss(student, torch.tensor(FEATURE_TEACHER), mask, channel_reduction="sum")
    assert loss.item() == pytest.approx((25.0 + 2.0) / 1.5)
    loss.backward()
    assert torch.isfinite(student.grad).all() and (student.grad[0, 1] == 0).all()
    empty = torch.randn(2, 5, 3, requires_grad=True)
    zero = attention_guided_feature_loss(empty, torch.randn(2, 5, 3), torch.zeros(2, 5))
    assert zero.item() == 0.0 and zero.grad_fn is not None
    zero.backward()
    assert (empty.grad == 0).all()


def test_feature_loss_with_a_learned_adapter_when_widths_differ() -> None:
    # phi(s) = W s + b with W = [[1, 0], [0, 1], [1, 1]], b = (0, 0, 1): student (3, 4) -> (3, 4, 8).
    adapter = nn.Linear(2, 3)
    with torch.no_grad():
        adapter.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        adapter.bias.copy_(torch.tensor([0.0, 0.0, 1.0]))
    student = torch.tensor([[[3.0, 4.0], [1.0, 1.0]]])
    teacher = torch.tensor([[[3.0, 4.0, 6.0], [0.0, 0.0, 0.0]]])  # token 0: diff (0, 0, 2) -> 4; token 1 masked
    loss = attention_guided_feature_loss(student, teacher, torch.tensor([[1.0, 0.0]]), adapter, channel_reduction="sum")
    assert loss.item() == pytest.approx(4.0)
    loss.backward()
    # d loss / d W[2] = 2 * diff_2 * s = 2 * 2 * (3, 4); the other rows have zero difference.
    torch.testing.assert_close(adapter.weight.grad, torch.tensor([[0.0, 0.0], [0.0, 0.0], [12.0, 16.0]]))
    torch.testing.assert_close(adapter.bias.grad, torch.tensor([0.0, 0.0, 4.0]))
    with pytest.raises(ValueError, match="adapter"):
        attention_guided_feature_loss(student, teacher, torch.ones(1, 2))
    with pytest.raises(ValueError, match="same tokens"):
        attention_guided_feature_loss(student, teacher[:, :1], torch.ones(1, 2), adapter)


# ---------------------------------------------------------------------------------------------------------------------
# LAPD pairing.
# ---------------------------------------------------------------------------------------------------------------------
def test_lapd_never_pairs_across_groups_even_when_a_global_match_would() -> None:
    # Teacher t0 (group 0) sits where the student's group-1 query s1 is, and t1 (group 1) where s0 (group 0) is.
    # A global match pairs the identical boxes (s0-t1, s1-t0); QSKD pairs inside the groups (s0-t0, s1-t1).
    box_a, box_b = [0.3, 0.3, 0.2, 0.2], [0.34, 0.3, 0.2, 0.2]
    student_boxes = torch.tensor([[box_b, box_a, [0.8, 0.8, 0.1, 0.1]]])
    teacher_boxes = torch.tensor([[box_a, box_b]])
    student_logits, teacher_logits = torch.zeros(1, 3, 4), torch.zeros(1, 2, 4)
    student_groups, teacher_groups = torch.tensor([[0, 1, -1]]), torch.tensor([[0, 1]])
    pairs = local_alignment_matching(
        student_logits, student_boxes, student_groups, teacher_logits, teacher_boxes, teacher_groups
    )
    assert pairs.teacher_index.tolist() == [[0, 1, -1]]
    assert pairs.paired.tolist() == [[True, True, False]] and pairs.num_pairs.item() == 2
    # The global match over the same costs (what a non-local method would do) crosses the groups.
    giou = hf_generalized_box_iou(center_to_corners(student_boxes[0, :2]), center_to_corners(teacher_boxes[0]))
    cost = 5 * torch.cdist(student_boxes[0, :2], teacher_boxes[0], p=1) - 2 * giou
    assert linear_sum_assignment(cost.numpy())[1].tolist() == [1, 0]


def test_lapd_within_a_group_is_a_bipartite_match_not_a_greedy_argmax() -> None:
    # One group, students at cx 0.45 (a) and 0.52 (b), teachers at cx 0.5 (x), 0.3 (y), 0.9 (z); L1 cost only:
    #   a: x .05, y .15, z .45;  b: x .02, y .22, z .38.  Greedy: both -> x.  Optimum: a -> y, b -> x (0.17).
    def at(cx: float) -> list[float]:
        return [cx, 0.5, 0.1, 0.1]

    student_boxes = torch.tensor([[at(0.45), at(0.52)]])
    teacher_boxes = torch.tensor([[at(0.5), at(0.3), at(0.9)]])
    pairs = local_alignment_matching(
        torch.zeros(1, 2, 4),
        student_boxes,
        torch.tensor([[0, 0]]),
        torch.zeros(1, 3, 4),
        teacher_boxes,
        torch.tensor([[0, 0, 0]]),
        class_cost=0.0,
        bbox_cost=1.0,
        giou_cost=0.0,
    )
    assert pairs.teacher_index.tolist() == [[1, 0]]


def test_lapd_class_cost_uses_the_teachers_class() -> None:
    # Identical boxes, so only the class cost -p_S[teacher's arg-max class] separates the pairs.
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2]] * 2])
    student_logits = torch.tensor([[[5.0, 0.0, 0.0], [0.0, 5.0, 0.0]]])
    teacher_logits = torch.tensor([[[0.0, 3.0, 0.0], [3.0, 0.0, 0.0]]])  # t0 says class 1, t1 class 0
    groups = torch.tensor([[0, 0]])
    pairs = local_alignment_matching(student_logits, boxes, groups, teacher_logits, boxes, groups)
    assert pairs.teacher_index.tolist() == [[1, 0]]


def _reference_lapd(cost: torch.Tensor, student_groups: torch.Tensor, teacher_groups: torch.Tensor) -> list[list[int]]:
    """An independent Hungarian match per image and per group (loops)."""
    result = []
    for image in range(cost.shape[0]):
        row = [-1] * cost.shape[1]
        for group in sorted(set(student_groups[image].tolist()) - {-1}):
            students = (student_groups[image] == group).nonzero().squeeze(1)
            teachers = (teacher_groups[image] == group).nonzero().squeeze(1)
            if len(teachers) == 0:
                continue
            sub = cost[image][students][:, teachers]
            for r, c in zip(*linear_sum_assignment(sub.numpy())):
                row[students[r]] = int(teachers[c])
        result.append(row)
    return result


def test_lapd_matches_an_independent_per_group_match() -> None:
    generator = torch.Generator().manual_seed(3)
    batch, num_student, num_teacher = 3, 10, 7

    def boxes(*shape: int) -> torch.Tensor:
        centre = torch.rand(*shape, 2, generator=generator) * 0.6 + 0.2
        return torch.cat([centre, torch.rand(*shape, 2, generator=generator) * 0.3 + 0.1], dim=-1)

    student_boxes, teacher_boxes = boxes(batch, num_student), boxes(batch, num_teacher)
    student_logits = torch.randn(batch, num_student, 4, generator=generator)
    teacher_logits = torch.randn(batch, num_teacher, 4, generator=generator)
    student_groups = torch.randint(-1, 3, (batch, num_student), generator=generator)
    teacher_groups = torch.randint(-1, 4, (batch, num_teacher), generator=generator)
    pairs = local_alignment_matching(
        student_logits, student_boxes, student_groups, teacher_logits, teacher_boxes, teacher_groups
    )
    prob = student_logits.softmax(-1)
    teacher_class = teacher_logits.argmax(-1)
    cost = torch.zeros(batch, num_student, num_teacher)
    for image, j, k in itertools.product(range(batch), range(num_student), range(num_teacher)):
        s, t = student_boxes[image, j], teacher_boxes[image, k]
        giou = hf_generalized_box_iou(center_to_corners(s[None]), center_to_corners(t[None]))[0, 0]
        cost[image, j, k] = -prob[image, j, teacher_class[image, k]] + 5 * (s - t).abs().sum() - 2 * giou
    expected = _reference_lapd(cost, student_groups, teacher_groups)
    assert pairs.teacher_index.tolist() == expected
    index = pairs.teacher_index
    assert (student_groups[index >= 0] == teacher_groups.gather(1, index.clamp_min(0))[index >= 0]).all()
    assert 0 < pairs.num_pairs.item() < batch * num_student


# ---------------------------------------------------------------------------------------------------------------------
# LAPD loss. One image, Qs = 3, Qt = 2, 1 class + no-object. Student 0 pairs with teacher 1; students 1, 2 unpaired.
#   logits: s0 = [0, 0] (p = [.5, .5]), t1 = [ln 3, 0] (p = [.75, .25])
#     KL(t || s) = .75 ln(1.5) + .25 ln(.5) = 0.130812
#   boxes: s0 = (0.5, 0.5, 0.2, 0.2), t1 = (0.6, 0.5, 0.2, 0.2): L1 = 0.1; xyxy [0.4, 0.4, 0.6, 0.6] vs
#     [0.5, 0.4, 0.7, 0.6]: inter 0.02, union 0.06, hull 0.06 -> GIoU 1/3, 1 - GIoU = 2/3
#   BCE on the object column: σ(0) = 0.5 against σ(ln 3) = 0.75 -> -(.75 ln .5 + .25 ln .5) = ln 2
# ---------------------------------------------------------------------------------------------------------------------
def _lapd_scene() -> tuple[torch.Tensor, ...]:
    nan = float("nan")
    student_logits = torch.tensor([[[0.0, 0.0], [nan, nan], [9.0, -9.0]]])
    student_boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [nan, nan, nan, nan], [0.1, 0.1, 0.1, 0.1]]])
    teacher_logits = torch.tensor([[[5.0, 5.0], [math.log(3.0), 0.0]]])
    teacher_boxes = torch.tensor([[[0.2, 0.2, 0.1, 0.1], [0.6, 0.5, 0.2, 0.2]]])
    teacher_index = torch.tensor([[1, -1, -1]])
    return student_logits, student_boxes, teacher_logits, teacher_boxes, teacher_index


KL_EXPECTED = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)


def test_lapd_loss_known_values_and_gradient() -> None:
    student_logits, student_boxes, teacher_logits, teacher_boxes, teacher_index = _lapd_scene()
    student_logits.requires_grad_(True)
    student_boxes.requires_grad_(True)
    terms = local_alignment_prediction_loss(student_logits, student_boxes, teacher_logits, teacher_boxes, teacher_index)
    assert terms["logits"].item() == pytest.approx(KL_EXPECTED, abs=1e-6)
    assert terms["l1"].item() == pytest.approx(0.1, abs=1e-6)
    assert terms["giou"].item() == pytest.approx(2.0 / 3.0, abs=1e-6)
    sum(terms.values()).backward()
    # d KL / d z_S = p_S - p_T = (-0.25, 0.25); unpaired rows (even NaN ones) get exactly zero gradient.
    torch.testing.assert_close(student_logits.grad[0, 0], torch.tensor([-0.25, 0.25]))
    assert (student_logits.grad[0, 1:] == 0).all() and (student_boxes.grad[0, 1:] == 0).all()
    assert torch.isfinite(student_boxes.grad).all()


def test_lapd_loss_temperature_bce_and_layers() -> None:
    student_logits, student_boxes, teacher_logits, teacher_boxes, teacher_index = _lapd_scene()
    # T = 2: p_S = [.5, .5], p_T = softmax([ln 3 / 2, 0]) = [√3, 1] / (√3 + 1); scaled by T² = 4.
    hot = local_alignment_prediction_loss(
        student_logits, student_boxes, teacher_logits, teacher_boxes, teacher_index, temperature=2.0
    )
    p = math.sqrt(3.0) / (math.sqrt(3.0) + 1.0)
    assert hot["logits"].item() == pytest.approx(4 * (p * math.log(2 * p) + (1 - p) * math.log(2 * (1 - p))), abs=1e-6)
    bce = local_alignment_prediction_loss(
        student_logits, student_boxes, teacher_logits, teacher_boxes, teacher_index, logits_loss="bce"
    )
    assert bce["logits"].item() == pytest.approx(math.log(2.0), abs=1e-6)
    # Two layers: the second equals its partner exactly -> every term is halved (mean over layers).
    second_logits, second_boxes = student_logits.clone(), student_boxes.clone()
    second_logits[0, 0], second_boxes[0, 0] = teacher_logits[0, 1], teacher_boxes[0, 1]
    layered = local_alignment_prediction_loss(
        torch.stack([student_logits, second_logits]),
        torch.stack([student_boxes, second_boxes]),
        teacher_logits,
        teacher_boxes,
        teacher_index,
    )
    assert layered["logits"].item() == pytest.approx(KL_EXPECTED / 2, abs=1e-6)
    assert layered["l1"].item() == pytest.approx(0.05, abs=1e-6)
    assert layered["giou"].item() == pytest.approx(1.0 / 3.0, abs=1e-6)
    with pytest.raises(ValueError, match="temperature"):
        local_alignment_prediction_loss(
            student_logits, student_boxes, teacher_logits, teacher_boxes, teacher_index, temperature=0.0
        )
    with pytest.raises(ValueError, match="teacher_index"):
        local_alignment_prediction_loss(
            student_logits, student_boxes, teacher_logits, teacher_boxes, torch.tensor([[2, -1, -1]])
        )


def test_lapd_loss_without_pairs_is_zero_with_a_gradient() -> None:
    student_logits, student_boxes, teacher_logits, teacher_boxes, _ = _lapd_scene()
    student_logits = student_logits.nan_to_num().requires_grad_(True)
    student_boxes.requires_grad_(True)
    terms = local_alignment_prediction_loss(
        student_logits, student_boxes, teacher_logits, teacher_boxes, torch.full((1, 3), -1)
    )
    for value in terms.values():
        assert value.item() == 0.0 and value.grad_fn is not None
    sum(terms.values()).backward()
    assert (student_logits.grad == 0).all() and (student_boxes.grad == 0).all()


# ---------------------------------------------------------------------------------------------------------------------
# The distiller on tiny real DETRs (teacher d_model 32 with eager attention; students d_model 32 or 16).
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def models() -> dict[str, DetrForObjectDetection]:
    torch.manual_seed(0)
    teacher = DetrForObjectDetection(DetrConfig(**tiny_detr_kwargs(attn_implementation="eager"))).eval()
    student = DetrForObjectDetection(DetrConfig(**tiny_detr_kwargs(num_queries=10))).eval()
    narrow = DetrForObjectDetection(DetrConfig(**tiny_detr_kwargs(d_model=16))).eval()
    return {"teacher": teacher, "student": student, "narrow": narrow}


def _outputs(model: nn.Module, images: torch.Tensor, pixel_mask: torch.Tensor, grad: bool) -> DetectorOutputs:
    with torch.set_grad_enabled(grad), capture_decoder_inputs(model) as decoder_inputs:
        out = model(pixel_values=images, pixel_mask=pixel_mask, output_attentions=True, output_hidden_states=True)
    return DetectorOutputs(
        logits=out.logits,
        pred_boxes=out.pred_boxes,
        outputs=out,
        model=model,
        pixel_values=images,
        pixel_mask=pixel_mask,
        decoder_inputs=dict(decoder_inputs),
    )


SCENE_LABELS = [
    _target([0, 2], [[0.1, 0.2, 0.5, 0.6], [0.55, 0.5, 0.95, 0.9]]),
    _target([1], [[0.2, 0.1, 0.8, 0.7]]),
]


def _run(distiller, models, student_name, images, labels, pixel_mask=None):
    if pixel_mask is None:
        pixel_mask = torch.ones(images.shape[0], *images.shape[2:], dtype=torch.long)
    student = _outputs(models[student_name], images, pixel_mask, grad=True)
    teacher = _outputs(models["teacher"], images, pixel_mask, grad=False)
    return distiller(student, teacher, labels)


def test_distiller_terms_on_tiny_models(models, images) -> None:
    # tau 0 so the random tiny models have hard negatives too.
    out = _run(QSKDDistiller(tau=0.0), models, "student", images, SCENE_LABELS)
    assert set(QSKD_LOSSES) <= set(out)
    for key in QSKD_LOSSES:
        assert torch.isfinite(out[key]) and out[key].item() > 0 and out[key].grad_fn is not None, key
    assert out["qskd_positives"].item() == 3 and out["qskd_teacher_positives"].item() == 3
    assert out["qskd_hard_negatives"].item() > 0
    assert 3 <= out["qskd_pairs"].item() <= 3 + out["qskd_hard_negatives"].item()
    assert all(not out[k].requires_grad for k in out if not k.startswith("loss_"))
    # Weights scale their terms linearly.
    heavy = _run(
        QSKDDistiller(tau=0.0, feature_weight=3.0, logits_weight=2.0, boxes_weight=10.0, giou_weight=1.0),
        models,
        "student",
        images,
        SCENE_LABELS,
    )
    for key, factor in zip(QSKD_LOSSES, (3.0, 2.0, 2.0, 0.5)):
        assert heavy[key].item() == pytest.approx(factor * out[key].item(), rel=1e-5), key
    # Distilling only the final layer changes the prediction terms, not the feature term.
    last = _run(QSKDDistiller(tau=0.0, all_layers=False), models, "student", images, SCENE_LABELS)
    assert last["loss_qskd_feature"].item() == pytest.approx(out["loss_qskd_feature"].item(), rel=1e-6)
    assert last["loss_qskd_logits"].item() != pytest.approx(out["loss_qskd_logits"].item(), rel=1e-3)


def test_distiller_image_without_objects(models, images) -> None:
    distiller = QSKDDistiller(tau=0.0)
    # A batch with no objects at all: every term is an exact 0, connected to the student, with finite gradients.
    out = _run(distiller, models, "student", images, [EMPTY, EMPTY])
    student = models["student"]
    student.zero_grad()
    total = sum(out[k] for k in QSKD_LOSSES)
    for key in QSKD_LOSSES:
        assert out[key].item() == 0.0 and out[key].grad_fn is not None, key
    total.backward()
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert out["qskd_positives"].item() == 0 and out["qskd_pairs"].item() == 0
    # An empty image in a batch contributes nothing: the terms equal those of the other image alone.
    mixed = _run(distiller, models, "student", images, [SCENE_LABELS[0], EMPTY])
    alone = _run(distiller, models, "student", images[:1], SCENE_LABELS[:1])
    for key in QSKD_LOSSES:
        assert mixed[key].item() == pytest.approx(alone[key].item(), rel=1e-4, abs=1e-7), key
    student.zero_grad()


def test_distiller_is_batch_size_independent(models, images) -> None:
    distiller = QSKDDistiller(tau=0.0)
    single = _run(distiller, models, "student", images, SCENE_LABELS)
    double = _run(distiller, models, "student", images.repeat(2, 1, 1, 1), SCENE_LABELS * 2)
    for key in QSKD_LOSSES:
        assert double[key].item() == pytest.approx(single[key].item(), rel=1e-4), key
    for key in ("qskd_positives", "qskd_hard_negatives", "qskd_pairs"):
        assert double[key].item() == 2 * single[key].item(), key


def test_distiller_excludes_padded_tokens(models, images) -> None:
    # Right half of image 1 padded: its encoder tokens there leave the mask (and so the feature loss).
    pixel_mask = torch.ones(2, 64, 64, dtype=torch.long)
    pixel_mask[1, :, 32:] = 0
    teacher = _outputs(models["teacher"], images, pixel_mask, grad=False)
    distiller = QSKDDistiller(tau=0.0)
    mask = distiller.foreground_mask(teacher, distiller.select(teacher, SCENE_LABELS))
    token_mask = teacher.decoder_inputs["encoder_attention_mask"]
    assert not token_mask[1].all() and token_mask[0].all()
    assert (mask[~token_mask] == 0).all()
    assert (mask.amax(dim=-1) == 1).all() and mask.min() >= 0
    # Without the captured decoder inputs a padded batch is a clear error, not a silently wrong mask.
    teacher.decoder_inputs = None
    with pytest.raises(ValueError, match="padding mask"):
        distiller.foreground_mask(teacher, distiller.select(teacher, SCENE_LABELS))


def test_distiller_learned_adapter_when_d_model_differs(models, images) -> None:
    with pytest.raises(ValueError, match="adapter"):
        _run(QSKDDistiller(), models, "narrow", images, SCENE_LABELS)
    distiller = QSKDDistiller(student_dim=16, teacher_dim=32)
    assert isinstance(distiller.adapter, nn.Linear)
    assert [p.shape for p in distiller.parameters() if p.requires_grad] == [torch.Size([32, 16]), torch.Size([32])]
    assert not list(QSKDDistiller(student_dim=32, teacher_dim=32).parameters())  # identity when widths match
    out = _run(distiller, models, "narrow", images, SCENE_LABELS)
    out["loss_qskd_feature"].backward()
    assert distiller.adapter.weight.grad is not None and distiller.adapter.weight.grad.abs().sum() > 0
    models["narrow"].zero_grad()


def test_distiller_validates_its_arguments() -> None:
    with pytest.raises(ValueError, match="tau"):
        QSKDDistiller(tau=2.0)
    with pytest.raises(ValueError, match="boxes_weight"):
        QSKDDistiller(boxes_weight=-1.0)
    with pytest.raises(ValueError, match="logits_loss"):
        QSKDDistiller(logits_loss="mse")
    with pytest.raises(ValueError, match="attention_reduction"):
        QSKDDistiller(attention_reduction="mean")
    with pytest.raises(ValueError, match="student_dim"):
        QSKDDistiller(student_dim=0, teacher_dim=32)
    distiller = QSKDDistiller()
    assert distiller.name == "qskd" and distiller.needs_attentions and distiller.needs_hidden_states


@pytest.mark.slow
def test_short_training_run_lowers_the_qskd_loss(tmp_path, tiny_teacher_dir, tiny_shapes) -> None:
    dataset, collator = tiny_shapes
    args = tiny_training_args(
        tmp_path / "out", max_steps=30, learning_rate=1e-3, lr_scheduler_type="constant", calibration_batches=2
    )
    trainer = QDetrDistillationTrainer(
        model=QDetrForObjectDetection.from_pretrained(tiny_teacher_dir),
        args=args,
        teacher_model=load_teacher(tiny_teacher_dir),
        distiller=QSKDDistiller(),
        train_dataset=dataset,
        data_collator=collator,
    )
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss_qskd_feature" in entry]
    assert len(logged) == 30
    totals = [sum(entry[key] for key in QSKD_LOSSES) for entry in logged]
    assert all(math.isfinite(t) and t > 0 for t in totals)
    first, last = sum(totals[:10]) / 10, sum(totals[-10:]) / 10
    assert last < 0.8 * first, (first, last)


def test_validate_false_gives_the_same_selection_and_pairs_without_checking() -> None:
    logits, boxes, labels = _gqs_scene()
    checked = group_query_selection(logits, boxes, labels, top_k=1)
    unchecked = group_query_selection(logits, boxes, labels, top_k=1, validate=False)
    for field in ("group", "positive", "best_giou"):
        assert torch.equal(getattr(checked, field), getattr(unchecked, field)), field
    assert checked.group[1].tolist() == NONE and checked.num_positives.item() == 2
    # The class range is only checked with validation (the trainer's DETR loss has seen the labels).
    out_of_range = [_target([0, 3], GT_XYXY), EMPTY]
    with pytest.raises(ValueError, match="class_labels must lie"):
        group_query_selection(logits, boxes, out_of_range)
    group_query_selection(logits, boxes, out_of_range, validate=False)

    student_logits, student_boxes, teacher_logits, teacher_boxes, teacher_index = _lapd_scene()
    groups = checked.group
    assert torch.equal(
        local_alignment_matching(logits, boxes, groups, logits, boxes, groups).teacher_index,
        local_alignment_matching(logits, boxes, groups, logits, boxes, groups, validate=False).teacher_index,
    )
    terms = local_alignment_prediction_loss(student_logits, student_boxes, teacher_logits, teacher_boxes, teacher_index)
    same = local_alignment_prediction_loss(
        student_logits, student_boxes, teacher_logits, teacher_boxes, teacher_index, validate=False
    )
    assert {k: v.item() for k, v in terms.items()} == {k: v.item() for k, v in same.items()}
    with pytest.raises(ValueError, match="teacher_index must lie"):
        local_alignment_prediction_loss(
            student_logits, student_boxes, teacher_logits, teacher_boxes, torch.tensor([[1, -2, -1]])
        )
