"""Quantized layers: Conv2d and Linear with weight and input quantizers, attention with quantized q / k / v / softmax and
Distribution Alignment."""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_qdetr import ALIGNMENT_INITS, SOFTMAX_INITS
from .quantizers import AlignmentInit, LSQActivationQuantizer, LSQWeightQuantizer, OffsetInit, WeightStepInit


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
