#!/usr/bin/env python
"""Training and inference cost of quantization-aware training and distillation, measured in one run.

For the same student architecture and batch:

- training step (forward + backward + AdamW step), median time and peak memory, for (a) real-valued fine-tuning,
  (b) quantization-aware training (4-4-8 + DA), (c) QAT + DRD distillation with the teacher, and the ratios
  (b)/(a), (c)/(a);
- inference latency and peak memory of the real-valued model vs the fake-quantized one;
- the fake-quantizer itself: our fused autograd function vs the usual LSQ formulation (``grad_scale`` /
  ``round_pass`` helpers, as in public LSQ code), forward + backward on a typical activation tensor;
- the efficiency accounting (size, OPs, theoretical speed-up) of the benchmark models and of a DETR-R50 built
  in-process at 800 x 1333.

Every configuration runs in its own subprocess, so peak memory (max RSS on CPU, max allocated on CUDA) is its own.

With ``--baseline_src`` the QAT + distillation steps (``--compare_configs``: ``train_qat_<method>`` for DRD, QSKD,
KD-DETR, IDa-Det) are also measured with another version of the package, imported from that ``src`` folder,
alternating with this one over ``--compare_rounds`` rounds in the same session (the machine's load drifts); the
results get the per-round medians and the ratio of the two versions.

    python benchmarks/speed.py                       # writes benchmarks/results/speed.json and speed.md
    python benchmarks/speed.py --quick --output_dir /tmp/speed
    git archive <commit> src | tar -x -C /tmp/base && python benchmarks/speed.py --baseline_src /tmp/base/src
    python benchmarks/speed.py --compare_only --baseline_src /tmp/base/src   # add only the comparison
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
TEACHER = ROOT / "examples" / "teacher-synthetic"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _timed(fn, steps: int, warmup: int, device: torch.device) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def _batch(batch_size: int, image_size: int, device: torch.device):
    from qdetr_hf.data import DetrCollator, SyntheticShapesDataset, default_image_processor

    dataset = SyntheticShapesDataset(num_images=batch_size, image_size=image_size, seed=123)
    batch = DetrCollator(default_image_processor(image_size))([dataset[i] for i in range(batch_size)])
    batch["pixel_values"] = batch["pixel_values"].to(device)
    batch["pixel_mask"] = batch["pixel_mask"].to(device)
    batch["labels"] = [{k: v.to(device) for k, v in label.items()} for label in batch["labels"]]
    return batch


def _models(teacher_path: str | Path, device: torch.device):
    from transformers import DetrForObjectDetection

    from qdetr_hf import QDetrForObjectDetection

    teacher = DetrForObjectDetection.from_pretrained(teacher_path, attn_implementation="eager").to(device)
    student = QDetrForObjectDetection.from_pretrained(teacher_path, weight_bits=4, activation_bits=4).to(device)
    return teacher, student


def measure(
    config: str, steps: int, warmup: int, batch_size: int, image_size: int, teacher_path: str | Path = TEACHER
) -> dict[str, Any]:
    """Run one configuration in this process and return its timings (called in a subprocess)."""
    from qdetr_hf import calibrate
    from qdetr_hf.distillers import DISTILLERS
    from qdetr_hf.trainer import QDetrDistillationTrainer, QDetrTrainingArguments

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch = _batch(batch_size, image_size, device)
    teacher, student = _models(teacher_path, device)
    calibrate(student, [batch])

    if config.startswith("infer"):
        model = teacher if config == "infer_fp" else student
        model.eval()
        images = {"pixel_values": batch["pixel_values"], "pixel_mask": batch["pixel_mask"]}

        def step():
            with torch.no_grad():
                model(**images)

    else:
        model = teacher if config == "train_fp" else student
        model.train()
        args = QDetrTrainingArguments(
            output_dir="/tmp/qdetr-speed", report_to="none", use_cpu=device.type == "cpu", disable_tqdm=True
        )
        method = config.removeprefix("train_qat_") if config.startswith("train_qat_") else None
        trainer = QDetrDistillationTrainer(
            model=model,
            args=args,
            teacher_model=teacher if method else None,
            distiller=DISTILLERS[method]() if method else None,
        )
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

        def step():
            loss = trainer.compute_loss(model, batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = _timed(step, steps, warmup, device)
    import qdetr_hf

    return {
        "config": config,
        "package": str(Path(qdetr_hf.__file__).resolve().parent),
        "median_s": statistics.median(times),
        "min_s": min(times),
        "steps": steps,
        "peak_memory_mb": _peak_memory_mb(device),
        "device": str(device),
    }


def naive_lsq(x: torch.Tensor, step: torch.Tensor, offset: torch.Tensor, qn: float, qp: float) -> torch.Tensor:
    """The usual LSQ+ formulation with straight-through helpers (reference for the fused kernel's gain)."""

    def grad_scale(t: torch.Tensor, scale: float) -> torch.Tensor:
        return (t - t * scale).detach() + t * scale

    def round_pass(t: torch.Tensor) -> torch.Tensor:
        return (t.round() - t).detach() + t

    g = 1.0 / math.sqrt(x[0].numel() * qp)
    s = grad_scale(step, g)
    z = grad_scale(offset, g)
    return round_pass(((x - z) / s).clamp(qn, qp)) * s + z


def measure_fake_quant(steps: int, warmup: int) -> dict[str, Any]:
    from qdetr_hf.quantization import lsq_fake_quantize

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    x = torch.randn(16, 64, 128, device=device, requires_grad=True)  # e.g. (batch, tokens, d_model)
    step = torch.tensor(0.05, device=device, requires_grad=True)
    offset = torch.tensor(0.01, device=device, requires_grad=True)
    grad = torch.randn_like(x)
    g = 1.0 / math.sqrt(x[0].numel() * 7)

    def fused():
        lsq_fake_quantize(x, step, offset, -8.0, 7.0, g).backward(grad)

    def naive():
        naive_lsq(x, step, offset, -8.0, 7.0).backward(grad)

    out = {}
    for name, fn in (("fused", fused), ("naive", naive)):
        times = _timed(fn, steps, warmup, device)
        out[f"{name}_median_ms"] = 1000 * statistics.median(times)
    out["speedup"] = out["naive_median_ms"] / out["fused_median_ms"]
    out["tensor"] = list(x.shape)
    # Same numbers either way (checked here so the comparison is fair).
    x.grad = step.grad = offset.grad = None
    a = lsq_fake_quantize(x, step, offset, -8.0, 7.0, g)
    b = naive_lsq(x, step, offset, -8.0, 7.0)
    out["max_abs_difference"] = float((a - b).abs().max())
    return out


def efficiency(teacher_path: str | Path = TEACHER) -> dict[str, Any]:
    from transformers import DetrConfig, DetrForObjectDetection

    from qdetr_hf import QDetrConfig, QDetrForObjectDetection
    from qdetr_hf.efficiency import efficiency_report

    rows: dict[str, Any] = {}
    teacher = DetrForObjectDetection.from_pretrained(teacher_path)
    rows["synthetic teacher (fp32), 128 px"] = efficiency_report(teacher, 128).to_dict()
    for bits in (4, 3, 2):
        student = QDetrForObjectDetection.from_pretrained(teacher_path, weight_bits=bits, activation_bits=bits)
        rows[f"synthetic student {bits}-{bits}-8, 128 px"] = efficiency_report(student, 128).to_dict()
    rows["DETR-R50 (fp32), 800 x 1333"] = efficiency_report(
        DetrForObjectDetection(DetrConfig(num_labels=91)), (800, 1333)
    ).to_dict()
    for bits in (4, 3, 2):
        config = QDetrConfig(num_labels=91, weight_bits=bits, activation_bits=bits)
        rows[f"DETR-R50 {bits}-{bits}-8, 800 x 1333"] = efficiency_report(
            QDetrForObjectDetection(config), (800, 1333)
        ).to_dict()
    return rows


PAPER_R50 = {4: (19.92, 13.02), 3: (15.03, 7.61), 2: (10.03, 5.32)}


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [
        "# Cost of QAT and distillation",
        "",
        f"Machine: {m['device']}, {m['cpu_count']} CPU cores, torch {m['torch']} ({m['platform']}). Student: the "
        f"synthetic teacher's architecture at 4-4-8 with DA; batch {results['batch_size']} of "
        f"{results['image_size']} px images; median of {results['steps']} steps after {results['warmup']} warm-up.",
        "",
        "| configuration | median step (ms) | ratio to (a) | peak memory (MB) |",
        "|---|---|---|---|",
    ]
    base = results["runs"]["train_fp"]["median_s"]
    names = {
        "train_fp": "(a) real-valued fine-tuning",
        "train_qat": "(b) quantization-aware training",
        "train_qat_drd": "(c) QAT + DRD distillation (teacher forward included)",
        "infer_fp": "inference, real-valued",
        "infer_qat": "inference, fake-quantized",
    }
    for key, label in names.items():
        run = results["runs"][key]
        ratio = (
            f"{run['median_s'] / base:.2f}x"
            if key.startswith("train")
            else (f"{run['median_s'] / results['runs']['infer_fp']['median_s']:.2f}x vs fp")
        )
        lines.append(f"| {label} | {1000 * run['median_s']:.1f} | {ratio} | {run['peak_memory_mb']:.0f} |")
    fq = results["fake_quant"]
    lines += [
        "",
        f"Fake quantizer, forward + backward on a {tuple(fq['tensor'])} tensor: fused autograd function "
        f"{fq['fused_median_ms']:.3f} ms vs the usual grad_scale/round_pass formulation {fq['naive_median_ms']:.3f} ms "
        f"({fq['speedup']:.2f}x; outputs equal to {fq['max_abs_difference']:.1e}).",
        "",
        "## Efficiency accounting (paper conventions)",
        "",
        "| model | size (MB) | OPs (G) | theoretical speed-up | memory saving | paper (size / OPs) |",
        "|---|---|---|---|---|---|",
    ]
    for name, rep in results["efficiency"].items():
        paper = ""
        if name.startswith("DETR-R50"):
            bits = name.split()[1]
            if bits == "(fp32),":
                paper = "159.32 / 85.51"
            else:
                b = int(bits.split("-")[0])
                paper = f"{PAPER_R50[b][0]} / {PAPER_R50[b][1]}"
        lines.append(
            f"| {name} | {rep['size_mb']:.2f} | {rep['ops_g']:.3f} | {rep['speedup']:.2f}x | "
            f"{rep['memory_saving']:.2f}x | {paper} |"
        )
    lines += [
        "",
        "The theoretical speed-up counts b-bit multiply-accumulates at 1/4, 1/8, 1/16, 1/32 of a real one (8, 4, 3, 2 "
        "bits); the measured fake-quantized inference above is *slower* than real-valued, since it computes in "
        "float32 and adds the quantizers. Real gains need low-bit kernels (int8 in practice).",
    ]
    comparison = results.get("comparison")
    if comparison:
        lines += [
            "",
            "## Against another version of the package",
            "",
            f"{comparison['label']}. Measured in the same session, alternating the two versions over "
            f"{comparison['rounds']} rounds (median step of each round, then the median of the rounds); ratio < 1: "
            "this version is faster.",
            "",
            "| configuration | baseline (ms) | this version (ms) | ratio | per-round ratios |",
            "|---|---|---|---|---|",
        ]
        for config, row in comparison["configs"].items():
            rounds = ", ".join(f"{r:.2f}" for r in row["round_ratios"])
            lines.append(
                f"| {config} | {1000 * row['baseline_s']:.1f} | {1000 * row['current_s']:.1f} | {row['ratio']:.2f} | "
                f"{rounds} |"
            )
    return "\n".join(lines) + "\n"


COMPARE_CONFIGS = ("train_qat_drd", "train_qat_qskd", "train_qat_kd_detr", "train_qat_ida")


def _run_config(config: str, args: argparse.Namespace, src: Path | None = None) -> dict[str, Any]:
    """Measure ``config`` in a subprocess; ``src`` puts another copy of the package first on its import path."""
    command = [sys.executable, __file__, "--_measure", config, "--steps", str(args.steps)]
    command += ["--warmup", str(args.warmup), "--batch_size", str(args.batch_size)]
    command += ["--image_size", str(args.image_size), "--teacher", args.teacher]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if src is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(src), env.get("PYTHONPATH")) if p)
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{config} failed:\n{result.stderr[-3000:]}")
    run = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"{config}{' (baseline)' if src else ''}: {1000 * run['median_s']:.1f} ms", flush=True)
    return run


def compare(args: argparse.Namespace) -> dict[str, Any]:
    """Step times of ``args.compare_configs`` with the baseline package and this one, alternating per round."""
    baseline_src = args.baseline_src.resolve()
    if not (baseline_src / "qdetr_hf" / "__init__.py").is_file():
        raise SystemExit(f"--baseline_src must be a src folder holding qdetr_hf/, got {baseline_src}")
    configs: dict[str, Any] = {}
    for config in args.compare_configs:
        baseline, current = [], []
        for _ in range(args.compare_rounds):
            baseline.append(_run_config(config, args, baseline_src))
            current.append(_run_config(config, args))
        if not all(run["package"].startswith(str(baseline_src)) for run in baseline):
            raise RuntimeError(f"the baseline runs did not import qdetr_hf from {baseline_src}")
        base_s = statistics.median(run["median_s"] for run in baseline)
        current_s = statistics.median(run["median_s"] for run in current)
        configs[config] = {
            "baseline_s": base_s,
            "current_s": current_s,
            "ratio": current_s / base_s,
            "round_ratios": [c["median_s"] / b["median_s"] for b, c in zip(baseline, current)],
            "baseline_runs": baseline,
            "current_runs": current,
        }
    return {"label": args.baseline_label, "rounds": args.compare_rounds, "configs": configs}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--image_size", type=int, default=128)
    parser.add_argument("--output_dir", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--teacher", default=str(TEACHER), help="Teacher folder (its architecture is the student's).")
    parser.add_argument("--quick", action="store_true", help="2 steps, batch 2 (smoke test).")
    parser.add_argument(
        "--baseline_src", type=Path, default=None, help="src folder of another package version to compare with."
    )
    parser.add_argument(
        "--baseline_label",
        default="Baseline: another version of the package",
        help="Sentence naming the baseline and what changed since (written into speed.md).",
    )
    parser.add_argument("--compare_configs", nargs="+", default=list(COMPARE_CONFIGS), choices=COMPARE_CONFIGS)
    parser.add_argument("--compare_rounds", type=int, default=3)
    parser.add_argument(
        "--compare_only",
        action="store_true",
        help="Only measure the comparison with --baseline_src and add it to the existing speed.json / speed.md.",
    )
    parser.add_argument("--_measure", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.batch_size = 2, 1, 2
    if args._measure:
        print(
            json.dumps(measure(args._measure, args.steps, args.warmup, args.batch_size, args.image_size, args.teacher))
        )
        return {}
    if args.compare_only:
        if args.baseline_src is None:
            raise SystemExit("--compare_only needs --baseline_src")
        path = args.output_dir / "speed.json"
        if not path.is_file():
            raise SystemExit(f"--compare_only adds to an existing {path}; run the full benchmark first")
        results = json.loads(path.read_text())
        results["comparison"] = compare(args)
        path.write_text(json.dumps(results, indent=2))
        (args.output_dir / "speed.md").write_text(markdown(results))
        return results

    runs = {
        config: _run_config(config, args)
        for config in ("train_fp", "train_qat", "train_qat_drd", "infer_fp", "infer_qat")
    }
    results = {
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "cpu_count": os.cpu_count(),
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU",
        },
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "steps": args.steps,
        "warmup": args.warmup,
        "runs": runs,
        "ratios": {
            "qat_over_fp": runs["train_qat"]["median_s"] / runs["train_fp"]["median_s"],
            "qat_drd_over_fp": runs["train_qat_drd"]["median_s"] / runs["train_fp"]["median_s"],
            "fake_quant_inference_over_fp": runs["infer_qat"]["median_s"] / runs["infer_fp"]["median_s"],
        },
        "fake_quant": measure_fake_quant(max(args.steps, 5) * 10, args.warmup),
        "efficiency": {} if args.quick else efficiency(args.teacher),
    }
    if args.baseline_src is not None:
        results["comparison"] = compare(args)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "speed.json").write_text(json.dumps(results, indent=2))
    if not args.quick:
        (args.output_dir / "speed.md").write_text(markdown(results))
    return results


if __name__ == "__main__":
    main()
