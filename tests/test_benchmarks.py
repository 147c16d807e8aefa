"""Smoke tests of the benchmark scripts' --quick modes (the committed results come from full runs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import REPO_ROOT, load_example, load_script


def _load(name: str):
    """Import ``benchmarks/<name>.py`` as module ``bench_<name>``."""
    return load_script(REPO_ROOT / "benchmarks" / f"{name}.py", f"bench_{name}")


@pytest.mark.slow
def test_accuracy_quick_mode_writes_rows_as_it_goes(tmp_path, tiny_teacher_dir):
    accuracy = _load("accuracy")
    args = ["--dataset", "synthetic", "--quick", "--teacher", str(tiny_teacher_dir)]
    args += ["--output_dir", str(tmp_path / "results"), "--work_dir", str(tmp_path / "work")]
    results = accuracy.main([*args, "--bits", "4-4-8", "--methods", "lsq", "qdetr"])
    saved = json.loads((tmp_path / "results" / "synthetic.json").read_text())
    assert {"dataset", "machine", "teacher", "rows"} <= set(saved)
    assert [(r["bits"], r["method"]) for r in saved["rows"]] == [
        ("32-32-32", "fp"),
        ("4-4-8", "lsq"),
        ("4-4-8", "qdetr"),
    ]
    for row in saved["rows"]:
        assert {"bits", "method", "seed", "AP", "AP50", "AP75", "APs", "APm", "APl", "epochs", "wall_time_s"} <= set(
            row
        )
    assert (tmp_path / "results" / "synthetic.md").read_text().count("\n| ") >= 4
    assert (tmp_path / "results" / "synthetic.png").stat().st_size > 0
    # A second call (e.g. after an interruption) skips finished rows and only runs new ones.
    again = accuracy.main([*args, "--bits", "4-4-8", "--methods", "lsq", "qdetr", "baseline"])
    assert [r["method"] for r in again["rows"]] == ["fp", "lsq", "baseline", "qdetr"]  # the paper's row order
    assert [again["rows"][i] for i in (0, 1, 3)] == results["rows"]
    # Rows trained under another budget cannot join the table.
    with pytest.raises(SystemExit):
        accuracy.main([*args, "--bits", "4-4-8", "--methods", "da", "--steps", "5"])


def test_accuracy_rows_from_concurrent_processes_are_merged(tmp_path):
    accuracy = _load("accuracy")
    path = tmp_path / "toy.json"
    metrics = {"AP": 0.5, "AP50": 0.7, "AP75": 0.5, "APs": -1.0, "APm": 0.4, "APl": 0.6}
    base = {"teacher": metrics, "teacher_path": "t", "steps": 1, "batch_size": 1, "machine": {}, "rows": []}
    base["machine"] = {"device": "cpu", "cpu_count": 2, "torch": "x"}
    path.write_text(json.dumps({"dataset": "toy", **base}))

    def row(bits: str, method: str, seed: int = 0) -> dict:
        label = accuracy.METHOD_LABELS[method]
        return {"bits": bits, "method": method, "label": label, "seed": seed, "epochs": 1, "wall_time_s": 1, **metrics}

    accuracy.record_row(path, row("2-2-8", "qdetr"))
    # Another process wrote a row in the meantime: it must survive this process's next write.
    on_disk = json.loads(path.read_text())
    on_disk["rows"].append(row("4-4-8", "lsq"))
    path.write_text(json.dumps(on_disk))
    merged = accuracy.record_row(path, row("32-32-32", "fp"))
    assert [(r["bits"], r["method"]) for r in merged["rows"]] == [
        ("32-32-32", "fp"),
        ("4-4-8", "lsq"),
        ("2-2-8", "qdetr"),
    ]
    assert json.loads(path.read_text())["rows"] == merged["rows"]
    assert "| 2-2-8 |" in (tmp_path / "toy.md").read_text()


@pytest.mark.slow
def test_speed_quick_mode(tmp_path, tiny_teacher_dir):
    speed = _load("speed")
    results = speed.main(
        ["--quick", "--teacher", str(tiny_teacher_dir), "--image_size", "64", "--output_dir", str(tmp_path)]
    )
    assert set(results["runs"]) == {"train_fp", "train_qat", "train_qat_drd", "infer_fp", "infer_qat"}
    assert results["ratios"]["qat_drd_over_fp"] > 0
    assert results["fake_quant"]["max_abs_difference"] < 1e-5
    assert json.loads((tmp_path / "speed.json").read_text())["batch_size"] == 2


@pytest.mark.slow
def test_deploy_quick_mode(tmp_path):
    deploy = _load("deploy")
    results = deploy.main(
        ["--quick", "--runs", "1", "--threads", "1", "--output_dir", str(tmp_path), "--trained_students"]
    )
    student = results["architectures"]["student"]
    assert student["fp32"]["safetensors_mb"] > 4 * student["bits"]["4-4-8"]["packed_safetensors_mb"]
    latency = student["bits"]["4-4-8"]["latency_ms"]
    assert {"pytorch_fake_quant@1", "ort_integer@1", "ratio_ort_fp32_over_integer@1"} <= set(latency)
    assert student["bits"]["4-4-8"]["optimised_graph_ops"]["QLinearConv"] > 0
    assert "zero_points" not in results  # no trained student given
    text = (tmp_path / "deploy.md").read_text()
    assert "ONNX Runtime integer 4-4-8" in text and "What ONNX Runtime runs" in text


@pytest.mark.slow
def test_low_bit_quick_mode(tmp_path, tiny_teacher_dir):
    low_bit = _load("low_bit")
    common = ["--quick", "--teacher", str(tiny_teacher_dir), "--image_size", "64"]
    common += ["--output_dir", str(tmp_path / "results"), "--work_dir", str(tmp_path / "work")]
    results = low_bit.main(["--part", "ablation", "--bits", "2", "4", *common])
    row = results["ablation"]["2-2-8, calibrated, untrained"]
    assert set(low_bit.GROUPS) <= set(row) and all(0 <= row[g]["both"] <= 1 for g in low_bit.GROUPS)
    # Two more bits keep more of every 2-bit group's signal (the stem's input stays at first_conv_bits).
    sqnr_2, sqnr_4 = (results["ablation"][f"{b}-{b}-8, calibrated, untrained"]["activation_sqnr"] for b in (2, 4))
    assert set(sqnr_2) == set(low_bit.GROUPS)
    assert all(sqnr_4[g] > sqnr_2[g] + 3 for g in low_bit.GROUPS if g != "stem")
    # ... and leave the encoder memory closer to the teacher's.
    memory_2, memory_4 = (results["ablation"][f"{b}-{b}-8, calibrated, untrained"]["memory_error"] for b in (2, 4))
    assert 0 < memory_4 < memory_2
    mixed = "mixed precision at the 2-2-8 size, 8-bit heads, 4-bit activations"
    results = low_bit.main(["--part", "runs", "--rows", "2-2-8", mixed, *common])
    assert set(results["ablation"]) == {f"{b}-{b}-8, calibrated, untrained" for b in (2, 4)}  # earlier rows are kept
    uniform, chosen = results["runs"]["2-2-8 @ 2 steps"], results["runs"][f"{mixed} @ 2 steps"]
    assert uniform["steps"] == chosen["steps"] == 2
    # The mixed model fits the uniform 2-bit model's size and, with its heads at 8 bits, spends the room on wider layers.
    assert chosen["size_mb"] <= uniform["size_mb"] + 1e-9 and chosen["average_weight_bits"] > 2
    assert f"| {mixed} @ 2 steps |" in (tmp_path / "results" / "low_bit.md").read_text()
    # A trained student (its weights on their grids) gets its whole-model AP and activation SQNR, no per-group AP.
    (trained,) = (tmp_path / "work").glob("2-2-8-2steps")
    results = low_bit.main(["--part", "ablation", "--bits", "--trained", str(trained), *common])
    row = results["ablation"]["2-2-8, trained (2-2-8-2steps)"]
    assert set(row) == {"all", "activation_sqnr", "memory_error"} and set(row["activation_sqnr"]) == set(low_bit.GROUPS)
    text = (tmp_path / "results" / "low_bit.md").read_text()
    assert text.count("| 2-2-8, trained (2-2-8-2steps) |") == 1 and text.count("| 2-2-8, calibrated, untrained |") == 2


def test_activation_sqnr_sees_no_noise_without_quantizers(tiny_teacher_dir):
    from qdetr_hf import QDetrForObjectDetection, calibrate
    from qdetr_hf.quantization import quantization_disabled

    low_bit = _load("low_bit")
    dataset, collator = low_bit._val(4, 64)
    model = QDetrForObjectDetection.from_pretrained(tiny_teacher_dir, weight_bits=3, activation_bits=3)
    calibrate(model, [collator([dataset[i] for i in range(4)])])
    assert set(low_bit.activation_sqnr(model, dataset, collator)) == set(low_bit.GROUPS)
    with quantization_disabled(model):  # every quantizer passes its input through: no noise, no group to report
        assert low_bit.activation_sqnr(model, dataset, collator) == {}


def test_memory_error_is_zero_against_itself_and_grows_with_quantization(tiny_teacher_dir):
    from transformers import DetrForObjectDetection

    from qdetr_hf import QDetrForObjectDetection, calibrate

    low_bit = _load("low_bit")
    dataset, collator = low_bit._val(4, 64)
    teacher = DetrForObjectDetection.from_pretrained(tiny_teacher_dir).eval()
    assert low_bit.memory_error(teacher, teacher, dataset, collator) == 0.0
    model = QDetrForObjectDetection.from_pretrained(tiny_teacher_dir, weight_bits=2, activation_bits=2)
    calibrate(model, [collator([dataset[i] for i in range(4)])])
    assert low_bit.memory_error(model, teacher, dataset, collator) > 0.0


def _fake_distill_runs(calls: list[list[str]]):
    """A stand-in for ``subprocess.run`` of examples/distill.py: records the command, writes a results.json."""

    def fake_run(command, check):
        calls.append(command)
        output = Path(command[command.index("--output_dir") + 1])
        output.mkdir(parents=True, exist_ok=True)
        row = {"AP": 0.25, "AP50": 0.5, "size_mb": 0.77}
        run = {
            "steps": 1000 + len(calls),
            "rows": {"teacher (fp32)": {"AP": 0.43}, "student (untrained)": {"AP": 0.01}, "student (3-3-8)": row},
            "average_weight_bits": 3.0,
            "oscillation": {},
            "weight_step_change": {},
        }
        (output / "results.json").write_text(json.dumps(run))

    return fake_run


def test_low_bit_time_budget_rows_are_kept_per_processor(tmp_path, monkeypatch, capsys):
    """A time budget buys different steps on different processors, so its rows never stand in for each other."""
    low_bit = _load("low_bit")
    calls = []
    monkeypatch.setattr(low_bit.subprocess, "run", _fake_distill_runs(calls))
    argv = ["--part", "runs", "--minutes", "12", "--rows", "3-3-8, KD-DETR", "--output_dir", str(tmp_path)]
    argv += ["--work_dir", str(tmp_path / "work")]
    for cpu in ("CPU A", "CPU A", "CPU B"):
        monkeypatch.setattr(low_bit, "cpu_model", lambda cpu=cpu: cpu)
        runs = low_bit.main(argv)["runs"]
    assert len(calls) == 2  # the second run on CPU A found its row done
    assert {k: v["steps"] for k, v in runs.items()} == {
        "3-3-8, KD-DETR @ 12 min on CPU A": 1001,
        "3-3-8, KD-DETR @ 12 min on CPU B": 1002,
    }
    assert runs["3-3-8, KD-DETR @ 12 min on CPU B"]["cpu"] == "CPU B"

    def last_learning_rate(command):
        return [command[i + 1] for i, arg in enumerate(command) if arg == "--learning_rate"][-1]

    # Rows run at the main job's learning rate whatever a width's defaults become, unless they name their own.
    low_bit.main([*argv[:5], "3-3-8, KD-DETR, learning rate 2e-3", *argv[6:]])
    assert [last_learning_rate(c) for c in calls] == ["6e-4", "6e-4", "2e-3"]
    assert "| 3-3-8, KD-DETR @ 12 min on CPU A | 1001 | 25.0 (58.1%) |" in (tmp_path / "low_bit.md").read_text()
    # Another seed is a row of its own: the training command gets it, the default seed's row stays.
    runs = low_bit.main([*argv, "--seed", "1"])["runs"]
    assert calls[-1][calls[-1].index("--seed") + 1] == "1" and "--seed" not in calls[0]
    assert "seed1" in calls[-1][calls[-1].index("--output_dir") + 1]
    # ... and every row, of any seed, trains and is scored on the default seed's images.
    assert all(c[c.index("--synthetic_seed") + 1] == str(low_bit.IMAGES_SEED) == "42" for c in calls)
    assert runs["3-3-8, KD-DETR @ 12 min on CPU B, seed 1"]["steps"] == 1004
    # Bad budgets and seeds are refused before anything runs.
    for flag, bad in (("--seed", "-1"), ("--steps", "0"), ("--minutes", "0"), ("--num_eval_images", "0")):
        with pytest.raises(SystemExit):
            low_bit.main([*argv, flag, bad])
        assert flag in capsys.readouterr().err.splitlines()[-1]  # the error line, not the usage above it
    assert len(calls) == 4
    assert runs["3-3-8, KD-DETR @ 12 min on CPU B"]["steps"] == 1002


def test_low_bit_rows_keep_their_recipe_whatever_the_width_defaults_become(tmp_path, monkeypatch):
    """examples/distill.py's per-width defaults (LOW_BIT_DEFAULTS) follow these rows' findings; a row that does not
    name a learning rate, KD-DETR query set or memory weight still trains at the main job's, as when it was measured."""
    low_bit = _load("low_bit")
    distill = load_example("distill")
    set_by_defaults = {flag for options in distill.LOW_BIT_DEFAULTS.values() for flag in options[::2]}
    assert set_by_defaults <= {*low_bit.MAIN_JOB_RECIPE[::2], "--distillation"}  # every row names its method
    calls = []
    monkeypatch.setattr(low_bit.subprocess, "run", _fake_distill_runs(calls))
    expected = {  # row -> (learning rate, KD-DETR general set, memory weight)
        "3-3-8, KD-DETR": (6e-4, True, 30.0),
        "2-2-8, KD-DETR + memory imitation (weight 10), learning rate 2e-3": (2e-3, True, 10.0),
        "3-3-8, KD-DETR without general sampling + memory imitation (weight 30), learning rate 2e-3": (
            2e-3,
            False,
            30.0,
        ),
        "2-2-8, KD-DETR without general sampling + memory imitation (weight 10), learning rate 2e-3": (
            2e-3,
            False,
            10.0,
        ),
    }
    low_bit.main(["--part", "runs", "--steps", "5", "--rows", *expected, "--output_dir", str(tmp_path)])
    parser = distill.build_parser()
    for row, command in zip(expected, calls, strict=True):
        _, _, distill_args, _, _, training_args = distill.parse_arguments(parser, command[2:])
        got = (training_args.learning_rate, distill_args.kd_general, distill_args.memory_weight)
        assert got == expected[row], row
