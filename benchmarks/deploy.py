#!/usr/bin/env python
"""Deployed size and latency of low-bit DETRs: packed checkpoints and integer ONNX models against fp32, in one run.

For the main job's student architecture (the shipped synthetic teacher's, 128 px) and the DETR-R50 architecture
(random weights, 800 x 1333), at each bit width (4-4-8, 8-8-8, 2-2-8 by default):

- file size of the fp32 safetensors, the packed low-bit safetensors, the fp32 ONNX export and the integer ONNX export;
- median latency (batch 1, >= 20 timed calls after warm-up) with 1 and 2 threads of PyTorch fp32, PyTorch
  fake-quantized, ONNX Runtime fp32 and ONNX Runtime integer, and their ratios, all measured in the same run;
- how many quantized layers ONNX Runtime's optimised graph runs as integer kernels, and where the integer model's time
  goes (ONNX Runtime profiler: time per operator type, integer kernels vs float operators);
- for DETR-R50 at 4-4-8, ONNX Runtime's own static quantizer (``quantize_static``: QDQ, U8S8, per-channel, Conv and
  MatMul) on the fp32 export, the peer to compare with;
- for trained students (``--trained_students``, folders written by ``examples/distill.py``), the AP on synthetic
  validation images of the PyTorch model and of its export: exact with ``integer_zero_points``, with LSQ+'s
  real-valued offsets rounded to integer zero points at export otherwise.

Students are converted from the real-valued weights and calibrated (latency does not depend on training), with the
main job's deployment options: integer zero points and an 8-bit residual stream.

    python benchmarks/deploy.py                     # writes benchmarks/results/deploy.json and deploy.md
    python benchmarks/deploy.py --quick --output_dir /tmp/deploy
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
TEACHER = ROOT / "examples" / "teacher-synthetic"
STUDENT_OPTIONS = {"integer_zero_points": True, "backbone_residual_bits": 8}


def machine() -> dict[str, Any]:
    import onnx
    import onnxruntime
    import transformers

    flags = set()
    model_name = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name") and model_name in ("", platform.processor()):
                model_name = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    return {
        "cpu": model_name,
        "cores": len(os.sched_getaffinity(0)),
        "isa": {flag: flag in flags for flag in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")},
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "onnx": onnx.__version__,
        "transformers": transformers.__version__,
    }


def timed_ms(fn, runs: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def torch_latency(model, pixel_values, pixel_mask, threads: int, runs: int, warmup: int) -> float:
    torch.set_num_threads(threads)
    with torch.no_grad():
        return timed_ms(lambda: model(pixel_values=pixel_values, pixel_mask=pixel_mask), runs, warmup)


def ort_session(path, threads: int, profile: bool = False):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if profile:
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tempfile.gettempdir()) / "qdetr_deploy_profile")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ort_latency(path, feeds, threads: int, runs: int, warmup: int) -> float:
    session = ort_session(path, threads)
    return timed_ms(lambda: session.run(None, feeds), runs, warmup)


INTEGER_OPS = {"QLinearConv", "QLinearMatMul", "MatMulIntegerToFloat", "QLinearAdd", "QLinearAveragePool", "QGemm"}
FLOAT_COMPUTE_OPS = {"Conv", "FusedConv", "MatMul", "FusedMatMul", "Gemm"}


def profile_summary(path, feeds, threads: int, runs: int = 3) -> dict[str, Any]:
    """ONNX Runtime's profiler on the optimised graph: milliseconds per run by operator type, split into integer
    kernels, float compute (Conv / MatMul / Gemm) and everything else."""
    session = ort_session(path, threads, profile=True)
    for _ in range(runs + 1):
        session.run(None, feeds)
    trace = json.loads(Path(session.end_profiling()).read_text())
    by_op: dict[str, float] = collections.defaultdict(float)
    for event in trace:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            by_op[event["args"]["op_name"]] += event["dur"] / 1000 / (runs + 1)
    total = sum(by_op.values())
    groups = {
        "integer kernels": sum(v for k, v in by_op.items() if k in INTEGER_OPS),
        "float Conv/MatMul/Gemm": sum(v for k, v in by_op.items() if k in FLOAT_COMPUTE_OPS),
    }
    groups["other operators"] = total - sum(groups.values())
    top = dict(sorted(by_op.items(), key=lambda kv: -kv[1])[:12])
    return {"total_ms": total, "groups_ms": groups, "top_ops_ms": top}


def file_mb(path) -> float:
    return Path(path).stat().st_size / 2**20


def build_real(arch: str):
    from transformers import DetrConfig, DetrForObjectDetection

    torch.manual_seed(0)
    if arch == "student":
        return DetrForObjectDetection.from_pretrained(TEACHER).eval(), (128, 128)
    return DetrForObjectDetection(DetrConfig(use_pretrained_backbone=False)).eval(), (800, 1333)


def calibration_batches(arch: str, image_size):
    from qdetr_hf.data import DetrCollator, SyntheticShapesDataset, default_image_processor

    if arch == "student":
        collator = DetrCollator(default_image_processor(image_size[0]))
        data = SyntheticShapesDataset(num_images=32, image_size=image_size[0], seed=0)
        return [collator([data[i] for i in range(j, j + 8)]) for j in range(0, 32, 8)]
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(1, 3, *image_size, generator=generator) for _ in range(2)]


def exported_ap(model_dir: Path, work: Path, num_images: int) -> dict[str, Any]:
    """AP on synthetic validation images of a trained student (a folder written by ``examples/distill.py``) in
    PyTorch and as exported to ONNX (integer zero points are exact; real-valued offsets are rounded at export)."""
    from qdetr_hf import OnnxDetector, QDetrForObjectDetection, export_onnx
    from qdetr_hf.data import DetrCollator, SyntheticShapesDataset, default_image_processor
    from qdetr_hf.metrics import make_compute_metrics

    torch.set_num_threads(2)
    model = QDetrForObjectDetection.from_pretrained(model_dir).eval()
    processor = default_image_processor(128)
    collator = DetrCollator(processor)
    val = SyntheticShapesDataset(num_images=num_images, image_size=128, seed=1)
    evaluator = make_compute_metrics(id2label=model.config.id2label, area_ranges=val.area_ranges)
    for start in range(0, len(val), 16):
        batch = collator([val[i] for i in range(start, min(start + 16, len(val)))])
        with torch.no_grad():
            out = model(pixel_values=batch["pixel_values"], pixel_mask=batch["pixel_mask"])
        evaluator.update(({}, out.logits, out.pred_boxes), batch["labels"])
    path = work / f"{model_dir.name}.onnx"
    report = export_onnx(model, path, 128)
    onnx_metrics = OnnxDetector(path, processor, num_threads=2).evaluate(val, collator, 16, val.area_ranges)
    return {
        "integer_zero_points": model.config.integer_zero_points,
        "pytorch_AP": evaluator.compute()["AP"],
        "onnx_AP": onnx_metrics["AP"],
        "max_zero_point_rounding": report.max_zero_point_rounding,
    }


def run_arch(arch: str, bits_list: list[str], threads_list: list[int], runs: int, warmup: int, work: Path) -> dict:
    from qdetr_hf import QDetrForObjectDetection, calibrate, export_onnx
    from qdetr_hf.onnx_export import integer_kernel_counts

    real, image_size = build_real(arch)
    print(f"[{arch}] {image_size[0]} x {image_size[1]}", flush=True)
    real_dir = work / f"{arch}-fp32"
    real.save_pretrained(real_dir)
    fp32_onnx = export_onnx(real, work / f"{arch}-fp32.onnx", image_size)
    pixel_values = torch.randn(1, 3, *image_size, generator=torch.Generator().manual_seed(1))
    pixel_mask = torch.ones(1, *image_size, dtype=torch.long)
    feeds = {"pixel_values": pixel_values.numpy(), "pixel_mask": pixel_mask.numpy()}
    result: dict[str, Any] = {
        "image_size": list(image_size),
        "fp32": {"safetensors_mb": file_mb(real_dir / "model.safetensors"), "onnx_mb": fp32_onnx.file_mb},
        "latency_ms": {},
        "bits": {},
    }
    for threads in threads_list:
        result["latency_ms"][f"pytorch_fp32@{threads}"] = torch_latency(
            real, pixel_values, pixel_mask, threads, runs, warmup
        )
        result["latency_ms"][f"ort_fp32@{threads}"] = ort_latency(fp32_onnx.path, feeds, threads, runs, warmup)
        print(f"  fp32 @{threads}: {result['latency_ms']}", flush=True)
    for bits in bits_list:
        w, a, att = (int(b) for b in bits.split("-"))
        options = {"weight_step_init": "mse", "activation_offset_init": "mse"} if arch == "student" else {}
        student = QDetrForObjectDetection.from_pretrained(
            real_dir, weight_bits=w, activation_bits=a, attention_bits=att, **STUDENT_OPTIONS, **options
        ).eval()
        torch.set_num_threads(max(threads_list))
        calibrate(student, calibration_batches(arch, image_size))
        packed_dir = work / f"{arch}-{bits}"
        student.save_pretrained(packed_dir)
        int_onnx = export_onnx(student, work / f"{arch}-{bits}.onnx", image_size)
        kernels = integer_kernel_counts(int_onnx.path, max(threads_list))
        entry: dict[str, Any] = {
            "packed_safetensors_mb": file_mb(packed_dir / "model.safetensors"),
            "integer_onnx_mb": int_onnx.file_mb,
            "quantized_layers": int_onnx.quantized_layers,
            "optimised_graph_ops": kernels,
            "latency_ms": {},
        }
        for threads in threads_list:
            lat = entry["latency_ms"]
            lat[f"pytorch_fake_quant@{threads}"] = torch_latency(
                student, pixel_values, pixel_mask, threads, runs, warmup
            )
            lat[f"ort_integer@{threads}"] = ort_latency(int_onnx.path, feeds, threads, runs, warmup)
            lat[f"ratio_ort_fp32_over_integer@{threads}"] = (
                result["latency_ms"][f"ort_fp32@{threads}"] / lat[f"ort_integer@{threads}"]
            )
            lat[f"ratio_pytorch_fp32_over_ort_integer@{threads}"] = (
                result["latency_ms"][f"pytorch_fp32@{threads}"] / lat[f"ort_integer@{threads}"]
            )
            print(f"  {bits} @{threads}: {lat}", flush=True)
        entry[f"profile@{max(threads_list)}"] = profile_summary(int_onnx.path, feeds, max(threads_list))
        if arch == "r50" and bits == "4-4-8":
            entry["ort_quantize_static"] = ort_static_peer(
                fp32_onnx.path, feeds, image_size, threads_list, runs, warmup, work, result
            )
        result["bits"][bits] = entry
    return result


def ort_static_peer(fp32_path, feeds, image_size, threads_list, runs, warmup, work, result) -> dict[str, Any]:
    """ONNX Runtime's own static quantizer on the fp32 export (QDQ, U8S8, per-channel, Conv + MatMul)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(
                [
                    {"pixel_values": b.numpy(), "pixel_mask": feeds["pixel_mask"]}
                    for b in calibration_batches("r50", image_size)
                ]
            )

        def get_next(self):
            return next(self.batches, None)

    prepared = work / "r50-fp32-prepared.onnx"
    quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
    output = work / "r50-ort-static-u8s8.onnx"
    quantize_static(
        str(prepared),
        str(output),
        Reader(),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        per_channel=True,
        op_types_to_quantize=["Conv", "MatMul"],
    )
    peer: dict[str, Any] = {"onnx_mb": file_mb(output), "latency_ms": {}}
    for threads in threads_list:
        ms = ort_latency(output, feeds, threads, runs, warmup)
        peer["latency_ms"][f"ort_static@{threads}"] = ms
        peer["latency_ms"][f"ratio_ort_fp32_over_static@{threads}"] = result["latency_ms"][f"ort_fp32@{threads}"] / ms
    print(f"  quantize_static: {peer}", flush=True)
    return peer


def to_markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    isa = ", ".join(k for k, v in m["isa"].items() if v) or "none of the listed"
    lines = [
        "# Deployed size and latency",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores ({isa}; no VNNI unless listed), {m['platform']}; torch {m['torch']}, "
        f"ONNX Runtime {m['onnxruntime']}, onnx {m['onnx']}, transformers {m['transformers']}. Batch 1, median of "
        f"{results['runs']} timed calls after {results['warmup']} warm-up calls; every number below comes from this "
        "one run. Students: converted from the fp32 weights and calibrated (integer zero points, 8-bit residual stream).",
        "",
    ]
    names = {"student": "main-job student architecture", "r50": "DETR-R50 architecture (random weights)"}
    for arch, res in results["architectures"].items():
        h, w = res["image_size"]
        lines += [f"## {names[arch]}, {h} x {w}", "", "### Files", ""]
        lines += ["| model | safetensors (MB) | ONNX (MB) |", "|---|---|---|"]
        lines.append(f"| fp32 | {res['fp32']['safetensors_mb']:.2f} | {res['fp32']['onnx_mb']:.2f} |")
        for bits, e in res["bits"].items():
            lines.append(
                f"| {bits} (packed / integer) | {e['packed_safetensors_mb']:.2f} | {e['integer_onnx_mb']:.2f} |"
            )
        lines += ["", "### Latency (ms) and ratios", ""]
        threads_list = sorted({int(k.split("@")[1]) for k in res["latency_ms"]})
        header = "| model | " + " | ".join(f"{t} thread{'s' * (t > 1)}" for t in threads_list) + " |"
        lines += [header, "|---" * (len(threads_list) + 1) + "|"]

        def row(name: str, values: list[str], lines: list[str] = lines) -> None:
            lines.append(f"| {name} | " + " | ".join(values) + " |")

        row("PyTorch fp32", [f"{res['latency_ms'][f'pytorch_fp32@{t}']:.1f}" for t in threads_list])
        row("ONNX Runtime fp32", [f"{res['latency_ms'][f'ort_fp32@{t}']:.1f}" for t in threads_list])
        for bits, e in res["bits"].items():
            lat = e["latency_ms"]
            row(f"PyTorch fake-quantized {bits}", [f"{lat[f'pytorch_fake_quant@{t}']:.1f}" for t in threads_list])
            row(
                f"ONNX Runtime integer {bits}",
                [
                    f"{lat[f'ort_integer@{t}']:.1f} ({lat[f'ratio_ort_fp32_over_integer@{t}']:.2f}x vs ORT fp32, "
                    f"{lat[f'ratio_pytorch_fp32_over_ort_integer@{t}']:.2f}x vs PyTorch fp32)"
                    for t in threads_list
                ],
            )
            if "ort_quantize_static" in e:
                peer = e["ort_quantize_static"]["latency_ms"]
                row(
                    "ONNX Runtime quantize_static U8S8 (peer)",
                    [
                        f"{peer[f'ort_static@{t}']:.1f} ({peer[f'ratio_ort_fp32_over_static@{t}']:.2f}x)"
                        for t in threads_list
                    ],
                )
        lines += ["", "### What ONNX Runtime runs", ""]
        for bits, e in res["bits"].items():
            ops = ", ".join(f"{k} {v}" for k, v in sorted(e["optimised_graph_ops"].items()))
            prof = next(v for k, v in e.items() if k.startswith("profile@"))
            groups = ", ".join(f"{k} {v:.1f} ms" for k, v in prof["groups_ms"].items())
            top = ", ".join(f"{k} {v:.1f}" for k, v in list(prof["top_ops_ms"].items())[:8])
            lines += [
                f"- {bits}: {e['quantized_layers']} quantized layers; optimised graph: {ops}. Profile "
                f"({prof['total_ms']:.1f} ms of kernels): {groups}; largest (ms): {top}.",
            ]
        lines.append("")
    if "zero_points" in results:
        lines += [
            "## Trained students: AP in PyTorch and exported (synthetic validation images, 128 px)",
            "",
            "| student | LSQ+ offsets | PyTorch AP | ONNX Runtime AP | largest offset rounding (steps) |",
            "|---|---|---|---|---|",
        ]
        for name, v in results["zero_points"].items():
            offsets = "integer zero points" if v["integer_zero_points"] else "real-valued, rounded at export"
            lines.append(
                f"| `{name}` | {offsets} | {100 * v['pytorch_AP']:.1f} | {100 * v['onnx_AP']:.1f} | "
                f"{v['max_zero_point_rounding']:.2f} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--architectures",
        nargs="*",
        default=["student", "r50"],
        choices=["student", "r50"],
        help="Architectures to measure; none (with --trained_students) measures only the trained students' AP. Parts "
        "not run keep their numbers from an existing deploy.json.",
    )
    parser.add_argument("--bits", nargs="+", default=["4-4-8", "8-8-8", "2-2-8"])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--trained_students",
        nargs="*",
        default=[str(ROOT / "runs" / "qdetr-synthetic-4bit")],
        help="Folders of students trained by examples/distill.py (synthetic data, 128 px) whose exported AP is "
        "compared with PyTorch's; missing folders are skipped.",
    )
    parser.add_argument("--num_eval_images", type=int, default=256)
    parser.add_argument("--quick", action="store_true", help="3 timed runs, the student only, 4-4-8, 32 images.")
    parser.add_argument("--output_dir", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    if args.quick:
        args.architectures, args.bits, args.runs, args.warmup, args.num_eval_images = ["student"], ["4-4-8"], 3, 1, 32
    if args.runs < 1 or min(args.threads) < 1:
        parser.error("--runs and --threads must be >= 1")
    previous = Path(args.output_dir) / "deploy.json"
    results: dict[str, Any] = json.loads(previous.read_text()) if previous.is_file() else {"architectures": {}}
    if args.architectures:
        results.update(machine=machine(), runs=args.runs, warmup=args.warmup)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for arch in args.architectures:
            results["architectures"][arch] = run_arch(arch, args.bits, args.threads, args.runs, args.warmup, work)
        for folder in [Path(p) for p in args.trained_students if Path(p).is_dir()]:
            results.setdefault("zero_points", {})[folder.name] = exported_ap(folder, work, args.num_eval_images)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "deploy.json").write_text(json.dumps(results, indent=2))
    (out / "deploy.md").write_text(to_markdown(results))
    print(to_markdown(results))
    return results


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
