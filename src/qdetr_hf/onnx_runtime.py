"""`OnnxDetector`: runs an exported Q-DETR with ONNX Runtime and returns `pipeline("object-detection")`'s detections."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from PIL import Image

from .onnx_export import METADATA_KEY, require_onnx

ONNX_FILE = "model.onnx"
"""File name of the exported model inside a model folder (what :class:`OnnxDetector` looks for in a folder)."""

Detection = dict[str, Any]
"""``{"score": float, "label": str, "box": {"xmin": int, "ymin": int, "xmax": int, "ymax": int}}``, as the
object-detection pipeline returns."""


class OnnxDetector:
    """A DETR exported by :func:`~qdetr_hf.export_onnx`, run by ONNX Runtime, with its image processor.

    ```python
    >>> detector = OnnxDetector("runs/qdetr-synthetic-4bit")  # a folder with model.onnx (+ preprocessor_config.json)
    >>> detector(Image.open("shapes.png"), threshold=0.5)
    [{'score': 0.98, 'label': 'circle', 'box': {'xmin': 10, 'ymin': 12, 'xmax': 40, 'ymax': 41}}, ...]
    ```

    Images are resized by the image processor to fit the exported input size and padded to it (``pixel_mask`` marks
    the image), and the outputs go through the processor's ``post_process_object_detection`` with each image's own
    size, exactly as ``pipeline("object-detection")`` does; with a processor that resizes to the exported size (the
    main job's) the detections are the pipeline's.

    Args:
        model: An ``.onnx`` file, or a folder holding ``model.onnx``.
        image_processor: The model's image processor, or a folder to load it from. Default: the folder of the ONNX
            file if it holds a ``preprocessor_config.json``, else a DETR processor for the exported size.
        num_threads: ONNX Runtime intra-op threads (default: ONNX Runtime's choice, every core).
        optimization: Let ONNX Runtime optimise the graph (``True``: every optimisation, which fuses the quantized
            layers into integer kernels; ``False``: run the graph as exported).
        providers: ONNX Runtime execution providers.

    Raises:
        FileNotFoundError: If no ONNX model is found.
        ImportError: If onnxruntime is not installed.
    """

    def __init__(
        self,
        model: str | os.PathLike,
        image_processor: Any = None,
        *,
        num_threads: int | None = None,
        optimization: bool = True,
        providers: Sequence[str] = ("CPUExecutionProvider",),
    ) -> None:
        require_onnx()
        import onnxruntime as ort

        path = Path(model)
        if path.is_dir():
            path = path / ONNX_FILE
        if not path.is_file():
            raise FileNotFoundError(f"No ONNX model at {path} (export one with qdetr_hf.export_onnx).")
        self.path = path
        options = ort.SessionOptions()
        if num_threads is not None:
            if num_threads < 1:
                raise ValueError(f"num_threads must be >= 1, got {num_threads}.")
            options.intra_op_num_threads = num_threads
        options.graph_optimization_level = (
            ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimization else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        )
        self.session = ort.InferenceSession(str(path), options, providers=list(providers))
        meta = self.session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
        if meta is None:
            raise ValueError(f"{path} was not written by qdetr_hf.export_onnx (no '{METADATA_KEY}' metadata).")
        self.metadata = json.loads(meta)
        self.image_size: tuple[int, int] = tuple(self.metadata["image_size"])  # type: ignore[assignment]
        self.id2label = {int(k): v for k, v in self.metadata["id2label"].items()}
        self.image_processor = self._processor(image_processor)

    def _processor(self, image_processor: Any) -> Any:
        from transformers import AutoImageProcessor

        if image_processor is None and (self.path.parent / "preprocessor_config.json").is_file():
            image_processor = self.path.parent
        if isinstance(image_processor, (str, os.PathLike)):
            image_processor = AutoImageProcessor.from_pretrained(image_processor)
        if image_processor is None:
            from .data import default_image_processor

            image_processor = default_image_processor(self.image_size)
        return image_processor

    def _preprocess_kwargs(self) -> dict[str, Any]:
        """Processor arguments that produce exactly the exported input size."""
        height, width = self.image_size
        size = dict(self.image_processor.size)
        if size.get("height") == height and size.get("width") == width:
            return {}
        return {
            "size": {"max_height": height, "max_width": width},
            "do_pad": True,
            "pad_size": {"height": height, "width": width},
        }

    def run(self, pixel_values: np.ndarray | torch.Tensor, pixel_mask: np.ndarray | torch.Tensor | None = None):
        """The raw ``(logits, pred_boxes)`` of a preprocessed batch (numpy arrays, DETR's output layout)."""
        pixel_values = np.ascontiguousarray(_numpy(pixel_values), dtype=np.float32)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[2:]) != self.image_size:
            raise ValueError(
                f"pixel_values must be (batch, 3, {self.image_size[0]}, {self.image_size[1]}) for this export, got "
                f"{tuple(pixel_values.shape)}."
            )
        if pixel_mask is None:
            pixel_mask = np.ones((pixel_values.shape[0], *self.image_size), dtype=np.int64)
        pixel_mask = np.ascontiguousarray(_numpy(pixel_mask), dtype=np.int64)
        logits, pred_boxes = self.session.run(
            ["logits", "pred_boxes"], {"pixel_values": pixel_values, "pixel_mask": pixel_mask}
        )
        return logits, pred_boxes

    def latency_ms(self, runs: int = 20, warmup: int = 3, batch_size: int = 1) -> float:
        """Median wall-clock milliseconds of one ONNX Runtime call on a random ``batch_size`` batch (after
        ``warmup`` untimed calls)."""
        if runs < 1 or warmup < 0 or batch_size < 1:
            raise ValueError(f"Need runs >= 1, warmup >= 0, batch_size >= 1; got {runs}, {warmup}, {batch_size}.")
        pixel_values = np.random.default_rng(0).standard_normal((batch_size, 3, *self.image_size), dtype=np.float32)
        for _ in range(warmup):
            self.run(pixel_values)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            self.run(pixel_values)
            times.append(time.perf_counter() - start)
        return 1000 * float(np.median(times))

    def evaluate(
        self,
        dataset: Any,
        collator: Any,
        batch_size: int = 8,
        area_ranges: dict[str, tuple[float, float]] | None = None,
        show_progress: bool = False,
    ) -> dict[str, float]:
        """COCO metrics of the exported model on a detection dataset, computed as for the PyTorch model (same
        collator, :class:`~qdetr_hf.metrics.CocoEvaluator`).

        Args:
            dataset: A ``qdetr_hf.data`` detection dataset.
            collator: The evaluation ``DetrCollator`` (its processor must produce the exported input size).
            batch_size: Images per ONNX Runtime call.
            area_ranges: Custom small/medium/large buckets (e.g. ``dataset.area_ranges``).
            show_progress: Show a progress bar.
        """
        from torch.utils.data import DataLoader

        from .metrics import CocoEvaluator

        evaluator = CocoEvaluator(id2label=self.id2label, area_ranges=area_ranges)
        batches: Any = DataLoader(dataset, batch_size=batch_size, collate_fn=collator)
        if show_progress:
            from tqdm.auto import tqdm

            batches = tqdm(batches, desc="Evaluating the ONNX model", leave=False)
        for batch in batches:
            logits, pred_boxes = self.run(batch["pixel_values"], batch["pixel_mask"])
            evaluator.update(({}, logits, pred_boxes), batch["labels"])
        return evaluator.compute()

    def __call__(
        self,
        images: Image.Image | str | os.PathLike | Sequence[Image.Image | str | os.PathLike],
        threshold: float = 0.5,
    ) -> list[Detection] | list[list[Detection]]:
        """Detections for one image (a list of dicts) or a batch (a list of such lists), like the pipeline."""
        single = not isinstance(images, (list, tuple))
        loaded = [_load_image(image) for image in ([images] if single else images)]
        inputs = self.image_processor(images=loaded, return_tensors="np", **self._preprocess_kwargs())
        logits, pred_boxes = self.run(inputs["pixel_values"], inputs.get("pixel_mask"))
        outputs = SimpleNamespace(logits=torch.from_numpy(logits), pred_boxes=torch.from_numpy(pred_boxes))
        sizes = torch.tensor([[image.height, image.width] for image in loaded])
        results = self.image_processor.post_process_object_detection(outputs, threshold=threshold, target_sizes=sizes)
        detections = [
            [
                {"score": score, "label": self.id2label[label], "box": dict(zip(("xmin", "ymin", "xmax", "ymax"), box))}
                for score, label, box in zip(
                    result["scores"].tolist(), result["labels"].tolist(), result["boxes"].int().tolist()
                )
            ]
            for result in results
        ]
        return detections[0] if single else detections


def _numpy(value: np.ndarray | torch.Tensor) -> np.ndarray:
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


def _load_image(image: Image.Image | str | os.PathLike) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    path = Path(image)
    if not path.is_file():
        raise FileNotFoundError(f"Image not found: {path}")
    return Image.open(path).convert("RGB")


__all__ = ["ONNX_FILE", "Detection", "OnnxDetector"]
