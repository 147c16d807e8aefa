"""`QDetrDistillationTrainer`: a transformers `Trainer` adding a distillation loss from a frozen teacher DETR."""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.utils import filter_repo_objects
from huggingface_hub.utils._paths import DEFAULT_IGNORE_PATTERNS
from torch import nn
from transformers import AutoModelForObjectDetection, PreTrainedModel, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
from transformers.utils import logging

from .distillers.base import (
    DetectorOutputs,
    Distiller,
    capture_co_attended_features,
    capture_decoder_inputs,
    check_label_spaces,
)
from .hub_utils import check_local_path
from .metrics import detection_gather_for_metrics, make_compute_metrics
from .quantization import activation_quantizers, calibrate, is_calibrated
from .transformers_compat import DistillationTrainerOverrides, schedule_length, set_schedule_length

logger = logging.get_logger(__name__)

DISTILLER_STATE_NAME = "distiller.pt"
"""File in a checkpoint folder holding the distiller's own parameters (e.g. IDa-Det's learned variance)."""

PUSH_IGNORE_PATTERNS = ["_*", f"{PREFIX_CHECKPOINT_DIR}-*"]
"""What `Trainer.push_to_hub` (transformers 5.23) leaves out of the upload of ``output_dir``."""

QUANTIZER_PARAMETER_MARKERS = ("_quantizer.", ".alignment.")
"""Parameters whose names contain one of these are quantizer steps/offsets or DA affines: no weight decay."""


@dataclass
class QDetrTrainingArguments(TrainingArguments):
    """`TrainingArguments` with Q-DETR's defaults and the few settings distillation adds.

    Defaults that differ from `TrainingArguments` (paper / authors' DETR recipe, qdetr.md section 4): `learning_rate`
    1e-4, `weight_decay` 1e-4, `max_grad_norm` 0.1. Object detection also needs `remove_unused_columns=False` (the
    labels are a list of dicts) and `eval_do_concat_batches=False` (images have different numbers of boxes).
    """

    learning_rate: float = field(default=1e-4, metadata={"help": "AdamW learning rate (paper: 1e-4)."})
    weight_decay: float = field(
        default=1e-4, metadata={"help": "Weight decay (paper: 1e-4); never applied to quantizer steps/offsets."}
    )
    max_grad_norm: float = field(default=0.1, metadata={"help": "Gradient clipping (DETR / Q-DETR code: 0.1)."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Must stay False for detection."})
    eval_do_concat_batches: bool = field(default=False, metadata={"help": "Must stay False for detection."})
    backbone_learning_rate: float | None = field(
        default=None,
        metadata={"help": "Learning rate of the backbone (authors' code: 1e-5 with lr 1e-4). None: learning_rate."},
    )
    quantizer_learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "Learning rate of the quantizer steps/offsets and DA affines (project option; the paper uses one "
            "rate). None: learning_rate."
        },
    )
    calibration_batches: int = field(
        default=4,
        metadata={"help": "Training batches used to calibrate an uncalibrated student before the first step."},
    )
    cpu_threads: int | None = field(
        default=None,
        metadata={
            "help": "PyTorch intra-op threads (see `configure_cpu_threads`). None: every core the process may use when "
            "one process trains on the CPU; otherwise the launcher's setting stands."
        },
    )

    max_train_minutes: float | None = field(
        default=None,
        metadata={
            "help": "Stop training once this many minutes have passed since this train() call began training "
            "(checked after every optimizer step, agreed by all processes); the run then ends as at max_steps (final "
            "checkpoint and evaluation under step strategies). None: no limit (project option)."
        },
    )

    fit_schedule_to_time_limit: bool = field(
        default=False,
        metadata={
            "help": "With max_train_minutes: shorten the learning-rate schedule to end at the step the time limit is "
            "projected to allow (re-estimated every 50 steps from the measured time per step), so a run the limit "
            "stops ends with its schedule decayed instead of cut off mid-way (project option)."
        },
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Start afresh in an output_dir that holds a run with other settings, deleting its checkpoints "
            "and outputs (transformers 5 removed this option; the example scripts honour it, see prepare_output_dir)."
        },
    )

    def __post_init__(self) -> None:
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(
                f"max_steps must be a positive number of optimizer steps, or -1 to train num_train_epochs, got "
                f"{self.max_steps}."
            )
        if self.cpu_threads is not None and self.cpu_threads < 1:
            raise ValueError(f"cpu_threads must be a positive integer or None, got {self.cpu_threads!r}.")
        if self.max_train_minutes is not None and not (
            math.isfinite(self.max_train_minutes) and self.max_train_minutes > 0
        ):
            raise ValueError(f"max_train_minutes must be a positive number or None, got {self.max_train_minutes!r}.")
        if not 0 <= self.seed < 2**32:  # numpy's range: `set_seed` would fail only once the run has started
            raise ValueError(f"seed must be in [0, 2**32), got {self.seed!r}.")
        super().__post_init__()


RUN_SETTINGS_NAME = "run_settings.json"
"""File in an example script's output folder recording the settings of the run that writes there."""
CHECKPOINT_FILES = ("config.json", "model.safetensors", "trainer_state.json")
"""Files every resumable checkpoint folder holds."""


def check_checkpoint(path: str | os.PathLike) -> str:
    """Return ``path`` if it is a complete checkpoint folder, else raise ``FileNotFoundError`` naming what is missing.

    Raises:
        FileNotFoundError: If the folder or one of :data:`CHECKPOINT_FILES` is missing.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"Checkpoint folder not found: {path}")
    missing = [name for name in CHECKPOINT_FILES if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{path} is not a complete checkpoint: {', '.join(missing)} missing.")
    return str(folder)


def prepare_output_dir(
    output_dir: str | os.PathLike,
    settings: dict[str, Any],
    overwrite: bool = False,
    resume_from_checkpoint: str | None = None,
    write: bool = True,
) -> str | None:
    """Decide what a run does with its output folder; returns the checkpoint to resume from, if any.

    - ``resume_from_checkpoint`` given: that folder must be a complete checkpoint (:func:`check_checkpoint`); the run
      resumes from it.
    - Otherwise a folder that holds a run recorded with the same ``settings`` (``run_settings.json``) resumes from its
      last checkpoint (a finished run resumes at its end and trains nothing more).
    - A folder that holds a run with other settings, or outputs no run recorded, is refused unless ``overwrite``:
      then its checkpoints and outputs are deleted and the run starts afresh. A finished run is never overwritten
      without being asked.

    ``settings`` should hold what defines the trained model (model, bits, method, data), not budgets such as
    ``max_steps`` (raising those continues a run). With ``write`` (the main process), ``run_settings.json`` is
    written atomically for the new run.

    Raises:
        FileNotFoundError: If ``resume_from_checkpoint`` is not a complete checkpoint.
        FileExistsError: If the folder holds another run and ``overwrite`` is not set.
    """
    folder = Path(output_dir)
    record = folder / RUN_SETTINGS_NAME
    settings = json.loads(json.dumps(settings, default=str))  # as it reads back from the file
    checkpoint = check_checkpoint(resume_from_checkpoint) if resume_from_checkpoint else None
    outputs = [p for p in folder.iterdir() if p.name not in (RUN_SETTINGS_NAME, "_eval")] if folder.is_dir() else []
    if outputs and checkpoint is None:
        previous = json.loads(record.read_text()) if record.is_file() else None
        if previous == settings:
            checkpoint = get_last_checkpoint(str(folder))
            if checkpoint:
                logger.info(f"Resuming the run in {folder} from {checkpoint}")
        elif not overwrite:
            if previous is None:
                what = "outputs of a run whose settings were not recorded"
            else:
                keys = sorted({*previous, *settings})
                changed = [
                    f"{k}: {previous.get(k)!r} -> {settings.get(k)!r}"
                    for k in keys
                    if previous.get(k) != settings.get(k)
                ]
                what = "a run with other settings (" + "; ".join(changed[:8]) + ")"
            raise FileExistsError(
                f"{folder} holds {what}. Choose another --output_dir, or pass --overwrite_output_dir to delete it and "
                "start afresh."
            )
        elif write:
            logger.warning(f"--overwrite_output_dir: deleting the previous run in {folder}")
            for path in outputs:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    if write:
        folder.mkdir(parents=True, exist_ok=True)
        staged = folder / f".{RUN_SETTINGS_NAME}.tmp"
        staged.write_text(json.dumps(settings, indent=2, sort_keys=True))
        os.replace(staged, record)
    return checkpoint


def configure_cpu_threads(args: QDetrTrainingArguments) -> int:
    """Set PyTorch's intra-op thread count for this run and return it.

    `accelerate launch` without a config file exports ``OMP_NUM_THREADS=1`` to a single process that was not declared a
    CPU run, so PyTorch would use one core even on a CPU-only machine (`benchmarks/results/main_job.md` measures the
    cost). An explicit ``args.cpu_threads`` is always applied. Otherwise
    a single process training on the CPU gets every core it may use (its CPU affinity), and nothing changes on a GPU or
    when several processes share the machine, where the launcher split the cores between them.
    """
    if args.cpu_threads is not None:
        torch.set_num_threads(args.cpu_threads)
    elif args.world_size == 1 and args.device.type == "cpu":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        torch.set_num_threads(cores)
    return torch.get_num_threads()


def any_process(flag: bool, device: torch.device | str | None = None) -> bool:
    """``flag`` made the same on every process: True everywhere if it is True on any (a max all-reduce over the
    default process group, on ``device``: the GPU under NCCL). Without an initialised group it is returned as is."""
    return bool(max_over_processes(float(flag), device) > 0)


def max_over_processes(value: float, device: torch.device | str | None = None) -> float:
    """The largest of ``value`` over all processes (a max all-reduce over the default process group, on ``device``);
    without an initialised group, ``value`` itself."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return value
    if torch.distributed.get_world_size() == 1:
        return value
    reduced = torch.tensor(float(value), device=device)
    torch.distributed.all_reduce(reduced, op=torch.distributed.ReduceOp.MAX)
    return float(reduced.item())


class TimeLimitCallback(TrainerCallback):
    """Stop training after a wall-clock budget, at the end of the step that uses it up.

    The clock starts when training begins (``on_train_begin``: after model loading and calibration) and counts this
    `train()` call only, so a resumed run gets the budget again. The step that crosses the limit completes; training
    then ends as if ``max_steps`` had been reached (a final checkpoint and evaluation under step strategies), and
    :attr:`stopped_at_step` records where. Under several processes every rank must stop at the same step, so the
    decision is the maximum over ranks (one tiny all-reduce per step, through ``agree``: :func:`any_process` in the
    trainer).

    With ``fit_schedule``, every ``fit_every`` steps the callback projects from the time per step so far (slowest
    process) the step at which the budget runs out and, when that comes before ``max_steps``, rebuilds the
    learning-rate schedule to end there (:attr:`fitted_steps`), so the run stops with its schedule decayed rather than
    cut off mid-way. Only schedules made by transformers' ``get_scheduler`` (a ``LambdaLR`` of a ``partial`` with
    ``num_training_steps``) can be refitted; the schedule is never made longer than ``max_steps``.

    Args:
        minutes: The budget, in minutes (> 0).
        agree: Maps this process's decision to the decision of all processes (default: single process, identity).
        clock: Seconds from an arbitrary origin (default `time.monotonic`; tests pass a fake one).
        fit_schedule: Refit the learning-rate schedule to the projected last step.
        fit_every: Steps between projections.
        slowest: Maps this process's seconds per step to the slowest process's (default: identity).
    """

    def __init__(
        self,
        minutes: float,
        agree: Callable[[bool], bool] | None = None,
        clock: Callable[[], float] = time.monotonic,
        fit_schedule: bool = False,
        fit_every: int = 50,
        slowest: Callable[[float], float] | None = None,
    ) -> None:
        if not (math.isfinite(minutes) and minutes > 0):
            raise ValueError(f"The time limit must be a positive number of minutes, got {minutes!r}.")
        if fit_every < 1:
            raise ValueError(f"fit_every must be >= 1, got {fit_every!r}.")
        self.minutes = minutes
        self.agree = agree or (lambda over: over)
        self.clock = clock
        self.fit_schedule = fit_schedule
        self.fit_every = fit_every
        self.slowest = slowest or (lambda seconds: seconds)
        self.started: float | None = None
        self.start_step = 0
        self.stopped_at_step: int | None = None
        self.fitted_steps: int | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = self.clock()
        self.start_step = state.global_step
        self.stopped_at_step = None

    def _refit(self, state, lr_scheduler) -> None:
        steps = state.global_step - self.start_step
        elapsed = self.clock() - self.started
        per_step = self.slowest(elapsed / steps)
        projected = state.global_step + int((60.0 * self.minutes - elapsed) / per_step)
        current = schedule_length(lr_scheduler)
        if current is None:
            return
        warmup = lr_scheduler.lr_lambdas[0].keywords.get("num_warmup_steps", 0)
        target = max(min(projected, state.max_steps), warmup + 1)
        if target == current or (target > current and current >= state.max_steps):
            return
        set_schedule_length(lr_scheduler, target)
        self.fitted_steps = target

    def on_step_end(self, args, state, control, **kwargs):
        if self.started is None or control.should_training_stop:
            return
        steps = state.global_step - self.start_step
        if self.fit_schedule and steps > 0 and steps % self.fit_every == 0:
            self._refit(state, kwargs.get("lr_scheduler"))
        if not self.agree(self.clock() - self.started >= 60.0 * self.minutes):
            return
        control.should_training_stop = True
        # What `DefaultFlowCallback` does at max_steps: a final step-strategy save and evaluation (epoch strategies
        # act at the end of the interrupted epoch).
        if args.save_strategy == "steps":  # str enums: equal to their value
            control.should_save = True
        if args.eval_strategy == "steps" and args.eval_delay <= state.global_step:
            control.should_evaluate = True
        self.stopped_at_step = state.global_step
        logger.warning(
            f"max_train_minutes={self.minutes:g} reached after {state.global_step} of {state.max_steps} steps: "
            "training stops here."
        )


class _ClearDistillerGradients(TrainerCallback):
    """Clear the distiller's gradients after every optimizer step: the `Trainer` calls ``model.zero_grad()``, which
    does not reach them, so they would otherwise add up over the whole run."""

    def __init__(self, parameters: Callable[[], list[nn.Parameter]]) -> None:
        self.parameters = parameters

    def on_optimizer_step(self, args, state, control, **kwargs):
        for param in self.parameters():
            param.grad = None


def load_teacher(name_or_path: str | os.PathLike, **kwargs: Any) -> PreTrainedModel:
    """Load a real-valued (or any transformers DETR-style) teacher from a Hub id or a local folder.

    The teacher uses eager attention so cross-attention maps are available to distillers that need them.

    Raises:
        FileNotFoundError: If ``name_or_path`` looks like a local path that does not exist.
    """
    check_local_path(name_or_path, "Teacher model folder")
    kwargs.setdefault("attn_implementation", "eager")
    return AutoModelForObjectDetection.from_pretrained(name_or_path, **kwargs)


class QDetrDistillationTrainer(DistillationTrainerOverrides, Trainer):
    """`Trainer` for a (quantized) DETR student with an optional distillation loss from a frozen teacher.

    Training loss: ``L = L_GT + sum(distiller terms)``, where ``L_GT`` is the detector's own Hungarian loss and the
    distiller (e.g. :class:`~qdetr_hf.distillers.DRDDistiller`, which returns ``λ L_DRD``) sees both models' outputs
    on the same batch. Each term is logged separately (``loss_gt``, ``loss_ce``, ``loss_bbox``, ``loss_giou``, the
    distiller's ``loss_*`` terms and statistics, and the total ``loss``). Evaluation reports the ground-truth loss and
    COCO metrics (``eval_AP``, ``eval_AP50``, ...).

    The teacher is frozen (``requires_grad_(False)``, eval mode), is not a submodule of the student, and is placed by
    Accelerate with ``prepare_model(..., evaluation_mode=True)`` (device and mixed-precision autocast, no DDP wrap).
    Teacher and student label spaces are checked at construction.

    With ``args.max_train_minutes`` set, a :class:`TimeLimitCallback` (:attr:`time_limit`) ends training once that
    wall-clock budget is used up, whatever ``max_steps`` says.

    A distiller's own parameters (QSKD's adapter, IDa-Det's variance) are trained with the student: the trainer's
    optimizer gives them a group without weight decay, gradient clipping and the logged ``grad_norm`` cover them, and
    their gradients are cleared after every optimizer step. An optimizer passed as ``optimizers=(optimizer,
    scheduler)`` must already hold them, or the trainer raises a ``ValueError`` at construction: it does not add a
    group to a user's optimizer behind their back, because it would have to guess that group's learning rate and
    weight decay, and a scheduler built for the optimizer's groups (``LambdaLR`` and the like) would not cover a group
    added later.

    Before the first step of a fresh run, an uncalibrated quantized student is calibrated on
    ``args.calibration_batches`` training batches (statistics all-reduced across processes). Checkpoints are written
    to ``output_dir/_staging`` and renamed into place once complete, so an interrupted save never leaves a
    ``checkpoint-N`` that ``resume_from_checkpoint=True`` would pick up.

    Args:
        model: The student, usually a `QDetrForObjectDetection`.
        args: Training arguments (a `QDetrTrainingArguments` gives the paper's defaults).
        teacher_model: A model, or a Hub id / local path loaded with `AutoModelForObjectDetection`.
        distiller: The distillation method; `None` trains on the ground-truth loss only (plain QAT).
        teacher_kwargs: Extra keyword arguments for loading the teacher from a path.
        **kwargs: Passed to `Trainer` (`train_dataset`, `eval_dataset`, `data_collator`, `processing_class`, ...).
            `compute_metrics` defaults to COCO metrics with the student's `id2label`.
    """

    # compute_loss returns per-batch means: the Trainer divides them by the accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        model: PreTrainedModel | None = None,
        args: TrainingArguments | None = None,
        teacher_model: PreTrainedModel | str | os.PathLike | None = None,
        distiller: Distiller | None = None,
        teacher_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if args is None:
            args = QDetrTrainingArguments(output_dir="qdetr-output")
        _fix_detection_arguments(args)
        if kwargs.get("compute_metrics") is None and model is not None:
            kwargs["compute_metrics"] = make_compute_metrics(id2label=model.config.id2label)
        if distiller is not None and teacher_model is None:
            raise ValueError(f"The '{distiller.name}' distiller needs a teacher: pass teacher_model=...")
        super().__init__(model=model, args=args, **kwargs)
        self.distiller = distiller
        self.teacher: nn.Module | None = None
        if teacher_model is not None:
            if isinstance(teacher_model, (str, os.PathLike)):
                teacher_model = load_teacher(teacher_model, **(teacher_kwargs or {}))
            check_label_spaces(teacher_model.config, self.model.config)
            if distiller is not None and distiller.needs_attentions:
                teacher_model.set_attn_implementation("eager")
            teacher_model.requires_grad_(False).eval()
            self.teacher = self.accelerator.prepare_model(teacher_model, evaluation_mode=True)
        if self.distiller is not None:
            self.distiller.to(self.args.device)
        self._check_user_optimizer()
        if self._distiller_parameters():
            self.add_callback(_ClearDistillerGradients(self._distiller_parameters))
        self._term_sums: dict[str, torch.Tensor] = {}
        self._term_count = 0
        self.model_card_data: Any = None
        self.time_limit: TimeLimitCallback | None = None
        minutes = getattr(self.args, "max_train_minutes", None)
        if minutes is not None:
            self.time_limit = TimeLimitCallback(
                minutes,
                agree=functools.partial(any_process, device=self.args.device),
                fit_schedule=getattr(self.args, "fit_schedule_to_time_limit", False),
                slowest=functools.partial(max_over_processes, device=self.args.device),
            )
            self.add_callback(self.time_limit)

    # ------------------------------------------------------------------------------------------------------------
    # Loss
    # ------------------------------------------------------------------------------------------------------------
    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ):
        """Ground-truth loss of the student plus, in training with a distiller, the distillation terms."""
        distill = model.training and self.distiller is not None and self.teacher is not None
        if not distill:
            outputs = model(**inputs)
            if model.training:
                self._record_terms(outputs.loss, outputs.loss_dict, {})
            return (outputs.loss, outputs) if return_outputs else outputs.loss

        distiller = self.distiller
        extra = {}
        if distiller.needs_attentions:
            extra["output_attentions"] = True
        if distiller.needs_hidden_states:
            extra["output_hidden_states"] = True
        student_model = self.accelerator.unwrap_model(model)
        teacher = self.accelerator.unwrap_model(self.teacher)
        wants_decoder = distiller.needs_decoder_inputs
        with (
            capture_co_attended_features(student_model, distiller.co_attended_layers) as student_features,
            capture_decoder_inputs(student_model, wants_decoder) as student_decoder,
        ):
            outputs = model(**inputs, **extra)
        images = {k: inputs[k] for k in ("pixel_values", "pixel_mask") if inputs.get(k) is not None}
        with (
            torch.no_grad(),
            capture_co_attended_features(teacher, distiller.co_attended_layers) as teacher_features,
            capture_decoder_inputs(teacher, wants_decoder) as teacher_decoder,
        ):
            teacher_outputs = self.teacher(**images, **extra)
        student = _detector_view(outputs, student_features, student_model, student_decoder, inputs, wants_decoder)
        teacher_view = _detector_view(
            teacher_outputs, teacher_features, teacher, teacher_decoder, inputs, wants_decoder
        )
        # The distiller runs under the same mixed precision as the forward passes whose tensors it reuses (extra
        # decoder passes on a bf16 encoder memory, for instance).
        with self.accelerator.autocast():
            terms = distiller(student, teacher_view, inputs["labels"])
        loss = outputs.loss
        for name, value in terms.items():
            if name.startswith("loss_"):
                loss = loss + value
        self._record_terms(outputs.loss, outputs.loss_dict, terms)
        return (loss, outputs) if return_outputs else loss

    def _record_terms(self, loss_gt: torch.Tensor, loss_dict: dict | None, terms: dict[str, torch.Tensor]) -> None:
        values = {"loss_gt": loss_gt}
        for name in ("loss_ce", "loss_bbox", "loss_giou"):
            if loss_dict and name in loss_dict:
                values[name] = loss_dict[name]
        values.update(terms)
        for name, value in values.items():
            value = value.detach().float()
            self._term_sums[name] = self._term_sums[name] + value if name in self._term_sums else value
        self._term_count += 1

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the mean of each recorded loss term (averaged over processes) to the training logs."""
        if "loss" in logs and self._term_count:
            names = sorted(self._term_sums)
            stacked = torch.stack([self._term_sums[n] / self._term_count for n in names])
            stacked = self.accelerator.reduce(stacked, reduction="mean")
            for name, value in zip(names, stacked.tolist()):
                logs[name] = value
            self._term_sums = {}
            self._term_count = 0
        super().log(logs, start_time)

    # ------------------------------------------------------------------------------------------------------------
    # Optimiser: no weight decay on quantizer steps/offsets/DA; optional backbone learning rate
    # ------------------------------------------------------------------------------------------------------------
    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        names = super().get_decay_parameter_names(model)
        return [n for n in names if not any(marker in n for marker in QUANTIZER_PARAMETER_MARKERS)]

    def _group_learning_rate(self, name: str) -> float | None:
        """Learning rate of parameter ``name``'s optimizer group (None: ``learning_rate``)."""
        if any(marker in name for marker in QUANTIZER_PARAMETER_MARKERS):
            return getattr(self.args, "quantizer_learning_rate", None)
        if ".backbone." in f".{name}":
            return getattr(self.args, "backbone_learning_rate", None)
        return None

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        distiller_params = self._distiller_parameters()
        own_rates = any(
            getattr(self.args, f, None) is not None for f in ("backbone_learning_rate", "quantizer_learning_rate")
        )
        if self.optimizer is None and (own_rates or distiller_params):
            opt_model = self.model if model is None else model
            decay = set(self.get_decay_parameter_names(opt_model))
            groups: dict[tuple[float | None, bool], list[nn.Parameter]] = {}
            for name, param in opt_model.named_parameters():
                if param.requires_grad:
                    groups.setdefault((self._group_learning_rate(name), name in decay), []).append(param)
            param_groups = [
                {
                    "params": params,
                    "weight_decay": self.args.weight_decay if with_decay else 0.0,
                    **({"lr": lr} if lr is not None else {}),
                }
                for (lr, with_decay), params in groups.items()
            ]
            if distiller_params:
                param_groups.append({"params": distiller_params, "weight_decay": 0.0})
            if self.optimizer_cls_and_kwargs is not None:
                optimizer_cls, optimizer_kwargs = self.optimizer_cls_and_kwargs
                optimizer_kwargs = dict(optimizer_kwargs)
            else:
                optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            self.optimizer = optimizer_cls(param_groups, **optimizer_kwargs)
        return super().create_optimizer(model)

    def _distiller_parameters(self) -> list[nn.Parameter]:
        if self.distiller is None:
            return []
        return [p for p in self.distiller.parameters() if p.requires_grad]

    def _check_user_optimizer(self) -> None:
        """Raise if an optimizer given as ``optimizers=(...)`` misses trainable distiller parameters (see the class
        docstring for why they are not added to it)."""
        if self.optimizer is None or self.distiller is None:
            return
        held = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        missing = [name for name, p in self.distiller.named_parameters() if p.requires_grad and id(p) not in held]
        if missing:
            raise ValueError(
                f"The optimizer passed as optimizers=(...) does not hold the trainable parameters of the "
                f"'{self.distiller.name}' distiller ({', '.join(repr(n) for n in missing)}), so they would never "
                "train. Build it over both, e.g. torch.optim.AdamW([*model.parameters(), *distiller.parameters()]), "
                "or leave `optimizers` unset so the trainer creates the optimizer (no weight decay on the distiller)."
            )

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch)
        # The distiller is not wrapped by DDP: average its gradients across processes by hand.
        params = [p for p in self._distiller_parameters() if p.grad is not None]
        if params and self.accelerator.num_processes > 1:
            for param in params:
                param.grad = self.accelerator.reduce(param.grad, reduction="mean")
        return loss

    def _save_distiller(self, output_dir: str) -> None:
        if self._distiller_parameters() and self.args.should_save:
            torch.save(self.distiller.state_dict(), os.path.join(output_dir, DISTILLER_STATE_NAME))

    def _load_model_weights(self, checkpoint: str, model: nn.Module | None = None) -> None:
        """Load a checkpoint's weights into the model with `from_pretrained`'s key conversion, strictly.

        `save_pretrained` writes DETR's legacy key names (``backbone.conv_encoder``, ``out_proj``, ``fc1``); the
        stock `Trainer` resume path loads the raw file non-strictly, which silently restores nothing for DETR models.
        """
        target = self.accelerator.unwrap_model(model if model is not None else self.model)
        reference = type(target).from_pretrained(checkpoint)
        result = target.load_state_dict(reference.state_dict(), strict=False)
        # Trainable BatchNorm (from-scratch teachers) counts batches; DETR's frozen BatchNorm has no such buffer.
        missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
        if missing or result.unexpected_keys:
            raise RuntimeError(
                f"Checkpoint {checkpoint} does not match the model: missing {missing[:5]}, unexpected "
                f"{result.unexpected_keys[:5]}."
            )

    def _load_distiller(self, checkpoint: str) -> None:
        path = os.path.join(checkpoint, DISTILLER_STATE_NAME)
        if self.distiller is not None and os.path.isfile(path):
            self.distiller.load_state_dict(torch.load(path, map_location=self.args.device, weights_only=True))

    # ------------------------------------------------------------------------------------------------------------
    # Calibration before the first step
    # ------------------------------------------------------------------------------------------------------------
    def calibrate_student(self, num_batches: int | None = None) -> None:
        """Calibrate the student's uncalibrated activation quantizers (and DA affines to fit) on training batches
        (all processes)."""
        num_batches = num_batches or getattr(self.args, "calibration_batches", 4)
        if num_batches <= 0:
            raise ValueError(
                "The student has uncalibrated activation quantizers and calibration_batches <= 0: calibrate it "
                "yourself with qdetr_hf.calibrate(model, batches) or set calibration_batches > 0."
            )
        logger.info(f"Calibrating the student's activation quantizers on {num_batches} training batches.")
        calibrate(
            self.model,
            self.get_train_dataloader(),
            max_batches=num_batches,
            device=self.args.device,
            show_progress=self.is_world_process_zero(),
            only_uncalibrated=True,
        )

    def train(self, resume_from_checkpoint: str | bool | None = None, trial: Any = None, **kwargs: Any):
        """`Trainer.train`, calibrating an uncalibrated quantized student first (fresh runs only: a resumed run loads
        the calibrated quantizers from its checkpoint)."""
        if not resume_from_checkpoint and activation_quantizers(self.model) and not is_calibrated(self.model):
            self.calibrate_student()
        return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial, **kwargs)

    # ------------------------------------------------------------------------------------------------------------
    # Evaluation: keep per-image targets intact when gathering the last (smaller) batch
    # ------------------------------------------------------------------------------------------------------------
    def evaluation_loop(self, *args: Any, **kwargs: Any):
        self.gather_function = detection_gather_for_metrics(self.accelerator)
        return super().evaluation_loop(*args, **kwargs)

    # ------------------------------------------------------------------------------------------------------------
    # Model card
    # ------------------------------------------------------------------------------------------------------------
    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        """Write the Q-DETR model card when :attr:`model_card_data` was set (by the example scripts after measuring
        the model); otherwise fall back to the generic `Trainer` card."""
        if self.model_card_data is None:
            return super().create_model_card(*args, **kwargs)
        if not self.is_world_process_zero():
            return None
        from .model_card import write_model_card

        write_model_card(self.model_card_data, self.args.output_dir)
        return None


def files_to_push(output_dir: str | os.PathLike) -> list[str]:
    """The files `Trainer.push_to_hub` would upload from ``output_dir`` (relative paths), filtered exactly as
    ``huggingface_hub.HfApi.upload_folder`` filters them; lets you check an upload offline."""
    folder = Path(output_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"Output folder not found: {output_dir}")
    files = [path.relative_to(folder).as_posix() for path in sorted(folder.glob("**/*")) if path.is_file()]
    return list(filter_repo_objects(files, ignore_patterns=PUSH_IGNORE_PATTERNS + DEFAULT_IGNORE_PATTERNS))


def _detector_view(
    outputs: Any,
    co_attended: dict[int, torch.Tensor],
    model: nn.Module,
    decoder_inputs: dict[str, Any],
    inputs: dict[str, Any],
    with_decoder_inputs: bool,
) -> DetectorOutputs:
    return DetectorOutputs(
        logits=outputs.logits,
        pred_boxes=outputs.pred_boxes,
        outputs=outputs,
        co_attended=co_attended,
        model=model,
        pixel_values=inputs.get("pixel_values"),
        pixel_mask=inputs.get("pixel_mask"),
        decoder_inputs=decoder_inputs if with_decoder_inputs else None,
    )


def _fix_detection_arguments(args: TrainingArguments) -> None:
    if args.remove_unused_columns:
        logger.warning("Object detection needs remove_unused_columns=False (labels are dicts); setting it.")
        args.remove_unused_columns = False
    if args.eval_do_concat_batches:
        logger.warning("Object detection needs eval_do_concat_batches=False (ragged targets); setting it.")
        args.eval_do_concat_batches = False


__all__ = [
    "QDetrDistillationTrainer",
    "QDetrTrainingArguments",
    "TimeLimitCallback",
    "any_process",
    "check_checkpoint",
    "files_to_push",
    "load_teacher",
    "prepare_output_dir",
]
