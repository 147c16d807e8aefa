"""`QDetrConfig`: DETR's configuration plus the quantization choices of Q-DETR."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import DetrConfig

# The quantization choices, defined once here (this module does not import torch) and used by `quantization.py`.
MIN_BITS = 2
MAX_BITS = 8
DA_LOCATIONS = ("cross_attention", "self_attention", "both", "none")
OFFSET_INITS = ("zero", "minmax", "mse")
"""Initialisations of an activation quantizer's step and offset (`activation_offset_init`)."""
SOFTMAX_INITS = ("unit_range", "lsq")
WEIGHT_STEP_INITS = ("lsq", "mse")
ALIGNMENT_INITS = ("unit", "fit")


PACKING_FORMAT = "qdetr-dense-bitpacked"
"""Name of the packing written into ``config.weight_packing["format"]``."""
PACKING_VERSION = 1


def packing_spec(layer_bits: Mapping[str, int]) -> dict[str, Any]:
    """The ``config.weight_packing`` record of a checkpoint whose layers ``layer_bits`` (name -> bits) are packed.

    It names the layout so any loader knows what it reads: per layer, the signed codes ``q`` in ``[-2^(b-1),
    2^(b-1) - 1]`` are stored as ``q + 2^(b-1)``, flattened in the weight's row-major order, ``b`` bits each, least
    significant bit first, in a ``uint8`` tensor of ``ceil(numel * b / 8)`` bytes; the float weight is ``q * step``
    with ``step = |weight_quantizer.raw_step|`` (one per output channel).
    """
    return {
        "format": PACKING_FORMAT,
        "version": PACKING_VERSION,
        "codes": "signed two's-complement range stored with offset 2^(bits-1)",
        "bit_order": "lsb_first",
        "container": "uint8",
        "layers": {name: int(bits) for name, bits in sorted(layer_bits.items())},
    }


def check_packing_spec(spec: Any) -> dict[str, int]:
    """Validate a ``config.weight_packing`` record and return its ``layers`` (name -> bits).

    Raises:
        ValueError: If the record is not one this version reads.
    """
    if not isinstance(spec, Mapping):
        raise ValueError(f"weight_packing must be a dict written by save_pretrained, got {type(spec).__name__}.")
    if spec.get("format") != PACKING_FORMAT or spec.get("version") != PACKING_VERSION:
        raise ValueError(
            f"weight_packing describes format {spec.get('format')!r} version {spec.get('version')!r}; this version "
            f"of qdetr_hf reads {PACKING_FORMAT!r} version {PACKING_VERSION}. Upgrade qdetr_hf to load this checkpoint."
        )
    layers = spec.get("layers")
    if not isinstance(layers, Mapping) or not all(
        isinstance(b, int) and not isinstance(b, bool) and 2 <= b <= 8 for b in layers.values()
    ):
        raise ValueError(f"weight_packing['layers'] must map layer names to bit widths in [2, 8], got {layers!r}.")
    return dict(layers)


def check_bits(bits: Any, name: str = "bits") -> int:
    """Return ``bits`` if it is an integer bit width in ``[MIN_BITS, MAX_BITS]`` (bools are not), else raise a
    ValueError naming ``name``."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"{name} must be an integer between {MIN_BITS} and {MAX_BITS}, got {bits!r}.")
    return bits


@strict
class QDetrConfig(DetrConfig):
    r"""Configuration of a low-bit quantized DETR ([`QDetrForObjectDetection`]).

    Every DETR field is inherited unchanged from [`transformers.DetrConfig`]; the fields below choose what is
    quantized and how. Defaults follow Q-DETR (Xu et al., CVPR 2023, arXiv 2304.00253) unless marked as a project
    decision (the paper leaves the point open).

    Args:
        weight_bits (`int`, defaults to 4):
            Bits of the LSQ per-output-channel weight quantizers of the quantized Conv2d/Linear layers (paper: W in
            W-A-Attention, 2/3/4).
        activation_bits (`int`, defaults to 4):
            Bits of the LSQ+ input quantizers of the quantized Conv2d/Linear layers (paper: A, 2/3/4).
        attention_bits (`int`, defaults to 8):
            Bits of the query, key, value and softmax-output quantizers inside attention (paper: 8).
        first_conv_bits (`int`, defaults to 8):
            Weight and input bits of the backbone's first convolution, the one that sees the image (paper: stem at
            8 bits, following Bi-Real/ReActNet).
        quantize_backbone (`bool`, defaults to `True`):
            Quantize the backbone convolutions. Q-DETR's first training stage quantizes only the backbone.
        quantize_encoder (`bool`, defaults to `True`):
            Quantize the encoder's attention projections, FFN and attention (q, k, v, softmax).
        quantize_decoder (`bool`, defaults to `True`):
            Quantize the decoder's self- and cross-attention projections, FFN and attention.
        distribution_alignment (`str`, defaults to `"cross_attention"`):
            Where Distribution Alignment standardises the attention query before its quantizer: `"cross_attention"`
            (the decoder co-attention, as in the paper), `"self_attention"` (the decoder self-attention, as in the
            authors' released code), `"both"` or `"none"`. Statistics are over `head_dim` per token and head, with a
            `head_dim`-sized affine shared across heads (project decision). Only used when the decoder is quantized.
        distribution_alignment_eps (`float`, defaults to 1e-5):
            Epsilon of the DA standardisation (paper: 1e-5).
        distribution_alignment_init (`str`, defaults to `"unit"`):
            Initial DA affine. `"unit"`: `gamma = 1`, `beta = 0` (the paper's), which changes the converted model's
            attention (the standardised query has a fixed per-token scale); `"fit"` (project option): calibration sets
            `gamma`/`beta` per dimension to the least-squares fit of the real-valued query from its standardised
            form, so DA starts close to the identity (`benchmarks/results/main_job.md` measures both).
        activation_offset (`bool`, defaults to `True`):
            Learn an LSQ+ offset in every activation quantizer (the paper's baseline). `False` gives plain LSQ.
        activation_offset_init (`str`, defaults to `"zero"`):
            Initialisation of activation step and offset at calibration. `"zero"`: LSQ step `2 mean|x| / sqrt(Qp)` and
            zero offset (the paper's stated init); `"minmax"`: LSQ+'s min/max init (project option); `"mse"` (project
            option): zero offset and, of the LSQ step's multiples in `MSE_STEP_MULTIPLIERS` (0.02-8), the one with the
            least squared quantization error on the calibration inputs (the quantizers with an analytic range, such as
            the softmax output's, keep it). LSQ's rule suits 4 bits but sets 8-bit steps far coarser than needed
            (q, k, v and the stem input); `benchmarks/results/main_job.md` measures the difference.
        weight_step_init (`str`, defaults to `"lsq"`):
            Initial weight steps. `"lsq"`: LSQ's `2 mean|w_c| / sqrt(Qp)` per output channel (the paper's);
            `"mse"` (project option): per channel, the clipping point `alpha * max|w_c|` that minimises the weight's
            quantization error; it matters most for short fine-tuning budgets (`benchmarks/results/main_job.md`).
        softmax_quantizer_init (`str`, defaults to `"unit_range"`):
            Initialisation of the attention-probability quantizer. `"unit_range"` (project decision): the softmax
            output's exact range [0, 1], step `1 / (2^b - 1)`; `"lsq"`: the generic LSQ activation init, which puts
            the clipping point near `32 / L_k` at 8 bits and clips confident attention (measured in
            `benchmarks/results/main_job.md`). The paper states the LSQ init for activations, not for the softmax.
        integer_zero_points (`bool`, defaults to `False`):
            Use each learned activation offset as a whole number of steps, `round(z / s)` (project option): an
            integer zero point, which is what ONNX's QuantizeLinear has, so `qdetr_hf.export_onnx` reproduces the
            trained numerics exactly. `False` (the paper's LSQ+): real-valued offsets, which the export rounds to the
            nearest step (an approximation; its effect on AP is measured in `benchmarks/results/deploy.md`).
        backbone_residual_bits (`int`, *optional*):
            Bits of quantizers on the backbone's residual stream (project option): the output of each residual block's
            last BatchNorm, of its shortcut (downsample) and of the block itself (after the final ReLU). `None` (the
            paper) leaves the residual stream real-valued, so the convolutions that feed a residual addition have no
            quantized output and ONNX Runtime runs them in float; 8 gives every backbone convolution an integer
            input and output in the exported model. Needs a timm ResNet backbone (BasicBlock / Bottleneck blocks).
        head_bits (`int`, *optional*):
            Weight and input bits of the layers Q-DETR keeps real-valued around the transformer: the input projection
            (backbone features to `d_model`) and the prediction heads (class classifier, box MLP) (project option).
            `None` (the paper) leaves them real-valued; they count 32 bits per weight in the size, which in a small
            model is much of the quantized model's size (`benchmarks/results/low_bit.md`). `layer_weight_bits` may
            set their weights' width per layer like any other's.
        layer_weight_bits (`dict[str, int]`, *optional*):
            Weight bits of individual quantized layers by module name (e.g. `{"model.encoder.layers.0.mlp.fc1":
            2}`), overriding `weight_bits` (and `first_conv_bits`) there: mixed precision (project option, the paper
            quantizes every layer alike). Activations keep `activation_bits`. `qdetr_hf.choose_bit_widths` fills it
            for a size budget from each layer's measured sensitivity.
        weight_packing (`dict`, *optional*):
            Written by `save_pretrained`, never set by hand: how the checkpoint stores its quantized weights. `None`
            (training checkpoints and earlier versions): float latent weights. A dict (see
            `qdetr_hf.packing.packing_spec`): each quantized layer's integer codes packed densely at its own bit width
            (`layers`: name -> bits) beside its per-channel steps; loading dequantizes them, so a model in memory
            always holds float weights and this field is `None` again.

    Example:

    ```python
    >>> from qdetr_hf import QDetrConfig, QDetrForObjectDetection
    >>> config = QDetrConfig(weight_bits=3, activation_bits=3, backbone="resnet18")
    >>> model = QDetrForObjectDetection(config)  # random weights, quantizers still to be calibrated
    ```
    """

    model_type = "qdetr"

    weight_bits: int = 4
    activation_bits: int = 4
    attention_bits: int = 8
    first_conv_bits: int = 8
    quantize_backbone: bool = True
    quantize_encoder: bool = True
    quantize_decoder: bool = True
    distribution_alignment: str = "cross_attention"
    distribution_alignment_eps: float = 1e-5
    distribution_alignment_init: str = "unit"
    activation_offset: bool = True
    activation_offset_init: str = "zero"
    weight_step_init: str = "lsq"
    softmax_quantizer_init: str = "unit_range"
    integer_zero_points: bool = False
    backbone_residual_bits: int | None = None
    head_bits: int | None = None
    layer_weight_bits: dict | None = None
    weight_packing: dict | None = None

    def __post_init__(self, **kwargs):
        # A real-valued DETR config.json (model_type "detr") loaded through QDetrConfig becomes a Q-DETR config.
        kwargs.pop("model_type", None)
        self.model_type = type(self).model_type
        self.validate_quantization()
        super().__post_init__(**kwargs)

    def validate_quantization(self) -> None:
        """Check every quantization field, naming the bad one. Run at construction and again by
        `QDetrForObjectDetection` when it builds the model: `from_pretrained(..., field=value)` sets its overrides on
        an already built config, where a typo would otherwise pass unseen.

        Raises:
            ValueError: If a field has a value outside its choices or range.
        """
        for field in ("weight_bits", "activation_bits", "attention_bits", "first_conv_bits"):
            check_bits(getattr(self, field), f"QDetrConfig.{field}")
        if self.backbone_residual_bits is not None:
            check_bits(self.backbone_residual_bits, "QDetrConfig.backbone_residual_bits")
        if self.head_bits is not None:
            check_bits(self.head_bits, "QDetrConfig.head_bits")
        if self.layer_weight_bits is not None:
            if not isinstance(self.layer_weight_bits, dict) or not all(
                isinstance(k, str) for k in self.layer_weight_bits
            ):
                raise ValueError(
                    f"QDetrConfig.layer_weight_bits must map layer names to bit widths, got {self.layer_weight_bits!r}."
                )
            for name, bits in self.layer_weight_bits.items():
                check_bits(bits, f"QDetrConfig.layer_weight_bits[{name!r}]")
        if self.distribution_alignment not in DA_LOCATIONS:
            raise ValueError(
                f"QDetrConfig.distribution_alignment must be one of {DA_LOCATIONS}, got {self.distribution_alignment!r}."
            )
        if not self.distribution_alignment_eps > 0:
            raise ValueError(
                f"QDetrConfig.distribution_alignment_eps must be > 0, got {self.distribution_alignment_eps!r}."
            )
        if self.distribution_alignment_init not in ALIGNMENT_INITS:
            raise ValueError(
                f"QDetrConfig.distribution_alignment_init must be one of {ALIGNMENT_INITS}, "
                f"got {self.distribution_alignment_init!r}."
            )
        if self.activation_offset_init not in OFFSET_INITS:
            raise ValueError(
                f"QDetrConfig.activation_offset_init must be one of {OFFSET_INITS}, got {self.activation_offset_init!r}."
            )
        if self.weight_step_init not in WEIGHT_STEP_INITS:
            raise ValueError(
                f"QDetrConfig.weight_step_init must be one of {WEIGHT_STEP_INITS}, got {self.weight_step_init!r}."
            )
        if self.softmax_quantizer_init not in SOFTMAX_INITS:
            raise ValueError(
                f"QDetrConfig.softmax_quantizer_init must be one of {SOFTMAX_INITS}, got {self.softmax_quantizer_init!r}."
            )
        if self.weight_packing is not None:
            check_packing_spec(self.weight_packing)
        if self.activation_offset_init == "minmax" and not self.activation_offset:
            raise ValueError(
                "QDetrConfig.activation_offset_init='minmax' needs activation_offset=True (plain LSQ has no offset)."
            )

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs):
        """Load a config dictionary; a real-valued DETR config (``model_type: detr``) is accepted as the starting
        point of a conversion and relabelled ``qdetr``; any other model type is refused.

        Raises:
            ValueError: If the checkpoint is neither DETR nor Q-DETR (e.g. BERT, YOLOS).
        """
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        model_type = config_dict.get("model_type")
        if model_type == DetrConfig.model_type:
            config_dict = {**config_dict, "model_type": cls.model_type}
        elif model_type != cls.model_type:
            raise ValueError(
                f"{pretrained_model_name_or_path} holds a {model_type!r} model, not DETR: Q-DETR converts DETR "
                f"checkpoints (model_type 'detr') or loads its own ('qdetr')."
            )
        return config_dict, kwargs

    @property
    def bit_notation(self) -> str:
        """The paper's W-A-Attention notation, e.g. ``"4-4-8"``."""
        return f"{self.weight_bits}-{self.activation_bits}-{self.attention_bits}"

    @property
    def aligns_cross_attention(self) -> bool:
        """Whether DA is applied to the decoder cross-attention query."""
        return self.distribution_alignment in ("cross_attention", "both")

    @property
    def aligns_self_attention(self) -> bool:
        """Whether DA is applied to the decoder self-attention query."""
        return self.distribution_alignment in ("self_attention", "both")


__all__ = ["QDetrConfig"]
