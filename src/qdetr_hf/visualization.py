"""Drawing detections on images (PNG previews written by the example scripts)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw

PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240)]


def draw_detections(
    image: Image.Image,
    detections: Mapping[str, torch.Tensor],
    id2label: Mapping[int, str],
    threshold: float = 0.5,
    scale: int = 1,
) -> Image.Image:
    """Draw boxes with labels and scores on a copy of ``image``.

    Args:
        image: The original image.
        detections: ``{"boxes": (N, 4) xyxy absolute pixels, "scores": (N,), "labels": (N,)}`` as returned by
            :func:`qdetr_hf.metrics.post_process_detections` or ``post_process_object_detection``.
        id2label: Class names.
        threshold: Only detections scoring at least this are drawn.
        scale: Integer up-scaling of the picture (small images read better enlarged).
    """
    if scale < 1:
        raise ValueError(f"scale must be >= 1, got {scale}")
    canvas = image.convert("RGB")
    if scale > 1:
        canvas = canvas.resize((canvas.width * scale, canvas.height * scale), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(canvas)
    boxes = torch.as_tensor(detections["boxes"]).reshape(-1, 4).tolist()
    scores = torch.as_tensor(detections["scores"]).reshape(-1).tolist()
    labels = torch.as_tensor(detections["labels"]).reshape(-1).tolist()
    for box, score, label in zip(boxes, scores, labels, strict=True):
        if score < threshold:
            continue
        color = PALETTE[int(label) % len(PALETTE)]
        x0, y0, x1, y1 = (v * scale for v in box)
        draw.rectangle([x0, y0, x1, y1], outline=color, width=2)
        text = f"{id2label.get(int(label), str(label))} {score:.2f}"
        draw.rectangle([x0, y0, x0 + 6 * len(text) + 4, y0 + 11], fill=color)
        draw.text((x0 + 2, y0), text, fill=(0, 0, 0))
    return canvas


def save_detection_grid(
    images: Sequence[Image.Image],
    detections: Sequence[Mapping[str, torch.Tensor]],
    id2label: Mapping[int, str],
    path: str | Path,
    threshold: float = 0.5,
    columns: int = 4,
    scale: int = 2,
    titles: Sequence[str] | None = None,
) -> Path:
    """Draw detections on several images and save them side by side as one PNG; returns the path."""
    if len(images) != len(detections) or not images:
        raise ValueError(f"Need as many detections as images (got {len(images)} images, {len(detections)}).")
    drawn = [draw_detections(im, det, id2label, threshold, scale) for im, det in zip(images, detections, strict=True)]
    title_height = 14 if titles else 0
    cell_w = max(im.width for im in drawn)
    cell_h = max(im.height for im in drawn) + title_height
    columns = max(1, min(columns, len(drawn)))
    rows = (len(drawn) + columns - 1) // columns
    grid = Image.new("RGB", (columns * cell_w, rows * cell_h), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for index, picture in enumerate(drawn):
        x, y = (index % columns) * cell_w, (index // columns) * cell_h
        if titles:
            draw.text((x + 2, y + 1), titles[index], fill=(0, 0, 0))
        grid.paste(picture, (x, y + title_height))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


__all__ = ["draw_detections", "save_detection_grid"]
