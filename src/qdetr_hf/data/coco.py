"""COCO JSON detection datasets: ``CocoDetectionDataset`` and the COCO folder layouts it is found in."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from qdetr_hf.data.base import CocoAnnotation, DetectionDataset, ImageInfo, _make_annotations
from qdetr_hf.data.sanitize import (
    DataQualityWarning,
    ImageSizeMismatch,
    _open_image,
    _record_fixes,
    _relative_name_problem,
    _sanitize_boxes,
    _warn_fixes,
)
from qdetr_hf.data.splits import _split_candidates

__all__ = ["CocoDetectionDataset"]


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
