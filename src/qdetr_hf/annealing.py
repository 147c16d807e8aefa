"""Bit-width annealing: a student's weight and activation widths lowered one bit at a time in one training run."""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from .calibration import quantized_layers
from .configuration_qdetr import check_bits
from .transformers_compat import schedule_length

logger = logging.getLogger(__name__)

__all__ = ["BitWidthAnnealing", "annealed_level"]


def annealed_level(start_bits: int, end_bits: int, step: int, anneal_steps: int) -> int:
    """The annealing width after ``step`` completed steps: ``start_bits`` at step 0, one bit lower at each of the
    ``start_bits - end_bits`` evenly spaced steps ``k * anneal_steps / (start_bits - end_bits)``, ``end_bits`` from
    ``anneal_steps`` on."""
    drops = start_bits - end_bits
    if drops <= 0 or step >= anneal_steps:
        return end_bits
    return start_bits - (max(step, 0) * drops) // anneal_steps


class BitWidthAnnealing(TrainerCallback):
    """Trains a quantized student first at ``start_bits`` and lowers its widths to the model's own, one bit at a time,
    within the first ``fraction`` of the learning-rate schedule: one run, one optimizer, one schedule (unlike the
    staged `requantize` schedule, which trains a second model from the first one's weights).

    Every quantized layer (`quantized_layers`) whose weight or input width lies below ``start_bits`` is annealed: at
    each step its width is ``max(own width, level)``, the level falling from ``start_bits`` to the lowest own width
    (:func:`annealed_level`). Layers at or above ``start_bits`` (the first convolution's 8 bits, 8-bit heads) keep
    theirs. When a width drops, the weight steps are re-initialised from the current weights by the quantizer's own
    rule (``weight_step_init``, as `requantize` does), the activation steps keep their calibrated or learned span
    (`LSQActivationQuantizer.set_bits`), and the optimizer forgets the moments of the steps it changed.

    The schedule's length is the learning-rate schedule's (refitted under a time limit by `TimeLimitCallback`), else
    ``max_steps``; the level never rises. While any width is above its own, the Trainer's checkpoints and
    evaluations are skipped (a wider model is not the one being trained for, and must not become the "best"
    checkpoint). A run resumed from a checkpoint is therefore past the anneal, and a run that stops before the anneal
    ends is lowered to the model's widths at ``on_train_end``. Do not combine with oscillation freezing, whose frozen
    codes belong to one width.

    Args:
        model: The quantized student, built (and calibrated) at its final widths.
        start_bits: Width the annealed quantizers start at (2-8); above at least one of the model's widths.
        fraction: Share of the schedule over which the widths fall, in ``(0, 1)`` (project choice: 0.25).
    """

    def __init__(self, model: nn.Module, start_bits: int, fraction: float = 0.25) -> None:
        self.start_bits = check_bits(start_bits)
        if not 0 < fraction < 1:
            raise ValueError(f"The annealing fraction must be in (0, 1), got {fraction!r}.")
        self.fraction = fraction
        self.layers = quantized_layers(model)
        self.targets = {
            name: (layer.weight_quantizer.bits, layer.input_quantizer.bits) for name, layer in self.layers.items()
        }
        below = [bits for pair in self.targets.values() for bits in pair if bits < self.start_bits]
        if not below:
            raise ValueError(
                f"Nothing to anneal from {start_bits} bits: every quantized layer is at {start_bits} bits or more."
            )
        self.end_bits = min(below)
        self.level: int | None = None
        self._skipping_logged = False

    @property
    def finished(self) -> bool:
        """Whether every annealed quantizer is at the model's own width."""
        return self.level is not None and self.level <= self.end_bits

    def anneal_steps(self, state: Any, lr_scheduler: Any = None) -> int:
        """Steps over which the widths fall: ``fraction`` of the learning-rate schedule's length (``max_steps`` when
        the schedule does not say), at least 1."""
        total = schedule_length(lr_scheduler) or state.max_steps
        return max(1, math.ceil(self.fraction * total))

    @torch.no_grad()
    def set_level(self, level: int, optimizer: torch.optim.Optimizer | None = None) -> list[str]:
        """Put every annealed quantizer at ``max(own width, level)``; returns the names of the quantizers changed."""
        changed: list[str] = []
        forget: list[torch.Tensor] = []
        for name, layer in self.layers.items():
            for kind, target in zip(("weight_quantizer", "input_quantizer"), self.targets[name]):
                quantizer = getattr(layer, kind)
                wanted = max(target, level)
                if target >= self.start_bits or quantizer.bits == wanted:
                    continue
                quantizer.set_bits(wanted)
                if kind == "weight_quantizer":  # weight steps start afresh; activation steps keep their span
                    quantizer.initialize_from(layer.weight)
                forget.append(quantizer.raw_step)
                changed.append(f"{name}.{kind}")
        state = getattr(optimizer, "state", None)
        if state is not None:
            for parameter in forget:
                state.pop(parameter, None)
        self.level = level
        return changed

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step > 0:  # checkpoints are only written once the anneal is over
            self.level = self.end_bits
            return
        self.set_level(self.start_bits, kwargs.get("optimizer"))
        logger.info(
            f"Bit-width annealing: training starts at {self.start_bits} bits, down to the model's widths over the "
            f"first {self.anneal_steps(state, kwargs.get('lr_scheduler'))} steps"
        )

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.level is None or self.finished:
            return
        steps = self.anneal_steps(state, kwargs.get("lr_scheduler"))
        level = min(self.level, annealed_level(self.start_bits, self.end_bits, state.global_step, steps))
        if level < self.level:
            changed = self.set_level(level, kwargs.get("optimizer"))
            logger.info(
                f"Bit-width annealing: {len(changed)} quantizers at most {level} bits from step {state.global_step}"
            )
        if not self.finished and (control.should_save or control.should_evaluate):
            control.should_save = control.should_evaluate = False
            if not self._skipping_logged:
                logger.warning("Bit-width annealing: checkpoints and evaluations are skipped until the anneal ends")
                self._skipping_logged = True

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.level is not None and not self.finished:
            logger.warning(
                f"Training ended at step {state.global_step}, before the bit-width anneal finished: the widths are "
                "lowered to the model's own without training at them."
            )
            self.set_level(self.end_bits, kwargs.get("optimizer"))
