"""Every override of a private transformers method, in one module: what to check when a new transformers release is out.

The supported releases are pyproject.toml's ``transformers`` range; ``.ci/run`` runs the suite on its lowest and
highest. Private methods overridden here (each mixin goes first in its user's bases, so ``super()`` reaches
transformers):

- ``Trainer._clip_grad_norm`` / ``_get_grad_norm``: the norm spans the distiller's trainable parameters too (they are
  not the model's); reads ``Trainer._has_mixed_mesh_grads``.
- ``Trainer._load_best_model`` / ``_load_from_checkpoint``: load through ``from_pretrained``'s key conversion,
  strictly, and restore the distiller's state.
- ``Trainer._save_checkpoint``: written into a staging folder then renamed into place (atomic); redirects
  ``Trainer._get_output_dir`` for the duration of the call.
- ``PreTrainedModel._check_and_adjust_attn_implementation``: a quantized model always runs its own attention function.

Also here: the length of a learning-rate schedule made by ``transformers.get_scheduler``, read from and written to
the ``functools.partial`` keywords (``num_training_steps``) of its ``LambdaLR`` (:func:`schedule_length`,
:func:`set_schedule_length`; used by the time limit and bit-width annealing).

Private attributes read or set elsewhere: ``PreTrainedModel._keys_to_ignore_on_load_missing`` and
``config._attn_implementation_internal`` (modeling_qdetr.py), and the ``_is_hf_initialized`` mark of parameters that
transformers' weight initialisation skips (quantization.py, packing.py, modeling_qdetr.py).
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import DistributedType
from torch import nn
from transformers import PreTrainedModel
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints
from transformers.utils import logging

logger = logging.get_logger(__name__)

STAGING_DIR = "_staging"
"""Sub-folder of ``output_dir`` where checkpoints are written before being renamed into place (atomic save). Its
leading underscore keeps it out of ``Trainer.push_to_hub`` uploads."""


def schedule_length(lr_scheduler: Any) -> int | None:
    """The number of steps a schedule made by ``transformers.get_scheduler`` decays over (the ``num_training_steps``
    of every ``partial`` in its ``LambdaLR``), or None for any other schedule."""
    lambdas = getattr(lr_scheduler, "lr_lambdas", None)
    if not lambdas or not all(isinstance(f, functools.partial) and "num_training_steps" in f.keywords for f in lambdas):
        return None
    return lambdas[0].keywords["num_training_steps"]


def set_schedule_length(lr_scheduler: Any, steps: int) -> None:
    """Make a schedule of :func:`schedule_length` decay over ``steps`` steps instead (warm-up unchanged)."""
    if schedule_length(lr_scheduler) is None:
        raise ValueError(f"Only schedules made by transformers' get_scheduler can be refitted, got {lr_scheduler!r}.")
    lr_scheduler.lr_lambdas = [
        functools.partial(f.func, *f.args, **{**f.keywords, "num_training_steps": steps})
        for f in lr_scheduler.lr_lambdas
    ]


class DistillationTrainerOverrides:
    """The private ``Trainer`` methods a distillation trainer changes.

    The class using it provides ``_distiller_parameters()`` (trainable parameters outside the model),
    ``_save_distiller(folder)``, ``_load_distiller(folder)`` and ``_load_model_weights(checkpoint, model)``.
    """

    def _clip_grad_norm(self, model: nn.Module) -> torch.Tensor | float | None:
        """Clip the gradients of the model *and* the distiller's parameters together (one norm over both)."""
        distiller_params = self._distiller_parameters()
        if not distiller_params or not self._plain_gradient_layout(model):
            return super()._clip_grad_norm(model)
        return self.accelerator.clip_grad_norm_([*model.parameters(), *distiller_params], self.args.max_grad_norm)

    def _get_grad_norm(self, model: nn.Module, grad_norm: torch.Tensor | float | None = None):
        """The logged ``grad_norm``: over the model's and the distiller's gradients (see :meth:`_clip_grad_norm`)."""
        distiller_params = self._distiller_parameters()
        if grad_norm is None and distiller_params and self._plain_gradient_layout(model):
            grad_norm = self.accelerator.clip_grad_norm_([*model.parameters(), *distiller_params], float("inf"))
        return super()._get_grad_norm(model, grad_norm=grad_norm)

    def _plain_gradient_layout(self, model: nn.Module) -> bool:
        """Whether the gradients are ordinary tensors that one ``clip_grad_norm_`` call spans (not FSDP, DeepSpeed or
        mixed device meshes, whose own clipping paths the stock `Trainer` keeps, over the model's parameters only)."""
        return self.accelerator.distributed_type not in (
            DistributedType.FSDP,
            DistributedType.DEEPSPEED,
        ) and not self._has_mixed_mesh_grads(model)

    def _load_best_model(self) -> None:
        checkpoint = self.state.best_model_checkpoint
        if isinstance(self.accelerator.unwrap_model(self.model), PreTrainedModel) and os.path.isfile(
            os.path.join(checkpoint, "config.json")
        ):
            logger.info(f"Loading best model from {checkpoint} (score: {self.state.best_metric}).")
            self._load_model_weights(checkpoint)
        else:
            super()._load_best_model()

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        target = self.accelerator.unwrap_model(model if model is not None else self.model)
        if isinstance(target, PreTrainedModel) and os.path.isfile(os.path.join(resume_from_checkpoint, "config.json")):
            self._load_model_weights(resume_from_checkpoint, model)
        else:
            super()._load_from_checkpoint(resume_from_checkpoint, model)
        self._load_distiller(resume_from_checkpoint)

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        run_dir = self._get_output_dir(trial=trial)
        staging_root = os.path.join(run_dir, STAGING_DIR)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staged, final = os.path.join(staging_root, name), os.path.join(run_dir, name)
        if self.args.should_save and os.path.exists(staged):
            shutil.rmtree(staged)  # left over from an interrupted save
        self.accelerator.wait_for_everyone()
        # Trainer._save_checkpoint writes to `_get_output_dir() / checkpoint-N`: point it at the staging folder.
        self._get_output_dir = lambda trial=None: staging_root  # type: ignore[method-assign]
        # A checkpoint keeps the float latent weights so that a resumed run continues exactly; only the final model
        # (save_model / push_to_hub) is written packed.
        unwrapped = self.accelerator.unwrap_model(self.model)
        packs = getattr(unwrapped, "pack_weights_on_save", True)
        unwrapped.pack_weights_on_save = False
        try:
            super()._save_checkpoint(model, trial)
        finally:
            del self._get_output_dir
            unwrapped.pack_weights_on_save = packs
        self._save_distiller(staged)
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(staged, final)
            with contextlib.suppress(OSError):
                os.rmdir(staging_root)  # only if empty
            if self.state.best_model_checkpoint and Path(self.state.best_model_checkpoint).parent == Path(staging_root):
                self.state.best_model_checkpoint = os.path.join(run_dir, Path(self.state.best_model_checkpoint).name)
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=False,
            )
        self.accelerator.wait_for_everyone()


class FixedAttentionImplementation:
    """``PreTrainedModel._check_and_adjust_attn_implementation`` for a model that always runs the one attention
    function named by its ``attention_function`` class attribute (any other request is logged and ignored)."""

    attention_function: str

    def _check_and_adjust_attn_implementation(
        self, attn_implementation: str | None, is_init_check: bool = False, allow_all_kernels: bool = False
    ) -> str:
        if attn_implementation not in (None, self.attention_function, "eager", "sdpa"):
            logger.warning(
                f"{type(self).__name__} ignores attn_implementation={attn_implementation!r}: quantized attention "
                f"runs through the '{self.attention_function}' attention function."
            )
        return self.attention_function


__all__ = ["STAGING_DIR", "DistillationTrainerOverrides", "FixedAttentionImplementation"]
