"""Pictures of detections: equal-size tiles in one PNG grid, with the ground truth beside the predictions."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont
from torchvision.transforms.v2 import functional as F
from torchvision.utils import draw_bounding_boxes

PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240)]
"""Box colours, by class id (cycled)."""

DEFAULT_TILE_SIZE = 384
"""Side in pixels of one picture in :func:`detection_grid`."""

LETTERBOX_COLOR = (224, 224, 224)
GRID_BACKGROUND = (255, 255, 255)
CAPTION_COLOR = (0, 0, 0)

Target = Mapping[str, Any] | Sequence[Mapping[str, Any]]
"""Boxes of one image: ``{"boxes": (N, 4) xyxy absolute pixels, "labels": (N,), "scores": (N,) optional}`` (what
:func:`qdetr_hf.metrics.post_process_detections` returns), or a list of COCO annotations ``{"bbox": [x, y, w, h],
"category_id": k}`` (a dataset example's ``"annotations"``)."""


@functools.cache
def _font_file() -> str | None:
    """A TrueType font that scales (DejaVu Sans, shipped with matplotlib), or None when there is none."""
    try:
        import matplotlib
    except ImportError:
        return None
    path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    return str(path) if path.is_file() else None


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    path = _font_file()
    return ImageFont.truetype(path, size) if path is not None else ImageFont.load_default()


def _line_width(side: int) -> int:
    """Box outline width for a picture whose longer side is ``side`` pixels."""
    return max(2, round(side / 150))


def _font_size(side: int) -> int:
    """Label font size for a picture whose longer side is ``side`` pixels."""
    return max(11, round(side / 24))


def _boxes_of(target: Target, threshold: float | None) -> tuple[torch.Tensor, list[int], list[float | None]]:
    """``(boxes (N, 4) xyxy float, labels, scores)`` of one image; scored boxes below ``threshold`` are left out."""
    if isinstance(target, Mapping):
        if "boxes" not in target or "labels" not in target:
            raise ValueError(f"detections need 'boxes' and 'labels', got keys {sorted(target)}")
        boxes = torch.as_tensor(target["boxes"]).detach().cpu().float().reshape(-1, 4)
        labels = [int(v) for v in torch.as_tensor(target["labels"]).reshape(-1).tolist()]
        scores: list[float | None]
        if target.get("scores") is not None:
            scores = [float(v) for v in torch.as_tensor(target["scores"]).reshape(-1).tolist()]
        else:
            scores = [None] * len(labels)
    else:  # COCO annotations: [x, y, w, h]
        annotations = list(target)
        for ann in annotations:
            if not isinstance(ann, Mapping) or "bbox" not in ann or "category_id" not in ann:
                raise ValueError(f"ground-truth annotations need 'bbox' and 'category_id', got {ann!r}")
        xywh = torch.tensor([[float(v) for v in ann["bbox"]] for ann in annotations]).reshape(-1, 4)
        boxes = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1)
        labels = [int(ann["category_id"]) for ann in annotations]
        scores = [None] * len(labels)
    if not len(boxes) == len(labels) == len(scores):
        raise ValueError(f"{len(boxes)} boxes, {len(labels)} labels and {len(scores)} scores in one image")
    keep = [k for k, score in enumerate(scores) if threshold is None or score is None or score >= threshold]
    return boxes[keep], [labels[k] for k in keep], [scores[k] for k in keep]


def _text_color(color: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black on light colours, white on dark ones."""
    return (0, 0, 0) if 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2] > 140 else (255, 255, 255)


def draw_detections(
    image: Image.Image,
    detections: Target,
    id2label: Mapping[int, str],
    threshold: float | None = 0.5,
    scale: int = 1,
    *,
    tile_size: int | None = None,
) -> Image.Image:
    """Draw boxes with their class names (and scores) on a copy of ``image``.

    Boxes are drawn by ``torchvision.utils.draw_bounding_boxes`` in one colour per class (:data:`PALETTE`), each
    labelled at its top-left corner inside the box. Line width and font size grow with the picture, so labels stay
    readable on large pictures.

    Args:
        image: The original image (any PIL mode; drawn as RGB).
        detections: The image's boxes in absolute pixels of ``image`` (see :data:`Target`): predictions with
            ``"scores"`` or ground truth without.
        id2label: Class names (a missing id is shown as its number).
        threshold: Only boxes scoring at least this are drawn; None draws all (boxes without scores are all drawn).
        scale: Integer enlargement of the picture when ``tile_size`` is None.
        tile_size: When given, the picture is a ``tile_size x tile_size`` square: the image is resized to fit it
            (aspect ratio kept; shrunk with Lanczos filtering, enlarged pixel by pixel) and centred on a light grey
            background, and the boxes follow it.

    Returns:
        The picture, an RGB PIL image.

    Raises:
        ValueError: If ``scale`` or ``tile_size`` is too small, or ``detections`` lacks boxes or labels.
    """
    if scale < 1:
        raise ValueError(f"scale must be >= 1, got {scale}")
    if tile_size is not None and tile_size < 16:
        raise ValueError(f"tile_size must be at least 16 pixels, got {tile_size}")
    boxes, labels, scores = _boxes_of(detections, threshold)
    picture = image.convert("RGB")
    width, height = picture.size
    if tile_size is None:
        if scale > 1:
            picture = picture.resize((width * scale, height * scale), Image.Resampling.NEAREST)
        offset = (0, 0)
    else:
        factor = tile_size / max(width, height)
        size = (max(1, min(tile_size, round(width * factor))), max(1, min(tile_size, round(height * factor))))
        if size != picture.size:
            shrink = factor < 1
            picture = picture.resize(size, Image.Resampling.LANCZOS if shrink else Image.Resampling.NEAREST)
        canvas = Image.new("RGB", (tile_size, tile_size), LETTERBOX_COLOR)
        offset = ((tile_size - size[0]) // 2, (tile_size - size[1]) // 2)
        canvas.paste(picture, offset)
        picture = canvas
    if not len(boxes):
        return picture

    resized_w, resized_h = picture.size if tile_size is None else size  # the image's pixels inside the picture
    boxes = boxes * torch.tensor([resized_w / width, resized_h / height] * 2)
    boxes = boxes + torch.tensor([offset[0], offset[1]] * 2, dtype=boxes.dtype)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, picture.width - 1)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, picture.height - 1)
    boxes = torch.cat([torch.minimum(boxes[:, :2], boxes[:, 2:]), torch.maximum(boxes[:, :2], boxes[:, 2:])], dim=1)
    colors = [PALETTE[label % len(PALETTE)] for label in labels]
    texts = [
        id2label.get(label, str(label)) + ("" if score is None else f" {score:.2f}")
        for label, score in zip(labels, scores, strict=True)
    ]
    side = max(picture.size)
    font = _font_file()
    drawn = draw_bounding_boxes(
        F.pil_to_tensor(picture),
        boxes,
        labels=texts,
        colors=colors,
        width=_line_width(side),
        font=font,
        font_size=_font_size(side) if font is not None else None,
        label_colors=[_text_color(color) for color in colors],
        fill_labels=True,
    )
    return F.to_pil_image(drawn)


def detection_grid(
    images: Sequence[Image.Image],
    detections: Sequence[Target],
    id2label: Mapping[int, str],
    threshold: float = 0.5,
    columns: int = 4,
    titles: Sequence[str] | None = None,
    *,
    ground_truth: Sequence[Target] | None = None,
    tile_size: int = DEFAULT_TILE_SIZE,
) -> Image.Image:
    """Draw detections on several images, as tiles of one size in a grid.

    Every image becomes a ``tile_size x tile_size`` picture (see :func:`draw_detections`), whatever its own size, so
    the grid is ``columns`` tiles wide however large the photos are. With ``ground_truth``, each tile is two pictures
    side by side: the ground truth on the left and the predictions on the right, in the same class colours, each
    captioned ("ground truth" / "predictions", after the image's title when ``titles`` are given).

    Args:
        images: The original images.
        detections: Per image, its predicted boxes in absolute pixels of that image (see :data:`Target`).
        id2label: Class names.
        threshold: Only predictions scoring at least this are drawn.
        columns: Tiles per row (fewer when there are fewer images).
        titles: Optional caption per image.
        ground_truth: Optional per image ground-truth boxes, as ``{"boxes", "labels"}`` or the example's COCO
            annotations (``example["annotations"]``).
        tile_size: Side in pixels of each picture.

    Returns:
        The grid, an RGB PIL image.

    Raises:
        ValueError: If there are no images, or ``detections``, ``ground_truth`` or ``titles`` do not have one entry
            per image.
    """
    if len(images) != len(detections) or not images:
        raise ValueError(f"Need as many detections as images (got {len(images)} images, {len(detections)}).")
    if ground_truth is not None and len(ground_truth) != len(images):
        raise ValueError(f"Need one ground truth per image (got {len(images)} images, {len(ground_truth)}).")
    if titles is not None and len(titles) != len(images):
        raise ValueError(f"Need one title per image (got {len(images)} images, {len(titles)}).")
    panels: list[list[tuple[Image.Image, str]]] = []
    for i, (image, det) in enumerate(zip(images, detections, strict=True)):
        title = titles[i] if titles else ""
        predicted = draw_detections(image, det, id2label, threshold, tile_size=tile_size)
        if ground_truth is None:
            panels.append([(predicted, title)])
            continue
        truth = draw_detections(image, ground_truth[i], id2label, None, tile_size=tile_size)
        panels.append(
            [
                (truth, f"{title}: ground truth" if title else "ground truth"),
                (predicted, f"{title}: predictions" if title else "predictions"),
            ]
        )

    per_tile = len(panels[0])
    font_size = _font_size(tile_size)
    caption_height = round(1.4 * font_size) if titles or ground_truth is not None else 0
    spacing = max(4, tile_size // 48)  # between tiles and around the grid
    pair_gap = max(2, spacing // 4)  # between the two pictures of a tile
    cell_w = per_tile * tile_size + (per_tile - 1) * pair_gap
    cell_h = caption_height + tile_size
    columns = max(1, min(columns, len(panels)))
    rows = (len(panels) + columns - 1) // columns
    grid = Image.new(
        "RGB", (columns * cell_w + (columns + 1) * spacing, rows * cell_h + (rows + 1) * spacing), GRID_BACKGROUND
    )
    draw = ImageDraw.Draw(grid)
    font = _font(font_size)
    for index, tile in enumerate(panels):
        x = spacing + (index % columns) * (cell_w + spacing)
        y = spacing + (index // columns) * (cell_h + spacing)
        for k, (picture, caption) in enumerate(tile):
            left = x + k * (tile_size + pair_gap)
            if caption:
                draw.text((left, y), caption, fill=CAPTION_COLOR, font=font)
            grid.paste(picture, (left, y + caption_height))
    return grid


def save_detection_grid(
    images: Sequence[Image.Image],
    detections: Sequence[Target],
    id2label: Mapping[int, str],
    path: str | Path,
    threshold: float = 0.5,
    columns: int = 4,
    scale: int | None = None,
    titles: Sequence[str] | None = None,
    *,
    ground_truth: Sequence[Target] | None = None,
    tile_size: int = DEFAULT_TILE_SIZE,
) -> Path:
    """Draw detections on several images as one grid of equal tiles (:func:`detection_grid`) and save it as a PNG.

    Args:
        images: The original images.
        detections: Per image, its predicted boxes (see :data:`Target`).
        id2label: Class names.
        path: Where to write the PNG (parent folders are created).
        threshold: Only predictions scoring at least this are drawn.
        columns: Tiles per row.
        scale: Deprecated and ignored (tiles are ``tile_size`` pixels whatever the image size); passing it warns.
        titles: Optional caption per image.
        ground_truth: Optional per image ground truth, drawn beside the predictions (see :func:`detection_grid`).
        tile_size: Side in pixels of each picture.

    Returns:
        The path written.
    """
    if scale is not None:
        warnings.warn(
            "save_detection_grid: `scale` is ignored, every image is drawn as a tile of `tile_size` pixels; "
            "pass tile_size instead.",
            FutureWarning,
            stacklevel=2,
        )
    grid = detection_grid(
        images, detections, id2label, threshold, columns, titles, ground_truth=ground_truth, tile_size=tile_size
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


__all__ = ["DEFAULT_TILE_SIZE", "PALETTE", "Target", "detection_grid", "draw_detections", "save_detection_grid"]
