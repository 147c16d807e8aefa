"""LSQ / LSQ+ fake quantization: the autograd function, the weight and activation quantizers and their range observer."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from .configuration_qdetr import OFFSET_INITS, WEIGHT_STEP_INITS, check_bits

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

    def set_bits(self, bits: int) -> None:
        """Change the bit width in place (the step stays the same ``Parameter``, so an optimizer holding it keeps
        working). The step itself is left as it is: re-initialise it for the new width with :meth:`initialize_from`."""
        self.bits = check_bits(bits)
        self.qn, self.qp = quant_range(self.bits, signed=True)

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

    def use_step_candidate(self, index: int) -> None:
        """Multiply the step by ``MSE_STEP_MULTIPLIERS[index]``, the candidate :meth:`step_errors` ranked best."""
        self.scale_step(MSE_STEP_MULTIPLIERS[index])

    @torch.no_grad()
    def set_bits(self, bits: int) -> None:
        """Change the bit width in place, keeping the span of the levels: the step becomes ``s (2^b - 1) / (2^b' -
        1)`` (``Qp - Qn = 2^b - 1``, signed or not) and the offset stays, so an unsigned range keeps its lowest and
        highest levels where calibration or training put them (a signed one its span, both ends moving by ``(s - s') /
        2``). The parameters stay the same objects, so an optimizer holding them keeps working."""
        old_levels = 2**self.bits - 1
        self.bits = check_bits(bits)
        self.raw_step.copy_((self.step * (old_levels / (2**self.bits - 1))).clamp_min(STEP_EPS))
        self._cached_range = None

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
