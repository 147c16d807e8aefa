"""Writing any ``DetectionDataset`` out: a COCO folder (``export_coco``) or a ``datasets.Dataset`` (``to_hf_dataset``)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qdetr_hf.data.base import DetectionDataset
from qdetr_hf.data.sanitize import _relative_name_problem

if TYPE_CHECKING:
    import datasets as hf_datasets

__all__ = ["export_coco", "to_hf_dataset"]


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
