"""What every detection dataset of the package is: ``DetectionDataset`` and its COCO-style items (typed dicts)."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from qdetr_hf.data.sanitize import BoxFix

__all__ = [
    "CocoAnnotation",
    "DetectionDataset",
    "DetectionExample",
    "ImageInfo",
    "scaled_coco_area_ranges",
]

# COCO's absolute area thresholds (32^2, 96^2 px^2) were chosen for images of about 640 x 480 pixels.
_COCO_REFERENCE_IMAGE_AREA = 640.0 * 480.0
_COCO_SMALL_MAX_AREA = 32.0**2
_COCO_MEDIUM_MAX_AREA = 96.0**2


class CocoAnnotation(TypedDict):
    """One object in COCO style: absolute-pixel ``[x, y, w, h]`` box and a contiguous label id (0..K-1)."""

    bbox: list[float]
    category_id: int
    area: float
    iscrowd: int


class DetectionExample(TypedDict):
    """One item of a :class:`DetectionDataset`."""

    image: Image.Image
    image_id: int
    annotations: list[CocoAnnotation]


class ImageInfo(TypedDict):
    """The COCO ``images`` record of one item (``file_name`` is relative to the images folder)."""

    id: int
    file_name: str
    width: int
    height: int


def scaled_coco_area_ranges(width: int, height: int) -> dict[str, tuple[float, float]]:
    """COCO's small/medium/large area buckets rescaled to another image size.

    COCO's thresholds (``32**2`` and ``96**2`` px^2) are meant for images of about 640 x 480 pixels. They are scaled
    by the ratio of image areas, so a 128 x 128 image gets ``small < 54.6`` and ``large > 491.5`` px^2.

    Args:
        width: Image width in pixels.
        height: Image height in pixels.

    Returns:
        ``{"all": (0, inf), "small": (0, s), "medium": (s, m), "large": (m, inf)}`` in px^2, the same layout as
        ``pycocotools`` ``Params.areaRng`` (with ``1e10`` replaced by ``inf``).

    Raises:
        ValueError: If ``width`` or ``height`` is not positive.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got width={width}, height={height}")
    scale = (width * height) / _COCO_REFERENCE_IMAGE_AREA
    small, medium = _COCO_SMALL_MAX_AREA * scale, _COCO_MEDIUM_MAX_AREA * scale
    return {"all": (0.0, math.inf), "small": (0.0, small), "medium": (small, medium), "large": (medium, math.inf)}


def _make_annotations(
    xyxy: np.ndarray, labels: Sequence[int], areas: Sequence[float] | None = None, iscrowd: Sequence[int] | None = None
) -> list[CocoAnnotation]:
    """Build COCO annotation dicts from xyxy boxes (already sanitised)."""
    anns: list[CocoAnnotation] = []
    for k, (x0, y0, x1, y1) in enumerate(np.asarray(xyxy, dtype=np.float64).reshape(-1, 4).tolist()):
        w, h = x1 - x0, y1 - y0
        anns.append(
            {
                "bbox": [float(x0), float(y0), float(w), float(h)],
                "category_id": int(labels[k]),
                "area": float(areas[k]) if areas is not None else float(w * h),
                "iscrowd": int(iscrowd[k]) if iscrowd is not None else 0,
            }
        )
    return anns


class DetectionDataset(Dataset):
    """Base class of all detection datasets of the package.

    ``dataset[i]`` is a :class:`DetectionExample`: ``{"image": PIL RGB image, "image_id": int, "annotations": [...]}``
    with COCO-style annotations ``{"bbox": [x, y, w, h] (absolute pixels, floats), "category_id": int, "area": float,
    "iscrowd": int}``. ``category_id`` is always a contiguous label id ``0..K-1`` that indexes :attr:`id2label`, so the
    mapping can be given as is to a transformers model config.

    Subclasses implement :meth:`__len__`, :meth:`load_image`, :meth:`get_image_info` and :meth:`get_annotations`
    (and may override :meth:`image_path` and :meth:`__getitem__`).

    Args:
        id2label: Contiguous label id -> class name, keys exactly ``0..K-1``.

    Raises:
        ValueError: If the keys are not ``0..K-1`` or names repeat.
    """

    def __init__(self, id2label: Mapping[int, str]) -> None:
        id2label = {int(k): str(v) for k, v in id2label.items()}
        if sorted(id2label) != list(range(len(id2label))):
            raise ValueError(f"id2label keys must be the contiguous ids 0..K-1, got {sorted(id2label)}")
        if len(set(id2label.values())) != len(id2label):
            raise ValueError(f"class names must be unique, got {list(id2label.values())}")
        self._id2label = dict(sorted(id2label.items()))
        self.box_fixes: list[BoxFix] = []

    # -- label maps ---------------------------------------------------------------------------------------------------
    @property
    def id2label(self) -> dict[int, str]:
        """Contiguous label id -> class name."""
        return dict(self._id2label)

    @property
    def label2id(self) -> dict[str, int]:
        """Class name -> contiguous label id."""
        return {name: idx for idx, name in self._id2label.items()}

    @property
    def num_labels(self) -> int:
        """Number of classes K."""
        return len(self._id2label)

    @property
    def area_ranges(self) -> dict[str, tuple[float, float]] | None:
        """Small/medium/large area buckets for COCO metrics on this dataset; ``None`` means COCO's own (meant for
        images of about 640 x 480 px)."""
        return None

    # -- to implement -------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        """Number of images."""
        raise NotImplementedError

    def load_image(self, index: int) -> Image.Image:
        """Load image ``index`` as an RGB PIL image."""
        raise NotImplementedError

    def get_image_info(self, index: int) -> ImageInfo:
        """COCO ``images`` record of item ``index`` (id, file_name, width, height)."""
        raise NotImplementedError

    def get_annotations(self, index: int) -> list[CocoAnnotation]:
        """Annotations of item ``index`` (contiguous ``category_id``)."""
        raise NotImplementedError

    def image_path(self, index: int) -> Path | None:
        """Path of the source image file of item ``index`` when there is one (used by :func:`export_coco`)."""
        return None

    # -- generic ------------------------------------------------------------------------------------------------------
    def _check_index(self, index: int) -> int:
        n = len(self)
        index = int(index)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} images")
        return index

    def __getitem__(self, index: int) -> DetectionExample:
        """Return ``{"image", "image_id", "annotations"}`` for item ``index`` (negative indices allowed)."""
        index = self._check_index(index)
        return {
            "image": self.load_image(index),
            "image_id": self.get_image_info(index)["id"],
            "annotations": self.get_annotations(index),
        }

    def __iter__(self) -> Iterator[DetectionExample]:
        """Iterate over all items in order."""
        for i in range(len(self)):
            yield self[i]

    def to_coco_dict(self) -> dict[str, Any]:
        """Return the dataset as a COCO JSON dict (``images``, ``annotations``, ``categories``).

        Category ids are the contiguous label ids ``0..K-1``; annotation ids run from 1. ``file_name`` is relative
        to the images folder written by :func:`export_coco`.

        Returns:
            The COCO dict (JSON-serialisable).
        """
        images: list[dict[str, Any]] = []
        annotations: list[dict[str, Any]] = []
        for i in range(len(self)):
            info = self.get_image_info(i)
            images.append(dict(info))
            for ann in self.get_annotations(i):
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": int(info["id"]),
                        "category_id": int(ann["category_id"]),
                        "bbox": [float(v) for v in ann["bbox"]],
                        "area": float(ann["area"]),
                        "iscrowd": int(ann.get("iscrowd", 0)),
                    }
                )
        categories = [{"id": k, "name": name, "supercategory": "object"} for k, name in self._id2label.items()]
        return {
            "info": {"description": f"exported by qdetr_hf from {type(self).__name__}"},
            "licenses": [],
            "images": images,
            "annotations": annotations,
            "categories": categories,
        }
