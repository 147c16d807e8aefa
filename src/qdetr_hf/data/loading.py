"""Choosing a dataset by name or path: ``load_detection_dataset`` and the scripts' ``DatasetArguments``."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qdetr_hf.data.base import DetectionDataset
from qdetr_hf.data.coco import CocoDetectionDataset, _find_coco_in_folder
from qdetr_hf.data.hub import HubDetectionDataset, _is_saved_to_disk
from qdetr_hf.data.splits import canonical_split
from qdetr_hf.data.synthetic import SYNTHETIC_DEFAULT_SIZES, SYNTHETIC_SPLIT_SEED_OFFSETS, SyntheticShapesDataset
from qdetr_hf.data.voc import VocDetectionDataset, find_voc_root
from qdetr_hf.hub_utils import looks_like_local_path

__all__ = ["DatasetArguments", "load_detection_dataset"]


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
        if fmt in ("voc", "coco") or looks_like_local_path(name):
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

    synthetic_seed: int | None = field(
        default=None,
        metadata={
            "help": "Synthetic data only: the seed the training and evaluation images are drawn from (default: the "
            "training --seed), so that runs at other training seeds can be scored on the same images."
        },
    )

    def __post_init__(self):
        if (
            self.synthetic_seed is not None
            and not 0 <= self.synthetic_seed < SYNTHETIC_SPLIT_SEED_OFFSETS["validation"]
        ):
            raise ValueError(
                f"synthetic_seed must be in [0, {SYNTHETIC_SPLIT_SEED_OFFSETS['validation']:,}) so that the splits' "
                f"images stay apart, got {self.synthetic_seed}"
            )

    def load(self, image_size: int, seed: int = 0) -> tuple[DetectionDataset, DetectionDataset]:
        """The training and evaluation datasets (synthetic images are generated at ``image_size`` from
        ``synthetic_seed``, or from ``seed`` when it is not set)."""
        if self.synthetic_seed is not None:
            seed = self.synthetic_seed
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
