#!/usr/bin/env python
"""Students below 4 bits: where they break, and what the package's remedies buy, on the main job's data.

Two parts, both writing to benchmarks/results/low_bit.{json,md} (rows are kept when the script is run again):

- ``--part ablation``: for the shipped teacher converted at 2 and 3 bits and calibrated (untrained), the AP on
  synthetic validation images with the quantizers of one layer group switched on alone (weights only, activations
  only, both), every other quantizer off: what each group costs. For these and for trained students given with
  ``--trained`` (``--bits`` with no value skips the untrained ones), each group's activation SQNR with the whole model
  quantized: how much signal its quantizers keep before and after training.
- ``--part runs``: ``examples/distill.py`` at the main job's settings with one budget for every row: ``--steps`` (a
  step budget, so that rows compare at equal training whatever else runs on the machine) or ``--minutes`` (the main
  job's time limit, for methods whose steps cost more; such rows are kept per processor, whose speed sets their steps).
  Uniform 3-3-8 and 2-2-8 students with DRD and KD-DETR and with the remedies (progressive schedule from 4 bits,
  staged or annealed in one run, oscillation dampening and freezing, encoder-memory imitation), mixed-precision students at the uniform 3-bit and 2-bit models' sizes (with
  8-bit heads, `--head_bits`), and 3-bit and 2-bit students with other learning rates or batch sizes.
  Each row records AP, the share of oscillating weights per layer group and how far training moved the steps.

    python benchmarks/low_bit.py --part ablation
    python benchmarks/low_bit.py --part runs --steps 1600              # the main job's budget on the 2-core machine
    python benchmarks/low_bit.py --part runs --steps 6400 --rows 3-3-8  # 4x that budget, one row
    python benchmarks/low_bit.py --part runs --minutes 12 --rows "3-3-8, KD-DETR"  # the main job's time budget
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
TEACHER = ROOT / "examples" / "teacher-synthetic"
RESULTS = ROOT / "benchmarks" / "results"
WORK = ROOT / "benchmarks" / "work" / "low_bit"
GROUPS = ("stem", "backbone", "encoder attention", "encoder FFN", "decoder attention", "decoder FFN")
MAIN_JOB_STUDENT = ["--integer_zero_points", "true", "--backbone_residual_bits", "8"]
# The main job's values of every option a width's defaults in examples/distill.py (LOW_BIT_DEFAULTS) set, which every
# row runs at unless it names its own: those defaults change with what these rows find, and a committed row must still
# mean what it measured (the distillation method they set too is named by every row).
MAIN_JOB_RECIPE = ["--learning_rate", "6e-4", "--kd_general", "true", "--memory_weight", "30"]
# The seed of the synthetic images every row trains and is scored on (examples/distill.py's default seed): rows of
# other training seeds (--seed) keep them.
IMAGES_SEED = 42
QUICK_RUN = [
    "--num_train_images", "16", "--num_eval_images", "4", "--per_device_train_batch_size", "2",
    "--per_device_eval_batch_size", "2", "--calibration_batches", "1", "--num_visualized", "1", "--save_steps", "2",
    "--disable_tqdm", "true",
]  # fmt: skip


def mixed(size: str, activation_bits: int, method: str) -> list[str]:
    """A mixed-precision row: weight widths chosen for the uniform ``size`` model's size (e.g. "2-2-8"), 8-bit heads."""
    return [
        "--weight_bits", size[0], "--activation_bits", str(activation_bits), "--head_bits", "8",
        "--target_size_mb", size, "--mixed_precision_candidates", "2", "3", "4", "8", "--distillation", method,
    ]  # fmt: skip


# The 3-bit default's recipe as measured (KD-DETR + encoder-memory imitation at weight 30); its rows add a learning
# rate and what they vary.
KD_MEMORY_3BIT = [
    "--weight_bits",
    "3",
    "--activation_bits",
    "3",
    "--distillation",
    "kd_detr+memory",
    "--memory_weight",
    "30",
]

# Every row names its distillation method: below 4 bits examples/distill.py picks its own (LOW_BIT_DEFAULTS).
ROWS: dict[str, list[str]] = {
    "3-3-8": ["--weight_bits", "3", "--activation_bits", "3", "--distillation", "drd"],
    "3-3-8, progressive from 4": [
        "--weight_bits", "3", "--activation_bits", "3", "--progressive_from_bits", "4", "--distillation", "drd",
    ],
    "3-3-8, oscillation dampening + freezing": [
        "--weight_bits", "3", "--activation_bits", "3",
        "--oscillation_dampening", "0.5", "--oscillation_freeze_threshold", "0.02", "--distillation", "drd",
    ],
    "2-2-8": ["--weight_bits", "2", "--activation_bits", "2", "--distillation", "drd"],
    "2-2-8, progressive from 4": [
        "--weight_bits", "2", "--activation_bits", "2", "--progressive_from_bits", "4", "--distillation", "drd",
    ],
    "2-2-8, progressive + dampening + freezing": [
        "--weight_bits", "2", "--activation_bits", "2", "--progressive_from_bits", "4",
        "--oscillation_dampening", "0.5", "--oscillation_freeze_threshold", "0.02", "--distillation", "drd",
    ],
    "mixed precision at the 3-3-8 size, 3-bit activations": [
        "--weight_bits", "3", "--activation_bits", "3", "--target_size_mb", "3-3-8", "--distillation", "drd",
    ],
    # With the input projection and heads quantized too (--head_bits), the size they held at 32 bits per weight goes
    # to the other layers. Without it a 2-2-8-sized model has no room: 2 bits is the narrowest width.
    "mixed precision at the 3-3-8 size, 8-bit heads, 3-bit activations": mixed("3-3-8", 3, "drd"),
    "mixed precision at the 2-2-8 size, 8-bit heads, 3-bit activations": mixed("2-2-8", 3, "drd"),
    "mixed precision at the 2-2-8 size, 8-bit heads, 4-bit activations": mixed("2-2-8", 4, "drd"),
    # KD-DETR's steps cost more than DRD's (benchmarks/speed.py): compare it under a time budget (--minutes).
    "3-3-8, KD-DETR": ["--weight_bits", "3", "--activation_bits", "3", "--distillation", "kd_detr"],
    "2-2-8, KD-DETR": ["--weight_bits", "2", "--activation_bits", "2", "--distillation", "kd_detr"],
    "mixed precision at the 2-2-8 size, 8-bit heads, 3-bit activations, KD-DETR": mixed("2-2-8", 3, "kd_detr"),
    "mixed precision at the 2-2-8 size, 8-bit heads, 4-bit activations, KD-DETR": mixed("2-2-8", 4, "kd_detr"),
    "mixed precision at the 3-3-8 size, 8-bit heads, 3-bit activations, KD-DETR": mixed("3-3-8", 3, "kd_detr"),
    "mixed precision at the 3-3-8 size, 8-bit heads, 4-bit activations, KD-DETR": mixed("3-3-8", 4, "kd_detr"),
    "mixed precision at the 3-3-8 size, 8-bit heads, 4-bit activations, KD-DETR without general sampling": [
        *mixed("3-3-8", 4, "kd_detr"), "--kd_general", "false",
    ],
    # Whether the steps' slow movement within the main job's time (the rows' step-change column) holds 3-bit back.
    "3-3-8, KD-DETR, quantizer learning rate 2e-3": [
        "--weight_bits", "3", "--activation_bits", "3", "--distillation", "kd_detr", "--quantizer_learning_rate", "2e-3",
    ],
    # Whether the 3-bit student, whose AP keeps rising with steps (the 4x-budget rows), gains from the main job's
    # minutes spent differently: a larger learning rate, or half the batch for more updates.
    "3-3-8, KD-DETR, learning rate 1e-3": [
        "--weight_bits", "3", "--activation_bits", "3", "--distillation", "kd_detr", "--learning_rate", "1e-3",
    ],
    "3-3-8, KD-DETR, learning rate 2e-3": [
        "--weight_bits", "3", "--activation_bits", "3", "--distillation", "kd_detr", "--learning_rate", "2e-3",
    ],
    "3-3-8, KD-DETR, learning rate 4e-3": [
        "--weight_bits", "3", "--activation_bits", "3", "--distillation", "kd_detr", "--learning_rate", "4e-3",
    ],
    "2-2-8, KD-DETR, learning rate 2e-3": [
        "--weight_bits", "2", "--activation_bits", "2", "--distillation", "kd_detr", "--learning_rate", "2e-3",
    ],
    "mixed precision at the 2-2-8 size, 8-bit heads, 4-bit activations, KD-DETR, learning rate 2e-3": [
        *mixed("2-2-8", 4, "kd_detr"), "--learning_rate", "2e-3",
    ],
    "3-3-8, KD-DETR, batch 4": [
        "--weight_bits", "3", "--activation_bits", "3", "--distillation", "kd_detr", "--per_device_train_batch_size", "4",
    ],
    # A 3-bit student's encoder output starts far from the teacher's (README "Below 4 bits"): whether a direct target
    # for it speeds up the backbone and encoder, which otherwise learn only through the decoder.
    **{
        f"{b}-{b}-8, KD-DETR + memory imitation (weight {w}), learning rate 2e-3": [
            "--weight_bits", b, "--activation_bits", b, "--distillation", "kd_detr+memory", "--memory_weight", w,
            "--learning_rate", "2e-3",
        ]
        for b, w in (("3", "10"), ("3", "30"), ("3", "100"), ("2", "10"), ("2", "30"))
    },
    # Whether the quantizer steps, which move most at learning rate 2e-3 (the step-change column), want another rate
    # than the weights' 2e-3: the main job's slower 6e-4, or 4e-3 (at which the whole model collapsed).
    **{
        f"3-3-8, KD-DETR + memory imitation (weight 30), learning rate 2e-3, quantizer learning rate {rate}": [
            *KD_MEMORY_3BIT, "--learning_rate", "2e-3", "--quantizer_learning_rate", rate,
        ]
        for rate in ("6e-4", "4e-3")
    },
    # The progressive schedule with the 3-bit default's recipe (DRD's row halved the 3-bit steps and lost AP).
    "3-3-8, KD-DETR + memory imitation (weight 30), learning rate 2e-3, progressive: a quarter of the steps at 4-4-8": [
        *KD_MEMORY_3BIT, "--learning_rate", "2e-3", "--progressive_from_bits", "4", "--progressive_fraction", "0.25",
    ],
    # The same in one run: the widths fall from 4 to 3 bits after the first quarter of the schedule (BitWidthAnnealing).
    "3-3-8, KD-DETR + memory imitation (weight 30), learning rate 2e-3, widths annealed from 4 bits over a quarter": [
        *KD_MEMORY_3BIT, "--learning_rate", "2e-3", "--anneal_from_bits", "4", "--anneal_fraction", "0.25",
    ],
    # The two levers left at the main job's budget: a larger learning rate, made safe by a longer warm-up (4e-3
    # collapsed KD-DETR alone with 50 warm-up steps), and Nagel et al.'s oscillation handling with the default recipe.
    "3-3-8, KD-DETR + memory imitation (weight 30), learning rate 3e-3, 200 warm-up steps": [
        *KD_MEMORY_3BIT, "--learning_rate", "3e-3", "--warmup_steps", "200",
    ],
    "3-3-8, KD-DETR + memory imitation (weight 30), learning rate 2e-3, oscillation dampening + freezing": [
        *KD_MEMORY_3BIT, "--learning_rate", "2e-3", "--oscillation_dampening", "0.5", "--oscillation_freeze_threshold", "0.02",
    ],
    # The optimizer at the default's 2e-3, where clipping to DETR's norm 0.1 acts at every step (README "Below 4 bits"):
    # without clipping, or with a shorter second-moment memory (beta2 0.99: 100 steps instead of 1,000).
    **{
        f"3-3-8, KD-DETR + memory imitation (weight 30), learning rate 2e-3, {label}": [
            *KD_MEMORY_3BIT, "--learning_rate", "2e-3", *flags,
        ]
        for label, flags in (
            ("no gradient clipping", ["--max_grad_norm", "0"]),
            ("Adam beta2 0.99", ["--adam_beta2", "0.99"]),
        )
    },
    # A cheaper step: KD-DETR without its general (random-query) set, one of its two extra decoder passes; at 3 bits
    # (the 3-bit default now) and with the 2-bit default's memory weight at 2 bits.
    **{
        f"{b}-{b}-8, KD-DETR without general sampling + memory imitation (weight {w}), learning rate 2e-3": [
            "--weight_bits", b, "--activation_bits", b, "--distillation", "kd_detr+memory", "--memory_weight", w,
            "--learning_rate", "2e-3", "--kd_general", "false",
        ]
        for b, w in (("3", "30"), ("2", "10"))
    },
}  # fmt: skip


def group_of(name: str, first_layer: str) -> str:
    from qdetr_hf.oscillation import layer_group

    return "stem" if name.startswith(first_layer) else layer_group(name)


def _val(num_images: int, image_size: int):
    from qdetr_hf.data import DetrCollator, SyntheticShapesDataset, default_image_processor

    collator = DetrCollator(default_image_processor(image_size))
    return SyntheticShapesDataset(num_images=num_images, image_size=image_size, seed=1_000_000), collator


def _batches(dataset, collator, size: int = 32):
    """The validation images in collated batches of ``size``, in order."""
    for start in range(0, len(dataset), size):
        yield collator([dataset[i] for i in range(start, min(start + size, len(dataset)))])


@torch.no_grad()
def ap_with(model, quantizers_on, dataset, collator) -> float:
    """AP of ``model`` with only ``quantizers_on`` enabled."""
    from qdetr_hf.metrics import make_compute_metrics
    from qdetr_hf.quantization import quantization_disabled

    evaluator = make_compute_metrics(id2label=model.config.id2label, area_ranges=dataset.area_ranges)
    with quantization_disabled(model):
        for quantizer in quantizers_on:
            quantizer.enabled = True
        for batch in _batches(dataset, collator):
            out = model(pixel_values=batch["pixel_values"], pixel_mask=batch["pixel_mask"])
            evaluator.update(({}, out.logits, out.pred_boxes), batch["labels"])
    return evaluator.compute()["AP"]


def _quantizers_by_group(model) -> dict[str, dict[str, list]]:
    """The model's weight and activation quantizers per layer group (``GROUPS``)."""
    from qdetr_hf.quantization import LSQActivationQuantizer, LSQWeightQuantizer, quantizers

    first = next(name for name, m in model.named_modules() if type(m).__name__ == "QuantConv2d")
    by_group: dict[str, dict[str, list]] = {g: {"weights": [], "activations": []} for g in GROUPS}
    for name, quantizer in quantizers(model):
        layer = name.rsplit(".", 1)[0]
        for suffix in (".attn_quantizer", ".output_quantizer"):
            layer = layer.replace(suffix, "")
        group = group_of(layer, first)
        kind = "weights" if isinstance(quantizer, LSQWeightQuantizer) else "activations"
        if isinstance(quantizer, (LSQWeightQuantizer, LSQActivationQuantizer)) and group in by_group:
            by_group[group][kind].append(quantizer)
    return by_group


def ablation(model, dataset, collator) -> dict[str, Any]:
    """Per layer group, the AP with only its weight quantizers, only its activation quantizers, or both, enabled."""
    model.eval()
    by_group = _quantizers_by_group(model)
    every = [q for parts in by_group.values() for qs in parts.values() for q in qs]
    result = {"real-valued": ap_with(model, [], dataset, collator), "all": ap_with(model, every, dataset, collator)}
    for group, parts in by_group.items():
        result[group] = {
            "weights": ap_with(model, parts["weights"], dataset, collator),
            "activations": ap_with(model, parts["activations"], dataset, collator),
            "both": ap_with(model, parts["weights"] + parts["activations"], dataset, collator),
        }
    return result


@torch.no_grad()
def activation_sqnr(model, dataset, collator) -> dict[str, float]:
    """Per layer group, the signal-to-quantization-noise ratio in dB of its activation quantizers with the whole model
    quantized, ``10 log10(sum x^2 / sum (Q(x) - x)^2)`` over their inputs on ``dataset``: how much of the signal the
    quantizers keep at the model's own operating point, comparable before and after training (unlike the ablation's
    AP, whose real-valued reference a trained student no longer has: its weights adapted to quantized inputs)."""
    model.eval()
    sums = {g: torch.zeros(2, dtype=torch.float64) for g in GROUPS}
    handles = []
    for group, parts in _quantizers_by_group(model).items():

        def accumulate(module, args, out, acc=sums[group]):
            x = args[0].double()
            acc += torch.stack([x.square().sum(), (out.double() - x).square().sum()])

        handles += [q.register_forward_hook(accumulate) for q in parts["activations"]]
    try:
        for batch in _batches(dataset, collator):
            model(pixel_values=batch["pixel_values"], pixel_mask=batch["pixel_mask"])
    finally:
        for handle in handles:
            handle.remove()
    return {g: 10 * torch.log10(s[0] / s[1]).item() for g, s in sums.items() if s[1] > 0}


@torch.no_grad()
def memory_error(model, teacher, dataset, collator) -> float:
    """The relative squared error of ``model``'s encoder memory against ``teacher``'s over ``dataset``
    (:func:`qdetr_hf.distillers.memory_imitation_loss` pooled over every image): how far the quantized backbone and
    encoder start (or end) from the targets the memory-imitation term gives them."""
    from qdetr_hf.distillers import capture_decoder_inputs, memory_imitation_loss

    model.eval()
    memories: dict[str, list[torch.Tensor]] = {"model": [], "teacher": [], "mask": []}
    for batch in _batches(dataset, collator):
        images = {"pixel_values": batch["pixel_values"], "pixel_mask": batch["pixel_mask"]}
        for name, net in (("model", model), ("teacher", teacher)):
            with capture_decoder_inputs(net) as captured:
                net(**images)
            memories[name].append(captured["encoder_hidden_states"])
        memories["mask"].append(captured["encoder_attention_mask"])
    stacked = {name: torch.cat(parts) for name, parts in memories.items()}
    return memory_imitation_loss(stacked["model"], stacked["teacher"], stacked["mask"]).item()


def run_ablation(args, results: dict[str, Any]) -> None:
    from transformers import DetrForObjectDetection

    from qdetr_hf import QDetrForObjectDetection, calibrate
    from qdetr_hf.data import SyntheticShapesDataset

    dataset, collator = _val(args.num_eval_images, args.image_size)
    teacher = DetrForObjectDetection.from_pretrained(args.teacher).eval()
    num_images = 8 if args.quick else 32
    train = SyntheticShapesDataset(num_images=num_images, image_size=args.image_size, seed=0)
    batches = [collator([train[i] for i in range(j, j + 8)]) for j in range(0, num_images, 8)]
    table = results.setdefault("ablation", {})
    for bits in args.bits:
        name = f"{bits}-{bits}-8, calibrated, untrained"
        model = QDetrForObjectDetection.from_pretrained(
            args.teacher,
            weight_bits=bits,
            activation_bits=bits,
            weight_step_init="mse",
            activation_offset_init="mse",
            distribution_alignment_init="fit",
            integer_zero_points=True,
            backbone_residual_bits=8,
        )
        calibrate(model, batches)
        table[name] = {
            **ablation(model, dataset, collator),
            "activation_sqnr": activation_sqnr(model, dataset, collator),
            "memory_error": memory_error(model, teacher, dataset, collator),
        }
        print(name, json.dumps(table[name]), flush=True)
    for folder in args.trained:
        # A trained checkpoint's weights lie on their grids and were trained with quantized inputs, so the per-group
        # AP against a real-valued model says nothing: record the whole model's AP and its activations' SQNR.
        model = QDetrForObjectDetection.from_pretrained(folder).eval()
        every = [q for parts in _quantizers_by_group(model).values() for qs in parts.values() for q in qs]
        table[f"{model.config.bit_notation}, trained ({Path(folder).name})"] = {
            "all": ap_with(model, every, dataset, collator),
            "activation_sqnr": activation_sqnr(model, dataset, collator),
            "memory_error": memory_error(model, teacher, dataset, collator),
        }


def size_of(bits: str, teacher: str | Path = TEACHER, image_size: int = 128) -> float:
    """The paper-convention size (MB) of the main job's student of ``teacher`` at uniform ``bits`` (e.g. "3-3-8")."""
    from qdetr_hf import QDetrForObjectDetection
    from qdetr_hf.efficiency import efficiency_report

    w, a, _ = (int(b) for b in bits.split("-"))
    model = QDetrForObjectDetection.from_pretrained(teacher, weight_bits=w, activation_bits=a, backbone_residual_bits=8)
    return efficiency_report(model, image_size).size_mb


def cpu_model() -> str:
    """The processor's model name (/proc/cpuinfo), which a time budget's steps depend on."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor() or platform.machine()


def run_rows(args, results: dict[str, Any]) -> None:
    rows = results.setdefault("runs", {})
    cpu = cpu_model()
    # A time budget buys different steps on different processors: its rows are kept per machine.
    budget = f"{args.minutes:g} min on {cpu}" if args.minutes else f"{args.steps} steps"
    budget_tag = f"{args.minutes:g}min" if args.minutes else f"{args.steps}steps"  # in the run folders' names
    if args.seed is not None:  # another seed of a row is a row of its own, beside the default seed's
        budget, budget_tag = f"{budget}, seed {args.seed}", f"{budget_tag}-seed{args.seed}"
    for name in args.rows:
        key = f"{name} @ {budget}"
        if key in rows:
            print(f"{key}: done", flush=True)
            continue
        extra = list(ROWS[name])
        if "--target_size_mb" in extra:  # a size named by the uniform model it matches
            index = extra.index("--target_size_mb") + 1
            extra[index] = f"{size_of(extra[index], args.teacher, args.image_size):.6f}"
        output = Path(args.work_dir) / f"{name.replace(' ', '_').replace(',', '')}-{budget_tag}"
        # A time budget is the main job's: 3,000 steps under the limit, the schedule fitted to the steps it allows.
        limit = ["--max_train_minutes", f"{args.minutes:g}"] if args.minutes else []
        command = [
            sys.executable, str(ROOT / "examples" / "distill.py"), "--output_dir", str(output),
            "--max_steps", str(3000 if args.minutes else args.steps), *limit, "--export_onnx", "false",
            "--overwrite_output_dir", "true", "--teacher_model_name_or_path", str(args.teacher),
            "--image_size", str(args.image_size), *(QUICK_RUN if args.quick else []), *MAIN_JOB_STUDENT,
            *MAIN_JOB_RECIPE, *extra, *(["--seed", str(args.seed)] if args.seed is not None else []),
            "--synthetic_seed", str(IMAGES_SEED),
        ]  # fmt: skip
        started = time.time()
        subprocess.run(command, check=True)
        run = json.loads((output / "results.json").read_text())
        student = next(v for k, v in run["rows"].items() if k.startswith("student") and "untrained" not in k)
        untrained = next(v for k, v in run["rows"].items() if "untrained" in k)
        rows[key] = {
            "args": extra,
            "steps": run["steps"],
            "AP": student["AP"],
            "AP50": student["AP50"],
            "untrained_AP": untrained["AP"],
            "teacher_AP": run["rows"]["teacher (fp32)"]["AP"],
            "size_mb": student["size_mb"],
            "average_weight_bits": run["average_weight_bits"],
            "oscillation": run["oscillation"],
            "weight_step_change": run["weight_step_change"],
            "wall_time_s": time.time() - started,
            "cpu": cpu,
        }
        save(results, args.output_dir)


def save(results: dict[str, Any], output_dir: str | Path) -> None:
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "low_bit.json").write_text(json.dumps(results, indent=2))
    (output_dir / "low_bit.md").write_text(to_markdown(results))


def share_of_teacher(row: dict[str, Any]) -> str:
    """A row's AP as a share of its teacher's ("n/a" for a teacher at 0 AP, such as a test's untrained one)."""
    return f"{100 * row['AP'] / row['teacher_AP']:.1f}%" if row["teacher_AP"] > 0 else "n/a"


def to_markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [
        "# Students below 4 bits",
        "",
        f"{m['cores']} CPU cores, torch {m['torch']}. Synthetic data at 128 px, the shipped teacher, "
        "the main job's settings (DA + DRD, integer zero points, 8-bit residual stream). AP in %.",
        "",
    ]
    if "ablation" in results:
        lines += [
            "## Where it breaks: one layer group quantized at a time",
            "",
            "AP with only the named group's quantizers on (everything else real-valued); `all` = the whole model "
            "quantized, `real-valued` = no quantizer on.",
            "",
            "| model | real-valued | all | " + " | ".join(f"{g} (W / A / both)" for g in GROUPS) + " |",
            "|---" * (len(GROUPS) + 3) + "|",
        ]
        for name, row in results["ablation"].items():
            if "real-valued" not in row:
                continue
            cells = [
                f"{100 * row[g]['weights']:.1f} / {100 * row[g]['activations']:.1f} / {100 * row[g]['both']:.1f}"
                for g in GROUPS
            ]
            lines.append(
                f"| {name} | {100 * row['real-valued']:.1f} | {100 * row['all']:.1f} | " + " | ".join(cells) + " |"
            )
        lines.append("")
        sqnr_rows = {name: row for name, row in results["ablation"].items() if "activation_sqnr" in row}
        if sqnr_rows:
            lines += [
                "Activation quantization error per layer group, the whole model quantized: signal-to-quantization-noise "
                "ratio in dB over the quantizers' inputs on the same images (higher keeps more of the signal; each "
                "further bit adds about 6 dB). Trained rows name their run (benchmarks/work/low_bit). Encoder memory "
                "error: the relative squared error of the encoder output against the teacher's, "
                "`sum ||s - t||^2 / sum ||t||^2` over every image token (0: the teacher's memory; '-': not measured "
                "for that row).",
                "",
                "| model | AP (all quantized) | " + " | ".join(GROUPS) + " | encoder memory error |",
                "|---" * (len(GROUPS) + 3) + "|",
            ]
            for name, row in sqnr_rows.items():
                cells = [f"{row['activation_sqnr'][g]:.1f}" if g in row["activation_sqnr"] else "-" for g in GROUPS]
                memory = f"{row['memory_error']:.2f}" if "memory_error" in row else "-"
                lines.append(f"| {name} | {100 * row['all']:.1f} | " + " | ".join(cells) + f" | {memory} |")
            lines.append("")
    if "runs" in results:
        lines += [
            "## Recipes at equal budgets",
            "",
            "Rows that name no method distil with DRD (the main job's), and rows that name no learning rate train at "
            "the main job's 6e-4. `@ N steps`: a step budget; `@ 12 min`: the main job's time limit on the named "
            "processor (2 cores; the steps column says how many it allowed). Calibrated start: the AP before training.",
            "",
            "| row | steps | AP (% of teacher) | AP50 | calibrated start | size MB | avg weight bits | oscillating weights "
            "(backbone / enc. attn / dec. attn) | median step change (backbone / enc. attn / dec. attn) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name, row in results["runs"].items():
            osc, steps = row["oscillation"], row["weight_step_change"]
            groups = ("backbone", "encoder attention", "decoder attention")
            lines.append(
                f"| {name} | {row['steps']} | {100 * row['AP']:.1f} ({share_of_teacher(row)}) | "
                f"{100 * row['AP50']:.1f} | {100 * row['untrained_AP']:.1f} | {row['size_mb']:.2f} | "
                f"{row['average_weight_bits']:.2f} | "
                + " / ".join(f"{100 * osc.get(g, {}).get('oscillating', 0):.1f}%" for g in groups)
                + " | "
                + " / ".join(f"{100 * steps.get(g, 0):.0f}%" for g in groups)
                + " |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["ablation", "runs"], required=True)
    parser.add_argument(
        "--bits",
        nargs="*",
        type=int,
        default=[3, 2],
        help="Ablation: uniform widths to convert at (none: --trained only).",
    )
    parser.add_argument("--trained", nargs="*", default=[], help="Ablation: trained student folders.")
    parser.add_argument("--num_eval_images", type=int, default=200)
    parser.add_argument("--steps", type=int, default=1600, help="Runs: the training budget of every row.")
    parser.add_argument(
        "--minutes",
        type=float,
        default=None,
        help="Runs: a training-time budget instead (the main job's: 3,000 steps under this limit); rows keep the "
        "machine to themselves.",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="Runs: the training seed (examples/distill.py's default, 42, when not given); the synthetic images stay "
        "the default seed's. Its rows are kept beside the default seed's, their budget naming the seed.",
    )
    parser.add_argument(
        "--rows", nargs="+", default=list(ROWS), choices=list(ROWS), metavar="ROW", help=f"Runs: any of {list(ROWS)}."
    )
    parser.add_argument("--teacher", default=str(TEACHER), help="Real-valued teacher (the main job's by default).")
    parser.add_argument("--image_size", type=int, default=128)
    parser.add_argument("--output_dir", default=str(RESULTS), help="Where low_bit.{json,md} are written.")
    parser.add_argument("--work_dir", default=str(WORK), help="Where the rows' training runs are written.")
    parser.add_argument("--quick", action="store_true", help="A few images and steps per row (smoke test).")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.num_eval_images < 1:
        parser.error(f"--steps and --num_eval_images must be >= 1, got {args.steps} and {args.num_eval_images}")
    if args.minutes is not None and not (math.isfinite(args.minutes) and args.minutes > 0):
        parser.error(f"--minutes must be a positive number, got {args.minutes}")
    if args.seed is not None and not 0 <= args.seed < 2**32:
        parser.error(f"--seed must be in [0, 2**32) (numpy's seeds), got {args.seed}")
    if args.quick:
        args.num_eval_images, args.steps = min(args.num_eval_images, 8), min(args.steps, 2)
    path = Path(args.output_dir) / "low_bit.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    results["machine"] = {
        "cpu": cpu_model(),
        "cores": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    if args.part == "ablation":
        run_ablation(args, results)
    else:
        run_rows(args, results)
    save(results, args.output_dir)
    print(to_markdown(results))
    return results


if __name__ == "__main__":
    main()
