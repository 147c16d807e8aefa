"""The example scripts end to end on tiny configurations: the main job, two processes, two stages, the teacher."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import REPO_ROOT, load_example, tiny_detr_kwargs
from huggingface_hub import ModelCard
from transformers import AutoImageProcessor, DetrConfig, DetrForObjectDetection

from qdetr_hf import DistributionAlignment, QDetrForObjectDetection
from qdetr_hf.distillers import CombinedDistiller
from qdetr_hf.quantization import quantized_layers
from qdetr_hf.trainer import files_to_push

TINY_RUN = [
    "--max_steps", "2",
    "--save_steps", "2",
    "--num_train_images", "16",
    "--num_eval_images", "4",
    "--per_device_train_batch_size", "2",
    "--per_device_eval_batch_size", "2",
    "--calibration_batches", "1",
    "--num_visualized", "2",
    "--logging_steps", "1",
    "--disable_tqdm", "true",
    "--use_cpu", "true",
    "--export_onnx", "false",  # exporting takes ~25 s a model: only the main-job test below exports
]  # fmt: skip


@pytest.fixture(scope="module")
def distill():
    return load_example("distill")


@pytest.mark.slow
def test_main_job_writes_a_complete_hub_ready_folder(tmp_path, tiny_teacher_dir, distill, capsys):
    output_dir = tmp_path / "student"
    results = distill.main(
        [
            "--teacher_model_name_or_path", str(tiny_teacher_dir), "--output_dir", str(output_dir), *TINY_RUN,
            "--export_onnx", "true", "--latency_runs", "2",
        ]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert "teacher (fp32)" in printed and "student 4-4-8, drd" in printed and "speed-up" in printed
    assert "ORT ms" in printed and "file MB" in printed
    rows = results["rows"]
    assert set(rows) == {
        "teacher (fp32)", "student 4-4-8, untrained", "student 4-4-8, drd", "student 4-4-8, ONNX Runtime"
    }  # fmt: skip
    for name in ("teacher (fp32)", "student 4-4-8, untrained", "student 4-4-8, drd"):
        assert {"AP", "AP50", "AP75", "size_mb", "speedup"} <= set(rows[name])
    assert rows["student 4-4-8, drd"]["speedup"] > 3
    # Measured deployment: files on disk and ONNX Runtime latency beside the theoretical numbers.
    assert {"file_mb", "onnx_mb", "latency_ms"} <= set(rows["teacher (fp32)"])
    assert {"onnx_mb", "latency_ms"} <= set(rows["student 4-4-8, ONNX Runtime"])
    assert rows["student 4-4-8, drd"]["file_mb"] < rows["teacher (fp32)"]["file_mb"] / 2  # packed weights
    assert rows["student 4-4-8, drd"]["file_mb"] == pytest.approx(
        (output_dir / "model.safetensors").stat().st_size / 2**20
    )
    # The exported student is the trained one: same AP on the same images (integer zero points make it exact).
    assert abs(rows["student 4-4-8, ONNX Runtime"]["AP"] - rows["student 4-4-8, drd"]["AP"]) <= 0.005
    assert results["deployment"]["student"]["max_zero_point_rounding"] == 0.0
    assert results["steps"] == 2 and not results["stopped_by_time_limit"]
    assert (output_dir / "checkpoint-2").is_dir()
    assert (output_dir / "detections.png").stat().st_size > 0

    # The folder push_to_hub would upload: model, code for trust_remote_code, processor, card, results.
    pushed = files_to_push(output_dir)
    for name in (
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "README.md",
        "modeling_qdetr.py",
        "configuration_qdetr.py",
        "quantization.py",
        "results.json",
        "detections.png",
        "model.onnx",
        "packing.py",
        "transformers_compat.py",
        "quantizers.py",
        "quant_layers.py",
        "calibration.py",
    ):
        assert name in pushed, name
    assert not any(p.startswith(("checkpoint-", "_")) for p in pushed)
    assert (output_dir / "_onnx" / "teacher.onnx").is_file()  # measured, not uploaded

    # The card states measured numbers (never placeholders) and valid Hub metadata.
    card = ModelCard((output_dir / "README.md").read_text())
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "object-detection"
    text = card.text
    assert "$" not in text.split("```python")[0]
    student_ap = results["rows"]["student 4-4-8, drd"]["AP"]
    assert f"| student 4-4-8, drd | {100 * student_ap:.1f} |" in text
    assert tiny_teacher_dir.name in text and "4-4-8" in text and "Q-DETR (DA + DRD)" in text
    # A local teacher is named by its folder, never by the user's directory layout.
    results_text = (output_dir / "results.json").read_text()
    assert str(tiny_teacher_dir) not in text and str(tiny_teacher_dir) not in results_text
    assert results["teacher"] == tiny_teacher_dir.name
    # Evaluated during training; the best checkpoint by AP is the result.
    assert results["best_checkpoint"] == "checkpoint-2"
    # --max_steps on the command line dropped the main job's 13-minute limit.
    assert "| steps | 2 |" in text and "training time limit" not in text
    assert "## Deployment" in text and "| student (integer ONNX) |" in text and "OnnxDetector(" in text

    # What would be uploaded is enough to load the model and run it.
    upload = tmp_path / "upload"
    for name in pushed:
        (upload / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(output_dir / name, upload / name)
    model = QDetrForObjectDetection.from_pretrained(upload).eval()
    assert model.is_calibrated and model.config.weight_bits == 4
    # The main job's short-schedule defaults reach the student: MSE weight and activation steps, DA affine fitted at
    # calibration.
    assert model.config.weight_step_init == "mse" and model.config.distribution_alignment_init == "fit"
    assert model.config.activation_offset_init == "mse"
    # ... and its integer-deployment options: integer zero points and an 8-bit residual stream.
    assert model.config.integer_zero_points and model.config.backbone_residual_bits == 8
    alignments = [m for m in model.modules() if isinstance(m, DistributionAlignment)]
    assert alignments and all(bool(a.calibrated) for a in alignments)
    processor = AutoImageProcessor.from_pretrained(upload)
    with torch.no_grad():
        out = model(**processor(images=[torch.zeros(3, 64, 64)], return_tensors="pt", do_rescale=False))
    assert out.logits.shape == (1, 8, 4)
    assert json.loads((upload / "results.json").read_text())["bits"] == "4-4-8"


@pytest.mark.slow
@pytest.mark.parametrize("method", ["qskd", "kd_detr", "ida", "none", "drd+qskd", "kd_detr+memory"])
def test_every_distillation_method_runs_from_the_command_line(tmp_path, tiny_teacher_dir, distill, method):
    output_dir = tmp_path / method
    args = ["--teacher_model_name_or_path", str(tiny_teacher_dir), "--output_dir", str(output_dir), *TINY_RUN]
    results = distill.main([*args, "--distillation", method, "--num_visualized", "1"])
    assert f"student 4-4-8, {method}" in results["rows"]
    assert results["method"] == distill.method_name(method)
    assert QDetrForObjectDetection.from_pretrained(output_dir).is_calibrated


@pytest.mark.slow
def test_the_time_limit_ends_the_main_job_early_and_says_so(tmp_path, tiny_teacher_dir, distill, capsys):
    output_dir = tmp_path / "limited"
    args = ["--teacher_model_name_or_path", str(tiny_teacher_dir), "--output_dir", str(output_dir), *TINY_RUN]
    results = distill.main([*args, "--max_steps", "4", "--max_train_minutes", "1e-9", "--num_visualized", "1"])
    assert results["steps"] == 1 and results["stopped_by_time_limit"]
    assert (
        "Training stopped at the 1e-09-minute limit (--max_train_minutes) after 1 of 4 steps."
        in capsys.readouterr().out
    )
    assert (output_dir / "checkpoint-1").is_dir() and QDetrForObjectDetection.from_pretrained(output_dir).is_calibrated


def test_the_main_jobs_time_limit_gives_way_to_an_explicit_step_budget(distill):
    assert distill.run_time_limit([], 13.0) == 13.0  # the main job
    assert distill.run_time_limit(["--distillation", "qskd"], 13.0) == 13.0  # a variant of it
    assert distill.run_time_limit(["--max_steps", "50000"], 13.0) is None  # a run with its own step budget
    assert distill.run_time_limit(["--max_steps=6000"], 13.0) is None
    assert distill.run_time_limit(["--max-steps", "6000"], 13.0) is None  # HfArgumentParser's dashed alias
    assert distill.run_time_limit(["--max-steps", "6000", "--max-train-minutes", "30"], 30.0) == 30.0
    assert distill.run_time_limit(["--max_steps", "6000", "--max_train_minutes", "30"], 30.0) == 30.0


def test_a_low_bit_width_brings_its_own_defaults_and_the_command_line_still_wins(distill):
    parser = distill.build_parser()

    def parsed(*argv):
        model_args, _, distill_args, _, _, training_args = distill.parse_arguments(parser, list(argv))
        return model_args, distill_args, training_args

    assert parsed()[1].distillation == "drd"  # the main job (4 bits)
    assert set(distill.LOW_BIT_DEFAULTS) == {2, 3}
    main_job_lr = distill._value(distill.MAIN_JOB_DEFAULTS, "--learning_rate")
    for bits in distill.LOW_BIT_DEFAULTS:
        model_args, distill_args, training_args = parsed("--weight_bits", str(bits), "--activation_bits", str(bits))
        expected = dict(zip(distill.LOW_BIT_DEFAULTS[bits][::2], distill.LOW_BIT_DEFAULTS[bits][1::2], strict=True))
        assert distill_args.distillation == expected["--distillation"] and model_args.weight_bits == bits
        assert training_args.learning_rate == float(expected.get("--learning_rate", main_job_lr))
        assert distill_args.memory_weight == float(expected.get("--memory_weight", distill.DEFAULT_MEMORY_WEIGHT))
        assert distill_args.kd_general == (expected.get("--kd_general", "true") == "true")
        assert training_args.max_train_minutes == 12  # still the main job's time budget
    assert parsed("--weight_bits", "3", "--learning_rate", "1e-4")[2].learning_rate == 1e-4
    assert parsed("--learning_rate", "1e-4", "--weight_bits", "3")[2].learning_rate == 1e-4
    assert parsed("--weight-bits=3")[1].distillation == distill.LOW_BIT_DEFAULTS[3][1]  # any spelling
    assert parsed("--weight_bits", "3", "--distillation", "drd")[1].distillation == "drd"
    assert parsed("--weight_bits", "3", "--kd_general", "true")[1].kd_general  # a flag the defaults set, given back
    assert parsed("--distillation", "qskd", "--weight_bits", "3")[1].distillation == "qskd"


@pytest.mark.slow
def test_two_stages_share_the_time_limit(tmp_path, tiny_teacher_dir, distill):
    output_dir = tmp_path / "two-stage-limited"
    args = ["--teacher_model_name_or_path", str(tiny_teacher_dir), "--output_dir", str(output_dir), *TINY_RUN]
    results = distill.main([*args, "--two_stage", "true", "--max_steps", "8", "--max_train_minutes", "1e-9"])
    stage1_state = json.loads((output_dir / "_stage1" / "checkpoint-1" / "trainer_state.json").read_text())
    assert stage1_state["global_step"] == 1  # stage 1 used the budget up after one step ...
    assert results["steps"] == 1 and results["stopped_by_time_limit"]  # ... and stage 2 got what was left: one step
    # Stage 2's limit is the remainder (floored at 1e-6 minutes), not a fresh 1e-9-minute budget.
    assert "| training time limit (min) | 1e-06 |" in (output_dir / "README.md").read_text()


def test_methods_combine_with_a_plus(distill):
    assert distill.distillation_methods("drd") == ("drd",)
    assert distill.distillation_methods("drd+qskd") == ("drd", "qskd")
    assert distill.method_name("drd+kd_detr") == f"{distill.METHOD_NAMES['drd']} + {distill.METHOD_NAMES['kd_detr']}"
    # The 3-bit default drops KD-DETR's general set: the model card must not claim both sets.
    only_specific = distill.method_name("kd_detr+memory", kd_general=False)
    assert only_specific == f"KD-DETR (specific distillation points only) + {distill.METHOD_NAMES['memory']}"
    assert distill.method_name("kd_detr", kd_specific=False) == "KD-DETR (general distillation points only)"
    args = distill.DistillationArguments(distillation="drd+qskd", drd_weight=1.5, qskd_feature_weight=0.5)
    combined = distill.build_distiller(args, 128, 128)
    assert isinstance(combined, CombinedDistiller) and combined.name == "drd+qskd"
    drd, qskd = combined.distillers
    assert drd.weight == 1.5 and qskd.feature_weight == 0.5  # each part keeps its own flags
    args = distill.DistillationArguments(distillation="kd_detr+memory", memory_weight=3.0)
    kd_detr, memory = distill.build_distiller(args, 128, 128).distillers
    assert kd_detr.name == "kd_detr" and memory.name == "memory" and memory.weight == 3.0
    with pytest.raises(ValueError, match="memory weight"):
        distill.build_distiller(distill.DistillationArguments(distillation="memory", memory_weight=-1.0))
    for bad, message in [
        ("drd+foo", "must be one of"),
        ("drd+drd", "distinct methods"),
        ("none+drd", "other than 'none'"),
        ("drd+", "must be one of"),
    ]:
        with pytest.raises(ValueError, match=message):
            distill.distillation_methods(bad)


@pytest.mark.parametrize("method", ["x", "drd+drd"])
def test_bad_method_is_rejected(tiny_teacher_dir, distill, tmp_path, method):
    with pytest.raises(SystemExit):
        distill.main(
            [
                "--teacher_model_name_or_path",
                str(tiny_teacher_dir),
                "--output_dir",
                str(tmp_path),
                "--distillation",
                method,
            ]
        )


@pytest.mark.slow
def test_two_stage_schedule(tmp_path, tiny_teacher_dir, distill, monkeypatch):
    output_dir = tmp_path / "two-stage"
    args = ["--teacher_model_name_or_path", str(tiny_teacher_dir), "--output_dir", str(output_dir), *TINY_RUN]
    starts, finals = [], []
    train_student = distill.train_student

    def recording(**kwargs):
        starts.append({k: v.clone() for k, v in kwargs["student"].state_dict().items()})
        trainer = train_student(**kwargs)
        finals.append({k: v.clone() for k, v in trainer.model.state_dict().items()})
        return trainer

    monkeypatch.setattr(distill, "train_student", recording)
    distill.main([*args, "--two_stage", "true", "--max_steps", "4", "--push_to_hub", "false"])
    stage1 = QDetrForObjectDetection.from_pretrained(output_dir / "_stage1")
    assert stage1.config.quantize_backbone and not stage1.config.quantize_encoder and not stage1.config.quantize_decoder
    final = QDetrForObjectDetection.from_pretrained(output_dir)
    assert final.config.quantize_encoder and final.config.quantize_decoder and final.is_calibrated
    # Stage 2 starts from exactly what stage 1 trained: every backbone weight and quantizer tensor carries over.
    stage1_end, stage2_start = finals[0], starts[1]
    backbone = [k for k in stage1_end if k.startswith("model.backbone.")]
    assert any("_quantizer." in k for k in backbone)
    for key in backbone:
        assert torch.equal(stage2_start[key], stage1_end[key]), key
    # ... and they are stage 1's own: the backbone weights moved away from the teacher's during stage 1.
    teacher = DetrForObjectDetection.from_pretrained(tiny_teacher_dir).state_dict()
    moved = [k for k in backbone if k in teacher and not torch.equal(teacher[k], stage2_start[k])]
    assert any(k.endswith(".weight") and "_quantizer" not in k for k in moved)


def test_stage_one_never_pushes_to_the_hub(distill):
    args = distill.QDetrTrainingArguments(
        output_dir="runs/x", max_steps=10, push_to_hub=True, hub_model_id="me/qdetr", hub_token="secret"
    )
    stage1 = distill.first_stage_arguments(args, 0.3)
    assert not stage1.push_to_hub and stage1.max_steps == 3 and stage1.output_dir.endswith("_stage1")
    assert args.push_to_hub and args.hub_token == "secret"  # the final model still pushes, with the real token


@pytest.mark.slow
def test_two_process_cpu_launch(tmp_path, tiny_teacher_dir):
    output_dir = tmp_path / "ddp"
    # accelerate 1.15 runs `--cpu` jobs in one process; this config starts two torchrun processes and the script's
    # --use_cpu true (in TINY_RUN) puts them on the CPU with the gloo backend.
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(REPO_ROOT / "examples" / "accelerate_configs" / "two_cpu_processes.yaml"),
        str(REPO_ROOT / "examples" / "distill.py"),
        "--teacher_model_name_or_path", str(tiny_teacher_dir), "--output_dir", str(output_dir), *TINY_RUN,
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert result.stdout.count("teacher (fp32)") == 1  # the table is printed once, by rank 0
    assert json.loads((output_dir / "results.json").read_text())["processes"] == 2
    checkpoints = sorted(p.name for p in output_dir.iterdir() if p.name.startswith("checkpoint-"))
    assert checkpoints == ["checkpoint-2"]
    state = json.loads((output_dir / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    assert sorted(p.name for p in (output_dir / "checkpoint-2").glob("rng_state_*.pth")) == [
        "rng_state_0.pth",
        "rng_state_1.pth",
    ]
    model = QDetrForObjectDetection.from_pretrained(output_dir)
    assert model.is_calibrated


@pytest.mark.slow
def test_train_teacher_from_scratch_saves_a_detr_with_frozen_batch_norm(tmp_path):
    train_teacher = load_example("train_teacher")
    output_dir = tmp_path / "teacher"
    args = ["--output_dir", str(output_dir), "--max_steps", "2", "--eval_steps", "2", "--save_steps", "2"]
    args += ["--num_train_images", "8", "--num_eval_images", "4", "--image_size", "64", "--d_model", "32"]
    args += ["--encoder_layers", "1", "--decoder_layers", "1", "--ffn_dim", "64", "--num_queries", "5"]
    args += ["--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4", "--use_cpu", "true"]
    args += ["--export_dir", str(tmp_path / "export")]
    metrics = train_teacher.main(args)
    assert "eval_AP" in metrics
    exported = sorted(p.name for p in (tmp_path / "export").iterdir())
    assert exported == [
        "README.md",
        "config.json",
        "eval_results.json",
        "model.safetensors",
        "preprocessor_config.json",
    ]
    card = (tmp_path / "export" / "README.md").read_text()
    assert f"| AP | {100 * metrics['eval_AP']:.1f} |" in card and "--export_dir" in card
    teacher = DetrForObjectDetection.from_pretrained(output_dir)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in teacher.modules())
    # Trainable BatchNorm really trained: its statistics moved away from the (0, 1) init and were kept.
    running_var = teacher.model.backbone.model.layer1[0].bn1.running_var
    assert not torch.allclose(running_var, torch.ones_like(running_var))
    assert teacher.config.id2label == {0: "circle", 1: "square", 2: "triangle"}


def test_dense_backbone_targets_label_the_smallest_covering_box():
    train_teacher = load_example("train_teacher")
    labels = [
        # A 0.5 x 0.5 box (class 0) at the top-left and a 0.2 x 0.2 box (class 2) inside it.
        {"boxes": torch.tensor([[0.25, 0.25, 0.5, 0.5], [0.3, 0.3, 0.2, 0.2]]), "class_labels": torch.tensor([0, 2])},
        {"boxes": torch.zeros(0, 4), "class_labels": torch.zeros(0, dtype=torch.long)},  # no objects
    ]
    targets = train_teacher.dense_targets(labels, 4, 4, num_labels=3)
    # Cell centres are at 0.125, 0.375, 0.625, 0.875: the big box covers the 2 x 2 top-left cells, the small box
    # ([0.2, 0.4]^2) covers the centre (0.375, 0.375) only and wins there; 3 is background.
    expected = torch.tensor([[0, 0, 3, 3], [0, 2, 3, 3], [3, 3, 3, 3], [3, 3, 3, 3]])
    assert torch.equal(targets[0], expected)
    assert torch.equal(targets[1], torch.full((4, 4), 3))


def test_from_scratch_teachers_use_the_original_detr_initialisation():
    train_teacher = load_example("train_teacher")
    torch.manual_seed(0)
    model = DetrForObjectDetection(DetrConfig(**tiny_detr_kwargs(num_queries=64, d_model=64)))
    # transformers' own initialisation: N(0, 0.02) queries, far smaller than the LayerNorm-ed decoder states.
    assert model.model.query_position_embeddings.weight.std() < 0.05
    train_teacher.initialize_like_original_detr(model)
    assert 0.85 < model.model.query_position_embeddings.weight.std() < 1.15  # nn.Embedding's N(0, 1)
    q_proj = model.model.decoder.layers[0].encoder_attn.q_proj.weight
    bound = (6 / (64 + 64)) ** 0.5  # Xavier-uniform bound for a 64 x 64 weight
    assert q_proj.abs().max() <= bound and q_proj.std() > 0.9 * bound / 3**0.5


def _teacher_with_labels(path, names):
    config = DetrConfig(**tiny_detr_kwargs(num_labels=len(names), id2label=dict(enumerate(names))))
    DetrForObjectDetection(config).save_pretrained(path)
    return path


@pytest.mark.parametrize(
    ("names", "message"),
    [
        (["a", "b", "c"], r"0: dataset 'circle' vs teacher 'a'"),
        (["circle", "square", "triangle", "star", "moon"], r"the dataset has 3 classes .*, the teacher 5 classes"),
    ],
)
def test_the_datasets_classes_must_be_the_teachers(tmp_path, distill, names, message):
    teacher = _teacher_with_labels(tmp_path / "teacher", names)
    args = ["--teacher_model_name_or_path", str(teacher), "--output_dir", str(tmp_path / "out"), *TINY_RUN]
    with pytest.raises(ValueError, match=message):
        distill.main([*args, "--image_size", "64"])


def test_a_bad_synthetic_seed_is_refused_from_the_command_line(tmp_path, tiny_teacher_dir, distill):
    args = ["--teacher_model_name_or_path", str(tiny_teacher_dir), "--output_dir", str(tmp_path / "out"), *TINY_RUN]
    with pytest.raises(ValueError, match=r"synthetic_seed must be in .* got -1"):
        distill.main([*args, "--synthetic_seed", "-1"])
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_an_output_folder_resumes_only_its_own_run(tmp_path, tiny_teacher_dir, distill, caplog):
    output_dir = tmp_path / "run"
    args = ["--teacher_model_name_or_path", str(tiny_teacher_dir), "--output_dir", str(output_dir), *TINY_RUN]
    distill.main([*args, "--num_visualized", "1"])
    first_model = (output_dir / "model.safetensors").read_bytes()
    # Other settings: refused, and the finished run is left as it was.
    with pytest.raises(FileExistsError, match=r"model\.weight_bits: 4 -> 2.*--overwrite_output_dir"):
        distill.main([*args, "--weight_bits", "2", "--distillation", "qskd"])
    assert (output_dir / "model.safetensors").read_bytes() == first_model
    assert (output_dir / "checkpoint-2").is_dir()
    # The same settings with a larger budget continue the run from its last checkpoint.
    with caplog.at_level("INFO"):
        results = distill.main([*args, "--max_steps", "4", "--num_visualized", "1"])
    assert results["steps"] == 4 and "Resuming the run" in caplog.text
    # Asked to overwrite, the other settings start afresh.
    results = distill.main([*args, "--weight_bits", "2", "--overwrite_output_dir", "true", "--num_visualized", "1"])
    assert results["bits"] == "2-4-8" and results["steps"] == 2
    assert QDetrForObjectDetection.from_pretrained(output_dir).config.weight_bits == 2


def test_resume_from_checkpoint_is_honoured_and_checked(tmp_path, tiny_teacher_dir, distill):
    args = ["--teacher_model_name_or_path", str(tiny_teacher_dir), "--output_dir", str(tmp_path / "out"), *TINY_RUN]
    with pytest.raises(FileNotFoundError, match=r"Checkpoint folder not found: .*nowhere"):
        distill.main([*args, "--resume_from_checkpoint", str(tmp_path / "nowhere")])
    broken = tmp_path / "checkpoint-7"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"not a complete checkpoint: model\.safetensors, trainer_state\.json"):
        distill.main([*args, "--resume_from_checkpoint", str(broken)])


def test_max_steps_zero_is_refused(tmp_path, tiny_teacher_dir, distill):
    args = ["--teacher_model_name_or_path", str(tiny_teacher_dir), "--output_dir", str(tmp_path / "out"), *TINY_RUN]
    with pytest.raises(ValueError, match="max_steps must be a positive"):
        distill.main([*args, "--max_steps", "0"])


@pytest.mark.slow
def test_a_student_that_ends_below_its_start_is_reported(tmp_path, tiny_teacher_dir, distill, monkeypatch, caplog):
    scores = iter([0.30, 0.30, 0.10])  # teacher, calibrated student, trained student
    monkeypatch.setattr(distill, "evaluate_model", lambda *a, **k: dict.fromkeys(("AP", "AP50", "AP75"), next(scores)))
    args = ["--teacher_model_name_or_path", str(tiny_teacher_dir), "--output_dir", str(tmp_path / "out"), *TINY_RUN]
    with caplog.at_level("WARNING"):
        results = distill.main([*args, "--num_visualized", "1"])
    assert "already scores 30.0 AP against the teacher's 30.0" in caplog.text
    assert "ends below its calibrated start" in caplog.text and results["below_calibrated_start"]
    assert "student 4-4-8, drd (below start)" in results["rows"]


def test_the_student_is_calibrated_where_it_trains(tmp_path, tiny_teacher_dir, distill, monkeypatch):
    calls = []
    original_to = QDetrForObjectDetection.to

    def to(self, *args, **kwargs):
        calls.append(("to", str(args[0]) if args else str(kwargs.get("device"))))
        return original_to(self, *args, **kwargs)

    def calibrate(model, *args, **kwargs):
        calls.append(("calibrate", str(next(model.parameters()).device)))
        raise KeyboardInterrupt  # stop here: only the order matters

    monkeypatch.setattr(QDetrForObjectDetection, "to", to)
    monkeypatch.setattr(distill, "calibrate", calibrate)
    args = ["--teacher_model_name_or_path", str(tiny_teacher_dir), "--output_dir", str(tmp_path / "out"), *TINY_RUN]
    with pytest.raises(KeyboardInterrupt):
        distill.main(args)
    assert calls[-2] == ("to", "cpu") and calls[-1] == ("calibrate", "cpu")


@pytest.mark.slow
def test_low_bit_remedies_from_the_command_line(tmp_path, tiny_teacher_dir, distill):
    base = ["--teacher_model_name_or_path", str(tiny_teacher_dir), *TINY_RUN, "--num_visualized", "1"]
    results = distill.main(
        [
            *base, "--output_dir", str(tmp_path / "progressive"), "--max_steps", "4",
            "--weight_bits", "2", "--activation_bits", "2", "--progressive_from_bits", "4",
            "--oscillation_dampening", "0.1", "--oscillation_freeze_threshold", "0.02",
        ]
    )  # fmt: skip
    assert results["bits"] == "2-2-8" and results["steps"] == 2  # the 4-bit stage trained the other 2 steps
    assert (tmp_path / "progressive" / "_progressive" / "checkpoint-2").is_dir()
    warm = QDetrForObjectDetection.from_pretrained(tmp_path / "progressive" / "_progressive" / "checkpoint-2")
    assert warm.config.weight_bits == 4
    assert set(results["oscillation"]) == {
        "backbone",
        "encoder attention",
        "encoder FFN",
        "decoder attention",
        "decoder FFN",
    }
    assert results["method"].endswith("+ oscillation dampening + oscillation freezing, progressive from 4 bits")

    results = distill.main(
        [*base, "--output_dir", str(tmp_path / "mixed"), "--target_average_weight_bits", "3", "--head_bits", "8"]
    )
    bits = results["layer_weight_bits"]
    assert bits and set(bits.values()) <= {2, 3, 4} and results["average_weight_bits"] < 4
    assert "class_labels_classifier" in bits and "model.input_projection" in bits  # the heads take part in the choice
    model = QDetrForObjectDetection.from_pretrained(tmp_path / "mixed")
    assert model.config.layer_weight_bits == bits and model.config.head_bits == 8
    with pytest.raises(SystemExit):
        distill.main(
            [*base, "--output_dir", str(tmp_path / "both"), "--two_stage", "true", "--progressive_from_bits", "4"]
        )


@pytest.mark.slow
def test_bit_width_annealing_from_the_command_line(tmp_path, tiny_teacher_dir, distill, caplog, capsys):
    base = ["--teacher_model_name_or_path", str(tiny_teacher_dir), *TINY_RUN, "--num_visualized", "1"]
    low = ["--weight_bits", "2", "--activation_bits", "2"]
    with caplog.at_level("INFO"):
        results = distill.main(
            [
                *base, *low, "--output_dir", str(tmp_path / "anneal"), "--max_steps", "4",
                "--anneal_from_bits", "4", "--anneal_fraction", "0.5",
            ]
        )  # fmt: skip
    # One run of 4 steps: the first at 4 bits, the second at 3, the last two at 2 (half of 4 steps is 2).
    assert results["bits"] == "2-2-8" and results["steps"] == 4
    assert results["method"].endswith(", bit widths annealed from 4 bits")
    assert "training starts at 4 bits, down to the model's widths over the first 2 steps" in caplog.text
    assert "quantizers at most 3 bits from step 1" in caplog.text and "at most 2 bits from step 2" in caplog.text
    assert (tmp_path / "anneal" / "checkpoint-2").is_dir()  # saved once the widths reached 2 bits
    model = QDetrForObjectDetection.from_pretrained(tmp_path / "anneal")
    codes = [layer.weight_quantizer.codes(layer.weight) for layer in list(quantized_layers(model).values())[1:]]
    assert all(c.min() >= -2 and c.max() <= 1 for c in codes)  # the saved weights lie on the 2-bit grids
    for bad, message in [
        (["--anneal_from_bits", "2"], "nothing to anneal"),
        (["--anneal_from_bits", "4", "--progressive_from_bits", "4"], "two progressive schedules"),
        (["--anneal_from_bits", "4", "--oscillation_freeze_threshold", "0.02"], "frozen codes belong to one width"),
        (["--anneal_from_bits", "4", "--anneal_fraction", "1"], "anneal_fraction must be in"),
    ]:
        with pytest.raises((SystemExit, ValueError)) as error:
            distill.main([*base, *low, "--output_dir", str(tmp_path / "bad"), *bad])
        assert message in (capsys.readouterr().err if error.type is SystemExit else str(error.value))
