"""Weight oscillation in quantization-aware training (Nagel et al., ICML 2022): measurement, dampening, freezing.

A latent weight near the midpoint between two grid levels can flip its integer code back and forth every few steps;
at 2-3 bits such flips are large changes of the function. "Overcoming Oscillations in Quantization-Aware Training"
(Nagel, Fournarakis, Bondarenko, Blankevoort, ICML 2022) measures them by an exponential moving average of how often a
weight's code changes direction, and proposes two remedies implemented here: a dampening loss that pulls latent
weights towards the centre of their level, and freezing weights whose oscillation frequency passes a threshold at
their most frequent level.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from .distillers.base import DetectorOutputs, Distiller
from .quantization import QuantConv2d, QuantLinear, quantized_layers


def dampening_loss(model: nn.Module) -> torch.Tensor:
    """Nagel et al.'s oscillation dampening, ``sum over quantized layers of mean((s * q - clip(w)) ** 2) / s**2``.

    ``q`` is the weight's integer code (no gradient) and ``clip(w)`` the latent weight clipped to the quantizer's
    range, so the gradient pulls each latent weight towards the centre of its current level. Divided by the squared
    step so every layer counts alike whatever its scale (the paper's sum is per layer, in weight units).
    """
    total = None
    for layer in quantized_layers(model).values():
        quantizer = layer.weight_quantizer
        if not quantizer.enabled:
            continue
        step = quantizer.step.detach()
        weight = layer.weight.float()
        clipped = torch.maximum(torch.minimum(weight, step * quantizer.qp), step * quantizer.qn)
        centre = (weight.detach() / step).round().clamp(quantizer.qn, quantizer.qp) * step
        term = ((centre - clipped) / step).pow(2).mean()
        total = term if total is None else total + term
    if total is None:
        raise ValueError("dampening_loss needs a model with quantized layers.")
    return total


class OscillationDampening(Distiller):
    """:func:`dampening_loss` as a loss term (``loss_dampening``), so it joins any distillation method through
    :class:`~qdetr_hf.distillers.CombinedDistiller` (``--oscillation_dampening`` in ``examples/distill.py``).

    Args:
        weight: The loss weight λ (Nagel et al. anneal it over training; here it is constant).
    """

    name = "dampening"

    def __init__(self, weight: float) -> None:
        super().__init__()
        if not weight > 0:
            raise ValueError(f"The dampening weight must be positive, got {weight!r}.")
        self.weight = weight

    def forward(
        self, student: DetectorOutputs, teacher: DetectorOutputs, labels: Sequence[dict[str, torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        if student.model is None:
            raise ValueError("OscillationDampening needs the student model in its DetectorOutputs.")
        return {"loss_dampening": self.weight * dampening_loss(student.model)}


class OscillationTracker(TrainerCallback):
    """Measures weight oscillation after every optimizer step and, optionally, freezes oscillating weights.

    Per weight: its integer code, the direction of its last code change, the EMA (momentum ``momentum``) of
    oscillations (a change opposite to the previous one) and the EMA of the code itself. With ``freeze_threshold``,
    a weight whose oscillation EMA passes it is frozen at its rounded EMA code (its latent value is written back after
    every step). :meth:`summary` reports per layer group the share of weights oscillating (EMA above
    ``report_threshold``) and frozen.

    Args:
        model: The quantized student (its layers are tracked from the first step on).
        momentum: EMA momentum (paper: 0.01).
        freeze_threshold: Oscillation frequency above which a weight is frozen (paper: 0.01-0.04); ``None``: only
            measure.
        report_threshold: Frequency above which :meth:`summary` counts a weight as oscillating.
    """

    def __init__(
        self,
        model: nn.Module,
        momentum: float = 0.01,
        freeze_threshold: float | None = None,
        report_threshold: float = 0.005,
    ) -> None:
        if not 0 < momentum <= 1:
            raise ValueError(f"momentum must be in (0, 1], got {momentum!r}.")
        if freeze_threshold is not None and not 0 < freeze_threshold < 1:
            raise ValueError(f"freeze_threshold must be in (0, 1), got {freeze_threshold!r}.")
        self.layers: dict[str, QuantLinear | QuantConv2d] = quantized_layers(model)
        self.momentum = momentum
        self.freeze_threshold = freeze_threshold
        self.report_threshold = report_threshold
        self.state: dict[str, dict[str, torch.Tensor]] = {}

    @torch.no_grad()
    def update(self) -> None:
        """Record one optimizer step (called by the Trainer after each; call it yourself in a custom loop)."""
        m = self.momentum
        for name, layer in self.layers.items():
            codes = layer.weight_quantizer.codes(layer.weight).to(torch.int16)
            state = self.state.get(name)
            if state is None:
                self.state[name] = {
                    "codes": codes,
                    "direction": torch.zeros_like(codes, dtype=torch.int8),
                    "frequency": torch.zeros_like(codes, dtype=torch.float32),
                    "ema_code": codes.float(),
                    "frozen": torch.zeros_like(codes, dtype=torch.bool),
                }
                continue
            frozen = state["frozen"]  # frozen weights keep their statistics; their value is restored below
            change = (codes - state["codes"]).sign().to(torch.int8)
            changed = change != 0
            oscillated = changed & (state["direction"] == -change)
            frequency = state["frequency"] * (1 - m) + oscillated.float() * m
            state["frequency"] = torch.where(frozen, state["frequency"], frequency)
            state["direction"] = torch.where(changed & ~frozen, change, state["direction"])
            state["ema_code"] = torch.where(frozen, state["ema_code"], state["ema_code"] * (1 - m) + codes.float() * m)
            state["codes"] = codes
            if self.freeze_threshold is not None:
                frozen |= state["frequency"] > self.freeze_threshold
                frozen_codes = state["ema_code"].round()
                step = layer.weight_quantizer.step.detach().expand_as(layer.weight)
                layer.weight.copy_(torch.where(frozen, (frozen_codes * step).to(layer.weight.dtype), layer.weight))
                state["codes"] = torch.where(frozen, frozen_codes.to(torch.int16), codes)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.update()

    def summary(self) -> dict[str, dict[str, float]]:
        """Per layer group (backbone, encoder attention / FFN, decoder attention / FFN): share of weights oscillating
        and share frozen."""
        groups: dict[str, list[float]] = {}
        for name, state in self.state.items():
            group = layer_group(name)
            totals = groups.setdefault(group, [0.0, 0.0, 0.0])
            totals[0] += float((state["frequency"] > self.report_threshold).sum())
            totals[1] += float(state["frozen"].sum())
            totals[2] += state["codes"].numel()
        return {g: {"oscillating": o / n, "frozen": f / n} for g, (o, f, n) in groups.items()}


def layer_group(name: str) -> str:
    """The group of a quantized layer for per-group reports: ``backbone``, ``encoder attention``, ``encoder FFN``,
    ``decoder attention``, ``decoder FFN``, ``heads`` (the input projection and prediction heads, `head_bits`)."""
    if ".backbone." in f".{name}":
        return "backbone"
    if ".encoder." not in name and ".decoder." not in name:
        return "heads"
    part = "encoder" if ".encoder." in name else "decoder"
    return f"{part} {'FFN' if '.mlp.' in name else 'attention'}"


__all__ = ["OscillationDampening", "OscillationTracker", "dampening_loss", "layer_group"]
