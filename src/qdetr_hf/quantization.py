"""LSQ / LSQ+ fake quantizers, quantized Conv2d / Linear / attention, Distribution Alignment and calibration."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_qdetr import (
    ALIGNMENT_INITS,
    OFFSET_INITS,
    SOFTMAX_INITS,
    WEIGHT_STEP_INITS,
    check_bits,
)

STEP_EPS = 1e-8
"""Lower bound of every effective step size: the stored step is used as ``|step|`` clamped to this value."""

OffsetInit = Literal["zero", "minmax", "mse"]
WeightStepInit = Literal["lsq", "mse"]
AlignmentInit = Literal["unit", "fit"]
MSE_STEP_MULTIPLIERS = torch.logspace(math.log10(0.02), math.log10(8.0), 120).tolist()
"""Candidate multiples of the LSQ step searched by the ``"mse"`` activation init (project choice: a geometric grid of
120 values from 0.02, for 8-bit inputs whose error-minimising step lies well below LSQ's, to 8, for heavy-tailed 4-bit
inputs such as the stem's post-ReLU maps, which want steps above LSQ's)."""
MSE_SAMPLES_PER_BATCH = 16384
"""Input values an ``"mse"`` activation quantizer keeps per calibration batch (evenly strided, no RNG)."""


def quant_range(bits: int, signed: bool) -> tuple[int, int]:
    """Integer range ``(Qn, Qp)`` of a ``bits``-bit quantizer (qdetr.md section 1)."""
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def integer_shift(offset: torch.Tensor, step: torch.Tensor, qn: float, qp: float) -> torch.Tensor:
    """An offset as whole steps, ``round(z / s)``, limited to ``[-Qn - 255, 255 - Qp]``: the shifts whose codes and
    integer zero point both fit ONNX's uint8 container (for an unsigned 8-bit range, ``k <= 0``)."""
    return torch.round(offset / step).clamp_(-qn - 255, 255 - qp)


class _LSQFunction(torch.autograd.Function):
    """Fused LSQ/LSQ+ fake quantization with the straight-through estimator.

    Forward: ``v = (x - z) / s``, ``q = round(clamp(v, Qn, Qp))``, ``out = s * q + z``.
    Backward (Esser et al. 2020, Bhalgat et al. 2020):

    * ``d out / d x = 1`` inside ``[Qn, Qp]``, ``0`` outside;
    * ``d out / d s = round(v) - v`` inside, ``Qn`` below, ``Qp`` above (i.e. ``q`` outside), times ``grad_scale``;
    * ``d out / d z = 0`` inside, ``1`` outside, times ``grad_scale``.

    The forward makes five passes over ``x`` (shift and scale in place, clamp, mask, round in place, rescale) and
    saves the mask, ``round(clamp(v))`` and ``v``. The backward never builds the local step gradient: since it is
    ``q - v`` inside and ``q`` outside, ``sum(g * local) = sum(g * q) - sum(g_x * v)`` with ``g_x = g * inside``, two
    dot products (one pass each, nothing allocated) for a per-tensor step, instead of saving a local-gradient tensor
    of the input's size (``benchmarks/speed.py`` measures the fused function). ``s`` and ``z`` broadcast against
    ``x``; their gradients are summed back to their own shapes, so a per-channel step (shape ``(C, 1, ...)``) gets a
    per-channel gradient. ``z`` may be ``None`` (symmetric LSQ); ``Qn``, ``Qp`` and ``grad_scale`` are Python numbers.
    The symmetric per-channel case equals ``torch._fake_quantize_learnable_per_channel_affine`` with ``grad_factor =
    grad_scale`` except where ``v`` lies within half a step outside ``[Qn, Qp]`` (PyTorch tests the range after
    rounding); tests/test_quantization.py compares the two.

    With ``integer_offset`` the offset counts whole steps, ``k = round(z / s)`` (:func:`integer_shift`), and the
    forward computes what ONNX's QuantizeLinear / DequantizeLinear compute with an integer zero point: ``q =
    clamp(round(x / s) - k, Qn, Qp)``, ``out = s * (q + k)``. The gradients are the ones above with ``v = x / s - k``
    (straight-through for the rounding of ``k``).
    """

    @staticmethod
    def forward(ctx, x, step, offset, qn, qp, grad_scale, integer_offset=False):  # type: ignore[override]
        needs_grad = any(ctx.needs_input_grad[:3])
        if integer_offset and offset is not None:
            shift = integer_shift(offset, step, qn, qp)
            v = x / step
            level = torch.round(v).sub_(shift)
            q = level.clamp(qn, qp)
            inside = q == level if needs_grad else None
            v.sub_(shift)
            out = (q + shift).mul_(step)
        else:
            v = x / step if offset is None else (x - offset).div_(step)
            q = v.clamp(qn, qp)
            inside = q == v if needs_grad else None
            q.round_()
            out = q * step if offset is None else torch.addcmul(offset, q, step)
        if needs_grad:
            ctx.save_for_backward(inside, q, v)
        ctx.shapes = (step.shape, None if offset is None else offset.shape)
        ctx.grad_scale = grad_scale
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        inside, q, v = ctx.saved_tensors
        step_shape, offset_shape = ctx.shapes
        grad_step = grad_offset = None
        grad_x = grad_out * inside
        if ctx.needs_input_grad[1]:
            if len(step_shape) == 0 or math.prod(step_shape) == 1:
                flat_grad, flat_x = grad_out.reshape(-1), grad_x.reshape(-1)
                grad_step = torch.dot(flat_grad, q.reshape(-1)) - torch.dot(flat_x, v.reshape(-1))
                grad_step = grad_step.reshape(step_shape)
            else:
                grad_step = (grad_out * q).sum_to_size(step_shape) - (grad_x * v).sum_to_size(step_shape)
            grad_step = grad_step * ctx.grad_scale
        if offset_shape is not None and ctx.needs_input_grad[2]:
            # d/dz is 1 outside the range: the part of the incoming gradient the input did not take.
            grad_offset = (grad_out.sum_to_size(offset_shape) - grad_x.sum_to_size(offset_shape)) * ctx.grad_scale
        if not ctx.needs_input_grad[0]:
            grad_x = None
        return grad_x, grad_step, grad_offset, None, None, None, None


def lsq_fake_quantize(
    x: torch.Tensor,
    step: torch.Tensor,
    offset: torch.Tensor | None,
    qn: float,
    qp: float,
    grad_scale: float,
    integer_offset: bool = False,
) -> torch.Tensor:
    """Functional LSQ/LSQ+ fake quantization (see :class:`_LSQFunction` for the gradients).

    Args:
        x: Tensor to quantize.
        step: Positive step size, broadcastable to ``x``.
        offset: Offset ``z`` broadcastable to ``x``, or ``None`` for symmetric LSQ.
        qn: Lowest integer level.
        qp: Highest integer level.
        grad_scale: LSQ gradient scale ``1 / sqrt(N * Qp)``.
        integer_offset: Use the offset as a whole number of steps ``round(z / s)`` (an integer zero point).
    """
    if not torch.is_grad_enabled():  # inference: same numbers, nothing saved for a backward
        if integer_offset and offset is not None:
            shift = integer_shift(offset, step, qn, qp)
            return (torch.round(x / step).sub_(shift).clamp_(qn, qp) + shift).mul_(step)
        v = x / step if offset is None else (x - offset) / step
        q = v.clamp(qn, qp).round()
        return q * step if offset is None else torch.addcmul(offset, q, step)
    return _LSQFunction.apply(x, step, offset, qn, qp, grad_scale, integer_offset)


def _effective_step(raw_step: torch.Tensor) -> torch.Tensor:
    """A stored step as the quantizers use it: ``|raw_step|`` clamped to ``STEP_EPS``, detached, float32."""
    return raw_step.detach().abs().clamp_min(STEP_EPS).float()


class _Quantizer(nn.Module):
    """Shared state of the LSQ quantizers: bit width, learned step, on/off switch."""

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.bits = check_bits(bits)
        self.enabled = True

    @property
    def step(self) -> torch.Tensor:
        """The effective (always positive) step size."""
        return self.raw_step.abs().clamp_min(STEP_EPS)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, enabled={self.enabled}"


class LSQWeightQuantizer(_Quantizer):
    """Symmetric signed LSQ weight quantizer with one learned step per output channel (axis 0).

    ``w_q = round(clip(w / s_c, -2^(b-1), 2^(b-1) - 1))``, ``Q_w = s_c * w_q``. The step gradient is scaled by
    ``1 / sqrt(N * Qp)`` with ``N`` the number of weights per output channel. Initialise with
    :meth:`initialize_from`: ``init="lsq"`` gives LSQ's ``s0 = 2 mean(|w_c|) / sqrt(Qp)`` (qdetr.md section 1),
    ``init="mse"`` the clipping point that minimises each channel's quantization error (:meth:`mse_init`).

    Args:
        num_channels: Number of output channels (size of axis 0 of the weight).
        bits: Bit width in ``[2, 8]``.
        weight_ndim: Number of dimensions of the weight (2 for Linear, 4 for Conv2d).
        init: Initial step rule, ``"lsq"`` (the paper's) or ``"mse"``.
    """

    def __init__(self, num_channels: int, bits: int, weight_ndim: int = 2, init: WeightStepInit = "lsq") -> None:
        super().__init__(bits)
        if init not in WEIGHT_STEP_INITS:
            raise ValueError(f"Weight step init must be one of {WEIGHT_STEP_INITS}, got {init!r}.")
        self.init = init
        self.qn, self.qp = quant_range(self.bits, signed=True)
        self.raw_step = nn.Parameter(torch.ones((num_channels,) + (1,) * (weight_ndim - 1)))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, init={self.init!r}"

    def initial_step(self, weight: torch.Tensor) -> torch.Tensor:
        """The initial step per output channel under this quantizer's ``init`` (:meth:`lsq_init` or :meth:`mse_init`)."""
        return self.mse_init(weight) if self.init == "mse" else self.lsq_init(weight)

    def lsq_init(self, weight: torch.Tensor) -> torch.Tensor:
        """LSQ initial step per output channel: ``2 * mean(|w_c|) / sqrt(Qp)``."""
        dims = tuple(range(1, weight.dim()))
        init = 2.0 * weight.detach().float().abs().mean(dim=dims, keepdim=True) / math.sqrt(self.qp)
        return init.clamp_min(STEP_EPS).reshape(self.raw_step.shape)

    @torch.no_grad()
    def mse_init(self, weight: torch.Tensor, num_candidates: int = 100) -> torch.Tensor:
        """Step per output channel minimising the channel's quantization error ``mean((Q_w - w)^2)``.

        Searches the clipping points ``alpha * max|w_c|`` for ``alpha`` in ``1/K, 2/K, ..., 1`` (``K =
        num_candidates``), i.e. steps ``alpha * max|w_c| / Qp``: the usual clipping search of post-training
        quantization, deterministic and a function of the weights only. ``alpha = 1`` (no clipping) is always a
        candidate, so a channel already on a uniform grid gets its exact step.
        """
        w = weight.detach().float().reshape(weight.shape[0], -1)
        max_abs = w.abs().amax(dim=1).clamp_min(STEP_EPS)
        best_error = torch.full_like(max_abs, math.inf)
        best_step = max_abs / self.qp
        for k in range(1, num_candidates + 1):  # candidates, not channels: each iteration is vectorised over channels
            step = (k / num_candidates) * max_abs / self.qp
            q = torch.clamp(torch.round(w / step[:, None]), self.qn, self.qp) * step[:, None]
            error = (q - w).pow(2).mean(dim=1)
            better = error < best_error
            best_error = torch.where(better, error, best_error)
            best_step = torch.where(better, step, best_step)
        return best_step.clamp_min(STEP_EPS).reshape(self.raw_step.shape)

    @torch.no_grad()
    def initialize_from(self, weight: torch.Tensor) -> None:
        """Set the step to its initial value computed from ``weight`` (:meth:`initial_step`)."""
        self.raw_step.copy_(self.initial_step(weight))

    @torch.no_grad()
    def codes(self, weight: torch.Tensor, raw_step: torch.Tensor | None = None) -> torch.Tensor:
        """The integer codes ``round(clip(w / s_c, Qn, Qp))`` of ``weight`` as ``int8``, computed with the forward's
        own operations (``raw_step``: a stored step to use instead of this quantizer's)."""
        step = _effective_step(self.raw_step if raw_step is None else raw_step)
        return (weight.detach().float() / step).clamp(self.qn, self.qp).round().to(torch.int8)

    @torch.no_grad()
    def dequantize(self, codes: torch.Tensor, raw_step: torch.Tensor | None = None) -> torch.Tensor:
        """``codes * s_c`` in float32: a weight whose fake quantization gives back exactly ``codes * s_c``."""
        return codes.float() * _effective_step(self.raw_step if raw_step is None else raw_step)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return weight
        with torch.autocast(device_type=weight.device.type, enabled=False):
            n = weight[0].numel()
            out = lsq_fake_quantize(
                weight.float(), self.step.float(), None, float(self.qn), float(self.qp), 1.0 / math.sqrt(n * self.qp)
            )
        return out.to(weight.dtype)


class LSQActivationQuantizer(_Quantizer):
    """Per-tensor LSQ+ activation quantizer with a learned offset (Bhalgat et al. 2020).

    ``x_q = round(clip((x - z) / s, Qn, Qp))``, ``Q_a = s * x_q + z``. The range is unsigned ``[0, 2^b - 1]`` when the
    calibration pass saw only non-negative inputs (e.g. after ReLU or softmax) and signed otherwise; the decision is
    stored in the ``signed`` buffer, never re-guessed per batch. ``N`` of the gradient scale is the number of elements
    per sample (``x.numel() / x.shape[0]``).

    The quantizer must be calibrated (:func:`calibrate`) before use: an uncalibrated quantizer raises, so a model is
    never silently run with placeholder steps. Calibration is recorded in the persistent ``calibrated`` buffer, so a
    saved and reloaded model is not re-initialised.

    Args:
        bits: Bit width in ``[2, 8]``.
        learn_offset: Learn the offset ``z`` (LSQ+). ``False`` gives plain LSQ (offset fixed at zero).
        offset_init: ``"zero"`` (LSQ step init ``2 mean|x| / sqrt(Qp)``, offset 0), ``"minmax"`` (LSQ+ min/max init:
            ``s = (max - min) / (Qp - Qn)``, ``z = min - s * Qn``; only with ``learn_offset``) or ``"mse"`` (offset 0
            and the multiple of the LSQ step in ``MSE_STEP_MULTIPLIERS`` with the least quantization error on the
            calibration inputs, see :func:`calibrate`).
        name: Human-readable location, used in error messages.
        known_range: ``(low, high)`` when the input's range is known analytically (the softmax output's ``(0, 1)``):
            calibration then sets ``s = (high - low) / (Qp - Qn)`` and ``z = low - s Qn`` (``z = 0`` when ``low`` is
            0), so the range is covered exactly, instead of using the statistics.
        integer_offset: Use the offset as a whole number of steps, ``round(z / s)``: an integer zero point, as in
            ONNX's QuantizeLinear, so an exported model computes exactly what the trained one does (see
            :class:`_LSQFunction`).
    """

    def __init__(
        self,
        bits: int,
        learn_offset: bool = True,
        offset_init: OffsetInit = "zero",
        name: str = "activation",
        known_range: tuple[float, float] | None = None,
        integer_offset: bool = False,
    ) -> None:
        super().__init__(bits)
        if known_range is not None and not known_range[0] < known_range[1]:
            raise ValueError(f"known_range must be (low, high) with low < high, got {known_range!r}.")
        self.known_range = known_range
        if offset_init not in OFFSET_INITS:
            raise ValueError(f"offset_init must be one of {OFFSET_INITS}, got {offset_init!r}.")
        if offset_init == "minmax" and not learn_offset:
            raise ValueError("offset_init='minmax' needs learn_offset=True (plain LSQ has no offset).")
        self.learn_offset = learn_offset
        self.offset_init = offset_init
        self.integer_offset = integer_offset
        self.name = name
        self.raw_step = nn.Parameter(torch.ones(()))
        self.offset = nn.Parameter(torch.zeros(()), requires_grad=learn_offset)
        self.register_buffer("signed", torch.ones((), dtype=torch.bool))
        self.register_buffer("calibrated", torch.zeros((), dtype=torch.bool))
        self._observer: _RangeObserver | None = None
        # (Qn, Qp) of a calibrated quantizer, read once from the buffers: a Python pair keeps the per-call overhead
        # (and device synchronisation) out of the forward. Dropped whenever the buffers may change.
        self._cached_range: tuple[int, int] | None = None

    def range(self) -> tuple[int, int]:
        """Current integer range ``(Qn, Qp)``, following the calibrated signedness."""
        return quant_range(self.bits, bool(self.signed))

    def _calibrated_range(self) -> tuple[int, int]:
        if self._cached_range is None:
            if not bool(self.calibrated):
                raise RuntimeError(
                    f"Activation quantizer '{self.name}' is not calibrated. Run `qdetr_hf.calibrate(model, batches)` "
                    "on a few real batches before training or inference (the distillation Trainer does this for you)."
                )
            self._cached_range = self.range()
        return self._cached_range

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # type: ignore[override]
        self._cached_range = None
        super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._observer is not None:
            self._observer.update(x)
            return x
        if not self.enabled:
            return x
        qn, qp = self._calibrated_range()
        with torch.autocast(device_type=x.device.type, enabled=False):
            n = x.numel() // x.shape[0] if x.dim() > 0 and x.shape[0] > 0 else max(x.numel(), 1)
            offset = self.offset.float() if self.learn_offset else None
            out = lsq_fake_quantize(
                x.float(), self.step.float(), offset, qn, qp, 1.0 / math.sqrt(n * qp), self.integer_offset
            )
        return out.to(x.dtype)

    @torch.no_grad()
    def set_from_statistics(self, mean_abs: float, minimum: float, maximum: float) -> None:
        """Initialise signedness, step and offset from calibration statistics and mark the quantizer calibrated."""
        if self.known_range is not None:
            minimum, maximum = self.known_range
        signed = minimum < 0
        qn, qp = quant_range(self.bits, signed)
        if self.known_range is not None or (self.offset_init == "minmax" and maximum > minimum):
            # Cover [minimum, maximum] exactly ("minmax" implies a learned offset; a known range may have none).
            step = (maximum - minimum) / (qp - qn)
            offset = minimum - step * qn if self.learn_offset else 0.0
        else:
            step = 2.0 * mean_abs / math.sqrt(qp)
            offset = 0.0
        self.signed.fill_(signed)
        self.raw_step.fill_(max(step, STEP_EPS) if math.isfinite(step) else 1.0)
        self.offset.fill_(offset)
        self.calibrated.fill_(True)
        self._cached_range = None

    @property
    def searches_step(self) -> bool:
        """Whether calibration refines this quantizer's step by the quantization-error search (``"mse"`` init)."""
        return self.offset_init == "mse" and self.known_range is None

    @torch.no_grad()
    def step_errors(self, samples: torch.Tensor) -> torch.Tensor:
        """Sum of squared quantization errors of ``samples`` at each step ``m * step`` for ``m`` in
        ``MSE_STEP_MULTIPLIERS`` (current signedness and offset), as a float64 tensor."""
        qn, qp = self.range()
        samples = samples.float()
        step = self.step.detach().float()
        offset = self.offset.detach().float() if self.learn_offset else None
        errors = [
            (lsq_fake_quantize(samples, step * m, offset, qn, qp, 1.0, self.integer_offset) - samples)
            .pow(2)
            .sum(dtype=torch.float64)
            for m in MSE_STEP_MULTIPLIERS
        ]
        return torch.stack(errors)

    @torch.no_grad()
    def scale_step(self, multiplier: float) -> None:
        """Multiply the step by ``multiplier`` (the ``"mse"`` init's chosen candidate)."""
        self.raw_step.copy_((self.step * multiplier).clamp_min(STEP_EPS))

    @torch.no_grad()
    def reset_calibration(self) -> None:
        """Forget the calibration (placeholder step 1, offset 0, signed) so the quantizer must be calibrated again."""
        self.raw_step.fill_(1.0)
        self.offset.fill_(0.0)
        self.signed.fill_(True)
        self.calibrated.fill_(False)
        self._cached_range = None

    def extra_repr(self) -> str:
        known = f", known_range={self.known_range}" if self.known_range is not None else ""
        return f"bits={self.bits}, learn_offset={self.learn_offset}, name={self.name!r}{known}"


class _RangeObserver:
    """Accumulates ``sum |x|``, element count, min and max of the finite values an activation quantizer sees and the
    number of non-finite ones (NaN, +-inf), and keeps up to ``sample_size`` evenly strided values of each tensor (for
    the ``"mse"`` step search)."""

    def __init__(self, sample_size: int = 0) -> None:
        self.sum_abs = 0.0
        self.count = 0
        self.non_finite = 0
        self.minimum = math.inf
        self.maximum = -math.inf
        self.sample_size = sample_size
        self.samples: list[torch.Tensor] = []

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        if x.numel() == 0:
            return
        finite = torch.isfinite(x)
        # One host transfer for the four statistics; non-finite values are counted, not folded into the range.
        sum_abs, minimum, maximum, non_finite = torch.stack(
            [
                torch.where(finite, x.abs(), 0.0).sum(),
                torch.where(finite, x, math.inf).min(),
                torch.where(finite, x, -math.inf).max(),
                (~finite).sum().float(),
            ]
        ).tolist()
        self.sum_abs += sum_abs
        self.count += x.numel()
        self.non_finite += int(non_finite)
        self.minimum = min(self.minimum, minimum)
        self.maximum = max(self.maximum, maximum)
        if self.sample_size > 0:
            flat = x.reshape(-1)
            self.samples.append(flat[:: max(1, flat.numel() // self.sample_size)][: self.sample_size].clone())


def _wrap_float_layer(cls: type[nn.Module], layer: nn.Module, args: tuple, kwargs: dict[str, Any]) -> Any:
    """``cls(*args, **kwargs)`` built around ``layer``'s own ``weight`` and ``bias`` objects (so checkpoints keep the
    float layer's keys), on its device and dtype; transformers' "already initialised" mark is carried over."""
    quantized = cls(*args, bias=layer.bias is not None, device=layer.weight.device, dtype=layer.weight.dtype, **kwargs)
    quantized.weight = layer.weight
    quantized.bias = layer.bias
    if getattr(layer, "_is_hf_initialized", False):
        quantized._is_hf_initialized = True
    return quantized


class QuantLinear(nn.Linear):
    """``nn.Linear`` with an LSQ per-channel weight quantizer and an LSQ+ input quantizer.

    Shares (not copies) the ``weight`` and ``bias`` parameters of the layer it was built from, so checkpoints keep the
    usual key names; the quantizer tensors live in ``weight_quantizer.*`` and ``input_quantizer.*``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        weight_bits: int = 4,
        activation_bits: int = 4,
        learn_offset: bool = True,
        offset_init: OffsetInit = "zero",
        name: str = "linear",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        weight_init: WeightStepInit = "lsq",
        integer_offset: bool = False,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.weight_quantizer = LSQWeightQuantizer(out_features, weight_bits, weight_ndim=2, init=weight_init)
        self.input_quantizer = LSQActivationQuantizer(
            activation_bits, learn_offset, offset_init, name=name, integer_offset=integer_offset
        )

    @classmethod
    def from_float(cls, linear: nn.Linear, **kwargs: Any) -> QuantLinear:
        """Wrap an existing ``nn.Linear`` (same parameter objects) into a quantized layer."""
        return _wrap_float_layer(cls, linear, (linear.in_features, linear.out_features), kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.input_quantizer(x), self.weight_quantizer(self.weight), self.bias)


class QuantConv2d(nn.Conv2d):
    """``nn.Conv2d`` with an LSQ per-output-channel weight quantizer and an LSQ+ input quantizer."""

    def __init__(
        self,
        *args: Any,
        weight_bits: int = 4,
        activation_bits: int = 4,
        learn_offset: bool = True,
        offset_init: OffsetInit = "zero",
        name: str = "conv",
        weight_init: WeightStepInit = "lsq",
        integer_offset: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.weight_quantizer = LSQWeightQuantizer(self.out_channels, weight_bits, weight_ndim=4, init=weight_init)
        self.input_quantizer = LSQActivationQuantizer(
            activation_bits, learn_offset, offset_init, name=name, integer_offset=integer_offset
        )

    @classmethod
    def from_float(cls, conv: nn.Conv2d, **kwargs: Any) -> QuantConv2d:
        """Wrap an existing ``nn.Conv2d`` (same parameter objects) into a quantized layer."""
        geometry = {
            "stride": conv.stride,
            "padding": conv.padding,
            "dilation": conv.dilation,
            "groups": conv.groups,
            "padding_mode": conv.padding_mode,
        }
        return _wrap_float_layer(
            cls, conv, (conv.in_channels, conv.out_channels, conv.kernel_size), {**geometry, **kwargs}
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.input_quantizer(x), self.weight_quantizer(self.weight), self.bias)


class DistributionAlignment(nn.Module):
    """Q-DETR's Distribution Alignment of attention queries (qdetr.md section 2).

    Maximising the self-information entropy of a Gaussian query amounts to standardising it:
    ``q* = gamma * (q - mean(q)) / sqrt(var(q) + eps) + beta``, with statistics over ``head_dim`` for every token and
    head, and ``gamma`` / ``beta`` of size ``head_dim`` shared across heads.

    Args:
        head_dim: Size of one attention head.
        eps: Variance epsilon (paper: 1e-5).
        init: ``"unit"``: ``gamma = 1``, ``beta = 0`` (the paper's). ``"fit"`` (project option): :func:`calibrate` sets
            ``gamma`` and ``beta`` per dimension to the least-squares fit of the incoming query ``q`` from its
            standardised form, so the aligned query starts as close to the real-valued model's as an affine map of
            the standardised query allows (:meth:`fit_from_statistics`). Until then the module is not calibrated.
    """

    def __init__(self, head_dim: int, eps: float = 1e-5, init: AlignmentInit = "unit") -> None:
        super().__init__()
        if init not in ALIGNMENT_INITS:
            raise ValueError(f"Distribution alignment init must be 'unit' or 'fit', got {init!r}.")
        self.head_dim = head_dim
        self.eps = eps
        self.init = init
        self.weight = nn.Parameter(torch.ones(head_dim))
        self.bias = nn.Parameter(torch.zeros(head_dim))
        # Only meaningful for init="fit": whether gamma/beta have been fitted (persistent, so a reload keeps them).
        self.register_buffer("calibrated", torch.tensor(init == "unit"))
        self._observer: _AlignmentObserver | None = None

    def standardize(self, query: torch.Tensor) -> torch.Tensor:
        """``(q - mean(q)) / sqrt(var(q) + eps)`` over the last (``head_dim``) axis, in float32."""
        return F.layer_norm(query.float(), (self.head_dim,), eps=self.eps)

    def forward(self, query: torch.Tensor) -> torch.Tensor:
        if self._observer is not None:  # calibration pass: record, and let the real-valued query through
            self._observer.update(query, self.standardize(query))
            return query
        with torch.autocast(device_type=query.device.type, enabled=False):
            out = F.layer_norm(query.float(), (self.head_dim,), self.weight.float(), self.bias.float(), self.eps)
        return out.to(query.dtype)

    @torch.no_grad()
    def fit_from_statistics(self, sums: torch.Tensor) -> None:
        """Set ``gamma``/``beta`` from the sums of :class:`_AlignmentObserver` and mark the module calibrated.

        Per dimension ``d``, with ``z`` the standardised query: ``gamma_d = Cov(z_d, q_d) / Var(z_d)`` and ``beta_d
        = E[q_d] - gamma_d E[z_d]``, the least-squares affine map from ``z_d`` to ``q_d``. A dimension whose ``z_d``
        is constant gets ``gamma_d = 1``.
        """
        count, sum_z, sum_zz, sum_q, sum_zq = sums.double()
        count = count.clamp_min(1.0)
        mean_z, mean_q = sum_z / count, sum_q / count
        var_z = sum_zz / count - mean_z**2
        cov = sum_zq / count - mean_z * mean_q
        gamma = torch.where(var_z > 1e-12, cov / var_z.clamp_min(1e-12), torch.ones_like(var_z))
        self.weight.copy_(gamma.to(self.weight.dtype))
        self.bias.copy_((mean_q - gamma * mean_z).to(self.bias.dtype))
        self.calibrated.fill_(True)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, eps={self.eps}, init={self.init!r}"


class _AlignmentObserver:
    """Per-dimension sums over tokens of ``1, z, z^2, q, z q`` (``q``: query, ``z``: its standardised form)."""

    def __init__(self, head_dim: int) -> None:
        self.sums = torch.zeros(5, head_dim, dtype=torch.float64)

    @torch.no_grad()
    def update(self, query: torch.Tensor, standardized: torch.Tensor) -> None:
        q = query.detach().reshape(-1, query.shape[-1]).double().cpu()
        z = standardized.detach().reshape(-1, query.shape[-1]).double().cpu()
        count = torch.full_like(q[0], q.shape[0])
        self.sums += torch.stack([count, z.sum(0), (z * z).sum(0), q.sum(0), (z * q).sum(0)])


class QuantAttention(nn.Module):
    """Quantizers of one attention block: q, k, v and the softmax output at ``attention_bits``, plus optional DA.

    It is attached to a transformers attention module as ``module.attn_quantizer`` and run by the ``"qdetr"``
    attention function registered in transformers' ``AttentionInterface`` (see ``modeling_qdetr``): the projections,
    masks and output projection stay the library's code; only the score/value product is computed here, because the
    softmax output must be quantized between the softmax and the product with ``v``. The softmax runs in float32.

    Args:
        bits: Bit width of q, k, v and the softmax output (paper: 8).
        head_dim: Size of one attention head.
        align_queries: Apply :class:`DistributionAlignment` to the query before its quantizer.
        eps: DA epsilon.
        learn_offset: LSQ+ offsets for the four quantizers.
        offset_init: Offset/step initialisation of the four quantizers.
        name: Location prefix used in error messages.
        softmax_init: ``"unit_range"``: the softmax-output quantizer covers its exact range ``[0, 1]`` (step
            ``1 / (2^b - 1)``); ``"lsq"``: LSQ's statistics-based init like every other activation.
        alignment_init: Initialisation of the DA affine (see :class:`DistributionAlignment`).
        integer_offset: Integer zero points for the four quantizers (see :class:`LSQActivationQuantizer`).
    """

    def __init__(
        self,
        bits: int,
        head_dim: int,
        align_queries: bool = False,
        eps: float = 1e-5,
        learn_offset: bool = True,
        offset_init: OffsetInit = "zero",
        name: str = "attention",
        softmax_init: Literal["unit_range", "lsq"] = "unit_range",
        alignment_init: AlignmentInit = "unit",
        integer_offset: bool = False,
    ) -> None:
        super().__init__()
        if softmax_init not in SOFTMAX_INITS:
            raise ValueError(f"softmax_init must be one of {SOFTMAX_INITS}, got {softmax_init!r}.")
        self.alignment = DistributionAlignment(head_dim, eps, alignment_init) if align_queries else None

        def make(part: str, known_range: tuple[float, float] | None = None) -> LSQActivationQuantizer:
            return LSQActivationQuantizer(
                bits, learn_offset, offset_init, f"{name}.{part}", known_range, integer_offset
            )

        self.q_quantizer = make("q")
        self.k_quantizer = make("k")
        self.v_quantizer = make("v")
        self.softmax_quantizer = make("softmax", (0.0, 1.0) if softmax_init == "unit_range" else None)

    def forward(
        self,
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float | None = None,
        dropout: float = 0.0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention of ``(batch, heads, length, head_dim)`` inputs; returns ``(output (B, L, H, D), probs)``.

        The softmax output is quantized before attention dropout: dropout scales the kept weights by ``1 / (1 - p)``,
        which would push them past the quantizer's ``[0, 1]`` range and clip them. ``probs`` is what multiplies ``v``
        (after dropout), as in transformers' eager attention.
        """
        if self.alignment is not None:
            query = self.alignment(query)
        query = self.q_quantizer(query)
        key = self.k_quantizer(key)
        value = self.v_quantizer(value)
        if scaling is None:
            scaling = query.size(-1) ** -0.5
        scores = torch.matmul(query, key.transpose(2, 3)) * scaling
        if attention_mask is not None:
            if attention_mask.dtype == torch.bool:
                scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
            else:
                scores = scores + attention_mask
        probs = self.softmax_quantizer(F.softmax(scores, dim=-1, dtype=torch.float32))
        probs = F.dropout(probs, p=dropout, training=module.training).to(value.dtype)
        output = torch.matmul(probs, value).transpose(1, 2).contiguous()
        return output, probs


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


def _forward_batch(model: nn.Module, batch: Any) -> None:
    if isinstance(batch, Mapping):
        inputs = {k: v for k, v in batch.items() if k in ("pixel_values", "pixel_mask")}
        if "pixel_values" not in inputs:
            raise ValueError(
                f"Calibration batches must contain 'pixel_values' (got keys {sorted(batch)}); pass the batches of a "
                "DETR data collator or plain image tensors."
            )
        model(**inputs)
    elif isinstance(batch, torch.Tensor):
        model(pixel_values=batch)
    else:
        raise TypeError(f"Calibration batches must be dicts or tensors, got {type(batch).__name__}.")


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
                batch = _to_device(batch, device)
                _forward_batch(target, batch)
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
            q.scale_step(MSE_STEP_MULTIPLIERS[best])

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


def _to_device(batch: Any, device: torch.device | str) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    return batch
