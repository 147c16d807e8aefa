"""Detection datasets (COCO JSON, Pascal VOC, Hub `datasets`, synthetic shapes) and the DETR batch collator."""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import tempfile
import warnings
import weakref
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import TYPE_CHECKING, Any, Literal, TypedDict

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

if TYPE_CHECKING:
    import datasets as hf_datasets
    from transformers import DetrImageProcessor

__all__ = [
    "BoxFix",
    "CocoAnnotation",
    "CocoDetectionDataset",
    "DataQualityWarning",
    "DetectionDataset",
    "DetectionExample",
    "DetrCollator",
    "HubDetectionDataset",
    "ImageInfo",
    "ImageSizeMismatch",
    "SyntheticShapesDataset",
    "VocDetectionDataset",
    "canonical_split",
    "default_image_processor",
    "export_coco",
    "find_voc_root",
    "hflip_example",
    "load_detection_dataset",
    "scaled_coco_area_ranges",
    "to_hf_dataset",
]


IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

# Canonical split name -> accepted spellings, in the order they are looked for on disk / in a DatasetDict.
_SPLIT_ALIASES: dict[str, tuple[str, ...]] = {
    "train": ("train", "training"),
    "validation": ("validation", "val", "valid", "dev"),
    "test": ("test", "testing"),
    "trainval": ("trainval",),
}

# COCO's absolute area thresholds (32^2, 96^2 px^2) were chosen for images of about 640 x 480 pixels.
_COCO_REFERENCE_IMAGE_AREA = 640.0 * 480.0
_COCO_SMALL_MAX_AREA = 32.0**2
_COCO_MEDIUM_MAX_AREA = 96.0**2


# ----------------------------------------------------------------------------------------------------------------------
# Common representation
# ----------------------------------------------------------------------------------------------------------------------
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


class DataQualityWarning(UserWarning):
    """Warned once per dataset when boxes had to be clipped to the image or dropped as degenerate."""


@dataclass(frozen=True)
class BoxFix:
    """Record of one box that a loader clipped or dropped.

    Attributes:
        source: The file (or Hub row) the box came from.
        box_index: Index of the box among the objects of that file, in file order.
        action: ``"clipped"`` (box reached outside the image and was clipped) or ``"dropped"`` (zero/negative
            width or height, or non-finite coordinates).
        original_xyxy: The box as ``(x0, y0, x1, y1)`` in 0-based continuous pixel coordinates before the fix.
        reason: Why the box was fixed, in words.
    """

    source: str
    box_index: int
    action: Literal["clipped", "dropped"]
    original_xyxy: tuple[float, float, float, float]
    reason: str


@dataclass(frozen=True)
class ImageSizeMismatch:
    """An image whose width/height in the annotation file disagrees with the image file (the file's size is used).

    Attributes:
        file_name: The image's file name, as in the annotation file.
        json_size: ``(width, height)`` in the annotation file.
        file_size: ``(width, height)`` of the image file.
    """

    file_name: str
    json_size: tuple[int, int]
    file_size: tuple[int, int]


def _relative_name_problem(name: str) -> str | None:
    """Why ``name`` cannot name a file inside a folder (empty, absolute, or leading out through ``..``), or None.

    Both ``/`` and ``\\`` count as separators, so a name that would escape on Windows is refused everywhere.
    """
    if not name:
        return "is empty"
    if PurePosixPath(name).is_absolute() or PureWindowsPath(name).is_absolute() or PureWindowsPath(name).drive:
        return "is absolute"
    depth = 0
    for part in name.replace("\\", "/").split("/"):
        if part == "..":
            depth -= 1
            if depth < 0:
                return "leads outside the folder (through '..')"
        elif part not in ("", "."):
            depth += 1
    return None


def _open_image(path: Path, listed_in: str | os.PathLike[str], rgb: bool = True) -> Image.Image | tuple[int, int]:
    """Decode ``path`` as RGB (``rgb``) or read only its ``(width, height)``; every failure names the file.

    A missing file raises ``FileNotFoundError``; an unreadable, corrupt or truncated one an ``OSError`` naming the file
    and where it is listed (PIL's own messages, e.g. ``Truncated File Read``, do not say which file).
    """
    try:
        with Image.open(path) as im:
            return im.convert("RGB") if rgb else im.size
    except FileNotFoundError as err:
        raise FileNotFoundError(f"image {path} listed in {listed_in} does not exist") from err
    except (OSError, SyntaxError, ValueError) as err:  # UnidentifiedImageError is an OSError
        raise OSError(
            f"cannot read image {path} (listed in {listed_in}): {type(err).__name__}: {err}. The file is corrupt "
            "or truncated: replace it, or remove it from the annotations."
        ) from err


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


def canonical_split(split: str) -> str:
    """Map a split name to its canonical spelling (``"val"``/``"valid"``/``"dev"`` -> ``"validation"`` ...).

    Unknown names are returned unchanged (lower-cased), so custom split files still work.

    Args:
        split: A split name.

    Returns:
        The canonical name.
    """
    key = split.strip().lower()
    for canonical, aliases in _SPLIT_ALIASES.items():
        if key in aliases:
            return canonical
    return key


def _split_candidates(split: str) -> tuple[str, ...]:
    """Spellings to look for on disk for ``split``: the name as given first, then its aliases."""
    canonical = canonical_split(split)
    aliases = _SPLIT_ALIASES.get(canonical, (canonical,))
    return tuple(dict.fromkeys((split, split.lower(), *aliases)))


def _sanitize_boxes(
    xyxy: np.ndarray,
    width: int,
    height: int,
    degenerate: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Clip ``(n, 4)`` xyxy boxes to ``[0, width] x [0, height]`` and flag boxes to drop.

    Args:
        xyxy: Boxes in 0-based continuous pixel coordinates.
        width: Image width.
        height: Image height.
        degenerate: Optional ``(n,)`` bool mask of boxes the caller already knows are degenerate.

    Returns:
        ``(clipped_xyxy, keep, was_clipped)``: ``keep`` is False for non-finite boxes, boxes flagged ``degenerate``
        and boxes with zero/negative width or height after clipping; ``was_clipped`` is True for kept boxes whose
        coordinates changed.
    """
    xyxy = np.asarray(xyxy, dtype=np.float64).reshape(-1, 4)
    finite = np.isfinite(xyxy).all(axis=1)
    safe = np.where(finite[:, None], xyxy, 0.0)
    clipped = safe.copy()
    clipped[:, 0::2] = clipped[:, 0::2].clip(0.0, float(width))
    clipped[:, 1::2] = clipped[:, 1::2].clip(0.0, float(height))
    keep = finite & (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    if degenerate is not None:
        keep &= ~np.asarray(degenerate, dtype=bool)
    was_clipped = keep & (clipped != safe).any(axis=1)
    return clipped, keep, was_clipped


def _record_fixes(
    fixes: list[BoxFix],
    source: str,
    xyxy: np.ndarray,
    keep: np.ndarray,
    was_clipped: np.ndarray,
    degenerate: np.ndarray | None = None,
    degenerate_reason: str = "degenerate in the annotation",
) -> None:
    """Append a :class:`BoxFix` for every dropped or clipped box."""
    xyxy = np.asarray(xyxy, dtype=np.float64).reshape(-1, 4)
    for index in np.flatnonzero(~keep | was_clipped).tolist():
        box = tuple(float(v) for v in xyxy[index])
        if keep[index]:
            action, reason = "clipped", "reached outside the image"
        elif degenerate is not None and degenerate[index]:
            action, reason = "dropped", degenerate_reason
        elif not np.isfinite(xyxy[index]).all():
            action, reason = "dropped", "non-finite coordinates"
        else:
            action, reason = "dropped", "zero/negative width or height after clipping to the image"
        fixes.append(BoxFix(source, index, action, box, reason))  # type: ignore[arg-type]


def _warn_fixes(dataset_name: str, fixes: Sequence[BoxFix], total_boxes: int, max_listed: int = 10) -> None:
    """Emit one :class:`DataQualityWarning` summarising ``fixes`` (nothing when empty)."""
    if not fixes:
        return
    n_dropped = sum(f.action == "dropped" for f in fixes)
    n_clipped = len(fixes) - n_dropped
    by_source: dict[str, list[BoxFix]] = {}
    for fix in fixes:
        by_source.setdefault(fix.source, []).append(fix)
    listed = [
        f"{source} ({', '.join(f'box {f.box_index} {f.action}: {f.reason}, xyxy={list(f.original_xyxy)}' for f in items)})"
        for source, items in list(by_source.items())[:max_listed]
    ]
    more = f" and {len(by_source) - max_listed} more file(s)" if len(by_source) > max_listed else ""
    warnings.warn(
        f"{dataset_name}: fixed {len(fixes)} of {total_boxes} boxes: {n_clipped} clipped to the image, "
        f"{n_dropped} dropped as degenerate. Files: {'; '.join(listed)}{more}. "
        "See the dataset's `box_fixes` attribute for the full list.",
        DataQualityWarning,
        stacklevel=3,
    )


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


def export_coco(dataset: DetectionDataset, output_dir: str | os.PathLike[str]) -> Path:
    """Write ``dataset`` as a COCO folder: ``output_dir/images/<file_name>`` and ``output_dir/annotations.json``.

    Source image files are copied byte for byte when the dataset has them (:meth:`DetectionDataset.image_path`);
    generated images are written losslessly (PNG, or the format named by the file suffix).

    Args:
        dataset: Any :class:`DetectionDataset`.
        output_dir: Folder to create (may exist).

    Returns:
        The path of ``annotations.json``.

    Raises:
        ValueError: If two images share a file name, or a file name is absolute or leads outside ``images/`` (checked
            before anything is written).
    """
    output_dir = Path(output_dir)
    images_dir = output_dir / "images"
    coco = dataset.to_coco_dict()
    names = [img["file_name"] for img in coco["images"]]
    for i, (record, name) in enumerate(zip(coco["images"], names, strict=True)):
        problem = _relative_name_problem(str(name))
        if problem is not None:
            raise ValueError(
                f"cannot export {type(dataset).__name__}: image {i} (id {record['id']}) has file name {name!r}, which "
                f"{problem}; export_coco writes only inside {images_dir}"
            )
    if len(set(names)) != len(names):
        raise ValueError(f"cannot export {type(dataset).__name__}: image file names are not unique")
    images_dir.mkdir(parents=True, exist_ok=True)
    for i, record in enumerate(coco["images"]):
        target = images_dir / record["file_name"]
        target.parent.mkdir(parents=True, exist_ok=True)
        source = dataset.image_path(i)
        if source is not None and source.suffix.lower() == target.suffix.lower():
            shutil.copyfile(source, target)
        else:
            dataset.load_image(i).save(target)
    annotation_file = output_dir / "annotations.json"
    annotation_file.write_text(json.dumps(coco))
    return annotation_file


# ----------------------------------------------------------------------------------------------------------------------
# COCO JSON
# ----------------------------------------------------------------------------------------------------------------------
class CocoDetectionDataset(DetectionDataset):
    """COCO JSON detection dataset.

    Categories are sorted by their original id and renumbered ``0..K-1`` (COCO's 1..90 become 0..79); the mapping is
    kept in :attr:`category_id_map` (original -> contiguous) and :attr:`original_category_ids` (contiguous ->
    original). Boxes are clipped to the image and degenerate boxes dropped, with one :class:`DataQualityWarning`
    for the dataset. ``iscrowd`` is kept as in the file (the DETR image processor ignores crowd boxes for training;
    COCO evaluation uses them). Images without annotations are kept.

    The image files are authoritative for the sizes, as in the VOC loader: every image's header is read at
    construction, and a JSON ``width``/``height`` that disagrees with the file is replaced by the file's size (one
    :class:`DataQualityWarning` for the dataset; the list is in :attr:`size_mismatches`), so boxes are never clipped
    or dropped against a wrong size. A file that cannot be decoded (corrupt, truncated) raises an ``OSError`` naming
    it. ``file_name`` entries must be relative names inside ``images_dir``.

    Args:
        images_dir: Folder the ``file_name`` entries are relative to.
        annotation_file: The COCO JSON file.

    Raises:
        FileNotFoundError: If the folder, the file or an image does not exist.
        OSError: If an image file cannot be read.
        ValueError: If the JSON is not a COCO detection file, references unknown images/categories, or has an
            absolute ``file_name`` or one leading outside ``images_dir``.
    """

    def __init__(self, images_dir: str | os.PathLike[str], annotation_file: str | os.PathLike[str]) -> None:
        self.images_dir = Path(images_dir)
        self.annotation_file = Path(annotation_file)
        if not self.annotation_file.is_file():
            raise FileNotFoundError(f"COCO annotation file not found: {self.annotation_file}")
        if not self.images_dir.is_dir():
            raise FileNotFoundError(f"COCO images folder not found: {self.images_dir}")
        try:
            coco = json.loads(self.annotation_file.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{self.annotation_file} is not valid JSON: {err}") from err
        if not isinstance(coco, dict) or "images" not in coco:
            raise ValueError(f"{self.annotation_file} is not a COCO detection file (no 'images' list)")
        categories = sorted(coco.get("categories") or [], key=lambda c: int(c["id"]))
        if not categories:
            raise ValueError(f"{self.annotation_file} has no 'categories'")
        self.original_category_ids: dict[int, int] = {k: int(c["id"]) for k, c in enumerate(categories)}
        self.category_id_map: dict[int, int] = {orig: k for k, orig in self.original_category_ids.items()}
        super().__init__({k: str(c["name"]) for k, c in enumerate(categories)})

        self._images: list[ImageInfo] = []
        position: dict[int, int] = {}
        for img in coco["images"]:
            if "file_name" not in img or "id" not in img:
                raise ValueError(f"{self.annotation_file}: image record without 'id' or 'file_name': {img}")
            image_id = int(img["id"])
            if image_id in position:
                raise ValueError(f"{self.annotation_file}: duplicate image id {image_id}")
            problem = _relative_name_problem(str(img["file_name"]))
            if problem is not None:
                raise ValueError(
                    f"{self.annotation_file}: image {image_id} has file name {img['file_name']!r}, which {problem}; "
                    f"file names must be relative to the images folder {self.images_dir}"
                )
            position[image_id] = len(self._images)
            self._images.append(
                {
                    "id": image_id,
                    "file_name": str(img["file_name"]),
                    "width": int(img.get("width") or 0),
                    "height": int(img.get("height") or 0),
                }
            )
        raw: list[list[dict[str, Any]]] = [[] for _ in self._images]
        for ann in coco.get("annotations") or []:
            image_id = int(ann["image_id"])
            if image_id not in position:
                raise ValueError(
                    f"{self.annotation_file}: annotation {ann.get('id')} refers to unknown image {image_id}"
                )
            if int(ann["category_id"]) not in self.category_id_map:
                raise ValueError(
                    f"{self.annotation_file}: annotation {ann.get('id')} has unknown category_id {ann['category_id']}"
                )
            raw[position[image_id]].append(ann)

        # The files are authoritative for the sizes (header reads only).
        self.size_mismatches: list[ImageSizeMismatch] = []
        for info in self._images:
            width, height = _open_image(self.images_dir / info["file_name"], self.annotation_file, rgb=False)
            if info["width"] > 0 and info["height"] > 0 and (info["width"], info["height"]) != (width, height):
                self.size_mismatches.append(
                    ImageSizeMismatch(info["file_name"], (info["width"], info["height"]), (width, height))
                )
            info["width"], info["height"] = width, height
        if self.size_mismatches:
            listed = ", ".join(
                f"{m.file_name} (JSON {m.json_size[0]}x{m.json_size[1]}, file {m.file_size[0]}x{m.file_size[1]})"
                for m in self.size_mismatches[:10]
            )
            more = f" and {len(self.size_mismatches) - 10} more" if len(self.size_mismatches) > 10 else ""
            warnings.warn(
                f"CocoDetectionDataset({self.annotation_file}): {len(self.size_mismatches)} of {len(self._images)} "
                f"images have a width/height in the JSON that disagrees with the image file; the file's size is used "
                f"(boxes are checked against it): {listed}{more}. See the dataset's `size_mismatches` attribute.",
                DataQualityWarning,
                stacklevel=2,
            )

        self._annotations: list[list[CocoAnnotation]] = []
        total = 0
        for info, anns in zip(self._images, raw):
            if not anns:
                self._annotations.append([])
                continue
            boxes = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
            xyxy = np.concatenate([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], axis=1)
            clipped, keep, was_clipped = _sanitize_boxes(xyxy, info["width"], info["height"])
            _record_fixes(self.box_fixes, info["file_name"], xyxy, keep, was_clipped)
            total += len(anns)
            kept = np.flatnonzero(keep)
            areas = [
                float(anns[k]["area"]) if "area" in anns[k] and not was_clipped[k] else None for k in kept.tolist()
            ]
            labels = [self.category_id_map[int(anns[k]["category_id"])] for k in kept.tolist()]
            out = _make_annotations(clipped[kept], labels, iscrowd=[int(anns[k].get("iscrowd", 0)) for k in kept])
            for ann_dict, area in zip(out, areas):
                if area is not None:
                    ann_dict["area"] = area
            self._annotations.append(out)
        _warn_fixes(f"CocoDetectionDataset({self.annotation_file})", self.box_fixes, total)

    def __len__(self) -> int:
        """Number of images in the JSON file."""
        return len(self._images)

    def image_path(self, index: int) -> Path:
        """Path of image ``index``."""
        return self.images_dir / self._images[self._check_index(index)]["file_name"]

    def load_image(self, index: int) -> Image.Image:
        """Load image ``index`` as RGB.

        Raises:
            FileNotFoundError: If the file named in the JSON does not exist.
            OSError: If it cannot be decoded (corrupt or truncated); the message names the file.
        """
        return _open_image(self.image_path(index), self.annotation_file)  # type: ignore[return-value]

    def get_image_info(self, index: int) -> ImageInfo:
        """COCO image record of item ``index`` (width/height: the image file's)."""
        return dict(self._images[self._check_index(index)])  # type: ignore[return-value]

    def get_annotations(self, index: int) -> list[CocoAnnotation]:
        """Annotations of item ``index`` with contiguous category ids."""
        return [dict(a) for a in self._annotations[self._check_index(index)]]  # type: ignore[misc]


# ----------------------------------------------------------------------------------------------------------------------
# Pascal VOC
# ----------------------------------------------------------------------------------------------------------------------
def _is_voc_root(path: Path) -> bool:
    """``Annotations/`` with ``ImageSets/`` (Pascal VOC) or with ``JPEGImages/`` (labelImg's export, no split files)."""
    return (path / "Annotations").is_dir() and ((path / "ImageSets").is_dir() or (path / "JPEGImages").is_dir())


def find_voc_root(path: str | os.PathLike[str]) -> Path | None:
    """Return the VOC root: ``path`` itself or its single child with ``Annotations/`` and ``ImageSets/`` or
    ``JPEGImages/`` (labelImg exports only ``Annotations/`` and ``JPEGImages/``).

    Args:
        path: A VOC root or a folder containing exactly one VOC root (e.g. ``bccd/`` containing ``BCCD/``).

    Returns:
        The root, or None when there is none (or more than one candidate child).
    """
    path = Path(path)
    if _is_voc_root(path):
        return path
    if not path.is_dir():
        return None
    children = [child for child in sorted(path.iterdir()) if child.is_dir() and _is_voc_root(child)]
    return children[0] if len(children) == 1 else None


def _xml_text(node: ET.Element, tag: str, source: Path) -> str:
    child = node.find(tag)
    if child is None or child.text is None:
        raise ValueError(f"{source}: missing <{tag}>")
    return child.text.strip()


class VocDetectionDataset(DetectionDataset):
    """Pascal VOC detection dataset (``Annotations/*.xml``, ``JPEGImages/``, ``ImageSets/Main/<split>.txt``).

    Without split files (no ``ImageSets/Main/*.txt``: labelImg exports only ``Annotations/`` and ``JPEGImages/``)
    the splits are made from all XML files: ``"trainval"``/``"all"`` is every file, ``"validation"`` a deterministic
    ``val_fraction`` of them (a permutation of the sorted file names drawn from ``split_seed``) and ``"train"`` the
    rest; any other split name is an error naming the missing ``ImageSets/Main/<split>.txt``.

    Coordinate convention: VOC ``xmin..xmax`` are 1-based *inclusive* pixel indices. A box is converted to 0-based
    continuous coordinates that cover those pixels: ``x = xmin - 1``, ``w = xmax - xmin + 1`` (same for y), so a box
    ``xmin=1, xmax=640`` covers a 640-px-wide image exactly. (This is the convention of Detectron2's VOC loader.)

    Defects: boxes with ``xmax <= xmin`` or ``ymax <= ymin`` in the XML (zero extent in the annotator's corner
    coordinates, i.e. a point or a line, not an object) and boxes with zero/negative size after clipping are
    dropped; boxes reaching outside the image are clipped to it. One :class:`DataQualityWarning` per dataset lists
    the affected files; the full list is in :attr:`box_fixes`. Only the split's images are checked and reported.

    ``difficult`` objects are kept, with ``iscrowd=0`` (VOC's "difficult" is not COCO's "crowd": the object is a
    valid single instance, so it is trained on and evaluated like any other). Images without objects are kept.

    Class names are taken as written (surrounding whitespace stripped). Names found in the XML files that differ only
    by case or whitespace (``"RBC"``, ``"rbc"``, ``"R BC"``) stay separate classes, with one
    :class:`DataQualityWarning` listing them; pass ``class_names`` to silence it.

    Args:
        root: The VOC root, or a folder containing exactly one VOC root (e.g. ``bccd/`` with ``BCCD/`` inside).
        split: Name of ``ImageSets/Main/<split>.txt``; ``"validation"`` finds ``val.txt`` and vice versa.
        class_names: Class names in label-id order. Default: the sorted set of names found in *all* XML files of
            ``Annotations/`` (not only the split's), so ids agree across splits.
        val_fraction: Without split files: the share of the XML files in ``"validation"``, in ``[0, 1)``.
        split_seed: Without split files: seed of the permutation that picks them.

    Raises:
        FileNotFoundError: If the root, split file, an XML file or an image is missing.
        OSError: If an image file cannot be read.
        ValueError: If an XML file is malformed, names a class not in ``class_names`` or has a ``<filename>`` outside
            ``JPEGImages/``, or ``val_fraction`` is not in ``[0, 1)``.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str = "trainval",
        class_names: Sequence[str] | None = None,
        val_fraction: float = 0.2,
        split_seed: int = 0,
    ) -> None:
        given = Path(root)
        found = find_voc_root(given)
        if found is None:
            raise FileNotFoundError(
                f"{given} is not a Pascal VOC root: expected a folder with Annotations/, JPEGImages/ and optionally "
                "ImageSets/Main/<split>.txt (or a folder containing exactly one such folder)"
            )
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
        self.root = found
        self.split = split
        self.val_fraction, self.split_seed = float(val_fraction), int(split_seed)
        main = self.root / "ImageSets" / "Main"
        available = sorted(p.stem for p in main.glob("*.txt")) if main.is_dir() else []
        xml_files = sorted((self.root / "Annotations").glob("*.xml"))
        self.split_file: Path | None = None
        if available:
            split_file = next(
                (main / f"{name}.txt" for name in _split_candidates(split) if (main / f"{name}.txt").is_file()), None
            )
            if split_file is None:
                raise FileNotFoundError(f"no split file for split {split!r} in {main}; available: {available}")
            self.split_file = split_file
            ids = [line.split()[0] for line in split_file.read_text().splitlines() if line.strip()]
        else:
            ids = self._split_without_files([p.stem for p in xml_files], split)

        parsed = {p.stem: self._parse_xml(p) for p in xml_files}
        if class_names is None:
            class_names = sorted({obj[0] for record in parsed.values() for obj in record["objects"]})
            self._warn_near_duplicate_names(parsed)
        super().__init__(dict(enumerate(class_names)))
        label2id = self.label2id
        global_index = {stem: k for k, stem in enumerate(parsed)}

        self.ids: list[str] = ids
        self._images: list[ImageInfo] = []
        self._paths: list[Path] = []
        self._annotations: list[list[CocoAnnotation]] = []
        total = 0
        for image_id in ids:
            if image_id not in parsed:
                raise FileNotFoundError(f"{split_file} lists {image_id!r} but {image_id}.xml is not in Annotations/")
            record = parsed[image_id]
            path = self._find_image(image_id, record["filename"])
            width, height = _open_image(path, f"{image_id}.xml", rgb=False)  # the file is authoritative for the size
            objects = record["objects"]
            unknown = sorted({name for name, *_ in objects if name not in label2id})
            if unknown:
                raise ValueError(f"{image_id}.xml has classes {unknown} that are not in class_names {class_names}")
            corners = np.array([obj[1] for obj in objects], dtype=np.float64).reshape(-1, 4)
            xyxy = corners.copy()
            xyxy[:, :2] -= 1.0  # 1-based inclusive pixel indices -> 0-based continuous coordinates
            zero_extent = (corners[:, 2] <= corners[:, 0]) | (corners[:, 3] <= corners[:, 1])
            clipped, keep, was_clipped = _sanitize_boxes(xyxy, width, height, degenerate=zero_extent)
            _record_fixes(
                self.box_fixes,
                path.name,
                xyxy,
                keep,
                was_clipped,
                degenerate=zero_extent,
                degenerate_reason="zero extent in the XML (xmax <= xmin or ymax <= ymin)",
            )
            total += len(objects)
            kept = np.flatnonzero(keep).tolist()
            self._annotations.append(_make_annotations(clipped[kept], [label2id[objects[k][0]] for k in kept]))
            self._images.append(
                {"id": global_index[image_id], "file_name": path.name, "width": width, "height": height}
            )
            self._paths.append(path)
        _warn_fixes(f"VocDetectionDataset({self.root}, split={split!r})", self.box_fixes, total)

    def _split_without_files(self, stems: list[str], split: str) -> list[str]:
        """The ids of ``split`` when the root has no split files (see the class docstring)."""
        canonical = canonical_split(split)
        if canonical in ("trainval", "all"):
            return stems
        if canonical not in ("train", "validation"):
            raise FileNotFoundError(
                f"no split file {self.root / 'ImageSets' / 'Main' / f'{split}.txt'}: {self.root} has no "
                "ImageSets/Main/ split files (labelImg's layout), so its splits are made from all XML files: "
                f"'train' and 'validation' (val_fraction={self.val_fraction}, split_seed={self.split_seed}) and "
                f"'trainval' or 'all'. Write ImageSets/Main/{split}.txt for a {split!r} split."
            )
        order = np.random.default_rng(self.split_seed).permutation(len(stems))
        in_val = np.zeros(len(stems), dtype=bool)
        in_val[order[: round(self.val_fraction * len(stems))]] = True
        return [stem for stem, val in zip(stems, in_val.tolist(), strict=True) if val == (canonical == "validation")]

    def _warn_near_duplicate_names(self, parsed: Mapping[str, dict[str, Any]]) -> None:
        """One :class:`DataQualityWarning` for class names that differ only by case or whitespace."""
        counts: dict[str, Counter[str]] = {}  # normalised name -> name as written -> objects
        files: dict[str, str] = {}  # name as written -> first XML file using it
        for stem, record in parsed.items():
            for name, _ in record["objects"]:
                counts.setdefault("".join(name.split()).casefold(), Counter())[name] += 1
                files.setdefault(name, f"{stem}.xml")
        groups = [names for names in counts.values() if len(names) > 1]
        if not groups:
            return

        def spelled(name: str, n: int, common: bool) -> str:  # where the rarer spellings are, e.g. 'rbc' in b.xml
            return f"{name!r} ({n} object{'s' if n != 1 else ''}{'' if common else f', {files[name]}'})"

        listed = "; ".join(
            ", ".join(spelled(name, n, k == 0) for k, (name, n) in enumerate(group.most_common())) for group in groups
        )
        warnings.warn(
            f"VocDetectionDataset({self.root}): class names that differ only by case or whitespace are separate "
            f"classes: {listed}. Fix the <name> of those objects, or pass class_names=[...] to keep them apart "
            "deliberately.",
            DataQualityWarning,
            stacklevel=3,
        )

    @staticmethod
    def _parse_xml(path: Path) -> dict[str, Any]:
        try:
            root = ET.parse(path).getroot()
        except ET.ParseError as err:
            raise ValueError(f"{path} is not valid XML: {err}") from err
        filename_node = root.find("filename")
        objects: list[tuple[str, tuple[float, float, float, float]]] = []
        for obj in root.findall("object"):
            name = _xml_text(obj, "name", path)
            box = obj.find("bndbox")
            if box is None:
                raise ValueError(f"{path}: object {name!r} has no <bndbox>")
            try:
                corners = tuple(float(_xml_text(box, tag, path)) for tag in ("xmin", "ymin", "xmax", "ymax"))
            except ValueError as err:
                raise ValueError(f"{path}: bad <bndbox> for object {name!r}: {err}") from err
            objects.append((name, corners))  # type: ignore[arg-type]
        filename = filename_node.text.strip() if filename_node is not None and filename_node.text else None
        return {"filename": filename, "objects": objects}

    def _find_image(self, image_id: str, filename: str | None) -> Path:
        folder = self.root / "JPEGImages"
        problem = _relative_name_problem(filename) if filename else None
        if problem is not None:
            raise ValueError(
                f"{self.root / 'Annotations' / f'{image_id}.xml'}: <filename> {filename!r} {problem} (outside {folder})"
            )
        candidates = [folder / filename] if filename else []
        candidates += [folder / f"{image_id}{suffix}" for suffix in IMAGE_SUFFIXES]
        for candidate in candidates:
            if candidate.is_file():
                return candidate
        raise FileNotFoundError(f"no image for {image_id!r} in {folder} (tried {[c.name for c in candidates]})")

    def __len__(self) -> int:
        """Number of images in the split."""
        return len(self.ids)

    def image_path(self, index: int) -> Path:
        """Path of image ``index``."""
        return self._paths[self._check_index(index)]

    def load_image(self, index: int) -> Image.Image:
        """Load image ``index`` as RGB.

        Raises:
            OSError: If it cannot be decoded (corrupt or truncated); the message names the file.
        """
        index = self._check_index(index)
        return _open_image(self._paths[index], f"{self.ids[index]}.xml")  # type: ignore[return-value]

    def get_image_info(self, index: int) -> ImageInfo:
        """COCO image record; ``id`` is the image's position among all annotation files (stable across splits)."""
        return dict(self._images[self._check_index(index)])  # type: ignore[return-value]

    def get_annotations(self, index: int) -> list[CocoAnnotation]:
        """Annotations of item ``index``."""
        return [dict(a) for a in self._annotations[self._check_index(index)]]  # type: ignore[misc]


# ----------------------------------------------------------------------------------------------------------------------
# Hugging Face `datasets`
# ----------------------------------------------------------------------------------------------------------------------
def _is_saved_to_disk(path: Path) -> bool:
    """True for a folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    return (path / "dataset_dict.json").is_file() or (
        (path / "state.json").is_file() and (path / "dataset_info.json").is_file()
    )


def _select_split(dataset_dict: Mapping[str, Any], split: str, source: str) -> Any:
    for name in _split_candidates(split):
        if name in dataset_dict:
            return dataset_dict[name]
    raise ValueError(f"{source} has no split {split!r}; available splits: {sorted(dataset_dict)}")


def _unwrap_list_feature(feature: Any) -> Any:
    """Return the element feature of a ``List``/``LargeList``/``Sequence`` feature (else the feature itself)."""
    import datasets

    while isinstance(feature, (datasets.List, datasets.LargeList, datasets.Sequence)):
        feature = feature.feature
    return feature


class HubDetectionDataset(DetectionDataset):
    """A Hugging Face ``datasets`` detection dataset (``cppe-5``, ``detection-datasets/coco`` style).

    Expects an image column and an objects column holding, per image, ``bbox`` (list of boxes) and ``category`` (list
    of class ids or names); both the dict-of-lists layout (``Sequence({...})``) and the list-of-dicts layout are read.
    Class names come from the ``ClassLabel`` feature of ``objects.category`` when present, else from ``class_names``,
    else from the sorted distinct category values of the whole split (integer ids are then renumbered ``0..K-1`` in
    sorted order; :attr:`original_category_ids` keeps the mapping). ``image_id`` is the ``image_id`` column when
    present, else the row index. Boxes are clipped/dropped like the other loaders; as rows are read lazily, one
    :class:`DataQualityWarning` is emitted at the first fix and all fixes seen so far are in :attr:`box_fixes`.

    Args:
        name_or_path: A Hub dataset name (``datasets.load_dataset``), a folder written by ``save_to_disk``
            (``datasets.load_from_disk``), a data folder ``load_dataset`` can read (e.g. imagefolder with
            ``metadata.jsonl``), or an in-memory ``datasets.Dataset``/``DatasetDict``.
        split: Split to use; ``"validation"`` and ``"val"`` find each other.
        image_column: Name of the image column.
        objects_column: Name of the objects column.
        class_names: Class names in label-id order when the dataset has no ``ClassLabel``.
        bbox_format: ``"coco"`` (``[x, y, w, h]``, the default, e.g. ``cppe-5``) or ``"pascal_voc"`` (``[x0, y0, x1,
            y1]`` absolute corners, as stored by some Hub datasets: check the dataset card).
        **load_kwargs: Extra arguments for ``datasets.load_dataset`` (e.g. ``cache_dir``, ``revision``). A local data
            folder without ``cache_dir`` is prepared in a temporary folder, removed when the ``datasets.Dataset``
            is (or at once when the load fails), so loading a local folder never writes to ``~/.cache``.

    Raises:
        ValueError: If columns are missing, the split does not exist or ``bbox_format`` is unknown.
        FileNotFoundError: If a local path is given that does not exist.
    """

    def __init__(
        self,
        name_or_path: str | os.PathLike[str] | hf_datasets.Dataset | hf_datasets.DatasetDict,
        split: str = "train",
        image_column: str = "image",
        objects_column: str = "objects",
        class_names: Sequence[str] | None = None,
        bbox_format: Literal["coco", "pascal_voc"] = "coco",
        **load_kwargs: Any,
    ) -> None:
        import datasets

        if bbox_format not in ("coco", "pascal_voc"):
            raise ValueError(f"bbox_format must be 'coco' or 'pascal_voc', got {bbox_format!r}")
        self.bbox_format = bbox_format
        self.image_column = image_column
        self.objects_column = objects_column
        self.split = split
        given = isinstance(name_or_path, (datasets.Dataset, datasets.DatasetDict))
        source = f"<{type(name_or_path).__name__}>" if given else str(name_or_path)
        local_folder = not given and Path(name_or_path).expanduser().is_dir()
        temporary_cache: str | None = None
        if local_folder and not _is_saved_to_disk(Path(name_or_path).expanduser()) and "cache_dir" not in load_kwargs:
            temporary_cache = tempfile.mkdtemp(prefix="qdetr-hf-datasets-")
            load_kwargs = {**load_kwargs, "cache_dir": temporary_cache}
        try:
            data: Any = name_or_path if given else self._load(name_or_path, split, **load_kwargs)
            if isinstance(data, datasets.DatasetDict):
                data = _select_split(data, split, source)
            missing = [c for c in (image_column, objects_column) if c not in data.column_names]
            if missing and local_folder:
                raise ValueError(
                    f"{source} is not a VOC root, a COCO folder, a save_to_disk folder or a data folder with detection "
                    f"columns: datasets.load_dataset reads it with columns {data.column_names}, missing {missing}"
                )
            if missing:
                raise ValueError(f"{source}: missing column(s) {missing}; columns are {data.column_names}")
        except BaseException:
            if temporary_cache is not None:
                shutil.rmtree(temporary_cache, ignore_errors=True)
            raise
        if temporary_cache is not None:
            weakref.finalize(data, shutil.rmtree, temporary_cache, True)
        self.source = source
        self.hf_dataset: datasets.Dataset = data

        self.original_category_ids: dict[int, int] | None = None
        self._category_map: dict[Any, int] | None = None  # raw category value -> contiguous id
        names = self._class_label_names(data.features[objects_column])
        if names is not None:
            if class_names is not None and list(class_names) != names:
                raise ValueError(f"{source}: class_names {list(class_names)} disagree with the ClassLabel {names}")
        elif class_names is not None:
            names = [str(n) for n in class_names]
            self._category_map = {n: k for k, n in enumerate(names)} | {k: k for k in range(len(names))}
        else:
            values = sorted({v for row in data[objects_column] for v in self._objects_of(row)[1]}, key=str)
            if all(isinstance(v, (int, np.integer)) for v in values):
                values = sorted(int(v) for v in values)
                self.original_category_ids = dict(enumerate(values))
                names = [str(v) for v in values]
            else:
                names = [str(v) for v in values]
            self._category_map = {v: k for k, v in enumerate(values)}
        super().__init__(dict(enumerate(names)))
        self._has_image_id = "image_id" in data.column_names
        self._checked_rows: set[int] = set()
        self._warned = False

    @staticmethod
    def _load(name_or_path: str | os.PathLike[str], split: str, **load_kwargs: Any) -> Any:
        import datasets

        path = Path(name_or_path).expanduser()
        if path.exists():
            if _is_saved_to_disk(path):
                return datasets.load_from_disk(str(path))
            if not path.is_dir():
                raise ValueError(f"{path} is a file; expected a save_to_disk folder, a data folder or a Hub name")
            try:
                return datasets.load_dataset(str(path), **load_kwargs)
            except Exception as err:
                raise ValueError(
                    f"{path} is not a VOC root, a COCO folder, a save_to_disk folder or a data folder that "
                    f"datasets.load_dataset can read ({type(err).__name__}: {err})"
                ) from err
        if _looks_like_local_path(str(name_or_path)):
            raise FileNotFoundError(f"dataset path {path} does not exist")
        errors: list[str] = []
        for candidate in _split_candidates(split):
            try:
                return datasets.load_dataset(str(name_or_path), split=candidate, **load_kwargs)
            except ValueError as err:
                if "split" not in str(err).lower():
                    raise
                errors.append(f"{candidate}: {err}")  # unknown split: try the next spelling
            except Exception as err:
                raise FileNotFoundError(
                    f"{name_or_path!r} is not an existing local path and could not be loaded as a Hub dataset "
                    f"({type(err).__name__}: {err})"
                ) from err
        raise ValueError(f"could not load split {split!r} of Hub dataset {name_or_path!r}: {'; '.join(errors)}")

    @staticmethod
    def _class_label_names(objects_feature: Any) -> list[str] | None:
        import datasets

        inner = _unwrap_list_feature(objects_feature)
        if not isinstance(inner, Mapping) or "category" not in inner:
            return None
        category = _unwrap_list_feature(inner["category"])
        return list(category.names) if isinstance(category, datasets.ClassLabel) else None

    def _objects_of(self, objects: Any) -> tuple[list[list[float]], list[Any]]:
        """Return ``(bboxes, categories)`` from either objects layout."""
        if isinstance(objects, Mapping):
            bboxes, cats = objects.get("bbox"), objects.get("category")
        else:
            objects = list(objects or [])
            bboxes = [o.get("bbox") for o in objects]
            cats = [o.get("category") for o in objects]
        if bboxes is None or cats is None:
            raise ValueError(f"{self.source}: the {self.objects_column!r} column needs 'bbox' and 'category' fields")
        if len(bboxes) != len(cats):
            raise ValueError(f"{self.source}: {len(bboxes)} boxes but {len(cats)} categories in one row")
        return list(bboxes), list(cats)

    def __len__(self) -> int:
        """Number of rows of the split."""
        return len(self.hf_dataset)

    def _image_of(self, value: Any) -> Image.Image:
        if isinstance(value, Image.Image):
            return value.convert("RGB")
        if isinstance(value, Mapping):
            if value.get("bytes"):
                import io

                with Image.open(io.BytesIO(value["bytes"])) as im:
                    return im.convert("RGB")
            value = value.get("path")
        if isinstance(value, (str, os.PathLike)):
            with Image.open(value) as im:
                return im.convert("RGB")
        raise ValueError(f"{self.source}: cannot read an image from a {type(value).__name__} in {self.image_column!r}")

    def _image_id(self, index: int, row: Mapping[str, Any]) -> int:
        return int(row["image_id"]) if self._has_image_id else index

    def _convert(self, index: int, row: Mapping[str, Any], width: int, height: int) -> list[CocoAnnotation]:
        bboxes, cats = self._objects_of(row[self.objects_column])
        boxes = np.array(bboxes, dtype=np.float64).reshape(-1, 4)
        if self.bbox_format == "coco":
            boxes[:, 2:] += boxes[:, :2]
        clipped, keep, was_clipped = _sanitize_boxes(boxes, width, height)
        if index not in self._checked_rows:  # record each row's fixes once, however often it is read
            self._checked_rows.add(index)
            new_fixes: list[BoxFix] = []
            _record_fixes(new_fixes, f"row {index} (image_id {self._image_id(index, row)})", boxes, keep, was_clipped)
            if new_fixes:
                self.box_fixes.extend(new_fixes)
                if not self._warned:
                    self._warned = True
                    _warn_fixes(
                        f"HubDetectionDataset({self.source}, split={self.split!r}) [first row with fixes; rows are "
                        "checked as they are read, later fixes are only added to `box_fixes`]",
                        new_fixes,
                        len(boxes),
                    )
        kept = np.flatnonzero(keep).tolist()
        labels = [self._label_of(cats[k]) for k in kept]
        return _make_annotations(clipped[kept], labels)

    def _label_of(self, value: Any) -> int:
        if self._category_map is None:
            label = int(value)
        else:
            key = int(value) if isinstance(value, (int, np.integer)) else value
            if key not in self._category_map:
                raise ValueError(
                    f"{self.source}: unknown category {value!r}; classes are {list(self.id2label.values())}"
                )
            label = self._category_map[key]
        if not 0 <= label < self.num_labels:
            raise ValueError(f"{self.source}: category id {label} outside 0..{self.num_labels - 1}")
        return label

    def __getitem__(self, index: int) -> DetectionExample:
        """Read row ``index`` (one decode of the image)."""
        index = self._check_index(index)
        row = self.hf_dataset[index]
        image = self._image_of(row[self.image_column])
        return {
            "image": image,
            "image_id": self._image_id(index, row),
            "annotations": self._convert(index, row, image.width, image.height),
        }

    def load_image(self, index: int) -> Image.Image:
        """Decode image ``index`` as RGB."""
        return self._image_of(self.hf_dataset[self._check_index(index)][self.image_column])

    def get_image_info(self, index: int) -> ImageInfo:
        """Image record; ``file_name`` is ``<image_id>.png`` (the name :func:`export_coco` writes)."""
        index = self._check_index(index)
        row = self.hf_dataset[index]
        columns = self.hf_dataset.column_names
        if "width" in columns and "height" in columns and row["width"] and row["height"]:
            width, height = int(row["width"]), int(row["height"])
        else:
            width, height = self._image_of(row[self.image_column]).size
        image_id = self._image_id(index, row)
        return {"id": image_id, "file_name": f"{image_id:08d}.png", "width": width, "height": height}

    def get_annotations(self, index: int) -> list[CocoAnnotation]:
        """Annotations of row ``index``."""
        info = self.get_image_info(index)
        return self._convert(index, self.hf_dataset[index], info["width"], info["height"])


def _looks_like_local_path(name: str) -> bool:
    """Heuristic: a string that cannot be a Hub ``owner/name`` id is meant as a local path."""
    return (
        name.startswith((".", "/", "~"))
        or "\\" in name
        or name.count("/") > 1
        or Path(name).suffix.lower() in {".json", ".xml", ".txt", ".arrow", ".parquet"}
    )


def _hf_generator(dataset: DetectionDataset) -> Iterator[dict[str, Any]]:
    for i in range(len(dataset)):
        info = dataset.get_image_info(i)
        anns = dataset.get_annotations(i)
        source = dataset.image_path(i)
        image: Any = (
            {"bytes": source.read_bytes(), "path": source.name} if source is not None else dataset.load_image(i)
        )
        yield {
            "image_id": int(info["id"]),
            "image": image,
            "width": int(info["width"]),
            "height": int(info["height"]),
            "objects": {
                "id": list(range(len(anns))),
                "area": [float(a["area"]) for a in anns],
                "bbox": [[float(v) for v in a["bbox"]] for a in anns],
                "category": [int(a["category_id"]) for a in anns],
            },
        }


def to_hf_dataset(dataset: DetectionDataset, cache_dir: str | os.PathLike[str] | None = None) -> hf_datasets.Dataset:
    """Convert a :class:`DetectionDataset` to a ``datasets.Dataset`` in the ``cppe-5`` layout.

    Columns: ``image_id`` (int64), ``image`` (``Image``; source files embedded as-is, generated images as PNG),
    ``width``, ``height`` and ``objects`` = ``{"id", "area", "bbox" (COCO xywh), "category" (ClassLabel with the
    dataset's class names)}``. Ready for ``push_to_hub`` / ``save_to_disk`` and readable by
    :class:`HubDetectionDataset`.

    Args:
        dataset: The dataset to convert.
        cache_dir: Where ``datasets`` writes the Arrow file (default: its cache).

    Returns:
        The ``datasets.Dataset``.
    """
    import datasets

    features = datasets.Features(
        {
            "image_id": datasets.Value("int64"),
            "image": datasets.Image(),
            "width": datasets.Value("int32"),
            "height": datasets.Value("int32"),
            "objects": {
                "id": datasets.List(datasets.Value("int64")),
                "area": datasets.List(datasets.Value("float32")),
                "bbox": datasets.List(datasets.List(datasets.Value("float32"), length=4)),
                "category": datasets.List(datasets.ClassLabel(names=list(dataset.id2label.values()))),
            },
        }
    )
    return datasets.Dataset.from_generator(
        _hf_generator,
        features=features,
        cache_dir=str(cache_dir) if cache_dir is not None else None,
        gen_kwargs={"dataset": dataset},
    )


# ----------------------------------------------------------------------------------------------------------------------
# Synthetic shapes
# ----------------------------------------------------------------------------------------------------------------------
SHAPE_NAMES: tuple[str, ...] = ("circle", "square", "triangle")


class SyntheticShapesDataset(DetectionDataset):
    """Procedurally generated shapes on textured backgrounds: the package's embedded default dataset.

    Classes differ by shape only: ``circle``, ``square`` (randomly rotated) and ``triangle`` (equilateral, randomly
    rotated). Colours are drawn independently of the class (re-drawn until they contrast with the background under
    the shape and with any shape they overlap). Shape extents are log-uniform in ``[min_size, max_size]`` (default 6
    px to 60% of the shorter side), so with :func:`scaled_coco_area_ranges` all of small/medium/large occur.
    ``min_objects..max_objects`` objects per image; a placement is rejected when it would leave an existing object
    with less than ``1 - max_occlusion`` of its pixels visible. The background is a colour gradient plus stripes,
    and Gaussian noise covers the whole image (objects included).

    Boxes are tight around the *visible* pixels of each shape (pixel ``(r, c)`` covers ``[c, c+1) x [r, r+1)``, so a
    shape covering columns ``c0..c1`` has ``x = c0, w = c1 - c0 + 1``); ``area`` is the box area.

    Item ``i`` is generated from ``numpy.random.default_rng([seed, i])`` only, so items can be produced lazily, in
    any order and in DataLoader workers, and are identical every time.

    Args:
        num_images: Number of images.
        image_size: Side (int) or ``(height, width)``.
        seed: Dataset seed.
        min_objects: Minimum number of objects per image (>= 1).
        max_objects: Maximum number of objects per image.
        min_size: Smallest shape extent in px (default ``max(6, round(0.05 * shorter side))``).
        max_size: Largest shape extent in px (default ``0.6 * shorter side``).
        max_occlusion: Largest fraction of an object that later objects may cover.
        noise_std: Standard deviation of the pixel noise (0-255 scale).
        cache_bytes: Keep generated items in memory while their pixels take at most this many bytes (``3 H W`` per
            image), so later epochs skip generation (about 5 ms per 128 px image on one core); 0 disables. Each
            DataLoader worker holds its own cache.

    Raises:
        ValueError: On inconsistent arguments.
    """

    def __init__(
        self,
        num_images: int = 1000,
        image_size: int | tuple[int, int] = 128,
        seed: int = 0,
        min_objects: int = 1,
        max_objects: int = 10,
        min_size: float | None = None,
        max_size: float | None = None,
        max_occlusion: float = 0.4,
        noise_std: float = 8.0,
        cache_bytes: int = 0,
    ) -> None:
        super().__init__(dict(enumerate(SHAPE_NAMES)))
        height, width = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        shorter = min(height, width)
        min_size = float(min_size) if min_size is not None else float(max(6, round(0.05 * shorter)))
        max_size = float(max_size) if max_size is not None else 0.6 * shorter
        if num_images < 0:
            raise ValueError(f"num_images must be >= 0, got {num_images}")
        if shorter < 16:
            raise ValueError(f"image_size must be at least 16 px, got {image_size}")
        if not 1 <= min_objects <= max_objects:
            raise ValueError(f"need 1 <= min_objects <= max_objects, got {min_objects}, {max_objects}")
        if not 4 <= min_size <= max_size <= shorter:
            raise ValueError(f"need 4 <= min_size <= max_size <= {shorter}, got {min_size}, {max_size}")
        if not 0.0 <= max_occlusion < 1.0:
            raise ValueError(f"max_occlusion must be in [0, 1), got {max_occlusion}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if cache_bytes < 0:
            raise ValueError(f"cache_bytes must be >= 0, got {cache_bytes}")
        self.num_images = int(num_images)
        self.height, self.width = int(height), int(width)
        self.seed = int(seed)
        self.min_objects, self.max_objects = int(min_objects), int(max_objects)
        self.min_size, self.max_size = min_size, max_size
        self.max_occlusion = float(max_occlusion)
        self.noise_std = float(noise_std)
        self.cache_bytes = int(cache_bytes)
        self._cache: dict[int, tuple[np.ndarray, list[CocoAnnotation]]] = {}
        self._cached_bytes = 0
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        self._pixel_y, self._pixel_x = yy + 0.5, xx + 0.5  # pixel centres

    def __len__(self) -> int:
        """Number of images."""
        return self.num_images

    @property
    def area_ranges(self) -> dict[str, tuple[float, float]]:
        """COCO's size buckets scaled to this image size (:func:`scaled_coco_area_ranges`): at 128 px COCO's own
        thresholds would call 68% of the objects small and none large."""
        return scaled_coco_area_ranges(self.width, self.height)

    # -- generation ---------------------------------------------------------------------------------------------------
    def _background(self, rng: np.random.Generator) -> np.ndarray:
        h, w = self.height, self.width
        c0, c1 = rng.uniform(0, 255, size=(2, 3)).astype(np.float32)
        angle = rng.uniform(0, 2 * np.pi)
        t = np.cos(angle) * self._pixel_x + np.sin(angle) * self._pixel_y
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        image = c0 + t[..., None] * (c1 - c0)
        stripe_angle = rng.uniform(0, np.pi)
        period = rng.uniform(6.0, 0.5 * max(h, w))
        phase = rng.uniform(0, 2 * np.pi)
        s = np.cos(stripe_angle) * self._pixel_x + np.sin(stripe_angle) * self._pixel_y
        stripes = np.sin(2 * np.pi * s / period + phase)
        amplitude = rng.uniform(5.0, 30.0, size=3).astype(np.float32)
        image = image + stripes[..., None] * amplitude
        return np.clip(image, 0, 255).astype(np.float32)

    def _shape_mask(self, rng: np.random.Generator, shape: int, extent: float) -> tuple[np.ndarray, int, int] | None:
        """Rasterise one shape of the given extent at a random position; return (mask, top, left) of its window."""
        h, w = self.height, self.width
        if shape == 0:  # circle
            radius = extent / 2.0
            verts = None
            half_w = half_h = radius
        else:
            n_vertices = 4 if shape == 1 else 3
            theta = rng.uniform(0, 2 * np.pi) + np.arange(n_vertices) * (2 * np.pi / n_vertices)
            verts = np.stack([np.cos(theta), np.sin(theta)], axis=1)
            span = verts.max(axis=0) - verts.min(axis=0)
            verts = verts * (extent / float(span.max()))
            verts -= (verts.max(axis=0) + verts.min(axis=0)) / 2.0  # centre the bounding box on the origin
            half_w, half_h = float(verts[:, 0].max()), float(verts[:, 1].max())
        if 2 * half_w > w - 1 or 2 * half_h > h - 1:
            return None
        cx = rng.uniform(half_w + 0.5, w - half_w - 0.5)
        cy = rng.uniform(half_h + 0.5, h - half_h - 0.5)
        left, right = max(int(np.floor(cx - half_w)), 0), min(int(np.ceil(cx + half_w)) + 1, w)
        top, bottom = max(int(np.floor(cy - half_h)), 0), min(int(np.ceil(cy + half_h)) + 1, h)
        px = self._pixel_x[top:bottom, left:right] - cx
        py = self._pixel_y[top:bottom, left:right] - cy
        if verts is None:
            mask = px * px + py * py <= radius * radius
        else:
            # Convex polygon with counter-clockwise vertices: inside = left of (or on) every edge.
            edges = np.roll(verts, -1, axis=0) - verts
            cross = edges[:, 0, None, None] * (py[None] - verts[:, 1, None, None]) - edges[:, 1, None, None] * (
                px[None] - verts[:, 0, None, None]
            )
            mask = (cross >= 0).all(axis=0)
        if mask.sum() < 9:
            return None
        return mask, top, left

    def _pick_colour(self, rng: np.random.Generator, under: np.ndarray, neighbours: list[np.ndarray]) -> np.ndarray:
        """Random colour contrasting with the mean colour ``under`` the shape and with overlapped shapes."""
        best, best_score = None, -1.0
        for _ in range(24):
            colour = rng.uniform(0, 255, size=3).astype(np.float32)
            score = float(np.linalg.norm(colour - under)) / 110.0
            for other in neighbours:
                score = min(score, float(np.linalg.norm(colour - other)) / 90.0)
            if score >= 1.0:
                return colour
            if score > best_score:
                best, best_score = colour, score
        assert best is not None
        return best

    def generate(self, index: int) -> tuple[np.ndarray, list[CocoAnnotation]]:
        """Generate item ``index``.

        Args:
            index: Item index (negative allowed).

        Returns:
            ``(image uint8 (H, W, 3), annotations)``; with a cache the image is a read-only array.
        """
        index = self._check_index(index)
        cached = self._cache.get(index)
        if cached is not None:  # copies of the annotations, so callers cannot change the cache
            return cached[0], copy.deepcopy(cached[1])
        pixels, annotations = self._generate(index)
        if self._cached_bytes + pixels.nbytes <= self.cache_bytes:
            pixels.flags.writeable = False
            self._cache[index] = (pixels, copy.deepcopy(annotations))
            self._cached_bytes += pixels.nbytes
        return pixels, annotations

    def _generate(self, index: int) -> tuple[np.ndarray, list[CocoAnnotation]]:
        rng = np.random.default_rng([self.seed, index])
        h, w = self.height, self.width
        image = self._background(rng)
        owner = np.full((h, w), -1, dtype=np.int16)
        full_area: list[int] = []
        visible = np.zeros(0, dtype=np.int64)  # visible pixel count of each placed object
        colours: list[np.ndarray] = []
        shapes: list[int] = []
        target = int(rng.integers(self.min_objects, self.max_objects + 1))
        log_lo, log_hi = np.log(self.min_size), np.log(self.max_size)
        for _ in range(target):
            shape = int(rng.integers(len(SHAPE_NAMES)))
            extent = float(np.exp(rng.uniform(log_lo, log_hi)))
            for attempt in range(30):
                if attempt and attempt % 10 == 0:
                    extent = max(self.min_size, extent * 0.75)
                placed = self._shape_mask(rng, shape, extent)
                if placed is None:
                    continue
                mask, top, left = placed
                window = owner[top : top + mask.shape[0], left : left + mask.shape[1]]
                covered = window[mask]
                covered = covered[covered >= 0]
                hit = np.bincount(covered, minlength=len(full_area))
                if covered.size and (visible - hit < (1.0 - self.max_occlusion) * np.asarray(full_area)).any():
                    continue
                region = image[top : top + mask.shape[0], left : left + mask.shape[1]]
                neighbours = [colours[j] for j in np.unique(covered).tolist()]
                colour = self._pick_colour(rng, region[mask].mean(axis=0), neighbours)
                region[mask] = colour
                window[mask] = len(full_area)
                visible = np.append(visible - hit, int(mask.sum()))
                full_area.append(int(mask.sum()))
                colours.append(colour)
                shapes.append(shape)
                break
        if self.noise_std > 0:
            image += rng.standard_normal(size=image.shape, dtype=np.float32) * self.noise_std
        pixels = np.clip(np.rint(image), 0, 255).astype(np.uint8)

        annotations: list[CocoAnnotation] = []
        for j, shape in enumerate(shapes):
            rows = np.flatnonzero((owner == j).any(axis=1))
            cols = np.flatnonzero((owner == j).any(axis=0))
            x0, y0 = float(cols[0]), float(rows[0])
            bw, bh = float(cols[-1] - cols[0] + 1), float(rows[-1] - rows[0] + 1)
            annotations.append({"bbox": [x0, y0, bw, bh], "category_id": shape, "area": bw * bh, "iscrowd": 0})
        return pixels, annotations

    def __getitem__(self, index: int) -> DetectionExample:
        """Generate item ``index`` (image and annotations in one pass)."""
        index = self._check_index(index)
        pixels, annotations = self.generate(index)
        return {"image": Image.fromarray(pixels, mode="RGB"), "image_id": index, "annotations": annotations}

    def load_image(self, index: int) -> Image.Image:
        """Generate image ``index``."""
        return Image.fromarray(self.generate(index)[0], mode="RGB")

    def get_image_info(self, index: int) -> ImageInfo:
        """Image record; ``file_name`` is ``<index:06d>.png``."""
        index = self._check_index(index)
        return {"id": index, "file_name": f"{index:06d}.png", "width": self.width, "height": self.height}

    def get_annotations(self, index: int) -> list[CocoAnnotation]:
        """Annotations of item ``index`` (generates the item)."""
        return self.generate(index)[1]


# ----------------------------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------------------------
# Synthetic splits use seeds that never collide for base seeds < 1_000_000.
SYNTHETIC_SPLIT_SEED_OFFSETS: dict[str, int] = {"train": 0, "validation": 1_000_000, "test": 2_000_000}
SYNTHETIC_DEFAULT_SIZES: dict[str, int] = {"train": 2000, "validation": 200, "test": 200}


def _find_coco_in_folder(folder: Path, split: str) -> tuple[Path, Path] | None:
    """Find ``(images_dir, annotation_file)`` of a COCO folder, or None."""
    candidates = _split_candidates(split)
    for name in candidates:  # one export folder per split: <folder>/<split>/annotations.json
        sub = folder / name
        if (sub / "annotations.json").is_file():
            return (sub / "images" if (sub / "images").is_dir() else sub), sub / "annotations.json"
    if (folder / "annotations.json").is_file():
        return (folder / "images" if (folder / "images").is_dir() else folder), folder / "annotations.json"
    for name in candidates:  # official layout: annotations/instances_<split>[2017].json + <split>[2017]/
        for stem in (name, f"{name}2017", f"{name}2014"):
            annotation_file = folder / "annotations" / f"instances_{stem}.json"
            if annotation_file.is_file():
                for images_dir in (folder / stem, folder / "images" / stem, folder / "images"):
                    if images_dir.is_dir():
                        return images_dir, annotation_file
                return folder, annotation_file
    return None


def load_detection_dataset(
    name_or_path: str | os.PathLike[str],
    split: str = "train",
    dataset_format: str = "auto",
    **kwargs: Any,
) -> DetectionDataset:
    """Load a detection dataset by name or path (the one entry point of the example scripts).

    Dispatch with ``dataset_format="auto"``:

    - ``"synthetic"`` -> :class:`SyntheticShapesDataset`; splits ``train``/``validation``/``test`` use seeds ``seed +
      0 / 1_000_000 / 2_000_000`` (``seed`` kwarg, default 0) and default sizes 2000/200/200 (``num_images`` kwarg).
    - a folder with ``Annotations/`` + ``ImageSets/`` or ``JPEGImages/`` (or containing exactly one such folder) ->
      VOC; without split files (labelImg's layout) the splits are drawn from all XML files (``val_fraction`` and
      ``split_seed`` kwargs, see :class:`VocDetectionDataset`).
    - a ``save_to_disk`` folder -> :class:`HubDetectionDataset` via ``datasets.load_from_disk``.
    - a COCO ``.json`` file (images in a sibling ``images/`` folder, else next to the file; or ``images_dir``
      kwarg), or a folder with ``[<split>/]annotations.json`` (+ ``images/``) or
      ``annotations/instances_<split>[2017].json`` (+ ``<split>[2017]/``) -> COCO.
    - another existing folder -> ``datasets.load_dataset(path)`` (e.g. imagefolder with ``metadata.jsonl``), prepared
      in a temporary folder unless a ``cache_dir`` kwarg is given (see :class:`HubDetectionDataset`).
    - anything else -> a Hub dataset name via ``datasets.load_dataset``.

    ``dataset_format`` may force ``"synthetic"``, ``"voc"``, ``"coco"`` or ``"hub"``. Split names are mapped
    sensibly (``"val"`` <-> ``"validation"``). ``kwargs`` go to the dataset class.

    Args:
        name_or_path: ``"synthetic"``, a local path or a Hub dataset name.
        split: Split to load.
        dataset_format: ``"auto"``, ``"synthetic"``, ``"voc"``, ``"coco"`` or ``"hub"``.
        **kwargs: Extra constructor arguments.

    Returns:
        The dataset.

    Raises:
        FileNotFoundError: If a local path does not exist or does not contain what the format needs.
        ValueError: If the format is unknown or the split does not exist.
    """
    formats = ("auto", "synthetic", "voc", "coco", "hub")
    fmt = dataset_format.lower()
    if fmt not in formats:
        raise ValueError(f"unknown dataset_format {dataset_format!r}; expected one of {formats}")
    name = str(name_or_path)
    if fmt == "synthetic" or (fmt == "auto" and name.lower() == "synthetic"):
        canonical = canonical_split(split)
        if canonical not in SYNTHETIC_SPLIT_SEED_OFFSETS:
            raise ValueError(f"synthetic data has splits {list(SYNTHETIC_SPLIT_SEED_OFFSETS)}, got {split!r}")
        seed = int(kwargs.pop("seed", 0))
        kwargs.setdefault("num_images", SYNTHETIC_DEFAULT_SIZES[canonical])
        return SyntheticShapesDataset(seed=seed + SYNTHETIC_SPLIT_SEED_OFFSETS[canonical], **kwargs)

    path = Path(name).expanduser()
    if fmt == "hub":
        return HubDetectionDataset(name, split=split, **kwargs)
    if not path.exists():
        if fmt in ("voc", "coco") or _looks_like_local_path(name):
            raise FileNotFoundError(
                f"dataset path {path} does not exist (expected 'synthetic', a VOC/COCO/save_to_disk folder, "
                "a COCO .json file or a Hub dataset name)"
            )
        return HubDetectionDataset(name, split=split, **kwargs)

    if fmt in ("auto", "voc"):
        voc_root = find_voc_root(path)
        if voc_root is not None:
            return VocDetectionDataset(voc_root, split=split, **kwargs)
        if fmt == "voc":
            raise FileNotFoundError(
                f"{path} is not a Pascal VOC root: expected Annotations/ and JPEGImages/ (and optionally "
                "ImageSets/Main/) in it or in its single sub-folder"
            )
    if fmt == "auto" and path.is_dir() and _is_saved_to_disk(path):
        return HubDetectionDataset(path, split=split, **kwargs)
    if path.is_file():
        if path.suffix.lower() != ".json":
            raise ValueError(f"{path} is a file but not a COCO .json annotation file")
        images_dir = kwargs.pop("images_dir", None)
        if images_dir is None:
            images_dir = path.parent / "images" if (path.parent / "images").is_dir() else path.parent
        return CocoDetectionDataset(images_dir, path, **kwargs)
    found = _find_coco_in_folder(path, split)
    if found is not None:
        images_dir = kwargs.pop("images_dir", found[0])
        return CocoDetectionDataset(images_dir, found[1], **kwargs)
    if fmt == "coco":
        raise FileNotFoundError(
            f"no COCO annotations for split {split!r} in {path}: expected [<split>/]annotations.json or "
            f"annotations/instances_<split>.json"
        )
    return HubDetectionDataset(path, split=split, **kwargs)


# ----------------------------------------------------------------------------------------------------------------------
# Collator
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class DatasetArguments:
    """Dataset selection for ``HfArgumentParser`` scripts (see :func:`load_detection_dataset`)."""

    dataset_name: str = field(
        default="synthetic", metadata={"help": "'synthetic', a COCO/VOC/save_to_disk folder, or a Hub dataset name."}
    )
    dataset_format: str = field(default="auto", metadata={"help": "auto, synthetic, coco, voc or hub."})
    train_split: str = "train"
    eval_split: str = "validation"
    num_train_images: int = field(default=4000, metadata={"help": "Synthetic data only."})
    num_eval_images: int = field(default=200, metadata={"help": "Synthetic data only."})
    augment: bool = field(default=True, metadata={"help": "Random horizontal flips of training images."})
    synthetic_cache_mb: int = field(
        default=1024,
        metadata={
            "help": "Synthetic data only: memory (MB) for keeping generated images, so later epochs skip generation "
            "(4,000 images at 128 px take 197 MB). 0 disables."
        },
    )

    def load(self, image_size: int, seed: int = 0) -> tuple[DetectionDataset, DetectionDataset]:
        """The training and evaluation datasets (synthetic images are generated at ``image_size`` from ``seed``)."""
        splits = []
        for split, num_images in ((self.train_split, self.num_train_images), (self.eval_split, self.num_eval_images)):
            kwargs: dict[str, Any] = {}
            if self.dataset_name == "synthetic":
                kwargs = {
                    "num_images": num_images,
                    "image_size": image_size,
                    "seed": seed,
                    "cache_bytes": self.synthetic_cache_mb * 2**20,
                }
            splits.append(load_detection_dataset(self.dataset_name, split, self.dataset_format, **kwargs))
        return splits[0], splits[1]


def default_image_processor(image_size: int | tuple[int, int]) -> DetrImageProcessor:
    """Build a ``DetrImageProcessor`` for a given input size, with ImageNet normalisation and padding.

    Args:
        image_size: ``int`` -> keep the aspect ratio and scale so the image fits in ``image_size x image_size`` (one
            side equals ``image_size``; a 128 px square image is left at 128 px, a 640x480 one becomes 128x96 and is
            padded per batch); ``(height, width)`` -> resize to exactly that size.

    Returns:
        The processor (``format="coco_detection"``, ``do_pad=True``, boxes converted to normalised cxcywh).

    Raises:
        ValueError: If a size is not positive.
    """
    from transformers import DetrImageProcessor
    from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    if isinstance(image_size, int):
        if image_size <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        size = {"max_height": image_size, "max_width": image_size}
    else:
        height, width = (int(v) for v in image_size)
        if height <= 0 or width <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        size = {"height": height, "width": width}
    return DetrImageProcessor(
        size=size,
        do_resize=True,
        do_rescale=True,
        do_normalize=True,
        image_mean=list(IMAGENET_DEFAULT_MEAN),
        image_std=list(IMAGENET_DEFAULT_STD),
        do_pad=True,
        do_convert_annotations=True,
        format="coco_detection",
    )


def hflip_example(example: DetectionExample) -> DetectionExample:
    """Flip an example left-right: the image and every box (``x -> W - x - w``).

    Args:
        example: The example.

    Returns:
        A new example (the input is not modified).
    """
    width = example["image"].width
    annotations = []
    for ann in example["annotations"]:
        x, y, w, h = (float(v) for v in ann["bbox"])
        annotations.append({**ann, "bbox": [width - x - w, y, w, h]})
    return {
        "image": example["image"].transpose(Image.Transpose.FLIP_LEFT_RIGHT),
        "image_id": example["image_id"],
        "annotations": annotations,  # type: ignore[typeddict-item]
    }


class DetrCollator:
    """Collate :class:`DetectionExample` lists into DETR model inputs with a transformers image processor.

    Each call passes the PIL images and ``{"image_id", "annotations"}`` targets (COCO xywh, absolute pixels) to the
    processor with ``format="coco_detection"``. What the DETR image processor (transformers 5.23,
    ``image_processing_detr.py``) does to the boxes:

    1. ``prepare_coco_detection_annotation``: drops ``iscrowd=1`` objects, converts xywh -> xyxy, clips to the
       original image and drops boxes with zero width/height.
    2. ``resize_annotation``: scales boxes by ``resized / original`` per axis (``area`` by the product).
    3. ``normalize_annotation``: xyxy -> cxcywh divided by the *resized* image size.
    4. ``pad`` (bottom/right zero padding to the largest image of the batch): boxes are multiplied by
       ``resized / padded`` per axis, i.e. normalised to the padded canvas.

    The collator then undoes step 4's renormalisation: the returned boxes are normalised cxcywh **relative to each
    (resized, un-padded) image**, DETR's own convention for ``pred_boxes`` ("relative to the size of each individual
    image in the batch, disregarding possible padding"), and ``labels[i]["size"]`` is that un-padded resized size.
    So a prediction maps back to original pixels with ``orig_size`` alone, as ``post_process_object_detection`` and
    the ``object-detection`` pipeline do, whatever padding the batch needed.

    ``pixel_mask`` is 1 on image pixels and 0 on padding.

    Args:
        image_processor: A DETR-style image processor (e.g. :func:`default_image_processor`).
        augment: Randomly flip examples left-right (boxes flipped accordingly).
        flip_prob: Probability of a flip when ``augment`` is True.
        generator: Optional ``torch.Generator`` for the flip decisions (default: torch's global RNG, which
            DataLoader seeds per worker).

    Raises:
        ValueError: If ``flip_prob`` is not in [0, 1].
    """

    def __init__(
        self,
        image_processor: Callable[..., Any],
        augment: bool = False,
        flip_prob: float = 0.5,
        generator: torch.Generator | None = None,
    ) -> None:
        if not 0.0 <= flip_prob <= 1.0:
            raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob}")
        self.image_processor = image_processor
        self.augment = augment
        self.flip_prob = flip_prob
        self.generator = generator

    def __call__(self, examples: Sequence[DetectionExample]) -> dict[str, Any]:
        """Collate a batch.

        Args:
            examples: Items of a :class:`DetectionDataset`.

        Returns:
            ``{"pixel_values": (B, 3, H, W) float, "pixel_mask": (B, H, W) long, "labels": [dict per image with
            "class_labels" (n,) long, "boxes" (n, 4) normalised cxcywh float, "image_id", "area", "iscrowd",
            "orig_size", "size"]}``.

        Raises:
            ValueError: If ``examples`` is empty.
        """
        if not examples:
            raise ValueError("cannot collate an empty batch")
        examples = list(examples)
        if self.augment and self.flip_prob > 0:
            flips = (torch.rand(len(examples), generator=self.generator) < self.flip_prob).tolist()
            examples = [hflip_example(ex) if flip else ex for ex, flip in zip(examples, flips)]
        images = [ex["image"] if ex["image"].mode == "RGB" else ex["image"].convert("RGB") for ex in examples]
        targets = [{"image_id": int(ex["image_id"]), "annotations": list(ex["annotations"])} for ex in examples]
        encoding = self.image_processor(images=images, annotations=targets, return_tensors="pt")
        pixel_values = encoding["pixel_values"]
        pixel_mask = encoding.get("pixel_mask")
        if pixel_mask is None:
            pixel_mask = torch.ones(
                (pixel_values.shape[0], *pixel_values.shape[-2:]), dtype=torch.long, device=pixel_values.device
            )
        pixel_mask = pixel_mask.long()
        labels = [dict(label) for label in encoding["labels"]]
        # Undo the processor's normalisation to the padded canvas (see the class docstring).
        padded_h, padded_w = pixel_values.shape[-2:]
        heights = pixel_mask.amax(dim=2).sum(dim=1)  # rows that contain image pixels
        widths = pixel_mask.amax(dim=1).sum(dim=1)
        for label, height, width in zip(labels, heights.tolist(), widths.tolist(), strict=True):
            if (height, width) != (padded_h, padded_w) and label["boxes"].numel():
                scale = torch.tensor([padded_w / width, padded_h / height] * 2, dtype=label["boxes"].dtype)
                label["boxes"] = label["boxes"] * scale
            label["size"] = torch.tensor([height, width], dtype=torch.long)
        return {"pixel_values": pixel_values, "pixel_mask": pixel_mask, "labels": labels}
