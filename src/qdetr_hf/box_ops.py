"""Batched box conversions, pairwise IoU/GIoU and target padding shared by the losses."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

__all__ = [
    "PAD_BOX_CXCYWH",
    "PAD_LABEL",
    "center_to_corners",
    "corners_to_center",
    "elementwise_generalized_box_iou",
    "pad_targets",
    "pairwise_generalized_box_iou",
]

#: Dummy box (normalised cxcywh: the whole image) written into padded ground-truth slots. It is non-degenerate, so
#: every IoU/GIoU against it is finite; the mask returned by :func:`pad_targets` says which slots are real.
PAD_BOX_CXCYWH: tuple[float, float, float, float] = (0.5, 0.5, 1.0, 1.0)
#: Class id written into padded ground-truth slots (never a valid class).
PAD_LABEL: int = -1

_DEFAULT_EPS = 1e-7


def _check_last_dim(boxes: torch.Tensor, name: str) -> None:
    if not isinstance(boxes, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(boxes).__name__}")
    if boxes.ndim < 1 or boxes.shape[-1] != 4:
        raise ValueError(f"{name} must have a last dimension of size 4, got shape {tuple(boxes.shape)}")


def _upcast(boxes: torch.Tensor) -> torch.Tensor:
    """Compute box geometry in at least float32 (half precision areas overflow/underflow); ints become float32."""
    if boxes.is_floating_point():
        return boxes if boxes.dtype in (torch.float32, torch.float64) else boxes.float()
    return boxes.float()


def _check_corners(boxes: torch.Tensor, name: str) -> None:
    """Raise ValueError if any xyxy box has x2 < x1 or y2 < y1 (or a NaN coordinate)."""
    ok = (boxes[..., 2:] >= boxes[..., :2]).all(dim=-1)
    if not bool(ok.all()):
        bad = (~ok).nonzero()[0].tolist()
        raise ValueError(
            f"degenerate box in {name} at index {bad}: {boxes[tuple(bad)].tolist()} "
            "(expected xyxy corners with x2 >= x1 and y2 >= y1 and no NaN)"
        )


def center_to_corners(boxes: torch.Tensor) -> torch.Tensor:
    """Convert boxes from (center_x, center_y, width, height) to (x1, y1, x2, y2).

    Args:
        boxes: Tensor of shape (..., 4) in cxcywh format.

    Returns:
        Tensor of shape (..., 4) in xyxy format, same dtype and device.

    Raises:
        ValueError: If the last dimension is not 4.
    """
    _check_last_dim(boxes, "boxes")
    center, size = boxes[..., :2], boxes[..., 2:]
    half = 0.5 * size
    return torch.cat([center - half, center + half], dim=-1)


def corners_to_center(boxes: torch.Tensor) -> torch.Tensor:
    """Convert boxes from (x1, y1, x2, y2) to (center_x, center_y, width, height).

    Args:
        boxes: Tensor of shape (..., 4) in xyxy format.

    Returns:
        Tensor of shape (..., 4) in cxcywh format, same dtype and device.

    Raises:
        ValueError: If the last dimension is not 4.
    """
    _check_last_dim(boxes, "boxes")
    top_left, bottom_right = boxes[..., :2], boxes[..., 2:]
    return torch.cat([0.5 * (top_left + bottom_right), bottom_right - top_left], dim=-1)


def _giou_from_corners(boxes1: torch.Tensor, boxes2: torch.Tensor, eps: float) -> torch.Tensor:
    """GIoU of two broadcastable xyxy tensors (..., 4) -> (...). Inputs already validated and upcast."""
    area1 = (boxes1[..., 2] - boxes1[..., 0]) * (boxes1[..., 3] - boxes1[..., 1])
    area2 = (boxes2[..., 2] - boxes2[..., 0]) * (boxes2[..., 3] - boxes2[..., 1])

    inter_wh = (
        torch.minimum(boxes1[..., 2:], boxes2[..., 2:]) - torch.maximum(boxes1[..., :2], boxes2[..., :2])
    ).clamp(min=0)
    inter = inter_wh[..., 0] * inter_wh[..., 1]
    union = area1 + area2 - inter
    iou = inter / union.clamp(min=eps)

    hull_wh = torch.maximum(boxes1[..., 2:], boxes2[..., 2:]) - torch.minimum(boxes1[..., :2], boxes2[..., :2])
    hull = hull_wh[..., 0] * hull_wh[..., 1]
    return iou - (hull - union) / hull.clamp(min=eps)


def pairwise_generalized_box_iou(
    boxes1: torch.Tensor, boxes2: torch.Tensor, *, eps: float = _DEFAULT_EPS
) -> torch.Tensor:
    """Pairwise Generalized IoU (https://giou.stanford.edu/) between two sets of xyxy boxes, per image.

    ``GIoU = IoU - (|C| - |A ∪ B|) / |C|`` with C the smallest enclosing box; values lie in [-1, 1].
    Unions and enclosing areas are clamped to at least ``eps`` so zero-area boxes give finite values (for example two
    identical zero-area boxes give 0). For boxes whose union is at least ``eps`` the result is identical to
    ``transformers.loss.loss_for_object_detection.generalized_box_iou``. Half-precision inputs are computed in float32.

    Args:
        boxes1: (N, 4) or (B, N, 4) boxes in (x1, y1, x2, y2) format.
        boxes2: (M, 4) or (B, M, 4) boxes in (x1, y1, x2, y2) format; same number of dimensions as ``boxes1`` (more
            leading batch dimensions are allowed if they broadcast).
        eps: Lower clamp for the union and the enclosing-box area.

    Returns:
        (N, M) or (B, N, M) tensor of GIoU values (float32 or float64).

    Raises:
        ValueError: If shapes are incompatible or a box is degenerate (x2 < x1 or y2 < y1, or NaN).
    """
    _check_last_dim(boxes1, "boxes1")
    _check_last_dim(boxes2, "boxes2")
    if boxes1.ndim < 2 or boxes1.ndim != boxes2.ndim:
        raise ValueError(
            "boxes1 and boxes2 must both be (N, 4)/(M, 4) or both (B, N, 4)/(B, M, 4), got shapes "
            f"{tuple(boxes1.shape)} and {tuple(boxes2.shape)}"
        )
    try:
        torch.broadcast_shapes(boxes1.shape[:-2], boxes2.shape[:-2])
    except RuntimeError as err:
        raise ValueError(
            f"batch dimensions of boxes1 {tuple(boxes1.shape)} and boxes2 {tuple(boxes2.shape)} do not match"
        ) from err
    boxes1, boxes2 = _upcast(boxes1), _upcast(boxes2)
    _check_corners(boxes1, "boxes1")
    _check_corners(boxes2, "boxes2")
    return _giou_from_corners(boxes1[..., :, None, :], boxes2[..., None, :, :], eps)


def elementwise_generalized_box_iou(
    boxes1: torch.Tensor, boxes2: torch.Tensor, *, eps: float = _DEFAULT_EPS
) -> torch.Tensor:
    """Generalized IoU of matched box pairs: ``boxes1[..., i]`` against ``boxes2[..., i]`` only.

    Args:
        boxes1: (..., 4) boxes in (x1, y1, x2, y2) format.
        boxes2: (..., 4) boxes in (x1, y1, x2, y2) format, broadcastable against ``boxes1``.
        eps: Lower clamp for the union and the enclosing-box area.

    Returns:
        Tensor of the broadcast leading shape (...) with the GIoU of each pair.

    Raises:
        ValueError: If the shapes do not broadcast or a box is degenerate (x2 < x1 or y2 < y1, or NaN).
    """
    _check_last_dim(boxes1, "boxes1")
    _check_last_dim(boxes2, "boxes2")
    try:
        torch.broadcast_shapes(boxes1.shape, boxes2.shape)
    except RuntimeError as err:
        raise ValueError(
            f"boxes1 {tuple(boxes1.shape)} and boxes2 {tuple(boxes2.shape)} are not broadcastable"
        ) from err
    boxes1, boxes2 = _upcast(boxes1), _upcast(boxes2)
    _check_corners(boxes1, "boxes1")
    _check_corners(boxes2, "boxes2")
    return _giou_from_corners(boxes1, boxes2, eps)


def pad_targets(
    labels: Sequence[Mapping[str, torch.Tensor]], device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad a DETR-style list of per-image targets into dense batch tensors.

    Padded slots get the dummy box :data:`PAD_BOX_CXCYWH` (non-degenerate, so GIoU against it is finite) and the
    class id :data:`PAD_LABEL` (-1); only ``mask`` says which slots are real.

    Args:
        labels: One dict per image with ``"class_labels"`` (LongTensor (n,)) and ``"boxes"`` (FloatTensor (n, 4),
            normalised cxcywh). ``n`` may be 0.
        device: Device of the outputs; defaults to the device of the first image's boxes.

    Returns:
        ``(boxes, class_labels, mask)``: boxes (B, G, 4) cxcywh (float dtype of the inputs, at least float32 for
        integer input), class_labels (B, G) long, mask (B, G) bool; G = max(1, largest n in the batch).

    Raises:
        ValueError: If ``labels`` is empty, a key is missing, shapes disagree, class labels are not integers, or a
            box is not finite or has a negative width/height.
    """
    if isinstance(labels, Mapping) or len(labels) == 0:
        raise ValueError("labels must be a non-empty list with one target dict per image")
    boxes_list: list[torch.Tensor] = []
    classes_list: list[torch.Tensor] = []
    # Data marshalling over the list of per-image dicts (validation only); the padding itself is vectorised below.
    for index, target in enumerate(labels):
        if not isinstance(target, Mapping) or "boxes" not in target or "class_labels" not in target:
            raise ValueError(f"labels[{index}] must be a dict with 'boxes' and 'class_labels'")
        boxes = torch.as_tensor(target["boxes"])
        classes = torch.as_tensor(target["class_labels"])
        if boxes.numel() == 0:
            boxes = boxes.reshape(0, 4)
        if boxes.ndim != 2 or boxes.shape[-1] != 4:
            raise ValueError(f"labels[{index}]['boxes'] must have shape (n, 4), got {tuple(boxes.shape)}")
        if classes.ndim != 1 or classes.shape[0] != boxes.shape[0]:
            raise ValueError(
                f"labels[{index}]['class_labels'] must have shape ({boxes.shape[0]},) to match its boxes, "
                f"got {tuple(classes.shape)}"
            )
        if classes.is_floating_point() or classes.is_complex() or classes.dtype == torch.bool:
            raise ValueError(f"labels[{index}]['class_labels'] must be an integer tensor, got {classes.dtype}")
        boxes_list.append(boxes)
        classes_list.append(classes)

    if device is None:
        device = boxes_list[0].device
    lengths = torch.tensor([b.shape[0] for b in boxes_list], device=device)
    all_boxes = torch.cat([b.to(device) for b in boxes_list])
    all_boxes = all_boxes if all_boxes.is_floating_point() else all_boxes.float()
    all_classes = torch.cat([c.to(device=device, dtype=torch.long) for c in classes_list])

    if not bool(torch.isfinite(all_boxes).all()):
        raise ValueError("ground-truth boxes contain NaN or inf values")
    if bool((all_boxes[:, 2:] < 0).any()):
        raise ValueError("ground-truth boxes (cxcywh) have a negative width or height")

    num_images = len(boxes_list)
    max_gt = max(1, max(b.shape[0] for b in boxes_list))
    mask = torch.arange(max_gt, device=device)[None, :] < lengths[:, None]
    padded_boxes = (
        torch.tensor(PAD_BOX_CXCYWH, dtype=all_boxes.dtype, device=device).expand(num_images, max_gt, 4).clone()
    )
    padded_classes = torch.full((num_images, max_gt), PAD_LABEL, dtype=torch.long, device=device)
    # Boolean-mask assignment fills in row-major order, i.e. image 0's boxes first, in the order they were given.
    padded_boxes[mask] = all_boxes
    padded_classes[mask] = all_classes
    return padded_boxes, padded_classes, mask
