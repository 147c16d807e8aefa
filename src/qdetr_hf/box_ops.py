"""Box helpers of the losses: torchvision's conversions, GIoU over padded batches and DETR target padding.

Conversions are ``torchvision.ops.box_convert``. GIoU is computed here because torchvision's versions do not fit the
losses' per-step path: ``generalized_box_iou`` divides without a clamp (0 / 0 = NaN for two zero-area boxes) and its
element-wise ``generalized_box_iou_loss`` writes the intersection through a boolean mask (a data-dependent shape, so a
host synchronisation on CUDA).

Host synchronisation: the validating checks (``validate=True``, the default of every public function) read tensor
values on the host. The distillers call these functions with ``validate=False`` on the training path, which is then
free of device-to-host copies; there DETR's own loss has already checked the batch's boxes (transformers'
``generalized_box_iou`` raises on a box with x2 < x1, y2 < y1 or NaN).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import reduce

import torch
from torch.nn.utils.rnn import pad_sequence
from torchvision.ops import box_convert

__all__ = [
    "PAD_BOX_CXCYWH",
    "PAD_LABEL",
    "center_to_corners",
    "check_corners",
    "compute_dtype",
    "constant_box",
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


def compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype box geometry and the distillation losses compute in: float64 stays float64, everything else
    (half precision, whose areas overflow/underflow, and integers) becomes float32."""
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def constant_box(values: Sequence[float], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """``values`` as a 1-D tensor written by fill kernels on ``device``: ``torch.tensor(values, device=...)`` would copy
    from pageable host memory, which waits for the device's queue."""
    return torch.stack([torch.full((), value, dtype=dtype, device=device) for value in values])


def _check_last_dim(boxes: torch.Tensor, name: str) -> None:
    if not isinstance(boxes, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(boxes).__name__}")
    if boxes.ndim < 1 or boxes.shape[-1] != 4:
        raise ValueError(f"{name} must have a last dimension of size 4, got shape {tuple(boxes.shape)}")


def check_corners(boxes: torch.Tensor, name: str) -> None:
    """Raise ValueError if any xyxy box has x2 < x1 or y2 < y1 (or a NaN coordinate); reads the values on the host."""
    ok = (boxes[..., 2:] >= boxes[..., :2]).all(dim=-1)
    if not bool(ok.all()):
        bad = (~ok).nonzero()[0].tolist()
        raise ValueError(
            f"degenerate box in {name} at index {bad}: {boxes[tuple(bad)].tolist()} "
            "(expected xyxy corners with x2 >= x1 and y2 >= y1 and no NaN)"
        )


def center_to_corners(boxes: torch.Tensor) -> torch.Tensor:
    """Convert boxes from (center_x, center_y, width, height) to (x1, y1, x2, y2) (``torchvision.ops.box_convert``).

    Args:
        boxes: Tensor of shape (..., 4) in cxcywh format.

    Returns:
        Tensor of shape (..., 4) in xyxy format, same device (floating dtype of the input, float32 for integers).

    Raises:
        ValueError: If the last dimension is not 4.
    """
    _check_last_dim(boxes, "boxes")
    return box_convert(boxes, in_fmt="cxcywh", out_fmt="xyxy")


def corners_to_center(boxes: torch.Tensor) -> torch.Tensor:
    """Convert boxes from (x1, y1, x2, y2) to (center_x, center_y, width, height) (``torchvision.ops.box_convert``).

    Args:
        boxes: Tensor of shape (..., 4) in xyxy format.

    Returns:
        Tensor of shape (..., 4) in cxcywh format, same device (floating dtype of the input).

    Raises:
        ValueError: If the last dimension is not 4.
    """
    _check_last_dim(boxes, "boxes")
    return box_convert(boxes, in_fmt="xyxy", out_fmt="cxcywh")


def _giou_from_corners(boxes1: torch.Tensor, boxes2: torch.Tensor, eps: float) -> torch.Tensor:
    """GIoU of two broadcastable xyxy tensors (..., 4) -> (...); every division is by a value clamped to ``eps``."""
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


def _upcast(boxes: torch.Tensor) -> torch.Tensor:
    return boxes.to(compute_dtype(boxes))


def pairwise_generalized_box_iou(
    boxes1: torch.Tensor, boxes2: torch.Tensor, *, eps: float = _DEFAULT_EPS, validate: bool = True
) -> torch.Tensor:
    """Pairwise Generalized IoU (https://giou.stanford.edu/) between two sets of xyxy boxes, per image.

    ``GIoU = IoU - (|C| - |A ∪ B|) / |C|`` with C the smallest enclosing box; values lie in [-1, 1].
    Unions and enclosing areas are clamped to at least ``eps`` so zero-area boxes give finite values (for example two
    identical zero-area boxes give 0). For boxes whose union is at least ``eps`` the result is identical to
    ``transformers.loss.loss_for_object_detection.generalized_box_iou`` (and ``torchvision.ops.generalized_box_iou``).
    Half-precision inputs are computed in float32.

    Args:
        boxes1: (N, 4) or (B, N, 4) boxes in (x1, y1, x2, y2) format.
        boxes2: (M, 4) or (B, M, 4) boxes in (x1, y1, x2, y2) format; same number of dimensions as ``boxes1`` (more
            leading batch dimensions are allowed if they broadcast).
        eps: Lower clamp for the union and the enclosing-box area.
        validate: Check that no box is degenerate (reads the values on the host). ``False`` skips the check: the
            call then makes no host synchronisation.

    Returns:
        (N, M) or (B, N, M) tensor of GIoU values (float32 or float64).

    Raises:
        ValueError: If shapes are incompatible or (with ``validate``) a box is degenerate (x2 < x1 or y2 < y1, or NaN).
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
    if validate:
        check_corners(boxes1, "boxes1")
        check_corners(boxes2, "boxes2")
    return _giou_from_corners(boxes1[..., :, None, :], boxes2[..., None, :, :], eps)


def elementwise_generalized_box_iou(
    boxes1: torch.Tensor, boxes2: torch.Tensor, *, eps: float = _DEFAULT_EPS, validate: bool = True
) -> torch.Tensor:
    """Generalized IoU of matched box pairs: ``boxes1[..., i]`` against ``boxes2[..., i]`` only.

    Equal to ``1 - torchvision.ops.generalized_box_iou_loss`` (``reduction="none"``) up to the ``eps`` convention
    (clamped here, added there), with broadcasting and without its boolean-mask indexing.

    Args:
        boxes1: (..., 4) boxes in (x1, y1, x2, y2) format.
        boxes2: (..., 4) boxes in (x1, y1, x2, y2) format, broadcastable against ``boxes1``.
        eps: Lower clamp for the union and the enclosing-box area.
        validate: Check that no box is degenerate (reads the values on the host); ``False`` makes no host
            synchronisation.

    Returns:
        Tensor of the broadcast leading shape (...) with the GIoU of each pair.

    Raises:
        ValueError: If the shapes do not broadcast or (with ``validate``) a box is degenerate (x2 < x1 or y2 < y1, or
            NaN).
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
    if validate:
        check_corners(boxes1, "boxes1")
        check_corners(boxes2, "boxes2")
    return _giou_from_corners(boxes1, boxes2, eps)


def pad_targets(
    labels: Sequence[Mapping[str, torch.Tensor]],
    device: torch.device | str | None = None,
    *,
    validate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad a DETR-style list of per-image targets into dense batch tensors.

    Padded slots get the dummy box :data:`PAD_BOX_CXCYWH` (non-degenerate, so GIoU against it is finite) and the
    class id :data:`PAD_LABEL` (-1); only ``mask`` says which slots are real. Each image's boxes fill its first slots,
    in the order given. The padding is ``torch.nn.utils.rnn.pad_sequence`` and reads no tensor value, so with
    ``validate=False`` the call makes no host synchronisation (the box counts are the tensors' shapes).

    Args:
        labels: One dict per image with ``"class_labels"`` (LongTensor (n,)) and ``"boxes"`` (FloatTensor (n, 4),
            normalised cxcywh). ``n`` may be 0.
        device: Device of the outputs; defaults to the device of the first image's boxes.
        validate: Also check the box values (finite, non-negative width and height), which reads them on the host.
            The structure (keys, shapes, integer class labels) is always checked.

    Returns:
        ``(boxes, class_labels, mask)``: boxes (B, G, 4) cxcywh (float dtype of the inputs, at least float32 for
        integer input), class_labels (B, G) long, mask (B, G) bool; G = max(1, largest n in the batch).

    Raises:
        ValueError: If ``labels`` is empty, a key is missing, shapes disagree, class labels are not integers, or (with
            ``validate``) a box is not finite or has a negative width/height.
    """
    if isinstance(labels, Mapping) or len(labels) == 0:
        raise ValueError("labels must be a non-empty list with one target dict per image")
    boxes_list: list[torch.Tensor] = []
    classes_list: list[torch.Tensor] = []
    # Structure checks over the list of per-image dicts (shapes and dtypes only); the padding is pad_sequence below.
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
    dtype = reduce(torch.promote_types, (b.dtype for b in boxes_list))
    dtype = dtype if dtype.is_floating_point else torch.float32
    boxes_list = [b.to(device=device, dtype=dtype) for b in boxes_list]
    classes_list = [c.to(device=device, dtype=torch.long) for c in classes_list]
    if validate:
        all_boxes = torch.cat(boxes_list)
        if not bool(torch.isfinite(all_boxes).all()):
            raise ValueError("ground-truth boxes contain NaN or inf values")
        if bool((all_boxes[:, 2:] < 0).any()):
            raise ValueError("ground-truth boxes (cxcywh) have a negative width or height")

    num_images = len(boxes_list)
    pad_box = constant_box(PAD_BOX_CXCYWH, dtype, device)
    if max(b.shape[0] for b in boxes_list) == 0:
        mask = torch.zeros((num_images, 1), dtype=torch.bool, device=device)
        padded_classes = torch.full((num_images, 1), PAD_LABEL, dtype=torch.long, device=device)
        return pad_box.expand(num_images, 1, 4).clone(), padded_classes, mask
    mask = pad_sequence([torch.ones_like(c, dtype=torch.bool) for c in classes_list], batch_first=True)
    padded_classes = pad_sequence(classes_list, batch_first=True, padding_value=PAD_LABEL)
    padded_boxes = torch.where(mask[..., None], pad_sequence(boxes_list, batch_first=True), pad_box)
    return padded_boxes, padded_classes, mask
