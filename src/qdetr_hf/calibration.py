"""Model-level quantization: find a model's quantizers, switch them off, calibrate them on data."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .quant_layers import DistributionAlignment, QuantConv2d, QuantLinear, _AlignmentObserver
from .quantizers import MSE_SAMPLES_PER_BATCH, STEP_EPS, LSQActivationQuantizer, _Quantizer, _RangeObserver


def quantizers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Yield ``(name, module)`` for every LSQ weight and activation quantizer in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, _Quantizer):
            yield name, module


def quantized_layers(model: nn.Module) -> dict[str, QuantLinear | QuantConv2d]:
    """Every quantized Conv2d / Linear layer of ``model`` by module name, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, (QuantLinear, QuantConv2d))}


def activation_quantizers(model: nn.Module) -> list[LSQActivationQuantizer]:
    """All activation quantizers of ``model`` in module order."""
    return [m for _, m in quantizers(model) if isinstance(m, LSQActivationQuantizer)]


def _fitted_alignments(model: nn.Module) -> list[DistributionAlignment]:
    """The DA modules of ``model`` whose affine is fitted at calibration (``init="fit"``)."""
    return [m for m in model.modules() if isinstance(m, DistributionAlignment) and m.init == "fit"]


def is_calibrated(model: nn.Module) -> bool:
    """Whether every activation quantizer (and every DA with ``init="fit"``) of ``model`` has been calibrated
    (``True`` if it has none)."""
    return all(bool(m.calibrated) for m in [*activation_quantizers(model), *_fitted_alignments(model)])


@contextmanager
def quantization_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Context manager running ``model`` with every fake quantizer bypassed (real-valued forward)."""
    qs = [m for _, m in quantizers(model)]
    previous = [q.enabled for q in qs]
    for q in qs:
        q.enabled = False
    try:
        yield model
    finally:
        for q, was in zip(qs, previous, strict=True):
            q.enabled = was


def detector_inputs(
    batch: Any, device: torch.device | str, what: str = "Calibration batches"
) -> dict[str, torch.Tensor]:
    """The detector's inputs of a batch (a DETR collator's dict or a plain image tensor) on ``device``: only
    ``pixel_values`` and ``pixel_mask`` are moved; a ValueError / TypeError names ``what`` for anything else."""
    if isinstance(batch, Mapping):
        if "pixel_values" not in batch:
            raise ValueError(
                f"{what} must contain 'pixel_values' (got keys {sorted(batch)}); pass the batches of a "
                "DETR data collator or plain image tensors."
            )
        return {k: batch[k].to(device) for k in ("pixel_values", "pixel_mask") if k in batch}
    if isinstance(batch, torch.Tensor):
        return {"pixel_values": batch.to(device)}
    raise TypeError(f"{what} must be dicts or tensors, got {type(batch).__name__}.")


@torch.no_grad()
def calibrate(
    model: nn.Module,
    batches: Iterable[Any],
    max_batches: int | None = None,
    device: torch.device | str | None = None,
    show_progress: bool = False,
    only_uncalibrated: bool = False,
) -> nn.Module:
    """Initialise every activation quantizer of ``model`` from real batches.

    The model runs real-valued (all fake quantizers bypassed, eval mode) over the batches while each activation
    quantizer records ``sum |x|``, the element count, the minimum and the maximum of its input. When
    ``torch.distributed`` is initialised the statistics are all-reduced (sum, sum, min, max) so every rank ends with
    identical steps whatever its own batches were. Each quantizer then takes its signedness (unsigned when the global
    minimum is ``>= 0``), LSQ step (``2 mean|x| / sqrt(Qp)``) and offset, and is marked calibrated in its persistent
    ``calibrated`` buffer. A quantizer with the ``"mse"`` init then keeps the multiple of that step (from
    ``MSE_STEP_MULTIPLIERS``) with the least squared quantization error over values sampled from its calibration
    inputs (errors all-reduced too, so ranks agree). Distribution Alignment modules with ``init="fit"`` pass their
    query through unchanged during this pass (so the q quantizer is calibrated on the real-valued query), accumulate
    its statistics (all-reduced too) and then take the least-squares ``gamma``/``beta``
    (:meth:`DistributionAlignment.fit_from_statistics`).
    Weight quantizers are initialised from the weights at construction/loading time and are not touched here.

    Bad calibration data is caught here, once, rather than in the training steps: if any quantizer (or fitted DA)
    saw a NaN or infinite value (a NaN pixel spreads through the whole network), a ``ValueError`` names them in
    module order, so the first name is where the non-finite values entered, and nothing is initialised or marked
    calibrated. A quantizer whose statistics are degenerate (constant input, e.g. blank images, so no range to fit,
    or a step at the ``STEP_EPS`` floor) is calibrated but named in one ``UserWarning``.

    Args:
        model: A model containing LSQ quantizers (e.g. ``QDetrForObjectDetection``); may be DDP-wrapped.
        batches: Iterable of DETR batches (dicts with ``pixel_values`` and optional ``pixel_mask``) or image tensors.
        max_batches: Use at most this many batches.
        device: Move the batch tensors to this device (defaults to the device of the model's first parameter).
        show_progress: Show a tqdm progress bar.
        only_uncalibrated: Initialise only the quantizers not calibrated yet, keeping the steps of the others (e.g.
            the backbone quantizers learned in Q-DETR's first stage when the transformer is quantized in the second).

    Returns:
        The same model, calibrated.

    Raises:
        ValueError: If no batch was given, a quantizer saw no data, or a quantizer or DA saw NaN/inf values.
    """
    import warnings

    target = model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model
    qs = activation_quantizers(target)
    alignments = _fitted_alignments(target)
    if only_uncalibrated:
        qs = [q for q in qs if not bool(q.calibrated)]
        alignments = [a for a in alignments if not bool(a.calibrated)]
    if not qs and not alignments:
        return model
    if device is None:
        device = next(target.parameters()).device
    was_training = target.training
    observers = [_RangeObserver(MSE_SAMPLES_PER_BATCH if q.searches_step else 0) for q in qs]
    for q, obs in zip(qs, observers, strict=True):
        q._observer = obs
    for alignment in alignments:
        alignment._observer = _AlignmentObserver(alignment.head_dim)
    iterator: Iterable[Any] = batches
    if show_progress:
        from tqdm.auto import tqdm

        iterator = tqdm(batches, total=max_batches, desc="Calibrating quantizers", leave=False)
    num_batches = 0
    images = _RangeObserver()  # the input images' own statistics, to tell blank images from structural zeros
    try:
        target.eval()
        with quantization_disabled(target):
            for batch in iterator:
                if max_batches is not None and num_batches >= max_batches:
                    break
                target(**detector_inputs(batch, device))
                images.update(batch["pixel_values"] if isinstance(batch, Mapping) else batch)
                num_batches += 1
    finally:
        for q in qs:
            q._observer = None
        alignment_sums = [a._observer.sums for a in alignments]
        for alignment in alignments:
            alignment._observer = None
        target.train(was_training)
    if num_batches == 0:
        raise ValueError("calibrate() received no batches: pass at least one batch of real images.")
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    # Reduce (and check) every statistic before anything is initialised, so a failed call leaves the model as it was.
    alignment_sums = [sums.to(device) for sums in alignment_sums]
    if distributed:
        for sums in alignment_sums:
            torch.distributed.all_reduce(sums, op=torch.distributed.ReduceOp.SUM)
    # One row per quantizer, then one for the images.
    stats = torch.tensor(
        [[o.sum_abs, float(o.count), float(o.non_finite), o.minimum, o.maximum] for o in [*observers, images]],
        dtype=torch.float64,
        device=device,
    )
    if distributed:
        sums = stats[:, :3].contiguous()
        mins = stats[:, 3].contiguous()
        maxs = stats[:, 4].contiguous()
        torch.distributed.all_reduce(sums, op=torch.distributed.ReduceOp.SUM)
        torch.distributed.all_reduce(mins, op=torch.distributed.ReduceOp.MIN)
        torch.distributed.all_reduce(maxs, op=torch.distributed.ReduceOp.MAX)
        stats = torch.cat([sums, mins[:, None], maxs[:, None]], dim=1)
    *stats, (_, _, bad_pixels, image_min, image_max) = stats.cpu().tolist()
    names = {id(m): name for name, m in target.named_modules()}

    def _listing(items: list[str], limit: int = 8) -> str:
        return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")

    non_finite = [
        f"'{q.name}' ({int(bad)} of {int(count)} values)" for q, (_, count, bad, _, _) in zip(qs, stats) if bad
    ]
    non_finite += [
        f"distribution alignment '{names.get(id(a), '?')}'"
        for a, sums in zip(alignments, alignment_sums)
        if not bool(torch.isfinite(sums).all())
    ]
    if non_finite:
        raise ValueError(
            f"calibrate(): non-finite (NaN or infinite) activations reached {len(non_finite)} quantizer(s), listed in "
            f"module order (the first is where they entered): {_listing(non_finite)}. "
            + (
                f"The calibration images hold {int(bad_pixels)} NaN/inf values"
                if bad_pixels
                else "The calibration images are finite, so the model produced them (an overflow)"
            )
            + "; nothing was calibrated."
        )
    for q, (_, count, *_) in zip(qs, stats, strict=True):
        if count == 0:
            raise ValueError(f"Activation quantizer '{q.name}' saw no data during calibration (nothing calibrated).")

    for alignment, sums in zip(alignments, alignment_sums, strict=True):
        alignment.fit_from_statistics(sums.cpu())
    if not qs:
        return model
    for q, (sum_abs, count, _, minimum, maximum) in zip(qs, stats, strict=True):
        q.set_from_statistics(sum_abs / count, minimum, maximum)
    searching = [(q, obs) for q, obs in zip(qs, observers, strict=True) if q.searches_step]
    if searching:
        errors = torch.stack([q.step_errors(torch.cat(obs.samples)) for q, obs in searching]).to(device)
        if distributed:
            torch.distributed.all_reduce(errors, op=torch.distributed.ReduceOp.SUM)
        for (q, _), best in zip(searching, errors.argmin(dim=1).tolist(), strict=True):
            q.use_step_candidate(best)

    # Degenerate statistics give a usable but meaningless quantizer: calibrated, and named in one warning. A known
    # (analytic) range does not depend on the statistics. An input that is exactly zero while the images vary is the
    # model's structure, not the data (DETR's first decoder layer's value projection: the decoder starts from zero
    # queries), and it is quantized exactly.
    constant_images = image_min == image_max
    steps = torch.stack([q.step.detach().reshape(()) for q in qs]).double().cpu().tolist()
    degenerate = []
    for q, (_, _, _, minimum, maximum), step in zip(qs, stats, steps, strict=True):
        if q.known_range is not None or (minimum == maximum == 0.0 and not constant_images):
            continue
        if minimum == maximum:
            degenerate.append(f"'{q.name}' (constant input {minimum:g})")
        elif step <= 2 * STEP_EPS:
            degenerate.append(
                f"'{q.name}' (step {step:.3g} at the STEP_EPS floor; input range [{minimum:g}, {maximum:g}])"
            )
    if degenerate:
        warnings.warn(
            f"calibrate(): degenerate statistics for {len(degenerate)} of {len(qs)} activation quantizer(s), listed "
            f"in module order: {_listing(degenerate)}. They were calibrated, but their steps fit no real range: "
            + (f"every calibration image value is {image_min:g}; " if constant_images else "")
            + "calibrate on real, varied images (not blank or constant ones).",
            UserWarning,
            stacklevel=3,  # the caller of calibrate(), past torch.no_grad's wrapper
        )
    return model
