"""Tests for qdetr_hf.box_ops: conversions, pairwise/elementwise GIoU and target padding."""

from __future__ import annotations

import pytest
import torch
from transformers.loss.loss_for_object_detection import generalized_box_iou as hf_generalized_box_iou

from qdetr_hf.box_ops import (
    PAD_BOX_CXCYWH,
    PAD_LABEL,
    center_to_corners,
    corners_to_center,
    elementwise_generalized_box_iou,
    pad_targets,
    pairwise_generalized_box_iou,
)


def _random_xyxy(*shape: int, generator: torch.Generator) -> torch.Tensor:
    """Random valid xyxy boxes inside the unit square (widths/heights in [0.05, 0.5])."""
    center = torch.rand(*shape, 2, generator=generator) * 0.6 + 0.2
    size = torch.rand(*shape, 2, generator=generator) * 0.45 + 0.05
    return center_to_corners(torch.cat([center, size], dim=-1))


def test_center_to_corners_known_values() -> None:
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.1, 0.2, 0.0, 0.0]])
    expected = torch.tensor([[0.4, 0.3, 0.6, 0.7], [0.1, 0.2, 0.1, 0.2]])
    torch.testing.assert_close(center_to_corners(boxes), expected)
    torch.testing.assert_close(corners_to_center(expected), boxes)


def test_conversions_round_trip_on_batched_shapes() -> None:
    generator = torch.Generator().manual_seed(0)
    cxcywh = torch.rand(3, 7, 5, 4, generator=generator)
    torch.testing.assert_close(corners_to_center(center_to_corners(cxcywh)), cxcywh)
    xyxy = _random_xyxy(4, 6, generator=generator)
    torch.testing.assert_close(center_to_corners(corners_to_center(xyxy)), xyxy)


def test_conversions_reject_wrong_last_dim() -> None:
    with pytest.raises(ValueError, match="last dimension of size 4"):
        center_to_corners(torch.zeros(3, 5))
    with pytest.raises(ValueError, match="last dimension of size 4"):
        corners_to_center(torch.zeros(3))


def test_pairwise_giou_hand_computed_values() -> None:
    boxes1 = torch.tensor(
        [
            [0.0, 0.0, 2.0, 2.0],  # A
            [0.0, 0.0, 1.0, 1.0],  # C
            [0.0, 0.0, 4.0, 4.0],  # E
        ]
    )
    boxes2 = torch.tensor(
        [
            [0.0, 0.0, 2.0, 2.0],  # A again
            [2.0, 0.0, 3.0, 1.0],  # D
            [1.0, 1.0, 3.0, 3.0],  # F
        ]
    )
    giou = pairwise_generalized_box_iou(boxes1, boxes2)
    assert giou.shape == (3, 3)
    # A vs A: identical boxes -> IoU 1, hull == union -> GIoU 1.
    assert giou[0, 0].item() == pytest.approx(1.0)
    # C=[0,0,1,1] vs D=[2,0,3,1]: disjoint, inter 0, union 1+1=2, hull [0,0,3,1] area 3 -> 0 - (3-2)/3 = -1/3.
    assert giou[1, 1].item() == pytest.approx(-1.0 / 3.0)
    # E=[0,0,4,4] (16) vs F=[1,1,3,3] (4): F nested in E, inter 4, union 16, IoU 1/4, hull = E -> GIoU 1/4.
    assert giou[2, 2].item() == pytest.approx(0.25)
    # A=[0,0,2,2] vs F=[1,1,3,3]: inter 1, union 4+4-1 = 7, hull [0,0,3,3] = 9 -> 1/7 - (9-7)/9 = -5/63 (overlapping
    # boxes can have a negative GIoU).
    assert giou[0, 2].item() == pytest.approx(-5.0 / 63.0)
    # C=[0,0,1,1] vs A: C nested in A, inter 1, union 4, IoU 1/4, hull = A -> 1/4.
    assert giou[1, 0].item() == pytest.approx(0.25)


def test_pairwise_giou_matches_transformers_unbatched() -> None:
    generator = torch.Generator().manual_seed(1)
    boxes1 = _random_xyxy(11, generator=generator)
    boxes2 = _random_xyxy(7, generator=generator)
    torch.testing.assert_close(pairwise_generalized_box_iou(boxes1, boxes2), hf_generalized_box_iou(boxes1, boxes2))
    # Also with a few exactly touching/identical boxes.
    boxes2 = torch.cat([boxes2, boxes1[:3], torch.tensor([[0.0, 0.0, 1.0, 1.0]])])
    torch.testing.assert_close(pairwise_generalized_box_iou(boxes1, boxes2), hf_generalized_box_iou(boxes1, boxes2))


def test_pairwise_giou_batched_equals_per_image() -> None:
    generator = torch.Generator().manual_seed(2)
    boxes1 = _random_xyxy(3, 5, generator=generator)
    boxes2 = _random_xyxy(3, 4, generator=generator)
    batched = pairwise_generalized_box_iou(boxes1, boxes2)
    assert batched.shape == (3, 5, 4)
    for image in range(3):
        torch.testing.assert_close(batched[image], pairwise_generalized_box_iou(boxes1[image], boxes2[image]))
        torch.testing.assert_close(batched[image], hf_generalized_box_iou(boxes1[image], boxes2[image]))


def test_pairwise_giou_half_precision_is_computed_in_float32() -> None:
    generator = torch.Generator().manual_seed(3)
    boxes1 = _random_xyxy(2, 6, generator=generator)
    boxes2 = _random_xyxy(2, 5, generator=generator)
    half = pairwise_generalized_box_iou(boxes1.half(), boxes2.half())
    assert half.dtype == torch.float32
    reference = pairwise_generalized_box_iou(boxes1.half().float(), boxes2.half().float())
    torch.testing.assert_close(half, reference)


def test_zero_area_boxes_are_finite() -> None:
    point = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    square = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    # Point vs itself: union 0 and hull 0 are clamped -> 0 - 0 = 0 instead of 0/0.
    assert pairwise_generalized_box_iou(point, point).item() == 0.0
    # Point inside the square: inter 0, union 4, hull 4 -> 0.
    assert pairwise_generalized_box_iou(point, square).item() == 0.0
    # Zero-width line [0,0,0,2] vs square: inter 0, union 4, hull = square -> 0.
    line = torch.tensor([[0.0, 0.0, 0.0, 2.0]])
    assert torch.isfinite(pairwise_generalized_box_iou(line, square)).all()
    # Gradients through zero-area boxes stay finite as well (the eps clamp keeps every division away from 0/0).
    predicted = torch.cat([point, line]).requires_grad_(True)
    elementwise_generalized_box_iou(predicted, torch.cat([point, square])).sum().backward()
    assert torch.isfinite(predicted.grad).all()


def test_degenerate_boxes_raise() -> None:
    good = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    bad = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.5, 0.0, 0.4, 1.0]])  # x2 < x1 in row 1
    with pytest.raises(ValueError, match=r"degenerate box in boxes2 at index \[1\]"):
        pairwise_generalized_box_iou(good, bad)
    with pytest.raises(ValueError, match="degenerate box in boxes1"):
        pairwise_generalized_box_iou(torch.tensor([[[0.0, 0.5, 1.0, 0.2]]]), good[None])
    with pytest.raises(ValueError, match="degenerate box"):
        elementwise_generalized_box_iou(good, torch.tensor([[0.0, float("nan"), 1.0, 1.0]]))


def test_pairwise_giou_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="both"):
        pairwise_generalized_box_iou(torch.zeros(2, 3, 4), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="batch dimensions"):
        pairwise_generalized_box_iou(torch.zeros(2, 3, 4), torch.zeros(3, 3, 4))


def test_elementwise_giou_equals_diagonal_of_pairwise() -> None:
    generator = torch.Generator().manual_seed(4)
    boxes1 = _random_xyxy(2, 6, generator=generator)
    boxes2 = _random_xyxy(2, 6, generator=generator)
    elementwise = elementwise_generalized_box_iou(boxes1, boxes2)
    assert elementwise.shape == (2, 6)
    pairwise = pairwise_generalized_box_iou(boxes1, boxes2)
    torch.testing.assert_close(elementwise, torch.diagonal(pairwise, dim1=-2, dim2=-1))
    # Hand value: [0,0,2,2] vs [1,1,3,3] -> -5/63 (see test_pairwise_giou_hand_computed_values).
    value = elementwise_generalized_box_iou(torch.tensor([0.0, 0.0, 2.0, 2.0]), torch.tensor([1.0, 1.0, 3.0, 3.0]))
    assert value.shape == ()
    assert value.item() == pytest.approx(-5.0 / 63.0)


def test_pad_targets_shapes_mask_and_padding() -> None:
    labels = [
        {"class_labels": torch.tensor([3, 1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.1, 0.4]])},
        {"class_labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)},
        {"class_labels": torch.tensor([7]), "boxes": torch.tensor([[0.1, 0.2, 0.05, 0.0]])},
    ]
    boxes, classes, mask = pad_targets(labels)
    assert boxes.shape == (3, 2, 4)
    assert classes.shape == (3, 2)
    assert classes.dtype == torch.long
    assert mask.dtype == torch.bool
    assert mask.tolist() == [[True, True], [False, False], [True, False]]
    torch.testing.assert_close(boxes[0], labels[0]["boxes"])
    torch.testing.assert_close(boxes[2, 0], labels[2]["boxes"][0])
    pad = torch.tensor(PAD_BOX_CXCYWH)
    torch.testing.assert_close(boxes[1], pad.expand(2, 4))
    torch.testing.assert_close(boxes[2, 1], pad)
    assert classes.tolist() == [[3, 1], [PAD_LABEL, PAD_LABEL], [7, PAD_LABEL]]
    # The padded boxes are valid for GIoU (finite against anything).
    assert torch.isfinite(pairwise_generalized_box_iou(center_to_corners(boxes), center_to_corners(boxes))).all()


def test_pad_targets_all_empty_gives_one_masked_slot() -> None:
    labels = [{"class_labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)} for _ in range(2)]
    boxes, classes, mask = pad_targets(labels)
    assert boxes.shape == (2, 1, 4)
    assert classes.shape == (2, 1)
    assert not mask.any()


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ({"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, -0.1, 0.2]])}, "negative width"),
        ({"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, float("nan"), 0.1, 0.2]])}, "NaN or inf"),
        ({"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.1]])}, r"shape \(n, 4\)"),
        ({"class_labels": torch.tensor([1, 2]), "boxes": torch.tensor([[0.5, 0.5, 0.1, 0.1]])}, "to match its boxes"),
        ({"class_labels": torch.tensor([1.0]), "boxes": torch.tensor([[0.5, 0.5, 0.1, 0.1]])}, "integer tensor"),
        ({"boxes": torch.tensor([[0.5, 0.5, 0.1, 0.1]])}, "'boxes' and 'class_labels'"),
    ],
)
def test_pad_targets_rejects_bad_targets(target: dict, message: str) -> None:
    good = {"class_labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.1, 0.1]])}
    with pytest.raises(ValueError, match=message):
        pad_targets([good, target])


def test_pad_targets_rejects_empty_list() -> None:
    with pytest.raises(ValueError, match="non-empty list"):
        pad_targets([])


# ---------------------------------------------------------------------------------------------------------------------
# Library agreement, validate=False and the helpers.
# ---------------------------------------------------------------------------------------------------------------------
def test_conversions_are_torchvision_box_convert() -> None:
    from torchvision.ops import box_convert

    generator = torch.Generator().manual_seed(5)
    cxcywh = torch.rand(2, 3, 4, generator=generator, dtype=torch.float64)
    assert torch.equal(center_to_corners(cxcywh), box_convert(cxcywh, "cxcywh", "xyxy"))
    xyxy = _random_xyxy(5, generator=generator)
    assert torch.equal(corners_to_center(xyxy), box_convert(xyxy, "xyxy", "cxcywh"))
    assert center_to_corners(torch.tensor([2, 2, 2, 4])).tolist() == [1.0, 0.0, 3.0, 4.0]  # integers become float


def test_giou_agrees_with_torchvision_where_their_definitions_agree() -> None:
    from torchvision.ops import generalized_box_iou, generalized_box_iou_loss

    generator = torch.Generator().manual_seed(6)
    boxes1 = _random_xyxy(9, generator=generator).double()
    boxes2 = _random_xyxy(9, generator=generator).double()
    # Pairwise: identical for non-degenerate boxes (torchvision has no eps, so 0 / 0 for two zero-area boxes).
    torch.testing.assert_close(pairwise_generalized_box_iou(boxes1, boxes2), generalized_box_iou(boxes1, boxes2))
    # Element-wise: 1 - torchvision's GIoU loss, which adds eps to the denominators instead of clamping them.
    torch.testing.assert_close(
        elementwise_generalized_box_iou(boxes1, boxes2), 1.0 - generalized_box_iou_loss(boxes1, boxes2, eps=0.0)
    )
    point = torch.tensor([[0.5, 0.5, 0.5, 0.5]])
    assert torch.isnan(generalized_box_iou(point, point)).all()
    assert pairwise_generalized_box_iou(point, point).item() == 0.0


def test_validate_false_skips_only_the_value_checks() -> None:
    good = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    bad = torch.tensor([[0.5, 0.0, 0.4, 1.0]])  # x2 < x1
    for function in (pairwise_generalized_box_iou, elementwise_generalized_box_iou):
        with pytest.raises(ValueError, match="degenerate box"):
            function(good, bad)
        assert torch.isfinite(function(good, bad, validate=False)).all()  # computed as given, not checked
    with pytest.raises(ValueError, match="last dimension of size 4"):  # shapes are always checked
        pairwise_generalized_box_iou(good, bad[:, :3], validate=False)
    nan_target = [{"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, float("nan"), 0.1, 0.2]])}]
    with pytest.raises(ValueError, match="NaN or inf"):
        pad_targets(nan_target)
    boxes, _, mask = pad_targets(nan_target, validate=False)
    assert mask.tolist() == [[True]] and torch.isnan(boxes[0, 0, 1])
    with pytest.raises(ValueError, match="integer tensor"):  # the structure is always checked
        pad_targets([{"class_labels": torch.tensor([1.0]), "boxes": torch.zeros(1, 4)}], validate=False)


def test_pad_targets_dtypes_and_devices() -> None:
    labels = [
        {"class_labels": torch.tensor([1], dtype=torch.int32), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])},
        {"class_labels": torch.tensor([2, 0]), "boxes": torch.tensor([[1, 1, 0, 0], [2, 2, 1, 1]])},  # int64 boxes
    ]
    boxes, classes, mask = pad_targets(labels, device="cpu")
    assert boxes.dtype == torch.float32 and classes.dtype == torch.long  # mixed float32/int64 boxes -> float32
    assert classes.tolist() == [[1, PAD_LABEL], [2, 0]] and mask.tolist() == [[True, False], [True, True]]
    torch.testing.assert_close(boxes[1], torch.tensor([[1.0, 1.0, 0.0, 0.0], [2.0, 2.0, 1.0, 1.0]]))
    double = pad_targets([{"class_labels": torch.tensor([0]), "boxes": torch.rand(1, 4, dtype=torch.float64)}])[0]
    assert double.dtype == torch.float64
    assert pad_targets([{"class_labels": [3], "boxes": [[0.5, 0.5, 0.1, 0.1]]}])[1].tolist() == [[3]]  # lists too


def test_helpers() -> None:
    from qdetr_hf.box_ops import compute_dtype, constant_box

    assert [compute_dtype(torch.zeros(1, dtype=d)) for d in (torch.half, torch.bfloat16, torch.int64)] == [
        torch.float32
    ] * 3
    assert compute_dtype(torch.zeros(1, dtype=torch.float64)) == torch.float64
    box = constant_box(PAD_BOX_CXCYWH, torch.float64, "cpu")
    assert box.dtype == torch.float64 and box.tolist() == list(PAD_BOX_CXCYWH)
