"""Checking annotations against their images: boxes clipped or dropped, sizes, file names, one warning per dataset."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Literal

import numpy as np
from PIL import Image

__all__ = ["BoxFix", "DataQualityWarning", "ImageSizeMismatch"]


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
