#!/usr/bin/env python
"""Q-DETR's comparison (qdetr.md section 5) on our data: one real-valued teacher, students under one fixed budget.

Rows (each with AP, AP50, AP75, APs/m/l, steps, epochs, seed and wall time):

- ``fp``: the real-valued teacher fine-tuned for the same budget as the students;
- at each bit setting: ``lsq`` (plain LSQ, no offset), ``baseline`` (LSQ+), ``da`` (baseline + DA), ``fqm`` (baseline
  + DRD without DA), ``qdetr`` (DA + DRD), and the other distillers on the DA student (``qskd``, ``kd_detr``,
  ``ida``) where available.

Results are written after every row (``benchmarks/results/<dataset>.json``, then the markdown table and the PNG
chart), and each row trains in its own checkpointed folder, so an interrupted run resumes where it stopped:

    python benchmarks/accuracy.py --dataset synthetic            # all rows (the committed results)
    python benchmarks/accuracy.py --dataset bccd --bits 4-4-8
    python benchmarks/accuracy.py --dataset synthetic --quick --output_dir /tmp/bench   # smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from transformers import AutoImageProcessor, set_seed
from transformers.trainer_utils import get_last_checkpoint

from qdetr_hf import QDetrForObjectDetection, calibrate
from qdetr_hf.data import DetrCollator, load_detection_dataset
from qdetr_hf.distillers import DISTILLERS, Distiller, DRDDistiller
from qdetr_hf.metrics import make_compute_metrics
from qdetr_hf.trainer import QDetrDistillationTrainer, QDetrTrainingArguments, load_teacher

logger = logging.getLogger("benchmarks.accuracy")

ROOT = Path(__file__).resolve().parents[1]
BCCD = ROOT / ".." / "shared" / "data" / "bccd"


@dataclass
class DatasetSetup:
    """Where a benchmark dataset, its teacher and its budget come from."""

    name: str
    dataset: str
    teacher: str
    train_split: str
    eval_split: str
    steps: int
    batch_size: int
    dataset_kwargs: dict[str, Any] = field(default_factory=dict)
    eval_kwargs: dict[str, Any] = field(default_factory=dict)


# Budget: 300 steps per row, so the full suite (27 synthetic rows + 9 BCCD rows) takes about two hours of CPU time on
# a 2-core machine, as the benchmark issue asks. Students start from the teacher's weights, as in the paper.
SETUPS = {
    "synthetic": DatasetSetup(
        name="synthetic",
        dataset="synthetic",
        teacher=str(ROOT / "examples" / "teacher-synthetic"),
        train_split="train",
        eval_split="validation",
        steps=300,
        batch_size=16,
        dataset_kwargs={"num_images": 4000, "image_size": 128},
        eval_kwargs={"num_images": 200, "image_size": 128},
    ),
    "bccd": DatasetSetup(
        name="bccd",
        dataset=str(BCCD),
        teacher=str(ROOT / "benchmarks" / "teachers" / "bccd"),
        train_split="trainval",
        eval_split="test",
        steps=300,
        batch_size=8,
    ),
}

QUANTIZED_METHODS = ("lsq", "baseline", "da", "fqm", "qdetr", "qskd", "kd_detr", "ida")
METHOD_LABELS = {
    "fp": "real-valued, fine-tuned",
    "lsq": "LSQ",
    "baseline": "LSQ+ (baseline)",
    "da": "+ DA",
    "fqm": "+ FQM/DRD",
    "qdetr": "Q-DETR (DA + DRD)",
    "qskd": "DA + QSKD",
    "kd_detr": "DA + KD-DETR",
    "ida": "DA + IDa-Det",
}


def student_kwargs(method: str, bits: tuple[int, int, int]) -> dict[str, Any]:
    """QDetrConfig overrides of a method: offsets (LSQ vs LSQ+) and DA."""
    weight_bits, activation_bits, attention_bits = bits
    return {
        "weight_bits": weight_bits,
        "activation_bits": activation_bits,
        "attention_bits": attention_bits,
        "activation_offset": method != "lsq",
        "distribution_alignment": "cross_attention" if method in ("da", "qdetr", "qskd", "kd_detr", "ida") else "none",
    }


def make_distiller(method: str) -> Distiller | None:
    """The distiller of a method (each method's documented defaults), or None for plain QAT."""
    if method in ("fqm", "qdetr"):
        return DRDDistiller()
    if method in DISTILLERS:
        return DISTILLERS[method]()
    return None


def machine_description() -> dict[str, Any]:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def row_key(row: dict[str, Any]) -> str:
    return f"{row['bits']}/{row['method']}/seed{row['seed']}"


def run_row(
    setup: DatasetSetup,
    method: str,
    bits: tuple[int, int, int] | None,
    seed: int,
    steps: int,
    work_dir: Path,
    train_dataset,
    eval_dataset,
    processor,
    quick: bool,
) -> dict[str, Any]:
    """Train one row to its budget (resuming its own checkpoints) and evaluate it."""
    set_seed(seed)
    started = time.time()
    bits_name = "fp" if bits is None else "-".join(map(str, bits))
    output_dir = work_dir / f"{bits_name}-{method}-seed{seed}"
    collator = DetrCollator(processor, augment=True)
    eval_collator = DetrCollator(processor)
    teacher = distiller = None
    if method == "fp":
        model = load_teacher(setup.teacher)
    else:
        model = QDetrForObjectDetection.from_pretrained(setup.teacher, **student_kwargs(method, bits))
        distiller = make_distiller(method)
        teacher = load_teacher(setup.teacher) if distiller is not None else None
        calibrate(
            model,
            DataLoader(train_dataset, batch_size=setup.batch_size, collate_fn=eval_collator),
            max_batches=1 if quick else 4,
            only_uncalibrated=True,
        )
    args = QDetrTrainingArguments(
        output_dir=str(output_dir),
        max_steps=steps,
        per_device_train_batch_size=setup.batch_size,
        per_device_eval_batch_size=2 * setup.batch_size,
        learning_rate=1e-4,
        lr_scheduler_type="cosine",
        warmup_steps=0 if quick else 20,
        logging_steps=max(1, steps // 10),
        save_strategy="steps",
        save_steps=max(1, steps // 4),
        save_total_limit=1,
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=seed,
        dataloader_num_workers=0,
    )
    trainer = QDetrDistillationTrainer(
        model=model,
        args=args,
        teacher_model=teacher,
        distiller=distiller,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=collator,
        processing_class=processor,
        compute_metrics=make_compute_metrics(model.config.id2label, area_ranges=eval_dataset.area_ranges),
    )
    checkpoint = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
    trainer.train(resume_from_checkpoint=checkpoint)
    trainer.data_collator = eval_collator
    metrics = trainer.evaluate()
    epochs = steps * setup.batch_size / len(train_dataset)
    row = {
        "bits": bits_name if bits is not None else "32-32-32",
        "method": method,
        "label": METHOD_LABELS[method],
        "seed": seed,
        "steps": steps,
        "epochs": round(epochs, 2),
        "wall_time_s": round(time.time() - started, 1),
        "torch_threads": torch.get_num_threads(),
        "resumed_from": checkpoint,
    }
    row.update({k.removeprefix("eval_"): v for k, v in metrics.items() if "AP" in k or "AR" in k})
    return row


def row_order(row: dict[str, Any]) -> tuple:
    """Table order: real-valued first, then bits from high to low, methods in the paper's order, seeds."""
    bits = tuple(-int(b) for b in row["bits"].split("-"))
    return (bits, list(METHOD_LABELS).index(row["method"]), row["seed"])


@contextlib.contextmanager
def locked(path: Path):
    """An exclusive lock next to ``path``, so several benchmark processes can fill the same results file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def record_row(results_path: Path, row: dict[str, Any]) -> dict[str, Any]:
    """Add ``row`` to the results on disk (re-read under the lock: another process may have added rows) and rewrite
    the JSON, table and chart."""
    with locked(results_path):
        results = json.loads(results_path.read_text())
        results["rows"] = [r for r in results["rows"] if row_key(r) != row_key(row)] + [row]
        write_outputs(results, results_path.parent)
    return results


def write_outputs(results: dict[str, Any], output_dir: Path) -> None:
    name = results["dataset"]
    results["rows"] = sorted(results["rows"], key=row_order)
    atomic_write(output_dir / f"{name}.json", json.dumps(results, indent=2))
    atomic_write(output_dir / f"{name}.md", markdown_table(results))
    if results["rows"]:
        plot_chart(results, output_dir / f"{name}.png")


def markdown_table(results: dict[str, Any]) -> str:
    teacher = results["teacher"]
    lines = [
        f"# Accuracy on {results['dataset']}",
        "",
        f"Teacher `{results['teacher_path']}`: AP {100 * teacher['AP']:.1f}, AP50 {100 * teacher['AP50']:.1f}, "
        f"AP75 {100 * teacher['AP75']:.1f}. Every row: {results['steps']} steps from the teacher's weights, "
        f"batch {results['batch_size']}. Machine: {results['machine']['device']}, "
        f"{results['machine']['cpu_count']} CPU cores, torch {results['machine']['torch']}.",
        "",
        "| W-A-Attn | method | seed | AP | AP50 | AP75 | APs | APm | APl | epochs | wall time (min) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def pct(value: float) -> str:
        return "n/a" if value < 0 else f"{100 * value:.1f}"

    for row in results["rows"]:
        lines.append(
            f"| {row['bits']} | {row['label']} | {row['seed']} | {pct(row['AP'])} | {pct(row['AP50'])} | "
            f"{pct(row['AP75'])} | {pct(row['APs'])} | {pct(row['APm'])} | {pct(row['APl'])} | {row['epochs']} | "
            f"{row['wall_time_s'] / 60:.1f} |"
        )
    return "\n".join(lines) + "\n"


def plot_chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    by_method: dict[str, dict[int, list[float]]] = {}
    for row in results["rows"]:
        if row["method"] == "fp":
            continue
        bits = int(row["bits"].split("-")[0])
        by_method.setdefault(row["method"], {}).setdefault(bits, []).append(100 * row["AP"])
    for method, values in by_method.items():
        xs = sorted(values)
        ax.plot(xs, [sum(values[x]) / len(values[x]) for x in xs], marker="o", label=METHOD_LABELS[method])
    ax.axhline(100 * results["teacher"]["AP"], color="k", linestyle="--", label="teacher (real-valued)")
    fp = [r for r in results["rows"] if r["method"] == "fp"]
    if fp:
        ax.axhline(100 * fp[0]["AP"], color="gray", linestyle=":", label="real-valued, fine-tuned")
    ax.set_xlabel("weight / activation bits (attention at 8)")
    ax.set_ylabel("AP (%)")
    ax.set_xticks(sorted({b for values in by_method.values() for b in values}))
    ax.set_title(f"AP vs bits on {results['dataset']}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_bits(text: str) -> tuple[int, int, int]:
    parts = tuple(int(p) for p in text.split("-"))
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"bits must look like 4-4-8, got {text!r}")
    return parts  # type: ignore[return-value]


def plan_rows(args: argparse.Namespace) -> list[tuple[str, tuple[int, int, int] | None, int]]:
    rows: list[tuple[str, tuple[int, int, int] | None, int]] = [("fp", None, args.seeds[0])]
    for bits in args.bits:
        for method in args.methods:
            for seed in args.seeds if bits == (4, 4, 8) else args.seeds[:1]:
                rows.append((method, bits, seed))
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=sorted(SETUPS), default="synthetic")
    parser.add_argument("--bits", type=parse_bits, nargs="+", default=[(4, 4, 8), (3, 3, 8), (2, 2, 8)])
    parser.add_argument(
        "--methods", nargs="+", choices=QUANTIZED_METHODS, default=["lsq", "baseline", "da", "fqm", "qdetr"]
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="Extra seeds are run at 4-4-8 only.")
    parser.add_argument("--steps", type=int, default=None, help="Training steps per row (default: the dataset's).")
    parser.add_argument("--output_dir", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--work_dir", type=Path, default=None, help="Row checkpoints (default: benchmarks/work).")
    parser.add_argument("--teacher", default=None, help="Override the dataset's teacher (Hub id or folder).")
    parser.add_argument("--quick", action="store_true", help="A handful of steps on a few images (smoke test).")
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)

    setup = SETUPS[args.dataset]
    if args.teacher:
        setup.teacher = args.teacher
    steps = args.steps or (3 if args.quick else setup.steps)
    if args.quick:
        setup.batch_size = 2
        setup.dataset_kwargs = {**setup.dataset_kwargs, "num_images": 8} if args.dataset == "synthetic" else {}
        setup.eval_kwargs = {**setup.eval_kwargs, "num_images": 4} if args.dataset == "synthetic" else {}
    work_dir = args.work_dir or (ROOT / "benchmarks" / "work" / args.dataset)

    processor = AutoImageProcessor.from_pretrained(setup.teacher)
    train_dataset = load_detection_dataset(setup.dataset, setup.train_split, **setup.dataset_kwargs)
    eval_dataset = load_detection_dataset(setup.dataset, setup.eval_split, **setup.eval_kwargs)
    if args.quick and args.dataset != "synthetic":
        train_dataset = torch.utils.data.Subset(train_dataset, range(8))

    results_path = args.output_dir / f"{args.dataset}.json"
    results: dict[str, Any]
    if results_path.is_file():
        results = json.loads(results_path.read_text())
        if results["steps"] != steps or results["batch_size"] != setup.batch_size:
            parser.error(
                f"{results_path} holds rows trained for {results['steps']} steps at batch {results['batch_size']}, "
                f"this run would train {steps} steps at batch {setup.batch_size}: rows under different budgets "
                "cannot share a table. Pass the same --steps, or another --output_dir."
            )
    else:
        teacher = load_teacher(setup.teacher)
        teacher_trainer = QDetrDistillationTrainer(
            model=teacher,
            args=QDetrTrainingArguments(
                output_dir=str(work_dir / "_teacher_eval"),
                per_device_eval_batch_size=2 * setup.batch_size,
                report_to="none",
                disable_tqdm=True,
            ),
            eval_dataset=eval_dataset,
            data_collator=DetrCollator(processor),
            compute_metrics=make_compute_metrics(teacher.config.id2label, area_ranges=eval_dataset.area_ranges),
        )
        teacher_metrics = {k.removeprefix("eval_"): v for k, v in teacher_trainer.evaluate().items() if "AP" in k}
        results = {
            "dataset": args.dataset,
            "machine": machine_description(),
            "teacher": teacher_metrics,
            "teacher_path": os.path.relpath(setup.teacher, ROOT),
            "steps": steps,
            "batch_size": setup.batch_size,
            "rows": [],
        }
        write_outputs(results, args.output_dir)

    for method, bits, seed in plan_rows(args):
        done = {row_key(row) for row in json.loads(results_path.read_text())["rows"]}  # other processes may add rows
        key = row_key(
            {"bits": "32-32-32" if bits is None else "-".join(map(str, bits)), "method": method, "seed": seed}
        )
        if key in done:
            logger.info(f"{key}: already measured, skipping")
            continue
        logger.info(f"{key}: training {steps} steps")
        row = run_row(setup, method, bits, seed, steps, work_dir, train_dataset, eval_dataset, processor, args.quick)
        results = record_row(results_path, row)
        logger.info(f"{key}: AP {100 * row['AP']:.1f} AP50 {100 * row['AP50']:.1f} ({row['wall_time_s'] / 60:.1f} min)")
    return results


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
