"""Efficiency accounting under Q-DETR's conventions: parameters, model size, OPs and theoretical speed-up."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from transformers.models.detr.modeling_detr import DetrCrossAttention, DetrSelfAttention

from .quantization import DistributionAlignment, QuantConv2d, QuantLinear, _Quantizer, quantization_disabled

MB = 2**20
"""Bytes per "MB" in reports. The paper's 159.32 MB for DETR-R50 is closest to 41.5 M parameters x 4 bytes / 2^20
(158.4 MiB; / 1e6 would give 166.1), so sizes are reported in MiB and called MB as in the paper."""

BIT_OPS_FACTOR: dict[int, float] = {8: 1 / 4, 7: 1 / 4, 6: 1 / 4, 5: 1 / 4, 4: 1 / 8, 3: 1 / 16, 2: 1 / 32}
"""OPs of one multiply-accumulate at ``b`` bits relative to a full-precision one (qdetr.md section 6: 1/4, 1/8, 1/16,
1/32 at 8, 4, 3, 2 bits, the Bi-Real "1/64 for 1-bit" convention extended). The paper gives no factor for 5-7 bits;
they are counted as 8-bit operations (the hardware they would run on)."""


@dataclass
class LayerCost:
    """Cost of one layer (or attention product) in an :class:`EfficiencyReport`."""

    name: str
    kind: str
    macs: int
    bits: int | None
    """Operand bits of the multiply-accumulates (max of weight and activation bits), ``None`` if full precision."""
    weight_params: int = 0


@dataclass
class EfficiencyReport:
    """Parameter counts, model size, OPs and theoretical speed-up of a (quantized) DETR.

    Conventions (qdetr.md section 6): memory = 32 bits x full-precision parameters + b bits x b-bit parameters;
    OPs = full-precision multiply-accumulates + sum over bit widths of ``BIT_OPS_FACTOR[b]`` x b-bit MACs. The
    real-valued reference counts every parameter at 32 bits and every MAC at full precision. Speed-up and memory
    saving are real-valued / quantized. Normalisation layers, softmax, additions and activations are not counted
    (they are a small fraction of the OPs and the paper does not count them); always report measured latency beside
    the theoretical speed-up.
    """

    image_size: tuple[int, int]
    num_parameters: int
    parameters_by_bits: dict[str, int]
    size_mb_real: float
    size_mb: float
    macs_by_bits: dict[str, int]
    ops_real_g: float
    ops_g: float
    speedup: float
    memory_saving: float
    layers: list[LayerCost] = field(default_factory=list, repr=False)

    def to_dict(self, with_layers: bool = False) -> dict[str, Any]:
        """JSON-serialisable dictionary (per-layer details only when ``with_layers``)."""
        out = asdict(self)
        if not with_layers:
            out.pop("layers")
        out["image_size"] = list(self.image_size)
        return out

    def to_markdown(self) -> str:
        """A one-table markdown summary."""
        rows = [
            ("Input size (H x W)", f"{self.image_size[0]} x {self.image_size[1]}"),
            ("Parameters", f"{self.num_parameters:,}"),
            ("Parameters by bits", ", ".join(f"{k}: {v:,}" for k, v in self.parameters_by_bits.items())),
            ("Size, real-valued (MB)", f"{self.size_mb_real:.2f}"),
            ("Size, quantized (MB)", f"{self.size_mb:.2f}"),
            ("OPs, real-valued (G)", f"{self.ops_real_g:.3f}"),
            ("OPs, quantized (G)", f"{self.ops_g:.3f}"),
            ("Theoretical speed-up", f"{self.speedup:.2f}x"),
            ("Memory saving", f"{self.memory_saving:.2f}x"),
        ]
        lines = ["| Quantity | Value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in rows]
        return "\n".join(lines)


def _bits_key(bits: int | None) -> str:
    return "fp32" if bits is None else f"{bits}bit"


def _attention_bits(module: nn.Module) -> int | None:
    quantizer = getattr(module, "attn_quantizer", None)
    return None if quantizer is None else quantizer.q_quantizer.bits


@torch.no_grad()
def efficiency_report(model: nn.Module, image_size: tuple[int, int] | int = (800, 1333)) -> EfficiencyReport:
    """Count parameters, size and OPs of a DETR or Q-DETR model for one image of ``image_size``.

    MACs are measured by forward hooks during one real-valued forward pass on a zero image (fake quantization
    bypassed, so the model need not be calibrated): ``Conv2d``: output elements x in_channels/groups x kernel area;
    ``Linear``: output elements x in_features; attention: ``Lq x Lk x d_model`` for ``q k^T`` and again for
    ``softmax . v``. A quantized Conv2d/Linear counts at ``max(weight_bits, activation_bits)``, a quantized attention
    product at its ``attention_bits``, everything else at full precision.

    Args:
        model: A ``QDetrForObjectDetection`` or a real-valued ``DetrForObjectDetection``.
        image_size: ``(height, width)`` of the input, or one int for a square input. The paper uses DETR's
            ``800 x 1333``.

    Returns:
        An :class:`EfficiencyReport`.
    """
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    height, width = (int(v) for v in image_size)
    if height <= 0 or width <= 0:
        raise ValueError(f"image_size must be positive, got {image_size!r}.")

    layers: list[LayerCost] = []
    handles = []
    # Bits are read before the forward pass, which runs with every quantizer bypassed.
    layer_bits = {id(module): _layer_bits(module) for module in model.modules()}

    def conv_hook(name: str):
        def hook(module: nn.Conv2d, args: tuple, output: torch.Tensor) -> None:
            kernel = module.kernel_size[0] * module.kernel_size[1]
            macs = output.numel() * (module.in_channels // module.groups) * kernel
            layers.append(LayerCost(name, "conv", int(macs), layer_bits[id(module)], module.weight.numel()))

        return hook

    def linear_hook(name: str):
        def hook(module: nn.Linear, args: tuple, output: torch.Tensor) -> None:
            macs = output.numel() * module.in_features
            layers.append(LayerCost(name, "linear", int(macs), layer_bits[id(module)], module.weight.numel()))

        return hook

    def attention_hook(name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            if isinstance(module, DetrCrossAttention):
                keys = kwargs["key_value_states"] if "key_value_states" in kwargs else args[1]
            else:
                keys = hidden
            batch, lq, d_model = hidden.shape
            lk = keys.shape[1]
            macs = batch * lq * lk * d_model
            bits = _attention_bits(module)
            layers.append(LayerCost(f"{name}.qk", "attention", int(macs), bits))
            layers.append(LayerCost(f"{name}.pv", "attention", int(macs), bits))

        return hook

    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(conv_hook(name)))
        elif isinstance(module, nn.Linear):
            handles.append(module.register_forward_hook(linear_hook(name)))
        elif isinstance(module, (DetrSelfAttention, DetrCrossAttention)):
            handles.append(module.register_forward_hook(attention_hook(name), with_kwargs=True))

    device = next(model.parameters()).device
    was_training = model.training
    try:
        model.eval()
        with quantization_disabled(model):
            model(pixel_values=torch.zeros(1, model.config.num_channels, height, width, device=device))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)

    # Parameters: quantized weights at their bits, everything else (biases, norms, heads, steps, offsets) at 32 bits.
    quantized_weights: dict[int, int] = {}
    quantized_ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, (QuantConv2d, QuantLinear)) and module.weight_quantizer.enabled:
            bits = module.weight_quantizer.bits
            quantized_weights[bits] = quantized_weights.get(bits, 0) + module.weight.numel()
            quantized_ids.add(id(module.weight))
    num_parameters = sum(p.numel() for p in model.parameters())
    full_precision = sum(p.numel() for p in model.parameters() if id(p) not in quantized_ids)
    quantizer_params = sum(
        p.numel() for m in model.modules() if isinstance(m, (_Quantizer, DistributionAlignment)) for p in m.parameters()
    )
    detector_parameters = num_parameters - quantizer_params

    size_bits = 32 * full_precision + sum(bits * count for bits, count in quantized_weights.items())
    size_mb = size_bits / 8 / MB
    size_mb_real = 32 * detector_parameters / 8 / MB

    macs_by_bits: dict[str, int] = {}
    for layer in layers:
        key = _bits_key(layer.bits)
        macs_by_bits[key] = macs_by_bits.get(key, 0) + layer.macs
    ops_real = sum(layer.macs for layer in layers)
    ops = sum(layer.macs * (1.0 if layer.bits is None else BIT_OPS_FACTOR[layer.bits]) for layer in layers)

    parameters_by_bits = {"fp32": full_precision}
    parameters_by_bits.update({f"{b}bit": n for b, n in sorted(quantized_weights.items(), reverse=True)})
    return EfficiencyReport(
        image_size=(height, width),
        num_parameters=detector_parameters,
        parameters_by_bits=parameters_by_bits,
        size_mb_real=size_mb_real,
        size_mb=size_mb,
        macs_by_bits=macs_by_bits,
        ops_real_g=ops_real / 1e9,
        ops_g=ops / 1e9,
        speedup=ops_real / ops if ops > 0 else float("nan"),
        memory_saving=size_mb_real / size_mb if size_mb > 0 else float("nan"),
        layers=layers,
    )


def _layer_bits(module: nn.Module) -> int | None:
    if isinstance(module, (QuantConv2d, QuantLinear)) and module.weight_quantizer.enabled:
        return max(module.weight_quantizer.bits, module.input_quantizer.bits)
    return None


__all__ = ["BIT_OPS_FACTOR", "MB", "EfficiencyReport", "LayerCost", "efficiency_report"]
