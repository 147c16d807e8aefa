"""Pascal VOC detection datasets (and labelImg's export without split files): ``VocDetectionDataset``."""

from __future__ import annotations

import os
import warnings
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from qdetr_hf.data.base import CocoAnnotation, DetectionDataset, ImageInfo, _make_annotations
from qdetr_hf.data.sanitize import (
    DataQualityWarning,
    _open_image,
    _record_fixes,
    _relative_name_problem,
    _sanitize_boxes,
    _warn_fixes,
)
from qdetr_hf.data.splits import _split_candidates, canonical_split

__all__ = ["IMAGE_SUFFIXES", "VocDetectionDataset", "find_voc_root"]

IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


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
