"""Mixed precision at a size budget: each layer's measured sensitivity to low-bit weights, and the widths that fit."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .calibration import detector_inputs
from .efficiency import MB, efficiency_report
from .quantization import LSQWeightQuantizer, quantization_disabled, quantized_layers


@dataclass
class LayerSensitivity:
    """How much one layer's weights cost the model's output at each candidate bit width.

    Attributes:
        name: Module name of the quantized layer.
        numel: Number of weights (what its bit width multiplies in the model size).
        costs: Bits -> output error of the model when only this layer's weights are quantized at that width.
    """

    name: str
    numel: int
    costs: dict[int, float]


def _output_error(outputs: Any, reference: Any) -> torch.Tensor:
    """Squared error of the class probabilities plus absolute error of the boxes, averaged over queries."""
    probs = outputs.logits.float().softmax(-1)
    reference_probs = reference.logits.float().softmax(-1)
    class_error = (probs - reference_probs).pow(2).sum(-1).mean()
    box_error = (outputs.pred_boxes.float() - reference.pred_boxes.float()).abs().sum(-1).mean()
    return class_error + box_error


@torch.no_grad()
def layer_sensitivity(
    model: nn.Module,
    batches: Iterable[Any],
    candidate_bits: Sequence[int] = (2, 3, 4, 8),
    max_batches: int = 2,
    show_progress: bool = False,
) -> list[LayerSensitivity]:
    """Measure, for every quantized layer and candidate width, the output error of quantizing that layer alone.

    The model runs real-valued (every quantizer bypassed) except the layer under test, whose weights are replaced by
    their per-channel fake-quantized version at the candidate width (steps by the layer's own ``weight_step_init``);
    the cost is :func:`_output_error` against the real-valued outputs on the same batches. This is the "quantize one
    layer at a time" sensitivity of mixed-precision search (as in HAWQ's ablations, with the output error in place of
    a Hessian trace); it needs no calibration and no labels.

    Args:
        model: A ``QDetrForObjectDetection`` (its current weights are measured; nothing is changed).
        batches: DETR batches (dicts with ``pixel_values`` and optional ``pixel_mask``) or image tensors.
        candidate_bits: The widths to measure.
        max_batches: Batches used (the same for every layer).
        show_progress: Show a progress bar over layers.
    """
    layers = quantized_layers(model)
    if not layers:
        raise ValueError(
            "layer_sensitivity needs a quantized model (QDetrForObjectDetection); it has no quantized layer."
        )
    device = next(model.parameters()).device
    kept = []
    for i, batch in enumerate(batches):
        if i >= max_batches:
            break
        kept.append(detector_inputs(batch, device, "Batches"))
    if not kept:
        raise ValueError("layer_sensitivity received no batches.")
    was_training = model.training
    model.eval()
    results = []

    def run() -> list[Any]:
        return [model(**inputs) for inputs in kept]

    items: Iterable = layers.items()
    if show_progress:
        from tqdm.auto import tqdm

        items = tqdm(list(items), desc="Layer sensitivity", leave=False)
    try:
        with quantization_disabled(model):
            outputs = run()
            for name, layer in items:
                original = layer.weight.detach().clone()
                costs = {}
                for bits in candidate_bits:
                    quantizer = LSQWeightQuantizer(
                        original.shape[0], bits, weight_ndim=original.dim(), init=layer.weight_quantizer.init
                    ).to(original.device)
                    quantizer.initialize_from(original)
                    layer.weight.copy_(quantizer(original.float()).to(original.dtype))
                    errors = [_output_error(out, ref) for out, ref in zip(run(), outputs, strict=True)]
                    costs[int(bits)] = float(torch.stack(errors).mean())
                layer.weight.copy_(original)
                results.append(LayerSensitivity(name, original.numel(), costs))
    finally:
        model.train(was_training)
    return results


def allocate_bits(sensitivities: Sequence[LayerSensitivity], budget_bits: float) -> dict[str, int]:
    """The per-layer widths, among each layer's measured candidates, whose total ``sum(bits * numel)`` stays within
    ``budget_bits`` at low total cost.

    Greedy on the marginal rate (the multiple-choice knapsack's usual relaxation): every layer starts at its widest
    candidate, then the step down (to the next narrower candidate) with the least cost increase per bit saved is taken,
    one at a time, until the budget holds. A step that costs nothing is taken first; ties go to the larger layer.

    Raises:
        ValueError: If even every layer at its narrowest candidate exceeds the budget.
    """
    widths = {s.name: sorted(s.costs) for s in sensitivities}
    chosen = {s.name: widths[s.name][-1] for s in sensitivities}
    by_name = {s.name: s for s in sensitivities}

    def total() -> float:
        return sum(chosen[name] * by_name[name].numel for name in chosen)

    narrowest = sum(widths[s.name][0] * s.numel for s in sensitivities)
    if narrowest > budget_bits:
        raise ValueError(
            f"No choice fits: every layer at its narrowest width needs {narrowest:.0f} weight bits, the budget is "
            f"{budget_bits:.0f}. Raise the budget, add a narrower candidate width, or quantize more of the model "
            "(QDetrConfig.head_bits: the input projection and heads count 32 bits per weight while real-valued)."
        )
    while total() > budget_bits:
        best = None
        for name, bits in chosen.items():
            candidates = widths[name]
            index = candidates.index(bits)
            if index == 0:
                continue
            lower = candidates[index - 1]
            saved = (bits - lower) * by_name[name].numel
            rate = (by_name[name].costs[lower] - by_name[name].costs[bits]) / saved
            key = (rate, -saved)
            if best is None or key < best[0]:
                best = (key, name, lower)
        _, name, lower = best
        chosen[name] = lower
    return chosen


def choose_bit_widths(
    model: nn.Module,
    batches: Iterable[Any],
    target_size_mb: float | None = None,
    target_average_bits: float | None = None,
    candidate_bits: Sequence[int] = (2, 3, 4),
    image_size: int | tuple[int, int] = 128,
    max_batches: int = 2,
    sensitivities: Sequence[LayerSensitivity] | None = None,
    layers: Iterable[str] | None = None,
    show_progress: bool = False,
) -> dict[str, int]:
    """Per-layer weight bit widths for a size budget, for ``QDetrConfig(layer_weight_bits=...)``.

    Give either ``target_size_mb`` (the model size under the paper's convention, as ``efficiency_report(...).size_mb``
    counts it: 32 bits per real-valued parameter, b bits per b-bit weight) or ``target_average_bits`` (the average
    width of the quantized weights). Widths come from :func:`allocate_bits` on :func:`layer_sensitivity` (or the
    ``sensitivities`` given), so the budget is never exceeded. ``layers`` restricts the choice to those layers (e.g.
    all but the 8-bit first convolution); the others keep their widths and count as fixed in the budget.

    Raises:
        ValueError: If neither or both targets are given, or no choice fits.
    """
    if (target_size_mb is None) == (target_average_bits is None):
        raise ValueError("Give exactly one of target_size_mb and target_average_bits.")
    all_layers = quantized_layers(model)
    names = list(all_layers) if layers is None else [name for name in all_layers if name in set(layers)]
    numel = sum(all_layers[name].weight.numel() for name in names)
    if target_average_bits is not None:
        if not target_average_bits > 0:
            raise ValueError(f"target_average_bits must be positive, got {target_average_bits!r}.")
        budget = target_average_bits * numel
    else:
        if not target_size_mb > 0:
            raise ValueError(f"target_size_mb must be positive, got {target_size_mb!r}.")
        report = efficiency_report(model, image_size)
        current = sum(all_layers[n].weight_quantizer.bits * all_layers[n].weight.numel() for n in names)
        fixed_bits = report.size_mb * MB * 8 - current  # everything but the weights being chosen
        budget = target_size_mb * MB * 8 - fixed_bits
    if sensitivities is None:
        sensitivities = layer_sensitivity(model, batches, candidate_bits, max_batches, show_progress)
    return allocate_bits([s for s in sensitivities if s.name in set(names)], budget)


def average_weight_bits(bits: Mapping[str, int], model: nn.Module) -> float:
    """Average width of the quantized weights of ``model`` under the per-layer ``bits`` (others at their own)."""
    layers = quantized_layers(model)
    total = sum(bits.get(name, layer.weight_quantizer.bits) * layer.weight.numel() for name, layer in layers.items())
    return total / sum(layer.weight.numel() for layer in layers.values())


__all__ = ["LayerSensitivity", "allocate_bits", "average_weight_bits", "choose_bit_widths", "layer_sensitivity"]
