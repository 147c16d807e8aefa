"""COCO-style detection metrics (pycocotools), the offline `evaluate` module and the Trainer adapter."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .box_ops import center_to_corners

if TYPE_CHECKING:
    from collections.abc import Callable

    import evaluate
    from accelerate import Accelerator
    from transformers import EvalPrediction

__all__ = [
    "COCO_DETECTION_METRIC_PATH",
    "COCO_METRIC_KEYS",
    "CocoEvaluator",
    "compute_coco_metrics",
    "detection_gather_for_metrics",
    "load_coco_metric",
    "make_compute_metrics",
    "post_process_detections",
]

COCO_METRIC_KEYS: tuple[str, ...] = (
    "AP",
    "AP50",
    "AP75",
    "APs",
    "APm",
    "APl",
    "AR1",
    "AR10",
    "AR100",
    "ARs",
    "ARm",
    "ARl",
)
"""Names of the 12 numbers of `COCOeval.summarize()` (bbox), in pycocotools' order."""

COCO_DETECTION_METRIC_PATH: str = str(Path(__file__).resolve().parent / "coco_detection")
"""Absolute path of the `evaluate` metric module shipped in this package (pass it to `evaluate.load`)."""


# ----------------------------------------------------------------------------------------------------------------------
# Input normalisation helpers
# ----------------------------------------------------------------------------------------------------------------------


def _to_numpy(value: Any) -> np.ndarray:
    """Converts a tensor / array / (nested) list to a numpy array (CPU, float32 for bfloat16 tensors)."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if value.dtype == torch.bfloat16:
            value = value.float()
        return value.numpy()
    return np.asarray(value)


def _as_boxes(value: Any, what: str) -> np.ndarray:
    """Returns `value` as a finite float64 (N, 4) xyxy array with x2 >= x1 and y2 >= y1."""
    if value is None:
        return np.zeros((0, 4), dtype=np.float64)
    arr = _to_numpy(value).astype(np.float64)
    if arr.size == 0:
        return np.zeros((0, 4), dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise ValueError(f"{what}: boxes must have shape (N, 4) (x1, y1, x2, y2), got {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{what}: boxes contain NaN or infinite values")
    bad = (arr[:, 2] < arr[:, 0]) | (arr[:, 3] < arr[:, 1])
    if bad.any():
        raise ValueError(
            f"{what}: boxes must be xyxy with x2 >= x1 and y2 >= y1; box {arr[bad][0].tolist()} is not "
            "(did you pass xywh or cxcywh boxes?)"
        )
    return arr


def _as_vector(value: Any, n: int, what: str, dtype: type | None = None) -> np.ndarray:
    """Returns `value` as a 1-D array of length `n`."""
    if value is None:
        if n:
            raise ValueError(f"{what}: missing (expected {n} values, one per box)")
        value = []
    arr = _to_numpy(value)
    if dtype is not None:
        arr = arr.astype(dtype)
    arr = arr.reshape(-1) if arr.size == n else arr
    if arr.shape != (n,):
        raise ValueError(f"{what}: expected {n} values (one per box), got shape {arr.shape}")
    return arr


def _as_labels(value: Any, n: int, what: str, num_labels: int | None) -> np.ndarray:
    """Returns integer class labels of length `n`, checking they lie in [0, num_labels)."""
    arr = _as_vector(value, n, what)
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        as_float = arr.astype(np.float64)
        if not (np.isfinite(as_float).all() and (as_float == np.round(as_float)).all()):
            raise ValueError(f"{what}: labels must be integers, got {arr[:5].tolist()}")
    arr = arr.astype(np.int64)
    upper = num_labels if num_labels is not None else np.iinfo(np.int64).max
    bad = (arr < 0) | (arr >= upper)
    if bad.any():
        range_text = f"[0, {num_labels})" if num_labels is not None else "[0, inf)"
        raise ValueError(f"{what}: label {int(arr[bad][0])} is out of range {range_text}")
    return arr


def _as_image_id(value: Any, what: str) -> int:
    """Returns a python int image id from an int, a 0-d or a one-element tensor/array."""
    if value is None:
        raise ValueError(f"{what}: missing 'image_id'")
    arr = _to_numpy(value).reshape(-1)
    if arr.size != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{what}: 'image_id' must be a single integer, got {value!r}")
    return int(arr[0])


def _xyxy_to_xywh(boxes: np.ndarray) -> np.ndarray:
    """Converts absolute (x1, y1, x2, y2) boxes to COCO (x, y, w, h)."""
    return np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)


def _cxcywh_to_xyxy_abs(boxes: torch.Tensor, sizes_hw: torch.Tensor) -> torch.Tensor:
    """Converts normalised (cx, cy, w, h) boxes (..., 4) to absolute xyxy using per-image (h, w) sizes (..., 2)."""
    xyxy = center_to_corners(boxes)
    img_h, img_w = sizes_hw.unbind(-1)
    scale = torch.stack([img_w, img_h, img_w, img_h], dim=-1)
    return xyxy * scale.unsqueeze(-2)


# ----------------------------------------------------------------------------------------------------------------------
# pycocotools wrapper
# ----------------------------------------------------------------------------------------------------------------------


def compute_coco_metrics(
    predictions: Sequence[Mapping[str, Any]],
    references: Sequence[Mapping[str, Any]],
    num_labels: int | None = None,
    *,
    per_class: bool = False,
    verbose: bool = False,
    area_ranges: Mapping[str, tuple[float, float]] | None = None,
) -> dict[str, float]:
    """Runs the official COCO bbox evaluation (pycocotools `COCOeval`) on in-memory detections.

    Boxes are absolute-pixel ``(x1, y1, x2, y2)`` in both inputs; they are converted to COCO ``(x, y, w, h)`` and fed
    to pycocotools through in-memory `COCO` objects (no files are written). Label ids are used as COCO category ids
    unchanged. The evaluation uses pycocotools' defaults: IoU thresholds 0.50:0.05:0.95, at most 1/10/100 detections
    per image and class (higher-scoring ones are kept), area buckets small < 32², medium < 96², large.

    Args:
        predictions: One dict per image: ``"image_id"`` (int), ``"boxes"`` (N, 4) xyxy absolute pixels,
            ``"scores"`` (N,), ``"labels"`` (N,). Tensors, numpy arrays or lists. An image of `references` without
            an entry here has no detections. Do not threshold the scores: AP needs the full ranked list.
        references: One dict per image: ``"image_id"`` (int), ``"boxes"`` (M, 4) xyxy absolute pixels, ``"labels"``
            (M,); optional ``"iscrowd"`` (M,) (default 0; crowd boxes are ignored as in COCO), optional ``"area"``
            (M,) used by pycocotools for the small/medium/large buckets (default: box area ``w * h`` in pixels,
            COCO itself uses the segmentation-mask area), optional ``"orig_size"`` (h, w) stored as the image's
            height/width (bbox evaluation does not use it). Images with no boxes (M = 0) are allowed: detections
            on them count as false positives.
        num_labels: Number of object classes; when given every label must lie in ``[0, num_labels)``. When omitted
            labels only need to be non-negative.
        per_class: Also return ``"AP_<label>"`` (AP@[.50:.95], all areas, 100 detections) for every class present
            in `references` or `num_labels`.
        verbose: Let pycocotools print its progress and summary table (silenced by default).
        area_ranges: Replace COCO's small/medium/large buckets (``< 32²``, ``< 96²``, rest, in px², meant for
            ~640 x 480 images), e.g. with :func:`qdetr_hf.data.scaled_coco_area_ranges` for small images. A mapping
            with ``"small"``, ``"medium"`` and ``"large"`` ``(low, high)`` areas in px².

    Returns:
        The 12 `COCOeval.summarize()` numbers as python floats under `COCO_METRIC_KEYS` (AP, AP50, AP75, APs, APm,
        APl, AR1, AR10, AR100, ARs, ARm, ARl), in [0, 1], plus per-class APs if asked. A value of exactly -1.0 is
        pycocotools' "undefined": no ground-truth box falls in that bucket (e.g. APs when there are no small
        objects, or everything when `references` has no boxes at all). It is not a score; filter it out before
        averaging.

    Raises:
        ValueError: On duplicate image ids, predictions for an image not in `references`, labels out of range or
            not integer, boxes not of shape (N, 4) / not xyxy / non-finite, or mismatched lengths.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if num_labels is not None and num_labels <= 0:
        raise ValueError(f"num_labels must be positive, got {num_labels}")
    if area_ranges is not None and not {"small", "medium", "large"} <= set(area_ranges):
        raise ValueError(f"area_ranges needs 'small', 'medium' and 'large' entries, got {sorted(area_ranges)}")

    images: list[dict[str, Any]] = []
    gt_annotations: list[dict[str, Any]] = []
    seen_ids: set[int] = set()
    categories: set[int] = set(range(num_labels)) if num_labels is not None else set()
    for ref in references:
        image_id = _as_image_id(ref.get("image_id"), "references")
        if image_id in seen_ids:
            raise ValueError(f"references: duplicate image_id {image_id}")
        seen_ids.add(image_id)
        what = f"references[image_id={image_id}]"
        boxes = _as_boxes(ref.get("boxes"), what)
        n = len(boxes)
        labels = _as_labels(ref.get("labels", []), n, what, num_labels)
        iscrowd = ref.get("iscrowd")
        iscrowd = (
            np.zeros(n, dtype=np.int64) if iscrowd is None else _as_vector(iscrowd, n, what + " iscrowd", np.int64)
        )
        xywh = _xyxy_to_xywh(boxes)
        area = ref.get("area")
        area = xywh[:, 2] * xywh[:, 3] if area is None else _as_vector(area, n, what + " area", np.float64)
        image: dict[str, Any] = {"id": image_id}
        if ref.get("orig_size") is not None:
            size = _to_numpy(ref["orig_size"]).reshape(-1)
            if size.size != 2:
                raise ValueError(f"{what}: 'orig_size' must be (height, width), got {ref['orig_size']!r}")
            image["height"], image["width"] = int(size[0]), int(size[1])
        images.append(image)
        categories.update(labels.tolist())
        for box, label, crowd, box_area in zip(xywh.tolist(), labels.tolist(), iscrowd.tolist(), area.tolist()):
            gt_annotations.append(
                {
                    "id": len(gt_annotations) + 1,  # pycocotools treats id 0 as "unmatched": ids must start at 1
                    "image_id": image_id,
                    "category_id": label,
                    "bbox": box,
                    "area": box_area,
                    "iscrowd": int(crowd),
                }
            )

    detections: list[dict[str, Any]] = []
    pred_ids: set[int] = set()
    for pred in predictions:
        image_id = _as_image_id(pred.get("image_id"), "predictions")
        if image_id in pred_ids:
            raise ValueError(f"predictions: duplicate image_id {image_id}")
        pred_ids.add(image_id)
        if image_id not in seen_ids:
            raise ValueError(f"predictions: image_id {image_id} has no entry in references")
        what = f"predictions[image_id={image_id}]"
        boxes = _as_boxes(pred.get("boxes"), what)
        n = len(boxes)
        scores = _as_vector(pred.get("scores", []), n, what + " scores", np.float64)
        if not np.isfinite(scores).all():
            raise ValueError(f"{what}: scores contain NaN or infinite values")
        labels = _as_labels(pred.get("labels", []), n, what, num_labels)
        if num_labels is None:
            categories.update(labels.tolist())
        for box, score, label in zip(_xyxy_to_xywh(boxes).tolist(), scores.tolist(), labels.tolist()):
            detections.append({"image_id": image_id, "category_id": label, "bbox": box, "score": score})

    dataset = {
        "info": {},
        "images": images,
        "categories": [{"id": c, "name": str(c)} for c in sorted(categories)],
        "annotations": gt_annotations,
    }
    sink = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with sink:
        coco_gt = COCO()
        coco_gt.dataset = dataset
        coco_gt.createIndex()
        if detections:
            coco_dt = coco_gt.loadRes(detections)
        else:  # loadRes indexes anns[0]: build the empty result set by hand
            coco_dt = COCO()
            coco_dt.dataset = {**dataset, "annotations": []}
            coco_dt.createIndex()
        coco_eval = COCOeval(coco_gt, coco_dt, iouType="bbox")
        if area_ranges is not None:
            coco_eval.params.areaRng = [[0.0, 1e10]] + [
                [float(area_ranges[k][0]), min(float(area_ranges[k][1]), 1e10)] for k in ("small", "medium", "large")
            ]
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()

    result = {key: float(value) for key, value in zip(COCO_METRIC_KEYS, coco_eval.stats)}
    if per_class:
        # precision: [T iou thresholds, R recall points, K classes, A areas, M max-dets]; area "all", 100 dets.
        precision = coco_eval.eval["precision"][:, :, :, 0, -1]
        for k, cat_id in enumerate(coco_eval.params.catIds):
            values = precision[:, :, k]
            values = values[values > -1]
            result[f"AP_{cat_id}"] = float(values.mean()) if values.size else -1.0
    return result


# ----------------------------------------------------------------------------------------------------------------------
# DETR post-processing
# ----------------------------------------------------------------------------------------------------------------------


def post_process_detections(
    logits: torch.Tensor | np.ndarray,
    pred_boxes: torch.Tensor | np.ndarray,
    target_sizes: torch.Tensor | np.ndarray | Sequence[Sequence[int]] | None,
    top_k: int | None = 100,
) -> list[dict[str, torch.Tensor]]:
    """Turns raw DETR outputs into ranked absolute-pixel detections, one dict per image.

    Same math as `DetrImageProcessor.post_process_object_detection`: softmax over the C + 1 classes, drop the last
    ("no object") column, score = max class probability, label = its argmax; boxes normalised (cx, cy, w, h) ->
    (x1, y1, x2, y2) (`torchvision.ops.box_convert`) scaled by the image's (h, w). No score threshold (AP needs the
    whole ranked list): instead the `top_k` best queries per image are kept, sorted by decreasing score (stable, so
    ties keep query order). The processor itself is not called because it thresholds the scores and returns each
    image's detections in query order, with no top-k.

    Args:
        logits: (B, Q, C + 1) classification logits, last column = no-object.
        pred_boxes: (B, Q, 4) normalised (cx, cy, w, h) boxes.
        target_sizes: (B, 2) image sizes as (height, width) to scale the boxes to; None keeps them normalised.
        top_k: Number of detections kept per image; None or >= Q keeps all Q queries.

    Returns:
        B dicts with ``"scores"`` (K,), ``"labels"`` (K,) int64 and ``"boxes"`` (K, 4) float tensors, K = min(top_k, Q).

    Raises:
        ValueError: On shape mismatches, a batch size different from len(target_sizes) or top_k < 1.
    """
    logits_t = torch.as_tensor(logits)
    boxes_t = torch.as_tensor(pred_boxes)
    if logits_t.ndim != 3 or logits_t.shape[-1] < 2:
        raise ValueError(f"logits must have shape (B, Q, num_labels + 1), got {tuple(logits_t.shape)}")
    if boxes_t.ndim != 3 or boxes_t.shape[-1] != 4 or boxes_t.shape[:2] != logits_t.shape[:2]:
        raise ValueError(
            f"pred_boxes must have shape (B, Q, 4) matching logits {tuple(logits_t.shape)}, got {tuple(boxes_t.shape)}"
        )
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    batch, num_queries = logits_t.shape[:2]

    probs = torch.nn.functional.softmax(logits_t.to(torch.promote_types(logits_t.dtype, torch.float32)), dim=-1)
    scores, labels = probs[..., :-1].max(-1)
    k = num_queries if top_k is None else min(top_k, num_queries)
    scores, order = torch.sort(scores, dim=-1, descending=True, stable=True)
    scores, order = scores[:, :k], order[:, :k]
    labels = torch.gather(labels, 1, order)
    boxes_t = boxes_t.to(torch.promote_types(boxes_t.dtype, torch.float32))
    boxes = torch.gather(boxes_t, 1, order.unsqueeze(-1).expand(-1, -1, 4))

    if target_sizes is not None:
        sizes = torch.as_tensor(_to_numpy(target_sizes) if not isinstance(target_sizes, torch.Tensor) else target_sizes)
        if sizes.ndim != 2 or sizes.shape != (batch, 2):
            raise ValueError(f"target_sizes must be ({batch}, 2) (height, width) per image, got {tuple(sizes.shape)}")
        boxes = _cxcywh_to_xyxy_abs(boxes, sizes.to(device=boxes.device, dtype=boxes.dtype))
    else:
        boxes = center_to_corners(boxes)
    return [{"scores": s, "labels": lab, "boxes": b} for s, lab, b in zip(scores, labels, boxes)]


# ----------------------------------------------------------------------------------------------------------------------
# Trainer adapter
# ----------------------------------------------------------------------------------------------------------------------


def _is_array(value: Any) -> bool:
    return isinstance(value, (torch.Tensor, np.ndarray))


def _find_logits_and_boxes(outputs: Any, num_labels: int | None) -> tuple[Any, Any]:
    """Finds (logits, pred_boxes) among the top-level entries of one batch of Trainer predictions.

    DETR-family outputs keep the order ``loss_dict, logits, pred_boxes, ...`` (then auxiliary outputs and hidden
    states). Logits are the first top-level 3-D array (whose last dim is num_labels + 1 when num_labels is known);
    boxes are the first later (B, Q, 4) array. Order matters because with 3 classes both are (B, Q, 4).
    """
    if isinstance(outputs, Mapping):
        if "logits" in outputs and "pred_boxes" in outputs:
            return outputs["logits"], outputs["pred_boxes"]
        outputs = list(outputs.values())
    entries = list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]
    arrays = [(i, e) for i, e in enumerate(entries) if _is_array(e) and e.ndim == 3]
    logits_pos = next(
        (j for j, (_, e) in enumerate(arrays) if num_labels is None or e.shape[-1] == num_labels + 1),
        None,
    )
    if logits_pos is None:
        shapes = [tuple(e.shape) for _, e in arrays]
        expected = "(B, Q, C + 1)" if num_labels is None else f"(B, Q, {num_labels + 1})"
        raise ValueError(f"could not find DETR logits {expected} among the prediction arrays {shapes}")
    logits = arrays[logits_pos][1]
    boxes = next(
        (e for _, e in arrays[logits_pos + 1 :] if e.shape[-1] == 4 and tuple(e.shape[:2]) == tuple(logits.shape[:2])),
        None,
    )
    if boxes is None:
        raise ValueError(
            f"could not find DETR pred_boxes (B, Q, 4) after logits {tuple(logits.shape)} among the prediction arrays "
            f"{[tuple(e.shape) for _, e in arrays]}"
        )
    return logits, boxes


def _split_prediction_batches(predictions: Any) -> list[Any]:
    """Returns the per-batch prediction tuples (one batch if `predictions` itself holds the arrays)."""
    if _is_array(predictions) or isinstance(predictions, Mapping):
        return [predictions]
    if isinstance(predictions, (list, tuple)) and any(_is_array(e) and e.ndim == 3 for e in predictions):
        return [predictions]
    return list(predictions)


def _split_label_batches(label_ids: Any) -> list[list[Mapping[str, Any]]]:
    """Returns the per-batch lists of per-image target dicts (one batch if `label_ids` is a list of dicts)."""
    if label_ids is None:
        raise ValueError("label_ids is None: the eval dataset must provide 'labels' (per-image target dicts)")
    if isinstance(label_ids, Mapping):
        raise ValueError(
            "label_ids must be per-batch lists of per-image dicts; got a single dict. Run the Trainer with "
            "eval_do_concat_batches=False and remove_unused_columns=False."
        )
    label_ids = list(label_ids)
    if not label_ids or isinstance(label_ids[0], Mapping):
        return [label_ids]
    return [list(batch) for batch in label_ids]


class CocoEvaluator:
    """`compute_metrics` callable for `transformers.Trainer` that scores DETR outputs with COCO AP.

    Run the Trainer with ``remove_unused_columns=False`` (so ``labels`` reach the model) and
    ``eval_do_concat_batches=False`` (per-image target dicts cannot be concatenated). `EvalPrediction.predictions` is
    then a list with one tuple per batch, ``(loss_dict, logits, pred_boxes, ...)``, and `label_ids` a list with one
    list of per-image target dicts per batch, as made by `DetrImageProcessor`: ``"boxes"`` normalised (cx, cy, w, h),
    ``"class_labels"``, ``"orig_size"`` (h, w) and ``"image_id"``. Predicted and ground-truth boxes are both
    converted to absolute xyxy in the original image size with the same formula (so whatever frame the normalised
    target boxes use, e.g. the padded canvas of `DetrImageProcessor` with padding, is the frame the model learns and
    both sides are scaled alike). The ``"area"`` of the targets is not used (it is in resized-image pixels): areas
    are recomputed from the original-size boxes. When the eval set size is not a multiple of the eval batch size,
    the stock Trainer damages the last batch's targets: install `detection_gather_for_metrics`.

    With ``batch_eval_metrics=True`` the Trainer calls it once per batch with ``compute_result``; detections are
    accumulated and the metrics returned (and the state reset) when ``compute_result`` is True.

    Args:
        id2label: Class names; sets the number of classes (labels are checked against it) and the names used by
            the per-class APs.
        top_k: Detections kept per image (the best-scoring queries).
        per_class: Also report ``"AP_<class name>"`` for every class.
        area_ranges: Custom small/medium/large buckets (see `compute_coco_metrics`).
    """

    def __init__(
        self,
        id2label: Mapping[int, str] | None = None,
        top_k: int | None = 100,
        per_class: bool = False,
        area_ranges: Mapping[str, tuple[float, float]] | None = None,
    ) -> None:
        self.id2label = {int(k): str(v) for k, v in id2label.items()} if id2label is not None else None
        self.num_labels = len(self.id2label) if self.id2label is not None else None
        if self.id2label is not None and set(self.id2label) != set(range(len(self.id2label))):
            raise ValueError(f"id2label keys must be 0..{len(self.id2label) - 1}, got {sorted(self.id2label)}")
        self.top_k = top_k
        self.per_class = per_class
        self.area_ranges = dict(area_ranges) if area_ranges is not None else None
        self._predictions: list[dict[str, Any]] = []
        self._references: list[dict[str, Any]] = []

    def reset(self) -> None:
        """Drops the accumulated detections and targets."""
        self._predictions, self._references = [], []

    def update(self, predictions: Any, label_ids: Any) -> None:
        """Post-processes and stores one or more batches of Trainer predictions and their targets.

        Args:
            predictions: One batch tuple ``(loss_dict, logits, pred_boxes, ...)`` or a list of them.
            label_ids: One batch (list of per-image target dicts) or a list of them, aligned with `predictions`.

        Raises:
            ValueError: If the batches of predictions and labels do not line up or a target lacks a field.
        """
        pred_batches = _split_prediction_batches(predictions)
        label_batches = _split_label_batches(label_ids)
        if len(pred_batches) != len(label_batches):
            raise ValueError(f"got {len(pred_batches)} prediction batches but {len(label_batches)} label batches")
        for outputs, targets in zip(pred_batches, label_batches):
            logits, boxes = _find_logits_and_boxes(outputs, self.num_labels)
            if len(targets) != logits.shape[0]:
                raise ValueError(f"a batch has {logits.shape[0]} predictions but {len(targets)} targets")
            for field in ("boxes", "class_labels", "orig_size"):
                if any(field not in t for t in targets):
                    raise ValueError(f"every target dict needs {field!r}; got keys {sorted(targets[0])}")
            sizes_list = [torch.as_tensor(_to_numpy(t["orig_size"])).reshape(-1) for t in targets]
            if any(size.numel() != 2 for size in sizes_list):
                raise ValueError(
                    "every target 'orig_size' must be (height, width); got "
                    f"{[tuple(size.tolist()) for size in sizes_list]}. A 1-element orig_size usually means the "
                    "Trainer's gather_for_metrics cut the per-image tensors of the last, smaller eval batch to the "
                    "batch remainder (its boxes and labels were cut too): evaluate with a Trainer whose "
                    "gather_function is qdetr_hf.metrics.detection_gather_for_metrics(accelerator)."
                )
            sizes = torch.stack(sizes_list).to(torch.float64)
            detections = post_process_detections(
                torch.as_tensor(_to_numpy(logits)),
                torch.as_tensor(_to_numpy(boxes), dtype=torch.float64),  # same precision as the GT conversion
                sizes,
                top_k=self.top_k,
            )
            for target, det, size in zip(targets, detections, sizes):
                # without ids, number images in arrival order; duplicates are rejected by compute_coco_metrics
                image_id = (
                    _as_image_id(target["image_id"], "label_ids") if "image_id" in target else len(self._references)
                )
                gt = torch.as_tensor(_to_numpy(target["boxes"]), dtype=torch.float64).reshape(-1, 4)
                reference: dict[str, Any] = {
                    "image_id": image_id,
                    "boxes": _cxcywh_to_xyxy_abs(gt, size),
                    "labels": _to_numpy(target["class_labels"]).reshape(-1),
                    "orig_size": size.to(torch.int64),
                }
                if "iscrowd" in target:
                    reference["iscrowd"] = _to_numpy(target["iscrowd"]).reshape(-1)
                self._predictions.append({"image_id": image_id, **det})
                self._references.append(reference)

    def compute(self) -> dict[str, float]:
        """Returns the COCO metrics of everything accumulated so far (see `compute_coco_metrics`)."""
        metrics = compute_coco_metrics(
            self._predictions,
            self._references,
            num_labels=self.num_labels,
            per_class=self.per_class,
            area_ranges=self.area_ranges,
        )
        if self.per_class and self.id2label is not None:
            metrics = {(f"AP_{self.id2label[int(k[3:])]}" if k.startswith("AP_") else k): v for k, v in metrics.items()}
        return metrics

    def __call__(self, eval_pred: EvalPrediction, compute_result: bool | None = None) -> dict[str, float]:
        """Scores an `EvalPrediction` (whole eval set, or one batch when `compute_result` is given).

        Args:
            eval_pred: The Trainer's predictions and label_ids.
            compute_result: `batch_eval_metrics` mode: False accumulates this batch and returns {}, True also
                computes the metrics over all accumulated batches and resets. None (default mode): computes the
                metrics of `eval_pred` alone.

        Returns:
            `COCO_METRIC_KEYS` -> float (the Trainer prefixes them with ``eval_``), -1.0 meaning undefined.
        """
        if compute_result is None:
            self.reset()
        self.update(eval_pred.predictions, eval_pred.label_ids)
        if compute_result is False:
            return {}
        try:
            return self.compute()
        finally:
            self.reset()


def detection_gather_for_metrics(accelerator: Accelerator) -> Callable[[Any], Any]:
    """Builds a `Trainer.gather_function` that keeps per-image detection targets intact.

    `Accelerator.gather_for_metrics` trims the last, smaller evaluation batch to the dataset remainder by slicing the
    first dimension of every tensor. That is right for batch-first predictions but wrong for DETR labels, a list of
    per-image dicts whose tensors are (num_boxes, ...) or (2,): with 5 eval images and batch size 2 the last image
    keeps 1 box and a 1-element ``orig_size``; with a remainder >= 2 boxes are silently dropped, which corrupts AP.
    The returned function gathers such lists as whole objects (trimming the list, not the tensors) and everything
    else as usual. Install it before each evaluation loop (the Trainer resets `gather_function` after each loop)::

        class MyTrainer(Trainer):
            def evaluation_loop(self, *args, **kwargs):
                self.gather_function = detection_gather_for_metrics(self.accelerator)
                return super().evaluation_loop(*args, **kwargs)

    Args:
        accelerator: The Trainer's `accelerate.Accelerator`.

    Returns:
        A callable ``gather(data) -> data`` with the `gather_for_metrics` contract.
    """

    def gather(data: Any) -> Any:
        if isinstance(data, (list, tuple)) and data and all(isinstance(item, Mapping) for item in data):
            return accelerator.gather_for_metrics(list(data), use_gather_object=True)
        return accelerator.gather_for_metrics(data)

    return gather


def make_compute_metrics(
    id2label: Mapping[int, str] | None = None,
    top_k: int | None = 100,
    per_class: bool = False,
    area_ranges: Mapping[str, tuple[float, float]] | None = None,
) -> CocoEvaluator:
    """Builds the `compute_metrics` callable for `transformers.Trainer` (see `CocoEvaluator`).

    Args:
        id2label: Class names (e.g. ``model.config.id2label``).
        top_k: Detections kept per image.
        per_class: Also report per-class AP.
        area_ranges: Custom small/medium/large buckets (see `compute_coco_metrics`).

    Returns:
        A `CocoEvaluator`.
    """
    return CocoEvaluator(id2label=id2label, top_k=top_k, per_class=per_class, area_ranges=area_ranges)


def load_coco_metric(**kwargs: Any) -> evaluate.EvaluationModule:
    """Loads the packaged `coco_detection` `evaluate` metric from its local path (works offline).

    Args:
        **kwargs: Forwarded to `evaluate.load` (e.g. ``keep_in_memory=True``, ``experiment_id``).

    Returns:
        The `evaluate.EvaluationModule`; use ``add_batch(predictions=..., references=...)`` then ``compute()``.
    """
    import evaluate

    return evaluate.load(COCO_DETECTION_METRIC_PATH, **kwargs)
