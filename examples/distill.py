#!/usr/bin/env python
"""Distil a low-bit quantized DETR student from a real-valued teacher (Q-DETR and friends).

With no arguments it runs the package's main job on a 2-core CPU in under 15 minutes: the small teacher shipped in
``examples/teacher-synthetic``, the built-in synthetic shapes data, a 4-4-8 student initialised from the teacher and
distilled with Q-DETR's DA + DRD. It prints a teacher vs student table (accuracy, sizes, ONNX Runtime latency) and
writes the student (packed weights), its integer ONNX export, its image processor, a model card, ``results.json`` and
``detections.png`` to ``--output_dir``. Training stops after 12 minutes on a slower machine (``--max_train_minutes``);
setting ``--max_steps`` on the command line removes that limit unless ``--max_train_minutes`` is set too. An output
folder holding a run with other settings is refused (``--overwrite_output_dir`` starts afresh); the same settings
resume its last checkpoint, as does ``--resume_from_checkpoint``.

    accelerate launch examples/distill.py
    accelerate launch --config_file examples/accelerate_configs/multi_gpu_bf16.yaml examples/distill.py \\
        --teacher_model_name_or_path facebook/detr-resnet-101 --model_name_or_path facebook/detr-resnet-50 \\
        --dataset_name ../shared/data/bccd --image_size 800 --max_steps 50000 \\
        --push_to_hub --hub_model_id <you>/qdetr-r50-4bit-bccd
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from transformers import AutoConfig, AutoImageProcessor, HfArgumentParser, set_seed
from transformers.trainer_utils import get_last_checkpoint

from qdetr_hf import BitWidthAnnealing, QDetrForObjectDetection, calibrate
from qdetr_hf.data import DatasetArguments, DetrCollator, default_image_processor
from qdetr_hf.distillers import (
    DEFAULT_MEMORY_WEIGHT,
    CombinedDistiller,
    Distiller,
    DRDDistiller,
    EncoderMemoryDistiller,
    IDaDetDistiller,
    KDDETRDistiller,
    QSKDDistiller,
)
from qdetr_hf.distillers.base import check_label_spaces
from qdetr_hf.efficiency import efficiency_report
from qdetr_hf.hub_utils import public_name
from qdetr_hf.metrics import make_compute_metrics, post_process_detections
from qdetr_hf.mixed_precision import average_weight_bits, choose_bit_widths, layer_sensitivity
from qdetr_hf.model_card import ModelCardData
from qdetr_hf.oscillation import OscillationDampening, OscillationTracker, layer_group
from qdetr_hf.quantization import quantized_layers
from qdetr_hf.trainer import (
    QDetrDistillationTrainer,
    QDetrTrainingArguments,
    configure_cpu_threads,
    load_teacher,
    prepare_output_dir,
)
from qdetr_hf.visualization import save_detection_grid

logger = logging.getLogger("distill")

EXAMPLES_DIR = Path(__file__).resolve().parent
DEFAULT_TEACHER = str(EXAMPLES_DIR / "teacher-synthetic")
DISTILLATION_METHODS = ("drd", "qskd", "kd_detr", "ida", "memory", "none")
METHOD_NAMES = {
    "drd": "Q-DETR (DA + DRD)",
    "qskd": "QSKD (group query selection, attention-guided features, local prediction alignment)",
    "kd_detr": "KD-DETR (specific + general distillation points)",
    "ida": "IDa-Det adapted to DETR (discrepancy-ranked query pairs, entropy loss)",
    "memory": "encoder-memory imitation (project addition)",
    "none": "QAT without distillation",
}


@dataclass
class ModelArguments:
    """Teacher, student initialisation and quantization."""

    teacher_model_name_or_path: str = field(
        default=DEFAULT_TEACHER, metadata={"help": "Real-valued teacher DETR: Hub id or local folder."}
    )
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Student initialisation (real-valued DETR or Q-DETR). Default: the teacher."}
    )
    weight_bits: int = field(
        default=4,
        metadata={"help": "Weight bits (2-8). Below 4 bits the main job's recipe changes too (LOW_BIT_DEFAULTS)."},
    )
    activation_bits: int = field(default=4, metadata={"help": "Activation bits (2-8)."})
    attention_bits: int = field(default=8, metadata={"help": "q/k/v/softmax bits (paper: 8)."})
    first_conv_bits: int = field(default=8, metadata={"help": "Bits of the backbone's first convolution."})
    distribution_alignment: str = field(
        default="cross_attention", metadata={"help": "DA location: cross_attention, self_attention, both, none."}
    )
    distribution_alignment_init: str = field(
        default="unit",
        metadata={"help": "DA affine init: 'unit' (paper: gamma 1, beta 0) or 'fit' (least squares at calibration)."},
    )
    activation_offset: bool = field(default=True, metadata={"help": "LSQ+ learned offsets (False: plain LSQ)."})
    activation_offset_init: str = field(
        default="zero",
        metadata={
            "help": "Activation step/offset init at calibration: 'zero' (paper: LSQ step, zero offset), 'minmax' "
            "(LSQ+) or 'mse' (the LSQ step's multiple with the least quantization error)."
        },
    )
    weight_step_init: str = field(
        default="lsq",
        metadata={"help": "Initial weight steps: 'lsq' (paper) or 'mse' (per-channel clipping search)."},
    )
    integer_zero_points: bool = field(
        default=False,
        metadata={
            "help": "Train LSQ+ offsets as whole steps (integer zero points), so the ONNX export is exact "
            "(main job: true; paper: false, real-valued offsets)."
        },
    )
    backbone_residual_bits: int | None = field(
        default=None,
        metadata={
            "help": "Quantize the backbone's residual stream at these bits, so every backbone convolution runs as an "
            "integer kernel in ONNX Runtime (main job: 8; paper: none)."
        },
    )
    head_bits: int | None = field(
        default=None,
        metadata={
            "help": "Quantize the input projection and the class/box heads at these bits (weights and inputs; both "
            "stages of --two_stage). Paper and main job: none (real-valued, 32 bits each in the size)."
        },
    )
    two_stage: bool = field(
        default=False,
        metadata={"help": "Q-DETR's two-stage schedule: backbone-only quantization first, then the full model."},
    )
    stage1_fraction: float = field(
        default=0.5, metadata={"help": "Share of max_steps spent in stage 1 with --two_stage (project choice)."}
    )


@dataclass
class LowBitArguments:
    """Remedies for students below 4 bits: a progressive schedule, oscillation handling, mixed precision."""

    progressive_from_bits: int | None = field(
        default=None,
        metadata={
            "help": "Progressive schedule: train first at these weight and activation bits, then re-quantize to "
            "--weight_bits/--activation_bits and continue (e.g. 4 for a 2-bit student)."
        },
    )
    progressive_fraction: float = field(
        default=0.5, metadata={"help": "Share of the steps (and of the time limit) spent at --progressive_from_bits."}
    )
    anneal_from_bits: int | None = field(
        default=None,
        metadata={
            "help": "Bit-width annealing (one run): start at these weight and activation bits and lower them one bit "
            "at a time to --weight_bits/--activation_bits within the first --anneal_fraction of the schedule."
        },
    )
    anneal_fraction: float = field(
        default=0.25, metadata={"help": "Share of the schedule over which --anneal_from_bits falls to the targets."}
    )
    oscillation_dampening: float = field(
        default=0.0,
        metadata={"help": "Weight of Nagel et al.'s oscillation dampening loss (0: off)."},
    )
    oscillation_freeze_threshold: float | None = field(
        default=None,
        metadata={"help": "Freeze weights whose oscillation frequency (EMA) passes this (Nagel et al.: 0.01-0.04)."},
    )
    target_size_mb: float | None = field(
        default=None,
        metadata={
            "help": "Mixed precision: per-layer weight bits chosen from each layer's measured sensitivity so the model "
            "(paper-convention size, as the table's 'size MB') fits this many MB."
        },
    )
    target_average_weight_bits: float | None = field(
        default=None, metadata={"help": "Mixed precision for an average weight width instead of a size."}
    )
    mixed_precision_candidates: list[int] = field(
        default_factory=lambda: [2, 3, 4], metadata={"help": "Weight widths mixed precision chooses from."}
    )

    def __post_init__(self) -> None:
        if self.progressive_from_bits is not None and not 2 <= self.progressive_from_bits <= 8:
            raise ValueError(f"--progressive_from_bits must be between 2 and 8, got {self.progressive_from_bits}.")
        if not 0 < self.progressive_fraction < 1:
            raise ValueError(f"--progressive_fraction must be in (0, 1), got {self.progressive_fraction}.")
        if self.anneal_from_bits is not None and not 2 <= self.anneal_from_bits <= 8:
            raise ValueError(f"--anneal_from_bits must be between 2 and 8, got {self.anneal_from_bits}.")
        if not 0 < self.anneal_fraction < 1:
            raise ValueError(f"--anneal_fraction must be in (0, 1), got {self.anneal_fraction}.")
        if self.anneal_from_bits is not None and self.progressive_from_bits is not None:
            raise ValueError(
                "--anneal_from_bits and --progressive_from_bits are two progressive schedules: choose one."
            )
        if self.anneal_from_bits is not None and self.oscillation_freeze_threshold is not None:
            raise ValueError(
                "--oscillation_freeze_threshold cannot be combined with --anneal_from_bits: frozen codes belong to one "
                "width."
            )
        if self.oscillation_dampening < 0:
            raise ValueError(f"--oscillation_dampening must be >= 0, got {self.oscillation_dampening}.")
        if self.oscillation_freeze_threshold is not None and not 0 < self.oscillation_freeze_threshold < 1:
            raise ValueError(
                f"--oscillation_freeze_threshold must be in (0, 1), got {self.oscillation_freeze_threshold}."
            )
        if self.target_size_mb is not None and self.target_average_weight_bits is not None:
            raise ValueError("Give at most one of --target_size_mb and --target_average_weight_bits.")
        if not self.mixed_precision_candidates or not all(2 <= b <= 8 for b in self.mixed_precision_candidates):
            raise ValueError(
                f"--mixed_precision_candidates must be bit widths in [2, 8], got {self.mixed_precision_candidates}."
            )

    @property
    def mixed_precision(self) -> bool:
        return self.target_size_mb is not None or self.target_average_weight_bits is not None


@dataclass
class DistillationArguments:
    """Distillation method and its hyper-parameters (defaults: Q-DETR paper)."""

    distillation: str = field(
        default="drd",
        metadata={
            "help": f"One of {', '.join(DISTILLATION_METHODS)}, or several joined by '+' to sum their losses "
            "(e.g. drd+qskd)."
        },
    )
    drd_tau: float = field(default=0.6, metadata={"help": "FQM selection threshold τ (paper: 0.6)."})
    drd_weight: float = field(default=2.5, metadata={"help": "λ of L_GT + λ L_DRD (paper: 2.5)."})
    drd_match_giou_weight: float = field(default=2.0, metadata={"help": "μ1 of the teacher pairing (paper: 2)."})
    drd_match_l1_weight: float = field(default=5.0, metadata={"help": "μ2 of the teacher pairing (paper: 5)."})
    drd_layers: list[int] = field(
        default_factory=lambda: [-1], metadata={"help": "Decoder layers distilled (project choice: last)."}
    )
    qskd_tau: float = field(default=0.5, metadata={"help": "QSKD hard-negative GIoU threshold (project choice)."})
    qskd_top_k: int | None = field(default=None, metadata={"help": "QSKD hard negatives kept per ground truth."})
    qskd_feature_weight: float = field(default=1.0, metadata={"help": "QSKD attention-guided feature weight."})
    qskd_logits_weight: float = field(default=1.0, metadata={"help": "QSKD local logits weight (DETR's 1)."})
    qskd_boxes_weight: float = field(default=5.0, metadata={"help": "QSKD local L1 weight (DETR's 5)."})
    qskd_giou_weight: float = field(default=2.0, metadata={"help": "QSKD local GIoU weight (DETR's 2)."})
    kd_specific: bool = field(default=True, metadata={"help": "KD-DETR specific sampling (teacher's queries)."})
    kd_general: bool = field(default=True, metadata={"help": "KD-DETR general sampling (random queries)."})
    kd_temperature: float = field(default=10.0, metadata={"help": "KD-DETR KL temperature (paper: 10)."})
    kd_weighting: str = field(
        default="softmax", metadata={"help": "KD-DETR foreground weights: softmax, sigmoid, none."}
    )
    kd_num_general_queries: int | None = field(
        default=None, metadata={"help": "KD-DETR random queries per step (default: the teacher's query count)."}
    )
    ida_gamma: float = field(default=0.6, metadata={"help": "IDa-Det kept fraction of query pairs (code: 0.6)."})
    ida_weight: float = field(default=0.5, metadata={"help": "IDa-Det loss weight (code: 0.5)."})
    ida_pairing: str = field(default="fqm", metadata={"help": "IDa-Det query pairs: fqm or hungarian."})
    memory_weight: float = field(
        default=DEFAULT_MEMORY_WEIGHT,
        metadata={"help": "Weight of the encoder-memory imitation term (--distillation ...+memory; project choice)."},
    )


@dataclass
class DataArguments(DatasetArguments):
    """Data (see qdetr_hf.data.load_detection_dataset) and outputs."""

    image_size: int | None = field(
        default=None, metadata={"help": "Network input side; default: the teacher's image processor."}
    )
    num_visualized: int = field(default=8, metadata={"help": "Validation images drawn in detections.png."})
    visualization_threshold: float = field(default=0.5, metadata={"help": "Score threshold of detections.png."})


@dataclass
class DeployArguments:
    """ONNX export of the trained student and the measurements of the deployed models."""

    export_onnx: bool = field(
        default=True,
        metadata={
            "help": "Export the student to output_dir/model.onnx (integer QDQ graph) and the teacher to "
            "output_dir/_onnx/teacher.onnx, evaluate the exported student and time both with ONNX Runtime."
        },
    )
    latency_runs: int = field(default=20, metadata={"help": "Timed ONNX Runtime calls per model (median reported)."})

    def __post_init__(self) -> None:
        if self.latency_runs < 1:
            raise ValueError(f"--latency_runs must be >= 1, got {self.latency_runs}.")


TUNED_DEFAULTS_NOTE = """\
The defaults are the main job's: a 4-4-8 student of the shipped teacher on the built-in synthetic data at 128 px,
tuned for a 15-minute job on a 2-core CPU (the README's "Main job" section has the measurements). Against the paper's
long GPU runs they use batch 8, learning rate 6e-4 (paper: 1e-4) and 3,000 steps with a 12-minute training limit,
MSE-searched weight and activation steps, the DA affine fitted at calibration, and two deployment options (integer zero
points, an 8-bit residual stream). On other data start from the paper's --learning_rate 1e-4, set --max_steps for your
budget (it drops the time limit), and keep the best checkpoint by AP (the main job evaluates every --eval_steps).
Below 4 bits the best recipe measured at that width replaces parts of it (2 and 3 bits: KD-DETR plus encoder-memory
imitation at learning rate 2e-3, without KD-DETR's general query set; README "Below 4 bits"); options on the command
line still win."""

# Each value below was measured on the synthetic data (README "Main job"); every one can be overridden. A command line
# that sets its own --max_steps drops the training time limit unless it sets --max_train_minutes too
# (`run_time_limit`): the limit keeps the whole job, ONNX export included, within 15 minutes on a slower machine.
MAIN_JOB_DEFAULTS = [
    "--output_dir", "runs/qdetr-synthetic-4bit",
    "--max_steps", "3000",
    "--max_train_minutes", "12",
    "--fit_schedule_to_time_limit", "true",
    "--per_device_train_batch_size", "8",
    "--per_device_eval_batch_size", "32",
    "--learning_rate", "6e-4",
    "--weight_step_init", "mse",
    "--distribution_alignment_init", "fit",
    "--activation_offset_init", "mse",
    "--integer_zero_points", "true",
    "--backbone_residual_bits", "8",
    "--lr_scheduler_type", "cosine",
    "--warmup_steps", "50",
    "--logging_steps", "50",
    "--save_steps", "1000",
    "--save_total_limit", "1",
    "--eval_strategy", "steps",
    "--eval_steps", "1000",
    "--load_best_model_at_end", "true",
    "--metric_for_best_model", "AP",
    "--report_to", "none",
    "--dataloader_num_workers", "0",
]  # fmt: skip

LOW_BIT_DEFAULTS: dict[int, list[str]] = {
    3: ["--distillation", "kd_detr+memory", "--kd_general", "false", "--learning_rate", "2e-3"],
    2: ["--distillation", "kd_detr+memory", "--kd_general", "false", "--memory_weight", "10", "--learning_rate", "2e-3"],
}  # fmt: skip
"""Per ``--weight_bits``, what replaces the main job's options for a student below 4 bits: the best recipe measured at
that width within the main job's time (benchmarks/results/low_bit.md, README "Below 4 bits")."""


def _value(argv: list[str], flag: str) -> str | None:
    """The last value ``argv`` gives ``flag`` (``--max_steps``) in any spelling HfArgumentParser accepts
    (``--max-steps N``, ``--max_steps=N``); ``None`` if it is not set (``""`` if set without a value)."""
    name = flag.lstrip("-").replace("-", "_")
    found = None
    for i, arg in enumerate(argv):
        key, equals, value = arg[2:].partition("=")
        if arg.startswith("--") and key.replace("-", "_") == name:
            found = value if equals else (argv[i + 1] if i + 1 < len(argv) else "")
    return found


def _sets(argv: list[str], flag: str) -> bool:
    """Whether ``argv`` sets ``flag`` (``--max_steps``), in any spelling HfArgumentParser accepts."""
    return _value(argv, flag) is not None


def aligned_evaluation(user_argv: list[str]) -> list[str]:
    """Arguments that keep the main job's best-checkpoint selection valid: a command line that sets its own
    ``--save_steps`` but not ``--eval_steps`` evaluates at the same steps (``load_best_model_at_end`` needs the saves
    to fall on evaluations)."""
    if not _sets(user_argv, "--save_steps") or _sets(user_argv, "--eval_steps"):
        return []
    return ["--eval_steps", _value(user_argv, "--save_steps")]


def bit_width_defaults(user_argv: list[str]) -> list[str]:
    """The main job's options for the weight width the command line asks for (:data:`LOW_BIT_DEFAULTS`); options the
    command line sets itself win, since they come after these."""
    value = _value(user_argv, "--weight_bits")
    return list(LOW_BIT_DEFAULTS.get(int(value), [])) if value and value.isdigit() else []


def run_time_limit(user_argv: list[str], max_train_minutes: float | None) -> float | None:
    """The training time limit of a run: the main job's ``--max_train_minutes`` holds unless the command line sets
    its own ``--max_steps`` (a budget in steps, e.g. 50,000 on GPUs) without ``--max_train_minutes``."""
    if _sets(user_argv, "--max_steps") and not _sets(user_argv, "--max_train_minutes"):
        return None
    return max_train_minutes


def distillation_methods(value: str) -> tuple[str, ...]:
    """The methods named by ``--distillation``: one of :data:`DISTILLATION_METHODS` or several joined by ``+``.

    Raises:
        ValueError: On an unknown or repeated method, or ``none`` inside a combination.
    """
    methods = tuple(value.split("+"))
    unknown = [m for m in methods if m not in DISTILLATION_METHODS]
    if unknown:
        raise ValueError(
            f"--distillation must be one of {DISTILLATION_METHODS} or several joined by '+', got {value!r}"
        )
    if len(methods) > 1 and ("none" in methods or len(set(methods)) != len(methods)):
        raise ValueError(f"--distillation combines distinct methods other than 'none' (e.g. drd+qskd), got {value!r}")
    return methods


def method_name(value: str, kd_specific: bool = True, kd_general: bool = True) -> str:
    """The model-card name of ``--distillation`` (methods joined by ``' + '``), naming KD-DETR's one sampling set when
    ``--kd_specific`` or ``--kd_general`` turned the other off."""
    names = dict(METHOD_NAMES)
    if not (kd_specific and kd_general):
        names["kd_detr"] = f"KD-DETR ({'specific' if kd_specific else 'general'} distillation points only)"
    return " + ".join(names[m] for m in distillation_methods(value))


def build_distiller(
    args: DistillationArguments, student_dim: int | None = None, teacher_dim: int | None = None
) -> Distiller | None:
    """The distiller selected by ``--distillation`` (``student_dim``/``teacher_dim``: d_model of the two models);
    a :class:`~qdetr_hf.distillers.CombinedDistiller` for several methods joined by ``+``."""
    methods = distillation_methods(args.distillation)
    if len(methods) > 1:
        parts = [build_distiller(replace(args, distillation=m), student_dim, teacher_dim) for m in methods]
        return CombinedDistiller(parts)
    if args.distillation == "none":
        return None
    if args.distillation == "drd":
        return DRDDistiller(
            tau=args.drd_tau,
            weight=args.drd_weight,
            match_giou_weight=args.drd_match_giou_weight,
            match_l1_weight=args.drd_match_l1_weight,
            layers=tuple(args.drd_layers),
        )
    if args.distillation == "qskd":
        return QSKDDistiller(
            tau=args.qskd_tau,
            top_k=args.qskd_top_k,
            feature_weight=args.qskd_feature_weight,
            logits_weight=args.qskd_logits_weight,
            boxes_weight=args.qskd_boxes_weight,
            giou_weight=args.qskd_giou_weight,
            student_dim=student_dim,
            teacher_dim=teacher_dim,
        )
    if args.distillation == "kd_detr":
        return KDDETRDistiller(
            specific=args.kd_specific,
            general=args.kd_general,
            temperature=args.kd_temperature,
            weighting=args.kd_weighting,
            num_general_queries=args.kd_num_general_queries,
        )
    if args.distillation == "ida":
        return IDaDetDistiller(
            gamma=args.ida_gamma,
            weight=args.ida_weight,
            pairing=args.ida_pairing,
            tau=args.drd_tau,
            match_giou_weight=args.drd_match_giou_weight,
            match_l1_weight=args.drd_match_l1_weight,
        )
    if args.distillation == "memory":
        return EncoderMemoryDistiller(weight=args.memory_weight)
    raise ValueError(f"--distillation must be one of {DISTILLATION_METHODS}, got {args.distillation!r}.")


def quantization_kwargs(args: ModelArguments, stage: int | None = None) -> dict[str, Any]:
    """QDetrConfig overrides for the student (``stage=1``: Q-DETR's backbone-only first stage)."""
    kwargs: dict[str, Any] = {
        "weight_bits": args.weight_bits,
        "activation_bits": args.activation_bits,
        "attention_bits": args.attention_bits,
        "first_conv_bits": args.first_conv_bits,
        "distribution_alignment": args.distribution_alignment,
        "activation_offset": args.activation_offset,
        "activation_offset_init": args.activation_offset_init,
        "weight_step_init": args.weight_step_init,
        "distribution_alignment_init": args.distribution_alignment_init,
        "integer_zero_points": args.integer_zero_points,
        "backbone_residual_bits": args.backbone_residual_bits,
        "head_bits": args.head_bits,
    }
    if stage is not None:
        kwargs.update(quantize_backbone=True, quantize_encoder=stage == 2, quantize_decoder=stage == 2)
    return kwargs


def processor_for(teacher_path: str, image_size: int | None):
    """The teacher's image processor (or one for ``image_size``), so teacher and student see the same inputs."""
    if image_size is not None:
        return default_image_processor(image_size), image_size
    try:
        processor = AutoImageProcessor.from_pretrained(teacher_path)
    except OSError:
        logger.warning("The teacher has no image processor; using a 800 px DETR processor (set --image_size).")
        return default_image_processor(800), 800
    size = processor.size
    side = size.get("max_height") or size.get("height") or size.get("longest_edge") or size.get("shortest_edge")
    return processor, int(side)


TABLE_COLUMNS = (  # (key, title, width, format, scale)
    ("AP", "AP", 7, ".1f", 100),
    ("AP50", "AP50", 7, ".1f", 100),
    ("AP75", "AP75", 7, ".1f", 100),
    ("size_mb", "size MB", 9, ".2f", 1),
    ("speedup", "speed-up", 10, ".2f", 1),
    ("file_mb", "file MB", 9, ".2f", 1),
    ("onnx_mb", "ONNX MB", 9, ".2f", 1),
    ("latency_ms", "ORT ms", 9, ".1f", 1),
)


def format_table(rows: dict[str, dict[str, float]]) -> str:
    """The main job's table: accuracy, the paper-convention size and speed-up, and where measured the checkpoint
    size on disk, the ONNX file size and the ONNX Runtime latency ('-' where a row has no such number)."""
    header = f"{'model':<30}" + "".join(f"{title:>{width}}" for _, title, width, _, _ in TABLE_COLUMNS)
    lines = [header, "-" * len(header)]
    for name, row in rows.items():
        cells = [
            f"{'-':>{width}}"
            if key not in row
            else f"{scale * row[key]:>{width - (key == 'speedup')}{fmt}}" + "x" * (key == "speedup")
            for key, _, width, fmt, scale in TABLE_COLUMNS
        ]
        lines.append(f"{name:<30}" + "".join(cells))
    return "\n".join(lines)


def measure_deployment(
    teacher, student, output_dir: Path, image_size: int, processor, eval_dataset, eval_collator, args, threads: int
) -> dict[str, Any]:
    """Export teacher (fp32) and student (integer) to ONNX, evaluate the exported student, and measure file sizes
    and ONNX Runtime latency of both side by side (same machine, threads and input)."""
    import tempfile

    from qdetr_hf import OnnxDetector, export_onnx

    with tempfile.TemporaryDirectory() as tmp:  # the teacher's fp32 checkpoint as save_pretrained writes it
        teacher.save_pretrained(tmp)
        teacher_file_mb = (Path(tmp) / "model.safetensors").stat().st_size / 2**20
    student_onnx = export_onnx(student, output_dir / "model.onnx", image_size)
    teacher_onnx = export_onnx(teacher, output_dir / "_onnx" / "teacher.onnx", image_size)
    student_ort = OnnxDetector(student_onnx.path, processor, num_threads=threads)
    teacher_ort = OnnxDetector(teacher_onnx.path, processor, num_threads=threads)
    metrics = student_ort.evaluate(
        eval_dataset, eval_collator, area_ranges=eval_dataset.area_ranges, show_progress=True
    )
    import onnxruntime

    return {
        "threads": threads,
        "onnxruntime": onnxruntime.__version__,
        "teacher": {
            "file_mb": teacher_file_mb,
            "onnx_mb": teacher_onnx.file_mb,
            "latency_ms": teacher_ort.latency_ms(args.latency_runs),
        },
        "student": {
            "file_mb": (output_dir / "model.safetensors").stat().st_size / 2**20,
            "onnx_mb": student_onnx.file_mb,
            "latency_ms": student_ort.latency_ms(args.latency_runs),
            "metrics": {k: v for k, v in metrics.items() if "AP" in k or "AR" in k},
            "max_zero_point_rounding": student_onnx.max_zero_point_rounding,
        },
    }


def coco_metrics_for(model, dataset):
    """COCO metrics with the dataset's size buckets (scaled to the image size for the synthetic data)."""
    return make_compute_metrics(id2label=model.config.id2label, area_ranges=dataset.area_ranges)


def evaluate_model(model, training_args, eval_dataset, collator, processor) -> dict[str, float]:
    """COCO metrics of any detection model on ``eval_dataset`` (no training, no checkpoints)."""
    trainer = QDetrDistillationTrainer(
        model=model,
        args=training_args,
        eval_dataset=eval_dataset,
        data_collator=collator,
        processing_class=processor,
        compute_metrics=coco_metrics_for(model, eval_dataset),
    )
    metrics = trainer.evaluate()
    return {k.removeprefix("eval_"): v for k, v in metrics.items() if "AP" in k or "AR" in k}


@torch.no_grad()
def visualize(model, dataset, collator, path: Path, count: int, threshold: float) -> Path:
    """Save a PNG grid of ``model``'s detections on the first ``count`` examples, each beside its ground truth."""
    examples = [dataset[i] for i in range(min(count, len(dataset)))]
    batch = collator(examples)
    device = next(model.parameters()).device
    model.eval()
    outputs = model(pixel_values=batch["pixel_values"].to(device), pixel_mask=batch["pixel_mask"].to(device))
    sizes = torch.tensor([[ex["image"].height, ex["image"].width] for ex in examples])
    detections = post_process_detections(outputs.logits.float().cpu(), outputs.pred_boxes.float().cpu(), sizes)
    truth = [ex["annotations"] for ex in examples] if all("annotations" in ex for ex in examples) else None
    return save_detection_grid(
        [ex["image"] for ex in examples],
        detections,
        model.config.id2label,
        path,
        threshold=threshold,
        ground_truth=truth,
    )


def train_student(
    model_args,
    distill_args,
    training_args,
    student,
    teacher,
    train_dataset,
    eval_dataset,
    collator,
    processor,
    checkpoint: str | None = None,
    low_bit: LowBitArguments | None = None,
) -> QDetrDistillationTrainer:
    low_bit = low_bit or LowBitArguments()
    distiller = build_distiller(distill_args, student.config.d_model, teacher.config.d_model)
    if low_bit.oscillation_dampening > 0:
        dampening = OscillationDampening(low_bit.oscillation_dampening)
        distiller = dampening if distiller is None else CombinedDistiller([distiller, dampening])
    trainer = QDetrDistillationTrainer(
        model=student,
        args=training_args,
        teacher_model=teacher,
        distiller=distiller,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=collator,
        processing_class=processor,
        compute_metrics=coco_metrics_for(student, eval_dataset),
    )
    trainer.oscillation = OscillationTracker(student, freeze_threshold=low_bit.oscillation_freeze_threshold)
    trainer.add_callback(trainer.oscillation)
    if low_bit.anneal_from_bits is not None:
        trainer.add_callback(BitWidthAnnealing(student, low_bit.anneal_from_bits, low_bit.anneal_fraction))
    if checkpoint:
        logger.info(f"Resuming from {checkpoint}")
    trainer.train(resume_from_checkpoint=checkpoint)
    return trainer


def choose_layer_bits(student_init, student_kwargs, low_bit, calibration_loader, image_size) -> dict[str, int]:
    """Per-layer weight bits for --target_size_mb / --target_average_weight_bits, from each layer's measured
    sensitivity on two calibration batches (the 8-bit first convolution keeps its width)."""
    probe = QDetrForObjectDetection.from_pretrained(student_init, **student_kwargs)
    names = list(quantized_layers(probe))[1:] if probe.config.quantize_backbone else None
    sensitivities = layer_sensitivity(probe, calibration_loader, low_bit.mixed_precision_candidates, show_progress=True)
    bits = choose_bit_widths(
        probe,
        None,
        target_size_mb=low_bit.target_size_mb,
        target_average_bits=low_bit.target_average_weight_bits,
        image_size=image_size,
        sensitivities=sensitivities,
        layers=names,
    )
    logger.info(
        f"Mixed precision: average weight width {average_weight_bits(bits, probe):.2f} bits over {len(bits)} layers"
    )
    return bits


def step_change(calibrated: dict[str, torch.Tensor], model) -> dict[str, float]:
    """Per layer group, the median relative change of the per-channel weight steps from calibration to the end of
    training (how far training moved the quantization grids)."""
    changes: dict[str, list[torch.Tensor]] = {}
    for name, layer in quantized_layers(model).items():
        if name in calibrated and calibrated[name].shape == layer.weight_quantizer.step.shape:
            ratio = layer.weight_quantizer.step.detach().cpu() / calibrated[name].cpu()
            changes.setdefault(layer_group(name), []).append((ratio - 1).abs().flatten())
    return {group: float(torch.cat(values).median()) for group, values in changes.items()}


def run_settings(model_args, distill_args, data_args, low_bit_args=None) -> dict[str, Any]:
    """What defines the trained student (model, bits, method, data): a run in an output folder resumes only under
    the same settings (see ``prepare_output_dir``); budgets such as --max_steps may change."""
    data = {k: getattr(data_args, k) for k in ("dataset_name", "dataset_format", "train_split", "image_size")}
    if data_args.dataset_name == "synthetic":
        data["num_train_images"] = data_args.num_train_images
        if data_args.synthetic_seed is not None:  # (absent otherwise, so that earlier runs still resume)
            data["synthetic_seed"] = data_args.synthetic_seed
    return {
        **{f"model.{k}": v for k, v in asdict(model_args).items()},
        **{f"low_bit.{k}": v for k, v in asdict(low_bit_args or LowBitArguments()).items()},
        **{f"distillation.{k}": v for k, v in asdict(distill_args).items()},
        **{f"data.{k}": v for k, v in data.items()},
    }


def first_stage_arguments(
    training_args: QDetrTrainingArguments, fraction: float, folder: str = "_stage1"
) -> QDetrTrainingArguments:
    """Training arguments of a first stage (Q-DETR's backbone-only stage, or the higher-bit stage of a progressive
    schedule) in ``output_dir/<folder>``: its share of the steps and of the time limit, never pushed to the Hub (the
    final model is)."""
    minutes = training_args.max_train_minutes
    return replace(
        training_args,
        output_dir=str(Path(training_args.output_dir) / folder),
        max_steps=max(1, math.ceil(training_args.max_steps * fraction)),
        max_train_minutes=None if minutes is None else minutes * fraction,
        push_to_hub=False,
        resume_from_checkpoint=None,
    )


def run_first_stage(stage_args, training_args, train, **kwargs) -> QDetrDistillationTrainer:
    """Train a first stage (resuming its own last checkpoint), then give the final stage the remaining steps and the
    remaining time limit."""
    stage_dir = Path(stage_args.output_dir)
    stage_checkpoint = get_last_checkpoint(str(stage_dir)) if stage_dir.is_dir() else None
    started = time.monotonic()
    trainer = train(training_args=stage_args, checkpoint=stage_checkpoint, **kwargs)
    training_args.max_steps = max(1, training_args.max_steps - stage_args.max_steps)
    if training_args.max_train_minutes is not None:  # the stages share the time limit
        used = (time.monotonic() - started) / 60
        training_args.max_train_minutes = max(training_args.max_train_minutes - used, 1e-6)
    return trainer


def build_parser() -> HfArgumentParser:
    """The command line: every argument dataclass of this script, with the main job's defaults in the epilog."""
    return HfArgumentParser(
        (
            ModelArguments,
            LowBitArguments,
            DistillationArguments,
            DataArguments,
            DeployArguments,
            QDetrTrainingArguments,
        ),
        description=__doc__.split("\n\n")[0],
        epilog=TUNED_DEFAULTS_NOTE,
    )


def parse_arguments(parser: HfArgumentParser, user_argv: list[str]) -> tuple:
    """The argument dataclasses of ``user_argv`` on top of the main job's defaults (:data:`MAIN_JOB_DEFAULTS`, then
    :data:`LOW_BIT_DEFAULTS` for the weight width asked for); the command line's own options win."""
    parsed = parser.parse_args_into_dataclasses(
        MAIN_JOB_DEFAULTS + bit_width_defaults(user_argv) + aligned_evaluation(user_argv) + user_argv
    )
    training_args = parsed[-1]
    training_args.max_train_minutes = run_time_limit(user_argv, training_args.max_train_minutes)
    return parsed


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = build_parser()
    user_argv = sys.argv[1:] if argv is None else list(argv)
    model_args, low_bit_args, distill_args, data_args, deploy_args, training_args = parse_arguments(parser, user_argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if not training_args.should_log:
        logging.getLogger().setLevel(logging.WARNING)
    try:
        distillation_methods(distill_args.distillation)
    except ValueError as error:
        parser.error(str(error))
    if model_args.two_stage and low_bit_args.progressive_from_bits is not None:
        parser.error("--two_stage and --progressive_from_bits are both first stages: choose one.")
    if model_args.two_stage and low_bit_args.anneal_from_bits is not None:
        parser.error("--two_stage and --anneal_from_bits are both schedules of the widths: choose one.")
    if low_bit_args.anneal_from_bits is not None and low_bit_args.anneal_from_bits <= min(
        model_args.weight_bits, model_args.activation_bits
    ):
        parser.error(
            f"--anneal_from_bits {low_bit_args.anneal_from_bits} must be above --weight_bits or --activation_bits "
            f"({model_args.weight_bits}, {model_args.activation_bits}): there is nothing to anneal."
        )
    set_seed(training_args.seed)
    threads = configure_cpu_threads(training_args)
    logger.info(f"PyTorch uses {threads} CPU thread(s) per process")
    started = time.time()
    output_dir = Path(training_args.output_dir)
    with training_args.main_process_first(desc="output folder"):
        checkpoint = prepare_output_dir(
            output_dir,
            run_settings(model_args, distill_args, data_args, low_bit_args),
            overwrite=training_args.overwrite_output_dir,
            resume_from_checkpoint=training_args.resume_from_checkpoint,
            write=training_args.should_save,
        )

    processor, image_size = processor_for(model_args.teacher_model_name_or_path, data_args.image_size)
    train_dataset, eval_dataset = data_args.load(image_size, training_args.seed)
    collator = DetrCollator(processor, augment=data_args.augment)
    eval_collator = DetrCollator(processor)
    teacher = load_teacher(model_args.teacher_model_name_or_path)
    logger.info(f"Teacher {model_args.teacher_model_name_or_path}: {teacher.num_parameters() / 1e6:.2f} M parameters")
    student_init = model_args.model_name_or_path or model_args.teacher_model_name_or_path
    # The data's classes must be the teacher's and the student's, in the same order: checked before any work.
    check_label_spaces(train_dataset.id2label, teacher.config, names=("dataset", "teacher"))
    if student_init != model_args.teacher_model_name_or_path:
        check_label_spaces(
            train_dataset.id2label, AutoConfig.from_pretrained(student_init), names=("dataset", "student")
        )

    # Reference numbers before training: the teacher, and the student converted + calibrated but not trained.
    eval_args = QDetrTrainingArguments(
        output_dir=str(output_dir / "_eval"),
        per_device_eval_batch_size=training_args.per_device_eval_batch_size,
        report_to="none",
        disable_tqdm=training_args.disable_tqdm,
        use_cpu=training_args.use_cpu,
        bf16=training_args.bf16,
    )
    rows: dict[str, dict[str, float]] = {}
    teacher_metrics = evaluate_model(teacher, eval_args, eval_dataset, eval_collator, processor)

    calibration_loader = DataLoader(
        train_dataset, batch_size=training_args.per_device_train_batch_size, collate_fn=eval_collator
    )
    stage_kwargs = {
        "model_args": model_args,
        "distill_args": distill_args,
        "teacher": teacher,
        "train_dataset": train_dataset,
        "eval_dataset": eval_dataset,
        "collator": collator,
        "processor": processor,
        "low_bit": low_bit_args,
    }
    final_stage = 2 if model_args.two_stage else None
    student_kwargs = quantization_kwargs(model_args, final_stage)
    if low_bit_args.mixed_precision:
        student_kwargs["layer_weight_bits"] = choose_layer_bits(
            student_init, student_kwargs, low_bit_args, calibration_loader, image_size
        )
    student = None
    if model_args.two_stage:
        stage1_args = first_stage_arguments(training_args, model_args.stage1_fraction)
        stage1 = QDetrForObjectDetection.from_pretrained(student_init, **quantization_kwargs(model_args, stage=1))
        logger.info(f"Stage 1: backbone-only quantization for {stage1_args.max_steps} steps")
        stage1_trainer = run_first_stage(stage1_args, training_args, train_student, student=stage1, **stage_kwargs)
        # Float latent weights (not packed): stage 2 continues from exactly what stage 1 trained.
        stage1_trainer.model.save_pretrained(stage1_args.output_dir, pack_weights=False)
        processor.save_pretrained(stage1_args.output_dir)
        student_init = stage1_args.output_dir
        logger.info(f"Stage 2: full quantization for {training_args.max_steps} steps")
    elif low_bit_args.progressive_from_bits is not None:
        warm_bits = low_bit_args.progressive_from_bits
        warm_args = first_stage_arguments(training_args, low_bit_args.progressive_fraction, "_progressive")
        warm_kwargs = {
            **student_kwargs,
            "weight_bits": warm_bits,
            "activation_bits": warm_bits,
            "layer_weight_bits": None,
        }
        warm = QDetrForObjectDetection.from_pretrained(student_init, **warm_kwargs)
        logger.info(f"Progressive schedule: {warm_bits}-bit weights and activations for {warm_args.max_steps} steps")
        student = run_first_stage(warm_args, training_args, train_student, student=warm, **stage_kwargs).model
        changed = student.requantize(
            weight_bits=model_args.weight_bits,
            activation_bits=model_args.activation_bits,
            layer_weight_bits=student_kwargs.get("layer_weight_bits"),
        )
        logger.info(f"Re-quantized {len(changed)} quantizers for the final {training_args.max_steps} steps")
    if student is None:
        student = QDetrForObjectDetection.from_pretrained(student_init, **student_kwargs)
    # Calibrate now (same batches on every process) to measure the untrained student; a resumed run then loads its
    # checkpoint's quantizers over these.
    student.to(training_args.device)  # calibrate where the student trains (a GPU job calibrates on the GPU)
    calibrate(student, calibration_loader, max_batches=training_args.calibration_batches, only_uncalibrated=True)
    untrained_metrics = evaluate_model(student, eval_args, eval_dataset, eval_collator, processor)
    calibrated_steps = {
        n: layer.weight_quantizer.step.detach().clone() for n, layer in quantized_layers(student).items()
    }
    if untrained_metrics["AP"] >= teacher_metrics["AP"] - 0.005:
        logger.warning(
            f"The calibrated, untrained student already scores {100 * untrained_metrics['AP']:.1f} AP against the "
            f"teacher's {100 * teacher_metrics['AP']:.1f}: distilling pulls it towards the teacher and may make it "
            "worse. Consider a stronger teacher, or --distillation none."
        )

    trainer = train_student(training_args=training_args, student=student, checkpoint=checkpoint, **stage_kwargs)
    student_metrics = evaluate_model(trainer.model, eval_args, eval_dataset, eval_collator, processor)
    below_start = student_metrics["AP"] < untrained_metrics["AP"]
    if below_start:
        logger.warning(
            f"The trained student ({100 * student_metrics['AP']:.1f} AP) ends below its calibrated start "
            f"({100 * untrained_metrics['AP']:.1f} AP): the main job's tuned values (learning rate 6e-4) may not suit "
            "this data; try the paper's --learning_rate 1e-4 or --distillation none, and evaluate during training "
            "(--eval_strategy steps --load_best_model_at_end true) to keep the best checkpoint."
        )

    teacher_eff = efficiency_report(teacher, image_size)
    student_eff = efficiency_report(trainer.model, image_size)
    bits = trainer.model.config.bit_notation
    method = method_name(distill_args.distillation, distill_args.kd_specific, distill_args.kd_general)
    if distill_args.distillation == "drd" and model_args.distribution_alignment == "none":
        method = "DRD distillation without DA"
    if low_bit_args.oscillation_dampening > 0:
        method += " + oscillation dampening"
    if low_bit_args.oscillation_freeze_threshold is not None:
        method += " + oscillation freezing"
    if low_bit_args.progressive_from_bits is not None:
        method += f", progressive from {low_bit_args.progressive_from_bits} bits"
    if low_bit_args.anneal_from_bits is not None:
        method += f", bit widths annealed from {low_bit_args.anneal_from_bits} bits"
    student_row = f"student {bits}, {distill_args.distillation}" + (" (below start)" if below_start else "")
    for name, metrics, eff in [
        ("teacher (fp32)", teacher_metrics, teacher_eff),
        (f"student {bits}, untrained", untrained_metrics, student_eff),
        (student_row, student_metrics, student_eff),
    ]:
        rows[name] = {**metrics, "size_mb": eff.size_mb, "ops_g": eff.ops_g, "speedup": eff.speedup}

    deployment = None
    if trainer.is_world_process_zero():
        trainer.save_model(str(output_dir))  # packed b-bit weights
        if deploy_args.export_onnx:
            deployment = measure_deployment(
                teacher,
                trainer.model,
                output_dir,
                image_size,
                processor,
                eval_dataset,
                eval_collator,
                deploy_args,
                threads,
            )
            rows["teacher (fp32)"].update(deployment["teacher"])
            rows[student_row]["file_mb"] = deployment["student"]["file_mb"]
            rows[f"student {bits}, ONNX Runtime"] = {
                **deployment["student"]["metrics"],
                "onnx_mb": deployment["student"]["onnx_mb"],
                "latency_ms": deployment["student"]["latency_ms"],
            }
        else:
            rows[student_row]["file_mb"] = (output_dir / "model.safetensors").stat().st_size / 2**20
    table = format_table(rows)
    wall_time = time.time() - started
    results = {
        "teacher": public_name(model_args.teacher_model_name_or_path),
        "dataset": public_name(data_args.dataset_name),
        "image_size": image_size,
        "bits": bits,
        "method": method,
        "rows": rows,
        "efficiency": {"teacher": teacher_eff.to_dict(), "student": student_eff.to_dict()},
        "deployment": deployment,
        "wall_time_s": wall_time,
        "steps": trainer.state.global_step,
        "stopped_by_time_limit": trainer.time_limit is not None and trainer.time_limit.stopped_at_step is not None,
        "processes": training_args.world_size,
        "args": {
            "model": {k: public_name(v) if k.endswith("name_or_path") else v for k, v in asdict(model_args).items()},
            "distillation": asdict(distill_args),
            "data": {**asdict(data_args), "dataset_name": public_name(data_args.dataset_name)},
            "deploy": asdict(deploy_args),
            "low_bit": asdict(low_bit_args),
        },
        "below_calibrated_start": below_start,
        "oscillation": trainer.oscillation.summary(),
        "weight_step_change": step_change(calibrated_steps, trainer.model),
        "layer_weight_bits": trainer.model.config.layer_weight_bits,
        "average_weight_bits": average_weight_bits({}, trainer.model),
        "best_checkpoint": public_name(trainer.state.best_model_checkpoint),
    }
    if trainer.is_world_process_zero():
        print("\n" + table + "\n", flush=True)
        if results["stopped_by_time_limit"]:
            print(
                f"Training stopped at the {training_args.max_train_minutes:g}-minute limit (--max_train_minutes) after "
                f"{results['steps']} of {training_args.max_steps} steps.\n",
                flush=True,
            )
        (output_dir / "results.json").write_text(json.dumps(results, indent=2, default=str))
        png = visualize(
            trainer.model,
            eval_dataset,
            eval_collator,
            output_dir / "detections.png",
            data_args.num_visualized,
            data_args.visualization_threshold,
        )
        logger.info(f"Student detections drawn in {png}")
    trainer.model_card_data = ModelCardData(
        model_name=(training_args.hub_model_id or output_dir.name).split("/")[-1],
        teacher=public_name(model_args.teacher_model_name_or_path),
        dataset=public_name(data_args.dataset_name),
        bits=bits,
        method=method,
        metrics={k: {m: v for m, v in row.items() if m.startswith("AP")} for k, row in rows.items()},
        efficiency={"teacher (fp32)": rows["teacher (fp32)"], f"student {bits}": rows[student_row]},
        training={
            "steps": trainer.state.global_step,
            "batch size (per device)": training_args.per_device_train_batch_size,
            "processes": training_args.world_size,
            "learning rate": training_args.learning_rate,
            "two-stage schedule": model_args.two_stage,
            "distillation": distill_args.distillation,
            "wall time (min)": f"{wall_time / 60:.1f}",
            "device": str(training_args.device),
            **(
                {"training time limit (min)": training_args.max_train_minutes}
                if training_args.max_train_minutes is not None
                else {}
            ),
        },
        image_size=image_size,
        eval_split=data_args.eval_split,
        num_eval_images=len(eval_dataset),
        repo_id=training_args.hub_model_id,
        deployment=deployment,
    )
    trainer.create_model_card()
    if training_args.push_to_hub:
        trainer.push_to_hub(commit_message=f"Q-DETR {bits} student ({method})")
    return results


if __name__ == "__main__":
    main()
