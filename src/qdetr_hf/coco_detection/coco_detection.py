"""`evaluate` metric module: COCO bbox AP/AR (pycocotools) over per-image detection records, usable offline."""

from __future__ import annotations

from typing import Any

import datasets
import evaluate

import qdetr_hf.metrics

_CITATION = """\
@inproceedings{lin2014microsoft,
  title     = {Microsoft {COCO}: Common Objects in Context},
  author    = {Lin, Tsung-Yi and Maire, Michael and Belongie, Serge and Hays, James and Perona, Pietro and
               Ramanan, Deva and Doll{\\'a}r, Piotr and Zitnick, C. Lawrence},
  booktitle = {European Conference on Computer Vision (ECCV)},
  pages     = {740--755},
  year      = {2014}
}
"""

_DESCRIPTION = """\
COCO detection metric: the 12 numbers of the official pycocotools `COCOeval` bounding-box evaluation (AP averaged over
IoU 0.50:0.05:0.95, AP at IoU 0.50 and 0.75, AP for small/medium/large objects, AR at 1/10/100 detections per image and
AR for small/medium/large objects). Predictions and references are per-image records with absolute-pixel
(x1, y1, x2, y2) boxes; evaluation runs in memory, nothing is downloaded or written.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `dict`): one record per image with
        `image_id` (`int`), `boxes` (`list` of [x1, y1, x2, y2] absolute pixels), `scores` (`list` of `float`),
        `labels` (`list` of `int`). Do not threshold the scores: AP needs the whole ranked list (at most 100 per
        image and class are used, highest scores first).
    references (`list` of `dict`): one record per image with
        `image_id` (`int`), `boxes` (`list` of [x1, y1, x2, y2] absolute pixels), `labels` (`list` of `int`) and
        optionally `iscrowd` (`list` of `int`, default 0), `area` (`list` of `float`, default box width * height,
        used for the small/medium/large buckets) and `orig_size` ([height, width]). Images without boxes are allowed.
    num_labels (`int`, *optional*): number of classes; labels must lie in [0, num_labels).
    per_class (`bool`, defaults to `False`): also return `AP_<label>` for every class.
    verbose (`bool`, defaults to `False`): let pycocotools print its summary table.
Returns:
    `dict` of `float` with keys AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl in [0, 1].
    -1.0 means undefined: no ground-truth box in that bucket (for example APs when there are no small objects).
Examples:
    >>> import evaluate, qdetr_hf.metrics
    >>> metric = evaluate.load(qdetr_hf.metrics.COCO_DETECTION_METRIC_PATH)
    >>> refs = [{"image_id": 1, "boxes": [[10.0, 10.0, 110.0, 110.0]], "labels": [0]}]
    >>> preds = [{"image_id": 1, "boxes": [[10.0, 10.0, 110.0, 110.0]], "scores": [0.9], "labels": [0]}]
    >>> metric.add_batch(predictions=preds, references=refs)
    >>> results = metric.compute()
    >>> round(results["AP"], 6), results["APs"]  # no small box in the references: APs is undefined
    (1.0, -1.0)
"""

_BOXES = datasets.List(datasets.List(datasets.Value("float64"), length=4))
_FEATURES = datasets.Features(
    {
        "predictions": {
            "image_id": datasets.Value("int64"),
            "boxes": _BOXES,
            "scores": datasets.List(datasets.Value("float64")),
            "labels": datasets.List(datasets.Value("int64")),
        },
        "references": {
            "image_id": datasets.Value("int64"),
            "boxes": _BOXES,
            "labels": datasets.List(datasets.Value("int64")),
            "iscrowd": datasets.List(datasets.Value("int64")),
            "area": datasets.List(datasets.Value("float64")),
            "orig_size": datasets.List(datasets.Value("int64"), length=2),
        },
    }
)
_OPTIONAL_REFERENCE_FIELDS = ("iscrowd", "area", "orig_size")


def _fill_optional(record: Any) -> Any:
    """Adds the missing optional reference fields as None (evaluate's type check needs every key present)."""
    if isinstance(record, dict) and any(key not in record for key in _OPTIONAL_REFERENCE_FIELDS):
        return {**{key: None for key in _OPTIONAL_REFERENCE_FIELDS}, **record}
    return record


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class CocoDetection(evaluate.Metric):
    """COCO bbox AP/AR delegating to `qdetr_hf.metrics.compute_coco_metrics`."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=_FEATURES,
            codebase_urls=["https://github.com/cocodataset/cocoapi/tree/master/PythonAPI/pycocotools"],
            reference_urls=["https://cocodataset.org/#detection-eval"],
        )

    def add_batch(self, *, predictions: Any = None, references: Any = None, **kwargs: Any) -> None:
        """Adds per-image prediction and reference records (optional reference fields may be omitted)."""
        if references is not None:
            references = [_fill_optional(record) for record in references]
        super().add_batch(predictions=predictions, references=references, **kwargs)

    def add(self, *, prediction: Any = None, reference: Any = None, **kwargs: Any) -> None:
        """Adds the records of one image (optional reference fields may be omitted)."""
        super().add(prediction=prediction, reference=_fill_optional(reference), **kwargs)

    def compute(self, *, predictions: Any = None, references: Any = None, **kwargs: Any) -> dict[str, float] | None:
        """Computes the metrics over everything added (and `predictions`/`references` if given)."""
        if references is not None:
            references = [_fill_optional(record) for record in references]
        return super().compute(predictions=predictions, references=references, **kwargs)

    def _compute(
        self,
        predictions: list[dict[str, Any]],
        references: list[dict[str, Any]],
        num_labels: int | None = None,
        per_class: bool = False,
        verbose: bool = False,
    ) -> dict[str, float]:
        return qdetr_hf.metrics.compute_coco_metrics(
            predictions, references, num_labels=num_labels, per_class=per_class, verbose=verbose
        )
