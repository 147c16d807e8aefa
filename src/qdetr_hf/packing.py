"""Packed checkpoints: b-bit integer weight codes stored densely (b bits per value) instead of float latent weights."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from .configuration_qdetr import check_packing_spec, packing_spec
from .quantization import QuantConv2d, QuantLinear

PACKED_SUFFIX = "weight_packed"
"""State-dict key suffix of a packed weight (``<layer>.weight_packed`` replaces ``<layer>.weight``)."""


def packed_numel(numel: int, bits: int) -> int:
    """Bytes of ``numel`` codes packed at ``bits`` bits each."""
    return math.ceil(numel * bits / 8)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack signed ``bits``-bit integer codes densely into a 1-D ``uint8`` tensor (layout: :func:`packing_spec`).

    Hand-written because neither torch nor safetensors has sub-byte integer types for arbitrary widths (3 bits).

    Raises:
        ValueError: If a code lies outside ``[-2^(bits-1), 2^(bits-1) - 1]``.
    """
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    flat = codes.detach().reshape(-1).to(torch.int16)
    if flat.numel() and (int(flat.min()) < low or int(flat.max()) > high):
        raise ValueError(f"codes must lie in [{low}, {high}] to be packed at {bits} bits.")
    unsigned = (flat - low).to(torch.uint8)
    if bits == 8:
        return unsigned.cpu()
    shifts = torch.arange(bits, dtype=torch.uint8, device=flat.device)
    stream = ((unsigned[:, None] >> shifts) & 1).reshape(-1)
    stream = torch.nn.functional.pad(stream, (0, (-stream.numel()) % 8))
    byte_shifts = torch.arange(8, dtype=torch.uint8, device=flat.device)
    return (stream.reshape(-1, 8) << byte_shifts).sum(dim=1, dtype=torch.uint8).cpu()


def unpack_codes(packed: torch.Tensor, bits: int, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: the signed codes of ``shape`` as an ``int8`` tensor.

    Raises:
        ValueError: If ``packed`` does not hold exactly the bytes that ``shape`` needs at ``bits`` bits.
    """
    numel = math.prod(shape)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != packed_numel(numel, bits):
        raise ValueError(
            f"A packed {tuple(shape)} weight at {bits} bits needs {packed_numel(numel, bits)} uint8 values, got a "
            f"{packed.dtype} tensor of shape {tuple(packed.shape)}."
        )
    if bits == 8:
        unsigned = packed.to(torch.int16)
    else:
        byte_shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
        stream = ((packed[:, None] >> byte_shifts) & 1).reshape(-1)[: numel * bits].reshape(numel, bits)
        shifts = torch.arange(bits, dtype=torch.int16, device=packed.device)
        unsigned = (stream.to(torch.int16) << shifts).sum(dim=1, dtype=torch.int16)
    return (unsigned - 2 ** (bits - 1)).to(torch.int8).reshape(shape)


def pack_state_dict(
    state_dict: Mapping[str, torch.Tensor], layers: Mapping[str, QuantLinear | QuantConv2d]
) -> tuple[dict[str, torch.Tensor], dict]:
    """Replace the float weight of every layer in ``layers`` (module name -> quantized layer) by its packed codes.

    The codes are those the layer's forward computes from the state dict's own weight and step, so a model loaded
    from the result (:func:`unpack_layer`) returns bit-identical outputs. Returns the new state dict and its
    ``config.weight_packing`` record (:func:`~qdetr_hf.configuration_qdetr.packing_spec`).
    """
    packed = dict(state_dict)
    bits = {}
    for name, layer in layers.items():
        quantizer = layer.weight_quantizer
        codes = quantizer.codes(packed.pop(f"{name}.weight"), packed[f"{name}.weight_quantizer.raw_step"])
        packed[f"{name}.{PACKED_SUFFIX}"] = pack_codes(codes, quantizer.bits)
        bits[name] = quantizer.bits
    return packed, packing_spec(bits)


def register_packed_buffers(layers: Mapping[str, QuantLinear | QuantConv2d], spec: Mapping) -> list[str]:
    """Give each layer named in a ``config.weight_packing`` record an empty ``weight_packed`` buffer for
    ``from_pretrained`` to load into; returns the packed layers' names. The model may quantize more layers than the
    checkpoint did (e.g. Q-DETR's second stage loading its first): their float weights load as usual.

    Raises:
        ValueError: If a packed layer is not quantized in the model, or at another bit width.
    """
    recorded = check_packing_spec(spec)
    actual = {name: layer.weight_quantizer.bits for name, layer in layers.items()}
    differing = sorted(
        f"{name} ({bits} bits packed, {actual.get(name)} in the model)"
        for name, bits in recorded.items()
        if actual.get(name) != bits
    )
    if differing:
        raise ValueError(
            f"The checkpoint's packed layers do not match the model built from its config: {', '.join(differing[:5])}"
            f"{' ...' if len(differing) > 5 else ''}. Load it with the config it was saved with."
        )
    for name in recorded:
        layer = layers[name]
        size = packed_numel(layer.weight.numel(), recorded[name])
        layer.register_buffer(PACKED_SUFFIX, torch.zeros(size, dtype=torch.uint8, device=layer.weight.device))
    return list(recorded)


@torch.no_grad()
def unpack_layer(layer: QuantLinear | QuantConv2d) -> bool:
    """Dequantize a loaded ``weight_packed`` buffer into the layer's float weight and drop the buffer; ``False``
    (and the buffer dropped) when the buffer was not loaded from a checkpoint."""
    packed = layer._buffers.pop(PACKED_SUFFIX, None)
    if packed is None or not getattr(packed, "_is_hf_initialized", False):
        return False
    quantizer = layer.weight_quantizer
    codes = unpack_codes(packed, quantizer.bits, layer.weight.shape)
    layer.weight.copy_(quantizer.dequantize(codes).to(layer.weight.dtype))
    return True


__all__ = [
    "PACKED_SUFFIX",
    "pack_codes",
    "pack_state_dict",
    "packed_numel",
    "register_packed_buffers",
    "unpack_codes",
    "unpack_layer",
]
