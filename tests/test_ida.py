"""Tests for the IDa-Det distiller: discrepancy ranking, top-γ selection, entropy loss, learned σ, checkpoints."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_training_args

from qdetr_hf import QDetrForObjectDetection
from qdetr_hf.box_ops import corners_to_center
from qdetr_hf.data import SyntheticShapesDataset
from qdetr_hf.distillers.base import DetectorOutputs
from qdetr_hf.distillers.ida import (
    DEFAULT_IDA_GAMMA,
    DEFAULT_IDA_WEIGHT,
    IDaDetDistiller,
    entropy_distillation_loss,
    hungarian_query_pairs,
    information_discrepancy,
    select_top_discrepancy,
)
from qdetr_hf.trainer import DISTILLER_STATE_NAME, QDetrDistillationTrainer, load_teacher


def _cxcywh(xyxy: list[list[float]]) -> torch.Tensor:
    return corners_to_center(torch.tensor(xyxy, dtype=torch.float32))


# ---------------------------------------------------------------------------------------------------------------------
# Ranking scene: one image, D = 2, five candidate pairs and one non-candidate. The teacher is the negated student
# (t = -s), so the pooled teacher+student mean of every channel is 0, its variance is sum_n s_nc^2 / N, and the
# residual is 2 s. Score = mean_c (2 s_nc)^2 / var_c.
#   channel 0: s = [4, 3, 0, 0,   0] -> var 25 / 5 = 5      channel 1: s = [0, 0, 1, 0.5, 0] -> var 1.25 / 5 = 0.25
#   score_n = (4 s_n0^2 / 5 + 4 s_n1^2 / 0.25) / 2 = 0.4 s_n0^2 + 8 s_n1^2 = [6.4, 3.6, 8.0, 2.0, 0.0]
# The Euclidean distance would rank [0, 1, 2, 3, 4] (|2s|^2 = [64, 36, 4, 1, 0]); the channel-normalised score ranks
# [2, 0, 1, 3, 4]. Query 5 has a huge residual but is not a candidate: it is neither scored, pooled nor kept.
# ---------------------------------------------------------------------------------------------------------------------
RANK_STUDENT = [[4.0, 0.0], [3.0, 0.0], [0.0, 1.0], [0.0, 0.5], [0.0, 0.0], [100.0, -100.0]]
RANK_CANDIDATES = [[True, True, True, True, True, False]]
RANK_SCORES = [6.4, 3.6, 8.0, 2.0, 0.0, 0.0]


def _rank_scene() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    student = torch.tensor([RANK_STUDENT])
    return student, -student, torch.tensor(RANK_CANDIDATES)


def test_discrepancy_is_a_channel_normalised_distance() -> None:
    student, teacher, candidates = _rank_scene()
    scores = information_discrepancy(student, teacher, candidates)
    torch.testing.assert_close(scores, torch.tensor([RANK_SCORES]))
    # Layers are averaged: the same features twice (L = 2) give the same scores; "image" == "batch" for one image.
    torch.testing.assert_close(
        information_discrepancy(torch.stack([student] * 2), torch.stack([teacher] * 2), candidates), scores
    )
    torch.testing.assert_close(information_discrepancy(student, teacher, candidates, scope="image"), scores)
    # Scale invariant per channel: multiplying channel 0 of both models by 10 changes nothing.
    scale = torch.tensor([10.0, 1.0])
    torch.testing.assert_close(information_discrepancy(student * scale, teacher * scale, candidates), scores)


@pytest.mark.parametrize(
    ("gamma", "expected"),
    [
        (0.6, [0, 1, 2]),  # k = round(0.6 * 5) = 3
        (0.4, [0, 2]),  # k = 2: the Euclidean ranking would keep {0, 1}
        (0.5, [0, 1, 2]),  # 2.5 rounds half up to 3
        (0.1, [2]),  # 0.5 -> 1
        (0.01, [2]),  # 0.05 -> 0, but at least one pair is kept
        (1.0, [0, 1, 2, 3, 4]),  # every candidate, never the non-candidate 5
    ],
)
def test_top_gamma_selection_keeps_the_most_discrepant_pairs(gamma: float, expected: list[int]) -> None:
    student, teacher, candidates = _rank_scene()
    scores = information_discrepancy(student, teacher, candidates)
    kept = select_top_discrepancy(scores, candidates, gamma=gamma)
    assert kept.dtype == torch.bool
    assert kept[0].nonzero().flatten().tolist() == expected


def test_selection_ties_and_empty_pools() -> None:
    scores = torch.tensor([[1.0, 2.0, 2.0, 0.5], [2.0, 0.0, 0.0, 0.0]])
    candidates = torch.tensor([[True, True, True, True], [True, False, False, False]])
    # Batch pool of 5, k = round(0.4 * 5) = 2 among the three 2.0 ties -> the two lowest flat indices.
    assert select_top_discrepancy(scores, candidates, 0.4).tolist() == [[False, True, True, False], [False] * 4]
    # Per image: image 0 keeps round(1.6) = 2, image 1 keeps its only candidate.
    assert select_top_discrepancy(scores, candidates, 0.4, scope="image").tolist() == [
        [False, True, True, False],
        [True, False, False, False],
    ]
    none = torch.zeros(2, 4, dtype=torch.bool)
    assert not select_top_discrepancy(scores, none, 0.6).any()
    assert not select_top_discrepancy(scores, none, 0.6, scope="image").any()
    torch.testing.assert_close(
        information_discrepancy(torch.randn(2, 4, 3), torch.randn(2, 4, 3), none), torch.zeros(2, 4)
    )


# ---------------------------------------------------------------------------------------------------------------------
# Batch dependence scene: D = 1, t = -s again, so score_n = 4 s_n^2 / (sum of s_m^2 over the pooled pairs / N).
#   image A: s = [1, 2, -] (2 candidates)        image B: s = [3, 4, 0] (3 candidates)
#   batch pool: N = 5, sum s^2 = 30, var = 6 -> scores A [0.667, 2.667], B [6, 10.667, 0]
#   gamma 0.4, batch: k = round(2) = 2 -> B1, B0; image A keeps NOTHING, while A alone (k = round(0.8) = 1) keeps A1.
#   gamma 0.4, image: A keeps round(0.8) = 1 -> A1, B keeps round(1.2) = 1 -> B1, with or without the other image.
# ---------------------------------------------------------------------------------------------------------------------
def _two_images() -> tuple[torch.Tensor, torch.Tensor]:
    student = torch.tensor([[[1.0], [2.0], [9.0]], [[3.0], [4.0], [0.0]]])
    candidates = torch.tensor([[True, True, False], [True, True, True]])
    return student, candidates


def test_batch_scope_selection_depends_on_the_batch() -> None:
    student, candidates = _two_images()
    scores = information_discrepancy(student, -student, candidates)
    torch.testing.assert_close(scores, torch.tensor([[4 / 6, 16 / 6, 0.0], [6.0, 64 / 6, 0.0]]))
    kept = select_top_discrepancy(scores, candidates, 0.4)
    assert kept.tolist() == [[False, False, False], [True, True, False]]
    alone = select_top_discrepancy(
        information_discrepancy(student[:1], -student[:1], candidates[:1]), candidates[:1], 0.4
    )
    assert alone.tolist() == [[False, True, False]]


def test_image_scope_selection_is_batch_independent() -> None:
    student, candidates = _two_images()
    kept = select_top_discrepancy(
        information_discrepancy(student, -student, candidates, "image"), candidates, 0.4, "image"
    )
    assert kept.tolist() == [[False, True, False], [False, True, False]]
    for image in range(2):
        one = slice(image, image + 1)
        scores = information_discrepancy(student[one], -student[one], candidates[one], "image")
        assert select_top_discrepancy(scores, candidates[one], 0.4, "image").tolist() == kept[one].tolist()


def _ida_loss(student: torch.Tensor, candidates: torch.Tensor, gamma: float, scope: str) -> tuple[torch.Tensor, list]:
    """Inner + upper level on t = -s with sigma = 1 (log_var = 0) and no regulariser: L = 2 m."""
    scores = information_discrepancy(student, -student, candidates, scope)
    kept = select_top_discrepancy(scores, candidates, gamma, scope)
    loss = entropy_distillation_loss(student, -student, kept, torch.tensor(0.0), regularizer=0.0)
    return loss, kept.sum(dim=1).tolist()


def test_repeated_images_and_batch_size() -> None:
    student, _, candidates = _rank_scene()
    pair = (torch.cat([student, student]), torch.cat([candidates, candidates]))
    # Alone, gamma 0.6 / 0.5 keep 3 pairs ({0, 1, 2}: residuals 2s = [8, 0], [6, 0], [0, 2]): L = 2 * 104 / 6.
    for gamma in (0.6, 0.5):
        loss, counts = _ida_loss(student, candidates, gamma, "batch")
        assert counts == [3] and loss.item() == pytest.approx(2 * 104 / 6)
    # Per-image ranking and gamma * N integer over the batch: a batch of copies gives the same loss.
    for gamma, scope in ((0.5, "image"), (0.6, "image"), (0.6, "batch")):
        loss, counts = _ida_loss(*pair, gamma, scope)
        assert counts == [3, 3] and loss.item() == pytest.approx(2 * 104 / 6)
    # Batch-level ranking with gamma * N = 5 over the pooled 10 pairs: the second copy keeps only 2 (ties go to the
    # lower flat index), so the loss changes: pairs {0, 1, 2} + {2, 0}: 2 * (104 + 68) / 10.
    loss, counts = _ida_loss(*pair, 0.5, "batch")
    assert counts == [3, 2] and loss.item() == pytest.approx(2 * 172 / 10)


def test_image_scope_loss_is_a_pair_weighted_mean_over_images() -> None:
    student, candidates = _two_images()
    both, counts = _ida_loss(student, candidates, 0.6, "image")
    alone = [_ida_loss(student[i : i + 1], candidates[i : i + 1], 0.6, "image") for i in range(2)]
    assert counts == [alone[0][1][0], alone[1][1][0]] == [1, 2]
    expected = (counts[0] * alone[0][0] + counts[1] * alone[1][0]) / sum(counts)
    torch.testing.assert_close(both, expected)


# ---------------------------------------------------------------------------------------------------------------------
# Entropy distillation loss on hand-made numbers. Kept pairs (teacher 0): s = [1, 2] and [3, 0]; a third, non-kept
# pair has a huge residual. m = (1 + 4 + 9 + 0) / (2 pairs * 2 channels) = 3.5.
# ---------------------------------------------------------------------------------------------------------------------
def _loss_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    student = torch.tensor([[[1.0, 2.0], [3.0, 0.0], [50.0, -50.0]]], requires_grad=True)
    teacher = torch.zeros(1, 3, 2)
    kept = torch.tensor([[True, True, False]])
    return student, teacher, kept


def test_entropy_loss_value_and_gradients() -> None:
    student, teacher, kept = _loss_inputs()
    log_variance = torch.tensor(math.log(2.0), requires_grad=True)  # sigma^2 = 2
    loss = entropy_distillation_loss(
        student, teacher, kept, log_variance, squared_weight=0.5, log_variance_weight=1.0, regularizer=0.01
    )
    # 0.5 * 3.5 + 3.5 / 2 + log 2 + 0.01 * (log 2)^2
    expected = 1.75 + 1.75 + math.log(2.0) + 0.01 * math.log(2.0) ** 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    # dL/d log_var = -m / sigma^2 + 1 + 2 * 0.01 * log 2
    assert log_variance.grad.item() == pytest.approx(-1.75 + 1.0 + 0.02 * math.log(2.0), rel=1e-6)
    # dL/ds = (0.5 + 1 / sigma^2) * 2 (s - t) / (2 * 2) = (s - t) / 2 on kept pairs, exactly 0 elsewhere.
    torch.testing.assert_close(student.grad, torch.tensor([[[0.5, 1.0], [1.5, 0.0], [0.0, 0.0]]]))


@pytest.mark.parametrize("log_variance_weight", [1.0, 0.5])
def test_sigma_gradient_vanishes_at_the_nll_optimum(log_variance_weight: float) -> None:
    student, teacher, kept = _loss_inputs()
    # The optimum of m / sigma^2 + w log sigma^2 is sigma^2 = m / w (= the mean squared residual for w = 1).
    sigma = torch.tensor(math.sqrt(3.5 / log_variance_weight), requires_grad=True)
    loss = entropy_distillation_loss(
        student, teacher, kept, 2 * torch.log(sigma), log_variance_weight=log_variance_weight, regularizer=0.0
    )
    (grad,) = torch.autograd.grad(loss, sigma)
    assert abs(grad.item()) < 1e-6
    # Either side of the optimum the gradient points back towards it.
    for factor, sign in ((0.5, -1.0), (2.0, 1.0)):
        other = (sigma.detach() * factor).requires_grad_(True)
        loss = entropy_distillation_loss(
            student, teacher, kept, 2 * torch.log(other), log_variance_weight=log_variance_weight, regularizer=0.0
        )
        (grad,) = torch.autograd.grad(loss, other)
        assert grad.item() * sign > 0.1


def test_entropy_loss_does_not_scale_with_channels_pairs_or_layers() -> None:
    student, teacher, kept = _loss_inputs()
    log_variance = torch.tensor(0.3)
    reference = entropy_distillation_loss(student, teacher, kept, log_variance)
    doubled_channels = torch.cat([student, student], dim=-1)
    doubled_pairs = torch.cat([student, student], dim=1)
    for features, mask in (
        (doubled_channels, kept),
        (doubled_pairs, torch.cat([kept, kept], dim=1)),
        (torch.stack([student, student]), kept),  # two identical layers
        (torch.cat([student, student]), torch.cat([kept, kept])),  # two identical images
    ):
        value = entropy_distillation_loss(features, torch.zeros_like(features), mask, log_variance)
        torch.testing.assert_close(value, reference)


def test_nothing_kept_gives_an_exact_zero_connected_to_the_graph() -> None:
    student, teacher, _ = _loss_inputs()
    log_variance = torch.tensor(0.7, requires_grad=True)
    loss = entropy_distillation_loss(student, teacher, torch.zeros(1, 3, dtype=torch.bool), log_variance)
    assert loss.item() == 0.0 and loss.grad_fn is not None
    loss.backward()
    assert torch.equal(student.grad, torch.zeros_like(student)) and log_variance.grad.item() == 0.0


# ---------------------------------------------------------------------------------------------------------------------
# The distiller on a hand-built DETR scene. Image 0 has two ground truths; FQM (tau 0.6, see test_drd) keeps student
# queries s0, s1 and s3, paired with teacher queries 4, 2 and 1 (exact box copies in shuffled order). Image 1 has no
# objects. Co-attended features (D = 2): teacher features are all 0 except the paired ones, which equal -student.
# ---------------------------------------------------------------------------------------------------------------------
STUDENTS_XYXY = [
    [0.1, 0.1, 0.3, 0.30],
    [0.1, 0.1, 0.3, 0.25],
    [0.1, 0.1, 0.3, 0.20],
    [0.6, 0.6, 0.85, 0.9],
    [0.6, 0.6, 0.9, 0.70],
]
TEACHER_ORDER = [None, 3, 1, None, 0, 4, 2]  # teacher k is a copy of student TEACHER_ORDER[k] (None: far away box)


def _outputs(boxes: torch.Tensor, features: torch.Tensor, logits: torch.Tensor | None = None) -> DetectorOutputs:
    logits = torch.zeros(*boxes.shape[:2], 4) if logits is None else logits
    return DetectorOutputs(logits=logits, pred_boxes=boxes, outputs=None, co_attended={1: features})


def _detr_scene(student_features: torch.Tensor) -> tuple[DetectorOutputs, DetectorOutputs, list[dict]]:
    students = _cxcywh(STUDENTS_XYXY)
    far = _cxcywh([[0.0, 0.9, 0.05, 0.95]])[0]
    teachers = torch.stack([far if j is None else students[j] for j in TEACHER_ORDER])
    teacher_features = torch.zeros(2, 7, student_features.shape[-1])
    for k, j in enumerate(TEACHER_ORDER):
        if j is not None:
            teacher_features[:, k] = -student_features[:, j].detach()
    labels = [
        {"class_labels": torch.tensor([0, 1]), "boxes": _cxcywh([[0.1, 0.1, 0.3, 0.3], [0.6, 0.6, 0.9, 0.9]])},
        {"class_labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)},
    ]
    student = _outputs(students.expand(2, -1, -1).clone(), student_features)
    return student, _outputs(teachers.expand(2, -1, -1).clone(), teacher_features), labels


def test_distiller_fqm_pairs_rank_and_distil() -> None:
    # Kept candidates s0, s1, s3 with student features (teacher = -student), channel variances over the 3 pairs:
    #   channel 0: s = [2, 1, 0] -> var 5 / 3;  channel 1: s = [0, 0, 1] -> var 1 / 3
    #   scores = (4 s0^2 * 3 / 5 + 4 s1^2 * 3) / 2 = [4.8, 1.2, 6.0] -> gamma 0.6 keeps round(1.8) = 2: s3 and s0.
    features = torch.zeros(2, 5, 2)
    features[0, 0] = torch.tensor([2.0, 0.0])
    features[0, 1] = torch.tensor([1.0, 0.0])
    features[0, 3] = torch.tensor([0.0, 1.0])
    features[0, 2] = torch.tensor([30.0, 30.0])  # not an FQM candidate: ignored
    features[1] = 7.0  # image without objects: ignored
    features.requires_grad_(True)
    student, teacher, labels = _detr_scene(features)
    distiller = IDaDetDistiller(layers=(1,), weight=2.0, regularizer=0.0, init_sigma=2.0)
    terms = distiller(student, teacher, labels)
    assert set(terms) == {"loss_ida", "ida_residual", "ida_pairs", "ida_candidates", "ida_sigma"}
    assert terms["ida_candidates"].item() == 3 and terms["ida_pairs"].item() == 2
    # Residuals 2 s: s0 -> [4, 0], s3 -> [0, 2]; m = (16 + 4) / 4 = 5; sigma^2 = 4.
    assert terms["ida_residual"].item() == pytest.approx(5.0)
    expected = 2.0 * (5.0 + 5.0 / 4.0 + math.log(4.0))
    assert terms["loss_ida"].item() == pytest.approx(expected, rel=1e-6)
    assert terms["ida_sigma"].item() == pytest.approx(2.0)
    assert all(not v.requires_grad for k, v in terms.items() if not k.startswith("loss_"))
    terms["loss_ida"].backward()
    touched = (features.grad.abs().sum(-1) > 0).tolist()
    assert touched == [[True, False, False, True, False], [False] * 5]
    assert distiller.log_variance.grad is not None


def test_distiller_without_objects_gives_zero_with_grad_fn() -> None:
    features = torch.randn(2, 5, 2, requires_grad=True)
    student, teacher, labels = _detr_scene(features)
    empty = [labels[1], labels[1]]
    distiller = IDaDetDistiller(layers=(1,))
    for pairing in ("fqm", "hungarian"):
        distiller.pairing = pairing
        terms = distiller(student, teacher, empty)
        assert terms["loss_ida"].item() == 0.0 and terms["loss_ida"].grad_fn is not None
        assert terms["ida_pairs"].item() == 0 and torch.isfinite(terms["ida_residual"])
        terms["loss_ida"].backward()
        assert torch.equal(features.grad, torch.zeros_like(features))
        assert distiller.log_variance.grad.item() == 0.0


def test_hungarian_pairing_joins_queries_matched_to_the_same_ground_truth() -> None:
    # Student query 1 sits on gt0 and query 3 on gt1; teacher query 4 on gt0 and query 0 on gt1. Class logits favour
    # the right classes (3 classes + no-object), every other query predicts "no object" on a far-away box.
    gt = _cxcywh([[0.1, 0.1, 0.3, 0.3], [0.6, 0.6, 0.9, 0.9]])
    far = _cxcywh([[0.0, 0.9, 0.05, 0.95]])[0]
    student_boxes = torch.stack([far, gt[0], far, gt[1], far])[None]
    teacher_boxes = torch.stack([gt[1], far, far, far, gt[0], far])[None]
    background = torch.tensor([0.0, 0.0, 0.0, 5.0])
    student_logits = background.repeat(1, 5, 1)
    student_logits[0, 1] = torch.tensor([5.0, 0.0, 0.0, 0.0])
    student_logits[0, 3] = torch.tensor([0.0, 5.0, 0.0, 0.0])
    teacher_logits = background.repeat(1, 6, 1)
    teacher_logits[0, 4] = torch.tensor([5.0, 0.0, 0.0, 0.0])
    teacher_logits[0, 0] = torch.tensor([0.0, 5.0, 0.0, 0.0])
    labels = [{"class_labels": torch.tensor([0, 1]), "boxes": gt}]
    candidates, teacher_index = hungarian_query_pairs(
        student_logits, student_boxes, teacher_logits, teacher_boxes, labels
    )
    assert candidates.tolist() == [[False, True, False, True, False]]
    assert teacher_index[0, 1].item() == 4 and teacher_index[0, 3].item() == 0


def test_hungarian_pairing_of_a_batch_matches_a_per_image_reference() -> None:
    from transformers.loss.loss_for_object_detection import HungarianMatcher

    generator = torch.Generator().manual_seed(7)
    batch, num_student, num_teacher = 4, 6, 5

    def boxes(*shape: int) -> torch.Tensor:
        centre = torch.rand(*shape, 2, generator=generator) * 0.6 + 0.2
        return torch.cat([centre, torch.rand(*shape, 2, generator=generator) * 0.3 + 0.05], dim=-1)

    student_boxes, teacher_boxes = boxes(batch, num_student), boxes(batch, num_teacher)
    student_logits = torch.randn(batch, num_student, 4, generator=generator)
    teacher_logits = torch.randn(batch, num_teacher, 4, generator=generator)
    counts = [3, 0, 7, 1]  # image 2 has more ground truths than the teacher has queries
    labels = [{"class_labels": torch.randint(0, 3, (n,), generator=generator), "boxes": boxes(n)} for n in counts]
    candidates, teacher_index = hungarian_query_pairs(
        student_logits, student_boxes, teacher_logits, teacher_boxes, labels
    )
    unchecked = hungarian_query_pairs(
        student_logits, student_boxes, teacher_logits, teacher_boxes, labels, validate=False
    )
    assert torch.equal(candidates, unchecked[0]) and torch.equal(teacher_index, unchecked[1])

    matcher = HungarianMatcher(class_cost=1.0, bbox_cost=5.0, giou_cost=2.0)
    for image, target in enumerate(labels):
        ((s_query, s_gt),) = matcher(
            {"logits": student_logits[image : image + 1], "pred_boxes": student_boxes[image : image + 1]}, [target]
        )
        ((t_query, t_gt),) = matcher(
            {"logits": teacher_logits[image : image + 1], "pred_boxes": teacher_boxes[image : image + 1]}, [target]
        )
        teacher_of_gt = dict(zip(t_gt.tolist(), t_query.tolist()))
        expected = {q: teacher_of_gt[g] for q, g in zip(s_query.tolist(), s_gt.tolist()) if g in teacher_of_gt}
        assert candidates[image].nonzero().flatten().tolist() == sorted(expected), image
        assert {q: teacher_index[image, q].item() for q in expected} == expected
        assert (teacher_index[image][~candidates[image]] == 0).all()
    # Image 1 has no ground truth; of image 2's 7 only those matched by both models (at most Qt = 5) give pairs.
    assert candidates[1].sum() == 0 and 0 < candidates[2].sum() <= num_teacher


def test_learned_sigma_is_the_only_parameter() -> None:
    distiller = IDaDetDistiller(init_sigma=3.0)
    params = dict(distiller.named_parameters())
    assert list(params) == ["log_variance"] and params["log_variance"].requires_grad
    assert params["log_variance"].shape == () and params["log_variance"].item() == pytest.approx(math.log(9.0))
    assert distiller.sigma.item() == pytest.approx(3.0)
    assert list(distiller.state_dict()) == ["log_variance"]
    assert distiller.name == "ida" and distiller.co_attended_layers == (-1,)
    assert (DEFAULT_IDA_GAMMA, DEFAULT_IDA_WEIGHT) == (0.6, 0.5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"gamma": 0.0}, "gamma"),
        ({"gamma": 1.5}, "gamma"),
        ({"pairing": "gqs"}, "pairing"),
        ({"selection_scope": "epoch"}, "scope"),
        ({"log_variance_weight": 0.0}, "log_variance_weight"),
        ({"init_sigma": -1.0}, "init_sigma"),
        ({"weight": float("nan")}, "weight"),
        ({"layers": ()}, "at least one decoder layer"),
    ],
)
def test_bad_arguments_are_clear_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        IDaDetDistiller(**kwargs)


def test_feature_width_mismatch_is_a_clear_error() -> None:
    student, teacher, labels = _detr_scene(torch.randn(2, 5, 4))
    teacher.co_attended = {1: torch.randn(2, 7, 6)}
    with pytest.raises(ValueError, match="same d_model"):
        IDaDetDistiller(layers=(1,))(student, teacher, labels)
    with pytest.raises(ValueError, match="paired row by row"):
        information_discrepancy(torch.randn(1, 3, 2), torch.randn(1, 4, 2), torch.ones(1, 3, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------------------------------
# With the trainer (tiny fixtures).
# ---------------------------------------------------------------------------------------------------------------------
def _trainer(tmp_path, teacher_dir, shapes, distiller, **overrides) -> QDetrDistillationTrainer:
    dataset, collator = shapes
    kwargs = {
        "per_device_train_batch_size": 2,
        "learning_rate": 1e-3,
        "lr_scheduler_type": "constant",
        "calibration_batches": 1,
        **overrides,
    }
    return QDetrDistillationTrainer(
        model=QDetrForObjectDetection.from_pretrained(teacher_dir),
        args=tiny_training_args(tmp_path / "out", **kwargs),
        teacher_model=load_teacher(teacher_dir),
        distiller=distiller,
        train_dataset=dataset,
        data_collator=collator,
    )


@pytest.fixture
def small_shapes(tiny_shapes):
    _, collator = tiny_shapes
    return SyntheticShapesDataset(num_images=8, image_size=64, seed=3, max_objects=4), collator


def test_short_run_learns_sigma_and_lowers_the_ida_loss(tmp_path, tiny_teacher_dir, small_shapes) -> None:
    distiller = IDaDetDistiller(tau=0.3)
    trainer = _trainer(tmp_path, tiny_teacher_dir, small_shapes, distiller, max_steps=20)
    trainer.train()
    optimised = {id(p): group for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimised[id(distiller.log_variance)]["weight_decay"] == 0.0
    logs = [entry for entry in trainer.state.log_history if "loss_ida" in entry]
    assert len(logs) == 20 and all(entry["ida_pairs"] >= 1 for entry in logs)
    first, last = logs[:5], logs[-5:]

    def mean(entries: list[dict], key: str) -> float:
        return sum(e[key] for e in entries) / len(entries)

    assert mean(last, "loss_ida") < mean(first, "loss_ida")
    # The residual m of the tiny random models is far below 1, so sigma^2 moves down towards m, and the student's
    # co-attended features move towards the teacher's.
    assert distiller.sigma.item() < 0.999
    assert logs[-1]["ida_sigma"] < logs[0]["ida_sigma"]
    assert mean(last, "ida_residual") < mean(first, "ida_residual")


def test_sigma_round_trips_through_a_checkpoint(tmp_path, tiny_teacher_dir, small_shapes) -> None:
    first = IDaDetDistiller(tau=0.3)
    save = {"save_strategy": "steps", "save_steps": 2}
    _trainer(tmp_path, tiny_teacher_dir, small_shapes, first, max_steps=2, **save).train()
    saved = first.log_variance.detach().clone()
    assert saved.item() != 0.0  # it was trained
    checkpoint = tmp_path / "out" / "checkpoint-2"
    stored = torch.load(checkpoint / DISTILLER_STATE_NAME, weights_only=True)
    torch.testing.assert_close(stored["log_variance"], saved)

    resumed = IDaDetDistiller(tau=0.3)  # sigma = 1 until the checkpoint is loaded
    assert resumed.log_variance.item() == 0.0
    trainer = _trainer(tmp_path, tiny_teacher_dir, small_shapes, resumed, max_steps=3, **save)
    # What `train(resume_from_checkpoint=...)` calls first (a full resume is exercised in test_trainer.py).
    trainer._load_from_checkpoint(str(checkpoint))
    torch.testing.assert_close(resumed.log_variance.detach(), saved)
    assert resumed.log_variance.requires_grad
