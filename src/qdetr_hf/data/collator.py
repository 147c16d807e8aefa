"""From detection examples to DETR batches: ``DetrCollator``, its random horizontal flip, ``default_image_processor``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from qdetr_hf.data.base import DetectionExample

if TYPE_CHECKING:
    from transformers import DetrImageProcessor

__all__ = ["DetrCollator", "default_image_processor", "hflip_example"]


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
    """Flip an example left-right with ``torchvision.transforms.v2``: the image and every box (``x -> W - x - w``).

    The boxes go through ``v2.functional.horizontal_flip`` as ``tv_tensors.BoundingBoxes`` (XYWH, float64, on the
    image's canvas), so image and boxes are flipped by the same library transform.

    Args:
        example: The example.

    Returns:
        A new example (the input is not modified); annotations keep every field but ``bbox``.
    """
    image = example["image"]
    boxes = tv_tensors.BoundingBoxes(
        torch.tensor([[float(v) for v in ann["bbox"]] for ann in example["annotations"]], dtype=torch.float64).reshape(
            -1, 4
        ),
        format=tv_tensors.BoundingBoxFormat.XYWH,
        canvas_size=(image.height, image.width),
    )
    flipped = F.horizontal_flip(boxes).tolist()
    return {
        "image": F.horizontal_flip(image),
        "image_id": example["image_id"],
        "annotations": [{**ann, "bbox": bbox} for ann, bbox in zip(example["annotations"], flipped, strict=True)],  # type: ignore[typeddict-item]
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
        augment: Randomly flip examples left-right (boxes flipped accordingly, by :func:`hflip_example`).
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
