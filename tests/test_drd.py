"""Tests for Q-DETR's Foreground-aware Query Matching and DRD loss on hand-built scenes with known answers."""

from __future__ import annotations

import pytest
import torch
from transformers.loss.loss_for_object_detection import generalized_box_iou as hf_generalized_box_iou

from qdetr_hf.box_ops import center_to_corners, corners_to_center
from qdetr_hf.distillers import (
    DEFAULT_DRD_WEIGHT,
    FQMResult,
    compute_drd,
    drd_loss,
    foreground_aware_query_matching,
)


def _cxcywh(xyxy: list[list[float]]) -> torch.Tensor:
    return corners_to_center(torch.tensor(xyxy, dtype=torch.float32))


# ---------------------------------------------------------------------------------------------------------------------
# Main scene. Image 0 has two ground-truth boxes (xyxy):
#   gt0 = [0.1, 0.1, 0.3, 0.3]  (area 0.04)      gt1 = [0.6, 0.6, 0.9, 0.9]  (area 0.09)
# and five student queries:
#   s0 = [0.1, 0.1, 0.3, 0.30]  == gt0                   GIoU(gt0, s0) = 1
#   s1 = [0.1, 0.1, 0.3, 0.25]  nested in gt0: inter 0.2*0.15 = 0.03, union 0.04, hull = gt0 -> GIoU 0.75
#   s2 = [0.1, 0.1, 0.3, 0.20]  nested in gt0: inter 0.02, union 0.04, hull = gt0             -> GIoU 0.50
#   s3 = [0.6, 0.6, 0.85, 0.9]  nested in gt1: inter 0.25*0.3 = 0.075, union 0.09            -> GIoU 0.8333
#   s4 = [0.6, 0.6, 0.9, 0.70]  nested in gt1: inter 0.3*0.1 = 0.03, union 0.09              -> GIoU 0.3333
# s0-s2 are disjoint from gt1 and s3-s4 from gt0 (negative GIoU there). So
#   G_0 = 1      -> threshold 0.6 * 1 = 0.6: s0 (1) and s1 (0.75) pass, s2 (0.5) does not.
#   G_1 = 0.8333 -> threshold 0.6 * 0.8333 = 0.5: s3 (0.8333) passes, s4 (0.3333) does not.
# selected = [T, T, F, T, F]; s3 is kept through gt1 only ("at least one gt", not "for all gt").
# Teachers (Qt = 7 != Qs = 5): exact copies of the students in a shuffled order plus two far-away boxes. The score
# 2*GIoU - 5*L1 is <= 2 with equality only for an identical box, so each student pairs with its copy:
#   teacher order [far_a, s3, s1, far_b, s0, s4, s2] -> s0->4, s1->2, s2->6, s3->1, s4->5.
# Image 1: the same queries but no ground truth -> nothing selected.
# ---------------------------------------------------------------------------------------------------------------------
STUDENTS_XYXY = [
    [0.1, 0.1, 0.3, 0.30],
    [0.1, 0.1, 0.3, 0.25],
    [0.1, 0.1, 0.3, 0.20],
    [0.6, 0.6, 0.85, 0.9],
    [0.6, 0.6, 0.9, 0.70],
]
GT_XYXY = [[0.1, 0.1, 0.3, 0.3], [0.6, 0.6, 0.9, 0.9]]
EXPECTED_SELECTED = [True, True, False, True, False]
EXPECTED_TEACHER_INDEX = [4, 2, 6, 1, 5]


def _main_scene() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    students = _cxcywh(STUDENTS_XYXY)
    far = _cxcywh([[0.0, 0.9, 0.05, 0.95], [0.9, 0.0, 0.95, 0.05]])
    teachers = torch.stack([far[0], students[3], students[1], far[1], students[0], students[4], students[2]])
    student_boxes = students.expand(2, -1, -1).clone()
    teacher_boxes = teachers.expand(2, -1, -1).clone()
    gt_boxes = torch.stack([_cxcywh(GT_XYXY), torch.tensor([[0.0, 0.0, -1.0, -1.0], [0.5, 0.5, 0.1, 0.1]])])
    gt_mask = torch.tensor([[True, True], [False, False]])  # image 1's slots are padding (even a junk box)
    return student_boxes, teacher_boxes, gt_boxes, gt_mask


def test_fqm_main_scene_selection_and_pairing() -> None:
    student_boxes, teacher_boxes, gt_boxes, gt_mask = _main_scene()
    result = foreground_aware_query_matching(student_boxes, teacher_boxes, gt_boxes, gt_mask, tau=0.6)
    assert isinstance(result, FQMResult)
    assert result.selected.dtype == torch.bool
    assert result.selected.tolist() == [EXPECTED_SELECTED, [False] * 5]
    assert result.num_selected.item() == 3
    assert result.teacher_index.dtype == torch.long
    assert result.teacher_index[0].tolist() == EXPECTED_TEACHER_INDEX
    assert result.teacher_index[1].tolist() == EXPECTED_TEACHER_INDEX  # pairing is defined for every query
    torch.testing.assert_close(result.pair_score[0], torch.full((5,), 2.0))  # identical box: 2*1 - 5*0
    # G_i: [1, 0.25*0.3/0.09] for image 0; padded slots report 0.
    torch.testing.assert_close(result.gt_giou_max, torch.tensor([[1.0, 0.075 / 0.09], [0.0, 0.0]]))
    assert torch.isfinite(result.gt_giou_max).all()


def test_fqm_tau_changes_the_selection_as_designed() -> None:
    student_boxes, teacher_boxes, gt_boxes, gt_mask = _main_scene()
    # tau = 0.45: thresholds 0.45 and 0.375 -> s2 (0.5) joins, s4 (0.3333) still out.
    result = foreground_aware_query_matching(student_boxes, teacher_boxes, gt_boxes, gt_mask, tau=0.45)
    assert result.selected[0].tolist() == [True, True, True, True, False]
    # tau = 0.8: thresholds 0.8 and 0.6667 -> only s0 (1) and s3 (0.8333).
    result = foreground_aware_query_matching(student_boxes, teacher_boxes, gt_boxes, gt_mask, tau=0.8)
    assert result.selected[0].tolist() == [True, False, False, True, False]
    # tau = 1: the strict inequality GIoU > G_i can never hold -> nothing.
    result = foreground_aware_query_matching(student_boxes, teacher_boxes, gt_boxes, gt_mask, tau=1.0)
    assert not result.selected.any()


def test_fqm_negative_best_giou_selects_nothing_for_that_gt() -> None:
    # gt A = [0, 0, 0.2, 0.2]. Students: u0 = [0.1, 0.1, 0.3, 0.3] overlaps A: inter 0.01, union 0.07, hull 0.09
    # -> GIoU = 1/7 - 2/9 = -5/63; u1 = [0.5, 0.5, 0.7, 0.7] is disjoint: union 0.08, hull 0.49 -> -0.41/0.49.
    # G_A = -5/63 < 0, so tau*G_A = -3/63 > G_A >= every GIoU(A, u_j): A keeps nothing, for any tau in [0, 1].
    students = _cxcywh([[0.1, 0.1, 0.3, 0.3], [0.5, 0.5, 0.7, 0.7]])[None]
    teachers = students.clone()
    gt_a = _cxcywh([[0.0, 0.0, 0.2, 0.2]])[None]
    mask = torch.ones(1, 1, dtype=torch.bool)
    for tau in (0.0, 0.6, 0.99):
        result = foreground_aware_query_matching(students, teachers, gt_a, mask, tau=tau)
        assert not result.selected.any(), tau
        assert result.gt_giou_max.item() == pytest.approx(-5.0 / 63.0)
    # Adding gt B == u1 (G_B = 1) keeps u1 through B only; u0 stays out (disjoint from B, negative for A).
    gt_ab = _cxcywh([[0.0, 0.0, 0.2, 0.2], [0.5, 0.5, 0.7, 0.7]])[None]
    result = foreground_aware_query_matching(students, teachers, gt_ab, torch.ones(1, 2, dtype=torch.bool), tau=0.6)
    assert result.selected.tolist() == [[False, True]]


# Pairing where the GIoU and L1 terms disagree. Student s = cxcywh (0.5, 0.5, 0.2, 0.2) = xyxy [0.4, 0.4, 0.6, 0.6].
#   t0 = (0.1, 0.9, 0.1, 0.1): far away, L1 = 0.4 + 0.4 + 0.1 + 0.1 = 1.0, GIoU < 0  -> score < -5 (never chosen).
#   t1 = (0.5, 0.5, 0.3, 0.3) = [0.35, 0.35, 0.65, 0.65]: s nested, GIoU = 0.04/0.09 = 4/9, L1 = 0.1 + 0.1 = 0.2.
#   t2 = (0.6, 0.5, 0.2, 0.2) = [0.5, 0.4, 0.7, 0.6]: inter 0.1*0.2 = 0.02, union 0.06, hull 0.3*0.2 = 0.06
#        -> GIoU = 1/3, L1 = 0.1.
# GIoU prefers t1, L1 prefers t2. Scores mu1*GIoU - mu2*L1:
#   (2, 5): t1 = 8/9 - 1 = -1/9,      t2 = 2/3 - 1/2 = 1/6    -> t2 (the L1 term decides)
#   (5, 1): t1 = 20/9 - 0.2 = 2.0222, t2 = 5/3 - 0.1 = 1.5667 -> t1 (the GIoU term decides)
#   (2, 0): t1 = 8/9 > t2 = 2/3 -> t1;  (0, 5): t1 = -1 < t2 = -0.5 -> t2.
# A second student query equal to t0 pairs with t0 (identical box).
PAIRING_STUDENTS = [[0.5, 0.5, 0.2, 0.2], [0.1, 0.9, 0.1, 0.1]]
PAIRING_TEACHERS = [[0.1, 0.9, 0.1, 0.1], [0.5, 0.5, 0.3, 0.3], [0.6, 0.5, 0.2, 0.2]]


@pytest.mark.parametrize(
    ("giou_weight", "l1_weight", "expected_index", "expected_score"),
    [(2.0, 5.0, 2, 1.0 / 6.0), (5.0, 1.0, 1, 20.0 / 9.0 - 0.2), (2.0, 0.0, 1, 8.0 / 9.0), (0.0, 5.0, 2, -0.5)],
)
def test_fqm_pairing_giou_versus_l1(
    giou_weight: float, l1_weight: float, expected_index: int, expected_score: float
) -> None:
    students = torch.tensor(PAIRING_STUDENTS)[None]
    teachers = torch.tensor(PAIRING_TEACHERS)[None]
    gt = students.clone()  # both students selected (each equals a gt box)
    result = foreground_aware_query_matching(
        students,
        teachers,
        gt,
        torch.ones(1, 2, dtype=torch.bool),
        match_giou_weight=giou_weight,
        match_l1_weight=l1_weight,
    )
    assert result.selected.tolist() == [[True, True]]
    assert result.teacher_index.tolist() == [[expected_index, 0]]
    assert result.pair_score[0, 0].item() == pytest.approx(expected_score, abs=1e-5)


def _reference_fqm(
    student_boxes: torch.Tensor,
    teacher_boxes: torch.Tensor,
    gt_list: list[torch.Tensor],
    tau: float,
) -> tuple[list[list[bool]], list[list[int]], list[list[float]]]:
    """Naive per-image, per-query loops on top of transformers' generalized_box_iou."""
    selected, pairs, gmax = [], [], []
    for image, gt in enumerate(gt_list):
        s_xyxy = center_to_corners(student_boxes[image])
        t_xyxy = center_to_corners(teacher_boxes[image])
        keep = [False] * s_xyxy.shape[0]
        g_row = []
        if gt.shape[0] > 0:
            giou = hf_generalized_box_iou(center_to_corners(gt), s_xyxy)
            for i in range(gt.shape[0]):
                g = giou[i].max().item()
                g_row.append(g)
                for j in range(s_xyxy.shape[0]):
                    if giou[i, j].item() > tau * g:
                        keep[j] = True
        pair_row = []
        giou_st = hf_generalized_box_iou(s_xyxy, t_xyxy)
        for j in range(s_xyxy.shape[0]):
            scores = [
                2.0 * giou_st[j, k].item()
                - 5.0 * (student_boxes[image, j] - teacher_boxes[image, k]).abs().sum().item()
                for k in range(t_xyxy.shape[0])
            ]
            pair_row.append(max(range(len(scores)), key=scores.__getitem__))
        selected.append(keep)
        pairs.append(pair_row)
        gmax.append(g_row)
    return selected, pairs, gmax


@pytest.mark.parametrize("tau", [0.6, 0.3])
def test_fqm_matches_naive_per_image_reference(tau: float) -> None:
    generator = torch.Generator().manual_seed(0)

    def boxes(*shape: int) -> torch.Tensor:
        return torch.cat(
            [
                torch.rand(*shape, 2, generator=generator) * 0.6 + 0.2,
                torch.rand(*shape, 2, generator=generator) * 0.4 + 0.05,
            ],
            dim=-1,
        )

    num_gt = [3, 0, 1, 5]
    student_boxes, teacher_boxes = boxes(4, 9), boxes(4, 6)
    gt_list = [boxes(n) for n in num_gt]
    gt_boxes = torch.full((4, 5, 4), 0.5)
    gt_mask = torch.zeros(4, 5, dtype=torch.bool)
    for image, gt in enumerate(gt_list):
        gt_boxes[image, : gt.shape[0]] = gt
        gt_mask[image, : gt.shape[0]] = True

    result = foreground_aware_query_matching(student_boxes, teacher_boxes, gt_boxes, gt_mask, tau=tau)
    ref_selected, ref_pairs, ref_gmax = _reference_fqm(student_boxes, teacher_boxes, gt_list, tau)
    assert result.selected.tolist() == ref_selected
    assert result.teacher_index.tolist() == ref_pairs
    for image, n in enumerate(num_gt):
        assert result.gt_giou_max[image, :n].tolist() == pytest.approx(ref_gmax[image], abs=1e-6)
    assert 0 < result.num_selected.item() < 4 * 9  # the scene is non-trivial
    assert not result.selected[1].any()  # the image without gt


def test_fqm_is_not_differentiated_and_validates_inputs() -> None:
    student_boxes, teacher_boxes, gt_boxes, gt_mask = _main_scene()
    student_boxes.requires_grad_(True)
    result = foreground_aware_query_matching(student_boxes, teacher_boxes, gt_boxes, gt_mask)
    assert result.pair_score.grad_fn is None and not result.gt_giou_max.requires_grad
    with pytest.raises(ValueError, match="tau"):
        foreground_aware_query_matching(student_boxes, teacher_boxes, gt_boxes, gt_mask, tau=1.5)
    with pytest.raises(ValueError, match="gt_mask"):
        foreground_aware_query_matching(student_boxes, teacher_boxes, gt_boxes, gt_mask.long())
    with pytest.raises(ValueError, match="batch sizes"):
        foreground_aware_query_matching(student_boxes, teacher_boxes[:1], gt_boxes, gt_mask)
    with pytest.raises(ValueError, match="match_l1_weight"):
        foreground_aware_query_matching(student_boxes, teacher_boxes, gt_boxes, gt_mask, match_l1_weight=-1.0)
    bad = teacher_boxes.detach().clone()
    bad[0, 0, 2] = -0.1  # negative width
    with pytest.raises(ValueError, match="degenerate box"):
        foreground_aware_query_matching(student_boxes, bad, gt_boxes, gt_mask)


# ---------------------------------------------------------------------------------------------------------------------
# drd_loss with hand-made features (B = 2, Qs = 3, Qt = 2, D = 2).
# selected = [[T, F, T], [F, T, F]], teacher_index = [[1, 0, 0], [9, 1, -1]] (unselected indices are never read).
#   s[0,0] - t[0,1] = (3, 4)   -> 5
#   s[0,2] - t[0,0] = (6, -8)  -> 10
#   s[1,1] - t[1,1] = (0, 0)   -> 0
# Pooled mean over the 3 kept queries = 15 / 3 = 5 (a mean of per-image means would give (7.5 + 0) / 2 = 3.75).
# Gradient: (s - t) / ||s - t|| / 3 -> (0.6, 0.8)/3, (0.6, -0.8)/3, and 0 at the exactly-zero difference.
# ---------------------------------------------------------------------------------------------------------------------
TEACHER_FEATURES = [[[1.0, 1.0], [2.0, 2.0]], [[-1.0, 0.0], [5.0, 5.0]]]
SELECTED = [[True, False, True], [False, True, False]]
TEACHER_INDEX = [[1, 0, 0], [9, 1, -1]]


def _hand_features() -> tuple[torch.Tensor, torch.Tensor]:
    nan = float("nan")
    student = torch.tensor(
        [
            [[2.0 + 3.0, 2.0 + 4.0], [100.0, 100.0], [1.0 + 6.0, 1.0 - 8.0]],
            [[nan, nan], [5.0, 5.0], [1e6, -1e6]],  # non-kept rows may hold anything, even NaN
        ]
    )
    return student, torch.tensor(TEACHER_FEATURES)


def test_drd_loss_known_value_and_gradient() -> None:
    student, teacher = _hand_features()
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    loss = drd_loss(student, teacher, torch.tensor(SELECTED), torch.tensor(TEACHER_INDEX))
    assert loss.shape == ()
    assert loss.item() == pytest.approx(5.0)
    loss.backward()
    expected = torch.zeros(2, 3, 2)
    expected[0, 0] = torch.tensor([0.6, 0.8]) / 3
    expected[0, 2] = torch.tensor([0.6, -0.8]) / 3
    assert torch.isfinite(student.grad).all()  # including the exactly-zero difference at [1, 1] and the NaN row
    torch.testing.assert_close(student.grad, expected)
    assert teacher.grad is None  # teacher features are detached


def test_drd_loss_multi_layer_average() -> None:
    student, teacher = _hand_features()
    # Layer 1: every kept difference is (0.3, -0.4) -> distance 0.5, mean 0.5. Average over layers (5 + 0.5) / 2.
    teacher_1 = teacher.clone()
    student_1 = student.clone()
    student_1[0, 0] = teacher_1[0, 1] + torch.tensor([0.3, -0.4])
    student_1[0, 2] = teacher_1[0, 0] + torch.tensor([0.3, -0.4])
    student_1[1, 1] = teacher_1[1, 1] + torch.tensor([0.3, -0.4])
    selected, index = torch.tensor(SELECTED), torch.tensor(TEACHER_INDEX)
    stacked_student = torch.stack([student, student_1]).requires_grad_(True)
    loss = drd_loss(stacked_student, torch.stack([teacher, teacher_1]), selected, index)
    assert loss.item() == pytest.approx(2.75)
    single = [drd_loss(s, t, selected, index) for s, t in ((student, teacher), (student_1, teacher_1))]
    assert loss.item() == pytest.approx(sum(x.item() for x in single) / 2)
    loss.backward()
    # Layer 1 gradient at [0, 0]: (0.3, -0.4) / 0.5 / 3 kept / 2 layers.
    torch.testing.assert_close(stacked_student.grad[1, 0, 0], torch.tensor([0.6, -0.8]) / 6)


def test_drd_loss_zero_selected_is_zero_with_finite_gradient() -> None:
    student = torch.randn(2, 4, 3, requires_grad=True)
    teacher = torch.randn(2, 5, 3)
    selected = torch.zeros(2, 4, dtype=torch.bool)
    loss = drd_loss(student, teacher, selected, torch.zeros(2, 4, dtype=torch.long))
    assert loss.item() == 0.0
    assert loss.grad_fn is not None  # still connected to the student (DDP sees the parameters as used)
    loss.backward()
    assert torch.isfinite(student.grad).all()
    assert (student.grad == 0).all()


def test_drd_loss_validates_inputs() -> None:
    student, teacher = _hand_features()
    selected, index = torch.tensor(SELECTED), torch.tensor(TEACHER_INDEX)
    bad_index = index.clone()
    bad_index[0, 0] = 2  # selected query paired with teacher 2, but Qt = 2
    with pytest.raises(ValueError, match="outside"):
        drd_loss(student, teacher, selected, bad_index)
    with pytest.raises(ValueError, match="both"):
        drd_loss(student, teacher[None], selected, index)
    with pytest.raises(ValueError, match="feature size"):
        drd_loss(student, teacher[..., :1], selected, index)
    with pytest.raises(ValueError, match="selected"):
        drd_loss(student, teacher, selected.long(), index)
    with pytest.raises(ValueError, match="teacher_index"):
        drd_loss(student, teacher, selected, index.float())


# ---------------------------------------------------------------------------------------------------------------------
# compute_drd on the main scene: the kept queries s0, s1, s3 pair with teachers 4, 2, 1.
# ---------------------------------------------------------------------------------------------------------------------
def _scene_features(batch_copies: int = 1) -> tuple[torch.Tensor, ...]:
    student_boxes, teacher_boxes, gt_boxes, gt_mask = _main_scene()
    student_features = torch.zeros(2, 5, 2)
    teacher_features = torch.zeros(2, 7, 2)
    teacher_features[0, 4] = torch.tensor([1.0, 1.0])
    student_features[0, 0] = torch.tensor([4.0, 5.0])  # (3, 4) -> 5
    teacher_features[0, 2] = torch.tensor([-2.0, 0.0])
    student_features[0, 1] = torch.tensor([-2.0, 0.0])  # 0
    teacher_features[0, 1] = torch.tensor([0.0, 0.0])
    student_features[0, 3] = torch.tensor([0.0, 1.0])  # 1
    student_features[0, 2] = torch.tensor([50.0, 50.0])  # not kept
    student_features[1] = 7.0  # image 1 keeps nothing
    tensors = (student_boxes, teacher_boxes, student_features, teacher_features, gt_boxes, gt_mask)
    return tuple(t.repeat(batch_copies, *([1] * (t.ndim - 1))) for t in tensors)


def test_compute_drd_on_main_scene_with_padded_or_list_labels() -> None:
    student_boxes, teacher_boxes, student_features, teacher_features, gt_boxes, gt_mask = _scene_features()
    out = compute_drd(student_boxes, teacher_boxes, student_features, teacher_features, (gt_boxes, gt_mask), tau=0.6)
    assert out["num_selected"].item() == 3
    assert out["loss_drd"].item() == pytest.approx((5.0 + 0.0 + 1.0) / 3)
    labels = [
        {"class_labels": torch.tensor([0, 1]), "boxes": gt_boxes[0]},
        {"class_labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)},
    ]
    out_list = compute_drd(student_boxes, teacher_boxes, student_features, teacher_features, labels, tau=0.6)
    assert out_list["num_selected"].item() == 3
    assert out_list["loss_drd"].item() == pytest.approx(out["loss_drd"].item())
    assert DEFAULT_DRD_WEIGHT == 2.5


@pytest.mark.parametrize("copies", [2, 3])
def test_compute_drd_is_batch_size_independent(copies: int) -> None:
    single = compute_drd(*_scene_features(1)[:4], _scene_features(1)[4:])
    student_boxes, teacher_boxes, student_features, teacher_features, gt_boxes, gt_mask = _scene_features(copies)
    assert student_boxes.shape[0] == 2 * copies
    out = compute_drd(student_boxes, teacher_boxes, student_features, teacher_features, (gt_boxes, gt_mask))
    assert out["num_selected"].item() == 3 * copies
    assert out["loss_drd"].item() == pytest.approx(single["loss_drd"].item())


def test_compute_drd_without_any_ground_truth() -> None:
    student_boxes, teacher_boxes, student_features, teacher_features, _, _ = _scene_features()
    student_features.requires_grad_(True)
    labels = [{"class_labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}] * 2
    out = compute_drd(student_boxes, teacher_boxes, student_features, teacher_features, labels)
    assert out["num_selected"].item() == 0
    assert out["loss_drd"].item() == 0.0
    out["loss_drd"].backward()
    assert torch.isfinite(student_features.grad).all()


def test_validate_false_gives_the_same_answers_without_checking() -> None:
    student_boxes, teacher_boxes, student_features, teacher_features, gt_boxes, gt_mask = _scene_features()
    checked = foreground_aware_query_matching(student_boxes, teacher_boxes, gt_boxes, gt_mask, tau=0.6)
    unchecked = foreground_aware_query_matching(student_boxes, teacher_boxes, gt_boxes, gt_mask, 0.6, validate=False)
    for field in ("selected", "teacher_index", "gt_giou_max", "pair_score"):
        assert torch.equal(getattr(checked, field), getattr(unchecked, field)), field
    assert checked.selected[0].tolist() == EXPECTED_SELECTED  # the known answer, either way
    labels = (gt_boxes, gt_mask)
    out = compute_drd(student_boxes, teacher_boxes, student_features, teacher_features, labels, validate=False)
    assert out["loss_drd"].item() == pytest.approx((5.0 + 0.0 + 1.0) / 3)
    # Without validation a degenerate box is not reported (its GIoU is computed as given) ...
    bad = teacher_boxes.clone()
    bad[0, 0, 2] = -0.1
    foreground_aware_query_matching(student_boxes, bad, gt_boxes, gt_mask, validate=False)
    with pytest.raises(ValueError, match="degenerate box in teacher_boxes"):  # ... which validation names
        foreground_aware_query_matching(student_boxes, bad, gt_boxes, gt_mask)
    # A selected index outside [0, Qt) is only looked for with validation.
    selected, index = torch.tensor(SELECTED), torch.tensor(TEACHER_INDEX)
    features_s, features_t = _hand_features()
    bad_index = index.clone()
    bad_index[0, 0] = 2
    with pytest.raises(ValueError, match="outside"):
        drd_loss(features_s, features_t, selected, bad_index)
    with pytest.raises(RuntimeError):  # torch's own gather bound check (CPU) instead of the message
        drd_loss(features_s, features_t, selected, bad_index, validate=False)
