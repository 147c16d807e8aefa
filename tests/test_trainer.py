"""QDetrDistillationTrainer: frozen teacher, logged terms, gradient accumulation, bf16, calibration, resume, time limit."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
import torch.multiprocessing as mp
from conftest import SHAPES, free_port, tiny_detr_kwargs, tiny_training_args
from torch.utils.data import DataLoader, Dataset
from transformers import DetrConfig, DetrForObjectDetection, TrainerCallback, TrainerControl, TrainerState
from transformers.trainer_utils import get_last_checkpoint

from qdetr_hf import QDetrForObjectDetection, calibrate
from qdetr_hf.data import SyntheticShapesDataset
from qdetr_hf.distillers import DRDDistiller
from qdetr_hf.trainer import (
    QDetrDistillationTrainer,
    QDetrTrainingArguments,
    TimeLimitCallback,
    any_process,
    configure_cpu_threads,
    load_teacher,
)
from qdetr_hf.transformers_compat import STAGING_DIR, schedule_length, set_schedule_length


def make_args(tmp_path, **overrides) -> QDetrTrainingArguments:
    return tiny_training_args(tmp_path / "out", **overrides)


@pytest.fixture
def teacher(tiny_teacher_dir):
    return load_teacher(tiny_teacher_dir)


@pytest.fixture
def student(tiny_teacher_dir):
    return QDetrForObjectDetection.from_pretrained(tiny_teacher_dir)


def make_trainer(tmp_path, student, teacher, shapes, distiller=None, **arg_overrides):
    dataset, collator = shapes
    return QDetrDistillationTrainer(
        model=student,
        args=make_args(tmp_path, **arg_overrides),
        teacher_model=teacher,
        distiller=distiller if distiller is not None else DRDDistiller(tau=0.3),
        train_dataset=dataset,
        data_collator=collator,
    )


def test_training_changes_only_the_student(tmp_path, student, teacher, tiny_shapes):
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in student.state_dict().items()}
    trainer = make_trainer(tmp_path, student, teacher, tiny_shapes)
    assert trainer.teacher is teacher and not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    assert all(module is not teacher for module in trainer.model.modules())  # not a submodule of the student
    trainer.train()
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, teacher_before[key]), key
    assert not teacher.training
    changed = [k for k, v in student.state_dict().items() if not torch.equal(v, student_before[k])]
    assert any(k.endswith("class_labels_classifier.weight") for k in changed)
    assert any("weight_quantizer.raw_step" in k for k in changed)


def test_each_loss_term_is_logged(tmp_path, student, teacher, tiny_shapes):
    trainer = make_trainer(tmp_path, student, teacher, tiny_shapes)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2
    for entry in logs:
        assert {"loss", "loss_gt", "loss_drd", "drd_selected", "loss_ce", "loss_bbox", "loss_giou"} <= set(entry)
        # The total is the ground-truth loss plus the (weighted) DRD term.
        assert entry["loss"] == pytest.approx(entry["loss_gt"] + entry["loss_drd"], rel=1e-4)
        assert entry["loss_drd"] > 0


def test_label_space_mismatch_is_a_clear_error(tmp_path, student, tiny_shapes):
    other = {0: "circle", 1: "square", 2: "star"}
    bad_teacher = DetrForObjectDetection(DetrConfig(**tiny_detr_kwargs(id2label=other)))
    with pytest.raises(ValueError, match=r"label spaces differ.*teacher 'star' vs student 'triangle'"):
        make_trainer(tmp_path, student, bad_teacher, tiny_shapes)
    four = DetrForObjectDetection(DetrConfig(**tiny_detr_kwargs(num_labels=4)))
    with pytest.raises(ValueError, match="4 classes"):
        make_trainer(tmp_path, student, four, tiny_shapes)


def test_a_distiller_needs_a_teacher(tmp_path, student, tiny_shapes):
    with pytest.raises(ValueError, match="needs a teacher"):
        QDetrDistillationTrainer(model=student, args=make_args(tmp_path), distiller=DRDDistiller())


def test_missing_teacher_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="Teacher model folder not found"):
        load_teacher(str(tmp_path / "does-not-exist"))


def test_uncalibrated_student_is_calibrated_before_the_first_step(tmp_path, student, teacher, tiny_shapes):
    assert not student.is_calibrated
    trainer = make_trainer(tmp_path, student, teacher, tiny_shapes, max_steps=1)
    trainer.train()
    assert student.is_calibrated


def test_a_calibrated_student_keeps_its_calibration(tmp_path, student, teacher, tiny_shapes, monkeypatch):
    dataset, collator = tiny_shapes
    calibrate(student, DataLoader(dataset, batch_size=4, collate_fn=collator), max_batches=1)
    trainer = make_trainer(tmp_path, student, teacher, tiny_shapes, max_steps=1)
    monkeypatch.setattr(trainer, "calibrate_student", lambda *a, **k: pytest.fail("recalibrated"))
    trainer.train()


def test_no_weight_decay_on_quantizers_and_backbone_learning_rate(tmp_path, student, teacher, tiny_shapes):
    trainer = make_trainer(tmp_path, student, teacher, tiny_shapes, backbone_learning_rate=1e-5, weight_decay=0.1)
    decay = set(trainer.get_decay_parameter_names(student))
    assert any(n.endswith("mlp.fc1.weight") for n in decay)
    assert not any("_quantizer." in n or ".alignment." in n for n in decay)
    optimizer = trainer.create_optimizer()
    by_param = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    params = dict(student.named_parameters())
    assert by_param[id(params["model.backbone.model.layer2.0.conv1.weight"])]["lr"] == 1e-5
    assert by_param[id(params["model.backbone.model.layer2.0.conv1.weight"])]["weight_decay"] == 0.1
    step = params["model.backbone.model.layer2.0.conv1.weight_quantizer.raw_step"]
    assert by_param[id(step)]["weight_decay"] == 0.0 and by_param[id(step)]["lr"] == 1e-4
    assert by_param[id(params["class_labels_classifier.weight"])]["lr"] == 1e-4


def test_quantizer_learning_rate_applies_to_steps_offsets_and_alignment_only(tmp_path, student, teacher, tiny_shapes):
    trainer = make_trainer(
        tmp_path, student, teacher, tiny_shapes, quantizer_learning_rate=3e-3, backbone_learning_rate=1e-5
    )
    optimizer = trainer.create_optimizer()
    lr = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    params = dict(student.named_parameters())
    for name, param in params.items():
        if not param.requires_grad:
            continue
        if "_quantizer." in name or ".alignment." in name:
            expected = 3e-3  # also the backbone's weight steps: the quantizer rate wins over the backbone rate
        elif ".backbone." in f".{name}":
            expected = 1e-5
        else:
            expected = 1e-4
        assert lr[id(param)] == expected, name
    assert any(".alignment." in n for n in params)  # the DA affines exist in this student


class _Repeat(Dataset):
    """The same example ``n`` times (every micro-batch then has identical statistics)."""

    def __init__(self, example, n: int) -> None:
        self.example, self.n = example, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int):
        return self.example


def _one_sgd_step(tmp_path, name, student, teacher, dataset, collator, distiller, batch_size, accumulation):
    model = copy.deepcopy(student)
    args = make_args(
        tmp_path / name,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        max_steps=1,
        max_grad_norm=0.0,
        weight_decay=0.0,
        lr_scheduler_type="constant",
    )
    trainer = QDetrDistillationTrainer(
        model=model,
        args=args,
        teacher_model=teacher,
        distiller=distiller,
        train_dataset=dataset,
        data_collator=collator,
        optimizers=(torch.optim.SGD(model.parameters(), lr=1.0), None),
    )
    trainer.train()
    return {k: v.detach().clone() for k, v in model.named_parameters()}


@pytest.mark.parametrize("with_drd", [False, True])
def test_gradient_accumulation_matches_one_big_batch(tmp_path, student, teacher, tiny_shapes, with_drd):
    """2 micro-batches of 2 accumulate to the same update as one batch of 4 (SGD, lr 1: update = -gradient)."""
    _, collator = tiny_shapes
    if with_drd:
        # Identical images: every normaliser (boxes, matched queries, DRD-selected queries) splits evenly.
        dataset = _Repeat(SyntheticShapesDataset(num_images=1, image_size=64, seed=5, max_objects=3)[0], 4)
    else:
        # Different images with the same number of objects: DETR's box and class normalisers split evenly.
        dataset = SyntheticShapesDataset(num_images=4, image_size=64, seed=7, min_objects=2, max_objects=2)
    distiller = DRDDistiller(tau=0.3) if with_drd else None
    calibrate(student, DataLoader(dataset, batch_size=4, collate_fn=collator), max_batches=1)
    before = {k: v.detach().clone() for k, v in student.named_parameters()}
    accumulated = _one_sgd_step(tmp_path, "ga", student, teacher, dataset, collator, distiller, 2, 2)
    big = _one_sgd_step(tmp_path, "big", student, teacher, dataset, collator, distiller, 4, 1)
    moved = 0
    for key, value in big.items():
        torch.testing.assert_close(accumulated[key], value, rtol=1e-4, atol=1e-6, msg=key)
        moved += int(not torch.equal(value, before[key]))
    assert moved > 10


class _RecordGradients(TrainerCallback):
    """Before each optimizer step (after clipping): the distiller's gradient and the total norm over model and
    distiller."""

    def __init__(self, model: torch.nn.Module, distiller: torch.nn.Module) -> None:
        self.model, self.distiller = model, distiller
        self.distiller_grads: list[torch.Tensor] = []
        self.total_norms: list[float] = []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        grads = [p.grad for p in [*self.model.parameters(), *self.distiller.parameters()] if p.grad is not None]
        self.distiller_grads.append(self.distiller.log_variance.grad.detach().clone())
        self.total_norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())


def _ida_trainer(tmp_path, student, teacher, dataset, collator, **overrides):
    from qdetr_hf.distillers import IDaDetDistiller

    distiller = IDaDetDistiller(tau=0.3)
    optimizers = overrides.pop("optimizers", (None, None))
    if callable(optimizers):
        optimizers = optimizers(distiller)
    trainer = QDetrDistillationTrainer(
        model=student,
        args=make_args(tmp_path, per_device_train_batch_size=2, calibration_batches=1, **overrides),
        teacher_model=teacher,
        distiller=distiller,
        train_dataset=dataset,
        data_collator=collator,
        optimizers=optimizers,
    )
    return trainer, distiller


def test_a_user_optimizer_must_hold_the_distillers_parameters(tmp_path, student, teacher, tiny_shapes):
    dataset, collator = tiny_shapes
    with pytest.raises(ValueError, match=r"optimizers=.*does not hold.*'ida' distiller \('log_variance'\)"):
        _ida_trainer(
            tmp_path, student, teacher, dataset, collator, optimizers=(torch.optim.AdamW(student.parameters()), None)
        )
    # With them, the distiller's parameters train.
    trainer, distiller = _ida_trainer(
        tmp_path,
        student,
        teacher,
        dataset,
        collator,
        max_steps=2,
        optimizers=lambda d: (torch.optim.AdamW([*student.parameters(), *d.parameters()], lr=1e-2), None),
    )
    trainer.train()
    assert distiller.log_variance.item() != 0.0
    # An optimizer class and kwargs are honoured when the trainer builds the groups (distiller group included).
    from qdetr_hf.distillers import IDaDetDistiller

    distiller = IDaDetDistiller(tau=0.3)
    trainer = QDetrDistillationTrainer(
        model=student,
        args=make_args(tmp_path),
        teacher_model=teacher,
        distiller=distiller,
        train_dataset=dataset,
        data_collator=collator,
        optimizer_cls_and_kwargs=(torch.optim.SGD, {"lr": 0.5}),
    )
    optimizer = trainer.create_optimizer()
    assert isinstance(optimizer, torch.optim.SGD)
    assert any(p is distiller.log_variance for group in optimizer.param_groups for p in group["params"])


def test_clipping_and_grad_norm_cover_the_distillers_parameters(tmp_path, student, teacher, tiny_shapes):
    dataset, collator = tiny_shapes
    # Only the class head trains in the first run, so the distiller's gradient is a visible part of the norm.
    frozen = copy.deepcopy(student).requires_grad_(False)
    frozen.class_labels_classifier.requires_grad_(True)
    calibrate(frozen, DataLoader(dataset, batch_size=2, collate_fn=collator), max_batches=1)
    trainer, distiller = _ida_trainer(tmp_path, frozen, teacher, dataset, collator, max_grad_norm=0.0)
    record = _RecordGradients(trainer.model, distiller)
    trainer.add_callback(record)
    trainer.train()
    logged = [entry["grad_norm"] for entry in trainer.state.log_history if "grad_norm" in entry]
    distiller_norms = [g.abs().item() for g in record.distiller_grads]
    # Without clipping, the logged norm is the norm over the model's and the distiller's gradients.
    assert logged == pytest.approx(record.total_norms, rel=1e-5)
    assert all(d > 0.01 * total for d, total in zip(distiller_norms, record.total_norms, strict=True))
    clipped, distiller = _ida_trainer(tmp_path / "clipped", student, teacher, dataset, collator, max_grad_norm=1e-3)
    record = _RecordGradients(clipped.model, distiller)
    clipped.add_callback(record)
    clipped.train()
    assert all(norm <= 1e-3 * (1 + 1e-4) for norm in record.total_norms)


def test_distiller_gradients_do_not_accumulate_across_steps(tmp_path, student, teacher, tiny_shapes):
    # The same example at every step and a learning rate of 0: every step must see the same gradient.
    example = SyntheticShapesDataset(num_images=1, image_size=64, seed=5, max_objects=3)[0]
    _, collator = tiny_shapes
    trainer, distiller = _ida_trainer(
        tmp_path,
        student,
        teacher,
        _Repeat(example, 8),
        collator,
        max_steps=3,
        learning_rate=0.0,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
    )
    record = _RecordGradients(trainer.model, distiller)
    trainer.add_callback(record)
    trainer.train()
    first = record.distiller_grads[0]
    assert first.abs().item() > 0
    for grad in record.distiller_grads[1:]:
        torch.testing.assert_close(grad, first)


def test_bf16_training_fake_quantizes_in_float32(tmp_path, student, teacher, tiny_shapes, monkeypatch):
    # Under bf16 autocast the quantized layers receive bf16 activations, but the package's fake quantization must
    # run in float32 with autocast off (bf16 has 8 mantissa bits: 8-bit levels would not round-trip).
    from qdetr_hf import quantization, quantizers

    calls: list[tuple[torch.dtype, torch.dtype, bool]] = []
    fake_quantize = quantizers.lsq_fake_quantize

    def recording(x, step, *args, **kwargs):
        calls.append((x.dtype, step.dtype, torch.is_autocast_enabled("cpu")))
        return fake_quantize(x, step, *args, **kwargs)

    monkeypatch.setattr(quantizers, "lsq_fake_quantize", recording)
    incoming: set[torch.dtype] = set()
    for module in student.modules():
        if isinstance(module, quantization.LSQActivationQuantizer):
            module.register_forward_pre_hook(lambda module, args: incoming.add(args[0].dtype))
    trainer = make_trainer(tmp_path, student, teacher, tiny_shapes, bf16=True, max_steps=2)
    trainer.train()
    assert torch.bfloat16 in incoming  # autocast really was on in the quantized layers
    assert calls and all(call == (torch.float32, torch.float32, False) for call in calls), set(calls)
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert all(torch.isfinite(torch.tensor([e["loss"], e["loss_drd"]])).all() for e in logs)
    assert student.model.decoder.layers[0].mlp.fc1.weight.dtype == torch.float32  # master weights stay fp32


@pytest.mark.slow
def test_short_distillation_run_lowers_the_loss(tmp_path, student, teacher, tiny_shapes):
    dataset, _ = tiny_shapes
    trainer = make_trainer(
        tmp_path, student, teacher, tiny_shapes, max_steps=60, learning_rate=1e-3, lr_scheduler_type="constant"
    )
    trainer.eval_dataset = dataset
    trainer.calibrate_student()
    before = trainer.evaluate()["eval_loss"]  # ground-truth loss on the (fixed) training images
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    assert after < 0.9 * before, (before, after)
    logged = [entry for entry in trainer.state.log_history if "loss_drd" in entry]
    assert len(logged) == 60 and all(entry["loss_drd"] > 0 for entry in logged)


class _StopAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt("simulated interruption")


def test_interrupted_run_resumes_from_its_last_checkpoint(tmp_path, student, teacher, tiny_shapes):
    reference = make_trainer(tmp_path / "ref", copy.deepcopy(student), teacher, tiny_shapes, max_steps=4)
    reference.train()

    common = {"max_steps": 4, "save_strategy": "steps", "save_steps": 2}
    interrupted = make_trainer(tmp_path, copy.deepcopy(student), teacher, tiny_shapes, **common)
    interrupted.add_callback(_StopAt(3))
    with pytest.raises(KeyboardInterrupt):
        interrupted.train()
    output_dir = tmp_path / "out"
    assert get_last_checkpoint(str(output_dir)) == str(output_dir / "checkpoint-2")

    resumed = make_trainer(tmp_path, copy.deepcopy(student), teacher, tiny_shapes, **common)
    resumed.train(resume_from_checkpoint=True)
    steps = [entry["step"] for entry in resumed.state.log_history if "loss" in entry]
    # Steps 1-2 come from the checkpoint's history, 3-4 were trained now: it continued, it did not start over.
    assert steps == [1, 2, 3, 4] and resumed.state.global_step == 4
    for (key, value), expected in zip(resumed.model.state_dict().items(), reference.model.state_dict().values()):
        torch.testing.assert_close(value, expected, msg=key)
    # Checkpoints hold the float latent weights (what resuming exactly needs); the final model is packed.
    checkpoint_config = json.loads((output_dir / "checkpoint-4" / "config.json").read_text())
    assert checkpoint_config["weight_packing"] is None
    resumed.save_model(str(tmp_path / "final"))
    assert json.loads((tmp_path / "final" / "config.json").read_text())["weight_packing"]["layers"]


def test_a_failed_save_leaves_no_checkpoint_behind(tmp_path, student, teacher, tiny_shapes, monkeypatch):
    trainer = make_trainer(tmp_path, student, teacher, tiny_shapes, max_steps=4, save_strategy="steps", save_steps=2)
    original = QDetrDistillationTrainer._save_rng_state

    def crash_on_second_save(self, output_dir):
        if self.state.global_step == 4:
            raise OSError("disk full (simulated)")
        return original(self, output_dir)

    monkeypatch.setattr(QDetrDistillationTrainer, "_save_rng_state", crash_on_second_save)
    with pytest.raises(OSError, match="disk full"):
        trainer.train()
    output_dir = tmp_path / "out"
    assert (output_dir / "checkpoint-2" / "model.safetensors").is_file()
    assert not (output_dir / "checkpoint-4").exists()
    assert (output_dir / STAGING_DIR / "checkpoint-4").exists()  # the partial save stays out of the way
    assert get_last_checkpoint(str(output_dir)) == str(output_dir / "checkpoint-2")
    assert {"config.json", "model.safetensors", "trainer_state.json"} <= set(os.listdir(output_dir / "checkpoint-2"))


def _predict_the_labels(model, monkeypatch, miss: bool = False) -> None:
    """Make ``model`` predict its ground truth exactly (class and box), or (``miss``) put every box in a far corner."""
    forward = model.forward

    def predicting(*args, labels=None, **kwargs):
        outputs = forward(*args, labels=labels, **kwargs)
        logits = torch.full_like(outputs.logits, -10.0)
        logits[..., -1] = 10.0  # "no object" everywhere but on the first queries
        boxes = torch.full_like(outputs.pred_boxes, 0.005)
        for i, label in enumerate(labels):
            n = len(label["class_labels"])
            logits[i, torch.arange(n), label["class_labels"]] = 10.0
            logits[i, :n, -1] = -10.0
            if not miss:
                boxes[i, :n] = label["boxes"]
        outputs.logits, outputs.pred_boxes = logits, boxes
        return outputs

    monkeypatch.setattr(model, "forward", predicting)


def test_evaluation_reports_coco_metrics(tmp_path, student, teacher, tiny_shapes, monkeypatch):
    dataset, collator = tiny_shapes
    calibrate(student, DataLoader(dataset, batch_size=4, collate_fn=collator), max_batches=1)
    trainer = make_trainer(tmp_path, student, teacher, tiny_shapes)
    trainer.eval_dataset = dataset
    metrics = trainer.evaluate()
    assert {"eval_loss", "eval_AP", "eval_AP50", "eval_AP75", "eval_APs", "eval_AR100"} <= set(metrics)
    assert {int(k): v for k, v in student.config.id2label.items()} == SHAPES
    # Known answers through the whole evaluation path (gather, post-processing, box conversion, COCOeval): a model
    # that predicts its ground truth scores AP = AR = 1, one whose boxes all miss scores 0.
    _predict_the_labels(student, monkeypatch)
    perfect = trainer.evaluate()
    for key in ("eval_AP", "eval_AP50", "eval_AP75", "eval_AR100"):
        assert perfect[key] == pytest.approx(1.0), key
    _predict_the_labels(student, monkeypatch, miss=True)
    missed = trainer.evaluate()
    assert missed["eval_AP"] == 0.0 and missed["eval_AR100"] == 0.0


def test_configure_cpu_threads_uses_every_core_of_a_single_cpu_process(tmp_path):
    # `accelerate launch` without a config exports OMP_NUM_THREADS=1; a single CPU process must still use every core.
    before = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0))
    try:
        torch.set_num_threads(1)
        args = QDetrTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
        assert configure_cpu_threads(args) == cores == torch.get_num_threads()
        explicit = QDetrTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", cpu_threads=1)
        assert configure_cpu_threads(explicit) == 1 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="cpu_threads"):
        QDetrTrainingArguments(output_dir=str(tmp_path), cpu_threads=0)


class _FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_time_limit_fits_the_learning_rate_schedule_to_the_projected_last_step(tmp_path):
    from transformers import get_scheduler

    args = QDetrTrainingArguments(output_dir=str(tmp_path), save_strategy="no", eval_strategy="no", report_to="none")
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=1.0)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=5, num_training_steps=1000)
    clock = _FakeClock()
    callback = TimeLimitCallback(2.0, clock=clock, fit_schedule=True, fit_every=10, slowest=lambda s: max(s, 2.0))
    state, control = TrainerState(max_steps=1000), TrainerControl()
    callback.on_train_begin(args, state, control)
    lrs = []
    for step in range(1, 61):  # 1 s per step here, 2 s on the slowest process: 60 steps fit in the 120 s
        optimizer.step()
        scheduler.step()
        lrs.append(scheduler.get_last_lr()[0])
        state.global_step, clock.now = step, 1000.0 + 2 * step
        callback.on_step_end(args, state, control, lr_scheduler=scheduler)
    assert callback.fitted_steps == 60  # projected at step 10 from the slowest process: 10 + (120 - 20) / 2
    assert callback.stopped_at_step == 60 and lrs[-1] < 1e-3  # decayed when the limit stops it, not cut off at 99%
    assert lrs[4] == pytest.approx(1.0)  # the warm-up is kept

    # A budget that allows every step leaves the schedule alone.
    roomy = TimeLimitCallback(100.0, clock=clock, fit_schedule=True, fit_every=10)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=5, num_training_steps=200)
    state = TrainerState(max_steps=200)
    roomy.on_train_begin(args, state, control)
    state.global_step, clock.now = 10, clock.now + 10
    roomy.on_step_end(args, state, control, lr_scheduler=scheduler)
    assert roomy.fitted_steps is None and scheduler.lr_lambdas[0].keywords["num_training_steps"] == 200


def test_schedule_length_reads_and_refits_only_get_scheduler_schedules():
    from transformers import get_scheduler

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=2, num_training_steps=10)
    assert schedule_length(scheduler) == 10
    set_schedule_length(scheduler, 6)
    assert schedule_length(scheduler) == 6
    assert [round(f(4), 6) for f in scheduler.lr_lambdas] == [0.5]  # (6 - 4) / (6 - 2): decays over 6 steps now
    assert scheduler.lr_lambdas[0].keywords["num_warmup_steps"] == 2

    # Any other schedule has no length to read, and refitting it is refused.
    other = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    assert schedule_length(other) is None and schedule_length(None) is None
    with pytest.raises(ValueError, match="get_scheduler"):
        set_schedule_length(other, 6)


def test_time_limit_stops_at_the_step_that_uses_up_the_budget(tmp_path):
    args = QDetrTrainingArguments(output_dir=str(tmp_path), save_strategy="steps", eval_strategy="no", report_to="none")
    clock = _FakeClock()
    callback = TimeLimitCallback(1.5, clock=clock)
    state, control = TrainerState(max_steps=100), TrainerControl()
    callback.on_train_begin(args, state, control)
    for step, seconds in [(1, 30.0), (2, 89.9)]:  # 90 s is the budget: not used up yet
        state.global_step, clock.now = step, 1000.0 + seconds
        callback.on_step_end(args, state, control)
        assert not control.should_training_stop and not control.should_save and callback.stopped_at_step is None
    state.global_step, clock.now = 3, 1090.0
    callback.on_step_end(args, state, control)
    assert control.should_training_stop and control.should_save and not control.should_evaluate
    assert callback.stopped_at_step == 3

    # A step-strategy evaluation runs at the stop, as it does at max_steps; nothing happens before training began.
    evaluating = QDetrTrainingArguments(
        output_dir=str(tmp_path), eval_strategy="steps", eval_steps=50, report_to="none"
    )
    state, control = TrainerState(max_steps=100, global_step=7), TrainerControl()
    late = TimeLimitCallback(1.5, clock=clock)
    late.on_step_end(evaluating, state, control)
    assert not control.should_training_stop
    late.on_train_begin(evaluating, state, control)
    clock.now += 90.0
    late.on_step_end(evaluating, state, control)
    assert control.should_training_stop and control.should_evaluate and late.stopped_at_step == 7

    # Another process used its budget up: this one stops at the same step although its own clock has time left.
    other = TimeLimitCallback(1.5, agree=lambda over: True, clock=clock)
    state, control = TrainerState(max_steps=100, global_step=1), TrainerControl()
    other.on_train_begin(args, state, control)
    other.on_step_end(args, state, control)
    assert control.should_training_stop and other.stopped_at_step == 1

    for bad in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="minutes"):
            TimeLimitCallback(bad)
        with pytest.raises(ValueError, match="max_train_minutes"):
            QDetrTrainingArguments(output_dir=str(tmp_path), max_train_minutes=bad)


def test_training_arguments_refuse_a_seed_numpy_cannot_take(tmp_path):
    """Outside [0, 2**32), `set_seed` would fail only once the run had started; the arguments refuse it up front."""
    for bad in (-1, 2**32):
        with pytest.raises(ValueError, match=rf"seed must be in \[0, 2\*\*32\), got {bad}"):
            QDetrTrainingArguments(output_dir=str(tmp_path), seed=bad)
    assert QDetrTrainingArguments(output_dir=str(tmp_path), seed=2**32 - 1).seed == 2**32 - 1


def test_max_train_minutes_ends_the_run_with_a_final_checkpoint(tmp_path, student, teacher, tiny_shapes):
    trainer = make_trainer(
        tmp_path,
        student,
        teacher,
        tiny_shapes,
        max_steps=5,
        save_strategy="steps",
        save_steps=10,
        max_train_minutes=1e-9,
    )
    trainer.train()
    assert trainer.state.global_step == 1 and trainer.time_limit.stopped_at_step == 1
    assert get_last_checkpoint(str(tmp_path / "out")) == str(tmp_path / "out" / "checkpoint-1")
    unlimited = make_trainer(tmp_path / "unlimited", student, teacher, tiny_shapes)
    assert unlimited.time_limit is None


def _any_process_rank(rank: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        # Rank 0 has used its time up, rank 1 has not: both must stop. Neither has: neither stops.
        decisions = [any_process(rank == 0), any_process(False)]
        torch.save(decisions, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def test_the_time_limit_decision_is_the_same_on_every_process(tmp_path):
    assert any_process(True) and not any_process(False)  # no process group: unchanged
    mp.spawn(_any_process_rank, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    assert torch.load(tmp_path / "rank0.pt") == torch.load(tmp_path / "rank1.pt") == [True, False]
