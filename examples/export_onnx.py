#!/usr/bin/env python
"""Export a calibrated Q-DETR student to an integer ONNX model and run it with ONNX Runtime.

The student folder (local or on the Hub) is loaded with `QDetrForObjectDetection.from_pretrained`, exported with
`qdetr_hf.export_onnx` beside its image processor, then run with `qdetr_hf.OnnxDetector`: the script prints how many
quantized layers ONNX Runtime runs as integer kernels, the median latency, and the detections of the given images.

    python examples/export_onnx.py --model runs/qdetr-synthetic-4bit            # writes .../model.onnx
    python examples/export_onnx.py --model <you>/qdetr-r50-4bit-bccd --output_dir exported \\
        --image_size 800 1333 --images ../shared/data/bccd/JPEGImages/BloodImage_00000.jpg

A model that is not calibrated yet is calibrated first on `--calibration_batches` batches of `--dataset_name`.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

from transformers import AutoImageProcessor, HfArgumentParser

from qdetr_hf import OnnxDetector, QDetrForObjectDetection, calibrate, export_onnx
from qdetr_hf.data import DetrCollator, load_detection_dataset
from qdetr_hf.onnx_export import integer_kernel_counts

logger = logging.getLogger("export_onnx")


@dataclass
class ExportArguments:
    """What to export, where, and what to run it on."""

    model: str = field(metadata={"help": "A Q-DETR student: local folder or Hub id."})
    output_dir: str | None = field(
        default=None, metadata={"help": "Folder for model.onnx and the image processor (default: the model folder)."}
    )
    image_size: list[int] | None = field(
        default=None,
        metadata={"help": "Network input: one side or 'height width' (default: the image processor's size)."},
    )
    images: list[str] = field(default_factory=list, metadata={"help": "Images to detect objects in."})
    threshold: float = field(default=0.5, metadata={"help": "Score threshold of the printed detections."})
    num_threads: int | None = field(default=None, metadata={"help": "ONNX Runtime threads (default: all cores)."})
    latency_runs: int = field(default=20, metadata={"help": "Timed ONNX Runtime calls (median printed)."})
    dataset_name: str | None = field(
        default=None, metadata={"help": "Data to calibrate an uncalibrated model on (see load_detection_dataset)."}
    )
    calibration_batches: int = field(default=4, metadata={"help": "Calibration batches of 8 images."})


def _image_size(args: ExportArguments, processor) -> tuple[int, int]:
    if args.image_size:
        if len(args.image_size) not in (1, 2) or min(args.image_size) <= 0:
            raise SystemExit(f"--image_size takes one side or 'height width', got {args.image_size}.")
        return (args.image_size[0], args.image_size[-1])
    size = processor.size
    if size.get("height") and size.get("width"):
        return (size["height"], size["width"])
    side = size.get("max_height") or size.get("longest_edge") or size.get("shortest_edge")
    if side is None:
        raise SystemExit(f"Cannot tell the input size from the image processor's size {size}: pass --image_size.")
    return (side, side)


def main(argv: list[str] | None = None) -> dict:
    (args,) = HfArgumentParser(ExportArguments).parse_args_into_dataclasses(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    model = QDetrForObjectDetection.from_pretrained(args.model).eval()
    processor = AutoImageProcessor.from_pretrained(args.model)
    if not model.is_calibrated:
        if args.dataset_name is None:
            raise SystemExit(f"{args.model} is not calibrated: pass --dataset_name to calibrate it on real images.")
        height, width = _image_size(args, processor)
        count = 8 * args.calibration_batches
        synthetic = {"image_size": max(height, width), "num_images": count} if args.dataset_name == "synthetic" else {}
        data = load_detection_dataset(args.dataset_name, "train", **synthetic)
        collator = DetrCollator(processor)
        batches = [
            collator([data[i] for i in range(j, min(j + 8, len(data)))]) for j in range(0, min(count, len(data)), 8)
        ]
        calibrate(model, batches, show_progress=True)
    output_dir = Path(args.output_dir or (args.model if Path(args.model).is_dir() else "exported"))
    image_size = _image_size(args, processor)
    report = export_onnx(model, output_dir / "model.onnx", image_size)
    processor.save_pretrained(output_dir)
    logger.info(f"Wrote {report.path} ({report.file_mb:.2f} MB, {report.quantized_layers} quantized layers)")
    if report.max_zero_point_rounding > 0:
        logger.warning(
            f"The model's LSQ+ offsets are real-valued: rounded to integer zero points (up to "
            f"{report.max_zero_point_rounding:.2f} steps). Train with integer_zero_points=True for an exact export."
        )
    kernels = integer_kernel_counts(report.path, num_threads=args.num_threads)
    detector = OnnxDetector(output_dir, num_threads=args.num_threads)
    summary = {
        "onnx": report.to_dict(),
        "optimised_graph_ops": kernels,
        "latency_ms": detector.latency_ms(args.latency_runs),
        "detections": {image: detector(image, threshold=args.threshold) for image in args.images},
    }
    print(json.dumps(summary, indent=2, default=str))
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
