"""Hugging Face ``datasets`` detection datasets (Hub names, ``save_to_disk`` and data folders): ``HubDetectionDataset``."""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from PIL import Image

from qdetr_hf.data.base import CocoAnnotation, DetectionDataset, DetectionExample, ImageInfo, _make_annotations
from qdetr_hf.data.sanitize import BoxFix, _record_fixes, _sanitize_boxes, _warn_fixes
from qdetr_hf.data.splits import _split_candidates
from qdetr_hf.hub_utils import looks_like_local_path

if TYPE_CHECKING:
    import datasets as hf_datasets

__all__ = ["HubDetectionDataset"]


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
        if looks_like_local_path(str(name_or_path)):
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
