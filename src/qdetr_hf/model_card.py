"""Model cards for trained Q-DETR students: measured metrics, efficiency and training details, never placeholders."""

from __future__ import annotations

import math
import string
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

METRIC_COLUMNS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


@dataclass
class ModelCardData:
    """Everything the model card states. Every metric must be a measured number.

    Attributes:
        model_name: Title of the card (e.g. the Hub repo name).
        teacher: Hub id or path of the real-valued teacher.
        dataset: Dataset name or path.
        bits: W-A-Attention notation, e.g. ``"4-4-8"``.
        method: Training method, e.g. ``"Q-DETR (DA + DRD distillation)"``.
        metrics: Row name (e.g. ``"teacher (fp32)"``, ``"student 4-4-8"``) -> COCO metrics (at least AP, AP50, AP75).
        efficiency: Row name -> ``size_mb``, ``ops_g`` and ``speedup`` (see :mod:`qdetr_hf.efficiency`).
        training: Free-form training facts (steps, batch size, learning rate, hardware, wall time, ...).
        image_size: Network input size used for the numbers.
        eval_split: Name of the evaluated split.
        num_eval_images: Number of evaluated images.
        repo_id: Hub repo id used in the usage snippet (defaults to ``model_name``).
        deployment: Measured deployment numbers (see ``examples/distill.py``): ``threads`` and, for ``"teacher"`` and
            ``"student"``, ``file_mb`` (safetensors on disk), ``onnx_mb`` and ``latency_ms`` (ONNX Runtime, median,
            batch 1), plus the exported student's ``metrics``; ``None`` when the model was not exported.
    """

    model_name: str
    teacher: str
    dataset: str
    bits: str
    method: str
    metrics: dict[str, dict[str, float]]
    efficiency: dict[str, dict[str, float]]
    training: dict[str, Any] = field(default_factory=dict)
    image_size: int = 0
    eval_split: str = "validation"
    num_eval_images: int = 0
    repo_id: str | None = None
    deployment: dict[str, Any] | None = None


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"Model card value {where} must be a measured finite number, got {value!r}.")
    return float(value)


def _metrics_table(metrics: dict[str, dict[str, float]]) -> str:
    if not metrics:
        raise ValueError("Model card needs at least one row of measured metrics.")
    lines = ["| Model | " + " | ".join(METRIC_COLUMNS) + " |", "|---" * (len(METRIC_COLUMNS) + 1) + "|"]
    for row, values in metrics.items():
        for required in ("AP", "AP50", "AP75"):
            if required not in values:
                raise ValueError(f"Model card metrics for {row!r} lack {required}.")
        cells = [
            f"{100 * _number(values[c], f'{row}.{c}'):.1f}" if values.get(c, -1) >= 0 else "n/a" for c in METRIC_COLUMNS
        ]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n(AP values in %.)"


def _efficiency_table(efficiency: dict[str, dict[str, float]]) -> str:
    if not efficiency:
        raise ValueError("Model card needs the efficiency accounting of at least one model.")
    lines = ["| Model | Size (MB) | OPs (G) | Theoretical speed-up |", "|---|---|---|---|"]
    for row, values in efficiency.items():
        size = _number(values.get("size_mb"), f"{row}.size_mb")
        ops = _number(values.get("ops_g"), f"{row}.ops_g")
        speedup = _number(values.get("speedup"), f"{row}.speedup")
        lines.append(f"| {row} | {size:.2f} | {ops:.3f} | {speedup:.2f}x |")
    return "\n".join(lines)


def _deployment_section(deployment: dict[str, Any] | None, image_size: int) -> str:
    if deployment is None:
        return "This model was not exported to ONNX; export it with `qdetr_hf.export_onnx(model, path, image_size)`."
    lines = [
        f"Measured with ONNX Runtime {deployment['onnxruntime']} on the CPU, {deployment['threads']} thread(s), "
        f"batch 1 at {image_size} px (median of the timed calls); sizes are the files on disk:",
        "",
        "| Model | Checkpoint (MB) | ONNX (MB) | ONNX Runtime latency (ms) |",
        "|---|---|---|---|",
    ]
    for row, name in (("teacher", "teacher (fp32)"), ("student", "student (integer ONNX)")):
        values = deployment[row]
        cells = [_number(values[k], f"deployment.{row}.{k}") for k in ("file_mb", "onnx_mb", "latency_ms")]
        lines.append(f"| {name} | {cells[0]:.2f} | {cells[1]:.2f} | {cells[2]:.1f} |")
    ratio = _number(deployment["teacher"]["latency_ms"], "latency") / _number(
        deployment["student"]["latency_ms"], "latency"
    )
    ap = _number(deployment["student"]["metrics"]["AP"], "deployment.student.metrics.AP")
    lines += [
        "",
        f"The integer ONNX model runs {ratio:.2f}x as fast as the fp32 teacher's ONNX export and scores {100 * ap:.1f} AP "
        "on the evaluation split above.",
    ]
    return "\n".join(lines)


def _onnx_usage(deployment: dict[str, Any] | None, repo_id: str) -> str:
    if deployment is None:
        return ""
    return (
        "Run the integer ONNX model (`model.onnx`) with ONNX Runtime, with the same pre- and post-processing:\n\n"
        "```python\n"
        "from huggingface_hub import snapshot_download\n"
        "from qdetr_hf import OnnxDetector\n\n"
        f'detector = OnnxDetector(snapshot_download("{repo_id}"))  # model.onnx + preprocessor_config.json\n'
        'detections = detector("image.jpg", threshold=0.5)  # [{"score", "label", "box"}, ...] like the pipeline\n'
        "```\n"
    )


def _training_table(training: dict[str, Any]) -> str:
    if not training:
        return "Not recorded."
    lines = ["| Setting | Value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in training.items()]
    return "\n".join(lines)


def render_model_card(data: ModelCardData, template: str | None = None) -> str:
    """Render the card from ``model_cards/template.md`` (shipped in the package).

    Raises:
        ValueError: If a metric or efficiency number is missing or not finite (a card never shows placeholders).
    """
    if template is None:
        template = resources.files("qdetr_hf").joinpath("templates/model_card.md").read_text(encoding="utf-8")
    base_model = data.teacher if "/" in data.teacher and not Path(data.teacher).exists() else None
    values = {
        "model_name": data.model_name,
        "teacher": data.teacher,
        "dataset": data.dataset,
        "bits": data.bits,
        "method": data.method,
        "metrics_table": _metrics_table(data.metrics),
        "efficiency_table": _efficiency_table(data.efficiency),
        "training_table": _training_table(data.training),
        "image_size": str(data.image_size),
        "eval_split": data.eval_split,
        "num_eval_images": str(data.num_eval_images),
        "repo_id": data.repo_id or data.model_name,
        "base_model_yaml": f"base_model: {base_model}" if base_model else "",
        "deployment_section": _deployment_section(data.deployment, data.image_size),
        "onnx_usage": _onnx_usage(data.deployment, data.repo_id or data.model_name),
        "onnx_sentence": (
            "`model.onnx` is the same model as an integer ONNX graph that ONNX Runtime runs with integer kernels."
            if data.deployment is not None
            else "export it with `qdetr_hf.export_onnx` and run it with ONNX Runtime (`qdetr_hf.OnnxDetector`)."
        ),
    }
    return string.Template(template).substitute(values)


def write_model_card(data: ModelCardData, output_dir: str | Path) -> Path:
    """Render the card and write it to ``output_dir/README.md``; returns the path."""
    path = Path(output_dir) / "README.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_model_card(data), encoding="utf-8")
    return path


__all__ = ["ModelCardData", "render_model_card", "write_model_card"]
