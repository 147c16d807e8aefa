"""`QDetrForObjectDetection`: transformers' DETR with LSQ-quantized backbone, encoder and decoder (Q-DETR)."""

from __future__ import annotations

import re

import torch
from torch import nn
from transformers import initialization as init
from transformers.masking_utils import AttentionMaskInterface, eager_mask
from transformers.modeling_utils import AttentionInterface
from transformers.models.detr.modeling_detr import (
    DetrCrossAttention,
    DetrForObjectDetection,
    DetrFrozenBatchNorm2d,
    DetrSelfAttention,
    eager_attention_forward,
)
from transformers.utils import logging

from .configuration_qdetr import QDetrConfig
from .hub_utils import check_local_path
from .packing import pack_state_dict, register_packed_buffers, unpack_layer
from .quantization import (
    DistributionAlignment,
    LSQActivationQuantizer,
    LSQWeightQuantizer,
    QuantAttention,
    QuantConv2d,
    QuantLinear,
    is_calibrated,
    quantized_layers,
)
from .transformers_compat import FixedAttentionImplementation

logger = logging.get_logger(__name__)

BIT_FIELDS = (
    "weight_bits",
    "activation_bits",
    "attention_bits",
    "first_conv_bits",
    "backbone_residual_bits",
    "head_bits",
    "layer_weight_bits",
)
"""Config fields that set bit widths: a trained Q-DETR checkpoint cannot be loaded with other values."""
HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "proxies")
"""`from_pretrained` keyword arguments that locate the checkpoint (passed on when reading its config)."""
QDETR_ATTENTION = "qdetr"
"""Name of the attention implementation registered by this module in transformers' ``AttentionInterface``."""


def qdetr_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention function of Q-DETR, registered as ``"qdetr"`` in transformers' ``AttentionInterface``.

    Modules carrying an ``attn_quantizer`` (:class:`~qdetr_hf.quantization.QuantAttention`) get DA and the q / k / v /
    softmax quantizers; any other attention module (e.g. the encoder during Q-DETR's backbone-only first stage) runs
    the library's eager attention unchanged.
    """
    quantizer = getattr(module, "attn_quantizer", None)
    if quantizer is None:
        return eager_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout)
    return quantizer(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout)


AttentionInterface.register(QDETR_ATTENTION, qdetr_attention_forward)
# The quantized path adds the mask to the scores like the eager path, so it takes eager-style (additive) masks.
AttentionMaskInterface.register(QDETR_ATTENTION, eager_mask)


class QDetrForObjectDetection(FixedAttentionImplementation, DetrForObjectDetection):
    r"""DETR with low-bit LSQ-quantized layers, as in Q-DETR (Xu et al., CVPR 2023).

    Same forward signature and outputs as [`transformers.DetrForObjectDetection`]. Built from a [`QDetrConfig`], it
    replaces, where the config asks for it:

    * every `nn.Conv2d` of the backbone by a [`~qdetr_hf.quantization.QuantConv2d`] (the first one, which sees the
      image, at `first_conv_bits`);
    * the q/k/v/o projections and FFN layers of the encoder and decoder by [`~qdetr_hf.quantization.QuantLinear`];
    * the attention score/value product by a quantized one (q, k, v and softmax output at `attention_bits`), with
      Distribution Alignment on the decoder queries chosen by `distribution_alignment`.

    * with `head_bits` set, the input projection and the class/box heads too (weights and inputs at `head_bits`).

    LayerNorms, (frozen) BatchNorms and query embeddings stay real-valued; so do the input projection and the heads
    unless `head_bits` is set (the paper keeps them real-valued).

    Converting a real-valued DETR checkpoint is one call; every real weight is loaded and every weight step is set to
    its LSQ init computed from the loaded weights:

    ```python
    >>> model = QDetrForObjectDetection.from_pretrained("facebook/detr-resnet-50", weight_bits=4, activation_bits=4)
    >>> qdetr_hf.calibrate(model, batches)  # activation steps/offsets from real data, once
    ```

    Activation quantizers must be calibrated ([`qdetr_hf.calibrate`]) before the model is run; an uncalibrated model
    raises a `RuntimeError` that says so. Calibration is stored in the checkpoint.
    """

    config_class = QDetrConfig
    config: QDetrConfig
    attention_function = QDETR_ATTENTION  # FixedAttentionImplementation: quantized attention needs its probabilities
    # Quantizer tensors are expected to be missing when converting a real-valued DETR checkpoint: they are
    # initialised explicitly in `initialize_weights` rather than reported as missing weights.
    _keys_to_ignore_on_load_missing = [r"_quantizer\.", r"\.alignment\.(weight|bias|calibrated)$"]

    def __init__(self, config: QDetrConfig):
        # Duck-typed: under trust_remote_code the config class is a dynamically loaded copy of QDetrConfig.
        if not hasattr(config, "weight_bits"):
            raise TypeError(
                f"QDetrForObjectDetection needs a QDetrConfig, got {type(config).__name__}; build one with "
                "QDetrConfig(**detr_config.to_dict()) or load with QDetrForObjectDetection.from_pretrained(...)."
            )
        config.validate_quantization()  # from_pretrained's overrides were set after the config was built
        config._attn_implementation_internal = QDETR_ATTENTION
        super().__init__(config)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """`PreTrainedModel.from_pretrained` for DETR (converted) and Q-DETR checkpoints, local or on the Hub.

        Keyword arguments override `QDetrConfig` fields and are validated like the config's own. A trained Q-DETR
        keeps its bit widths: its steps and calibration belong to them, so overriding `weight_bits`,
        `activation_bits`, `attention_bits`, `first_conv_bits` or `backbone_residual_bits` of a Q-DETR checkpoint is
        refused (convert a real-valued checkpoint instead, or re-quantize the loaded model explicitly).

        Raises:
            FileNotFoundError: If a local path does not exist.
            ValueError: If the checkpoint is not DETR / Q-DETR, an override is invalid, or a Q-DETR checkpoint's bit
                widths would change.
        """
        check_local_path(pretrained_model_name_or_path, "Model folder")
        hub_kwargs = {k: kwargs[k] for k in HUB_KWARGS if k in kwargs}
        saved, _ = cls.config_class.get_config_dict(pretrained_model_name_or_path, **hub_kwargs)
        config = kwargs.get("config")

        def requested(field: str) -> object:
            if field in kwargs:
                return kwargs[field]
            return getattr(config, field, None) if config is not None else saved.get(field)

        is_qdetr = "weight_bits" in saved  # a converted DETR checkpoint has no bit widths yet
        changed = {f: (saved.get(f), requested(f)) for f in BIT_FIELDS if is_qdetr and saved.get(f) != requested(f)}
        if changed:
            described = ", ".join(f"{f} {old} -> {new}" for f, (old, new) in changed.items())
            raise ValueError(
                f"{pretrained_model_name_or_path} is a trained Q-DETR at {saved.get('weight_bits')}-"
                f"{saved.get('activation_bits')}-{saved.get('attention_bits')}; loading it with other bit widths "
                f"({described}) would keep steps and calibration made for the old ones. Load it as saved, or convert "
                "the real-valued checkpoint at the new widths."
            )
        return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)

    def set_attn_implementation(self, attn_implementation: str | dict, allow_all_kernels: bool = False) -> None:
        """Kept for API compatibility; Q-DETR always uses its own ``"qdetr"`` attention function."""
        self._check_and_adjust_attn_implementation(
            attn_implementation if isinstance(attn_implementation, str) else None
        )
        self.config._attn_implementation_internal = QDETR_ATTENTION

    def post_init(self) -> None:
        # DetrForObjectDetection.__init__ ends with post_init(): swap in the quantized layers first, so that weight
        # initialisation (or loading) sees the final module tree.
        self._quantize_modules()
        self._check_layer_weight_bits()
        packed: list[str] = []
        if self.config.weight_packing is not None:  # a packed checkpoint: load its codes, not float weights
            packed = register_packed_buffers(quantized_layers(self), self.config.weight_packing)
        super().post_init()
        self._keys_to_ignore_on_load_missing |= {f"^{re.escape(name)}\\.weight$" for name in packed}

    # ------------------------------------------------------------------------------------------------------------
    # Building the quantized layers
    # ------------------------------------------------------------------------------------------------------------
    def _quantize_modules(self) -> None:
        config = self.config
        offset_kwargs = {
            "learn_offset": config.activation_offset,
            "offset_init": config.activation_offset_init,
            "integer_offset": config.integer_zero_points,
        }
        if config.quantize_backbone:
            self._quantize_backbone(offset_kwargs)
            if config.backbone_residual_bits is not None:
                self._quantize_residual_stream(offset_kwargs)
        if config.quantize_encoder:
            for i, layer in enumerate(self.model.encoder.layers):
                prefix = f"model.encoder.layers.{i}"
                self._quantize_attention(layer.self_attn, f"{prefix}.self_attn", align=False, **offset_kwargs)
                self._quantize_mlp(f"{prefix}.mlp", offset_kwargs)
        if config.quantize_decoder:
            for i, layer in enumerate(self.model.decoder.layers):
                prefix = f"model.decoder.layers.{i}"
                self._quantize_attention(
                    layer.self_attn, f"{prefix}.self_attn", align=config.aligns_self_attention, **offset_kwargs
                )
                self._quantize_attention(
                    layer.encoder_attn, f"{prefix}.encoder_attn", align=config.aligns_cross_attention, **offset_kwargs
                )
                self._quantize_mlp(f"{prefix}.mlp", offset_kwargs)
        if config.head_bits is not None:
            for name in self.head_layer_names():
                self._quantize_layer(name, offset_kwargs, config.head_bits)

    def head_layer_names(self) -> list[str]:
        """Module names of the input projection and the prediction heads' layers (what `head_bits` quantizes)."""
        box_layers = [f"bbox_predictor.layers.{i}" for i in range(len(self.bbox_predictor.layers))]
        return ["model.input_projection", "class_labels_classifier", *box_layers]

    def _quantize_backbone(self, offset_kwargs: dict) -> None:
        backbone = self.model.backbone.model
        first = True
        for name, module in list(backbone.named_modules()):
            if isinstance(module, QuantConv2d):
                first = False
                continue
            if not isinstance(module, nn.Conv2d):
                continue
            if type(module) is not nn.Conv2d:
                raise TypeError(
                    f"Backbone layer '{name}' is a {type(module).__name__}; only plain nn.Conv2d layers can be "
                    "quantized. Use a backbone built from nn.Conv2d (e.g. a timm ResNet)."
                )
            self._quantize_layer(
                f"model.backbone.model.{name}", offset_kwargs, self.config.first_conv_bits if first else None
            )
            first = False

    def _quantize_residual_stream(self, offset_kwargs: dict) -> None:
        """Quantize each residual block's last BatchNorm output, its shortcut output and the block output."""
        backbone = self.model.backbone.model
        blocks = [(n, m) for n, m in backbone.named_modules() if type(m).__name__ in RESIDUAL_BLOCK_LAYERS]
        if not blocks:
            raise ValueError(
                "backbone_residual_bits needs a backbone of residual blocks (timm ResNet BasicBlock / Bottleneck); "
                f"this backbone ({type(backbone).__name__}) has none."
            )
        bits = self.config.backbone_residual_bits
        for name, block in blocks:
            prefix = f"model.backbone.model.{name}"
            norm_attr, act_attr = RESIDUAL_BLOCK_LAYERS[type(block).__name__]
            setattr(
                block,
                norm_attr,
                QuantFrozenBatchNorm2d.wrap(getattr(block, norm_attr), bits, f"{prefix}.{norm_attr}", offset_kwargs),
            )
            if block.downsample is not None:
                index = len(block.downsample) - 1
                block.downsample[index] = QuantFrozenBatchNorm2d.wrap(
                    block.downsample[index], bits, f"{prefix}.downsample.{index}", offset_kwargs
                )
            setattr(
                block, act_attr, QuantReLU.wrap(getattr(block, act_attr), bits, f"{prefix}.{act_attr}", offset_kwargs)
            )

    def _weight_bits(self, name: str, default: int) -> int:
        """The weight bits of the layer ``name``: its entry in ``config.layer_weight_bits``, else ``default``."""
        return (self.config.layer_weight_bits or {}).get(name, default)

    def _check_layer_weight_bits(self) -> None:
        unknown = sorted(set(self.config.layer_weight_bits or {}) - set(quantized_layers(self)))
        if unknown:
            raise ValueError(
                f"QDetrConfig.layer_weight_bits names layers this model does not quantize: {unknown[:5]}"
                f"{' ...' if len(unknown) > 5 else ''} (keys are module names such as "
                "'model.encoder.layers.0.mlp.fc1')."
            )

    def _quantize_layer(self, name: str, offset_kwargs: dict, bits: int | None = None) -> None:
        """Replace the nn.Linear or nn.Conv2d ``name`` (a module name from the model's root) by its quantized
        version: weights at ``bits`` (or ``weight_bits``) unless ``layer_weight_bits`` names it, inputs at ``bits``
        (or ``activation_bits``)."""
        layer = self.get_submodule(name)
        if isinstance(layer, (QuantLinear, QuantConv2d)):
            return
        quantized = (QuantConv2d if isinstance(layer, nn.Conv2d) else QuantLinear).from_float(
            layer,
            weight_bits=self._weight_bits(name, bits or self.config.weight_bits),
            activation_bits=bits or self.config.activation_bits,
            weight_init=self.config.weight_step_init,
            name=name,
            **offset_kwargs,
        )
        self.set_submodule(name, quantized)

    def _quantize_attention(
        self, attention: DetrSelfAttention | DetrCrossAttention, name: str, align: bool, **offset_kwargs
    ) -> None:
        for attr in ("q_proj", "k_proj", "v_proj", "o_proj"):
            self._quantize_layer(f"{name}.{attr}", offset_kwargs)
        head_dim = attention.head_dim
        attention.attn_quantizer = QuantAttention(
            self.config.attention_bits,
            head_dim,
            align_queries=align,
            eps=self.config.distribution_alignment_eps,
            name=name,
            softmax_init=self.config.softmax_quantizer_init,
            alignment_init=self.config.distribution_alignment_init,
            **offset_kwargs,
        )

    def _quantize_mlp(self, name: str, offset_kwargs: dict) -> None:
        for attr in ("fc1", "fc2"):
            self._quantize_layer(f"{name}.{attr}", offset_kwargs)

    # ------------------------------------------------------------------------------------------------------------
    # Initialisation of quantizer tensors (guards the transformers v5 weight-init trap)
    # ------------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def initialize_weights(self) -> None:
        """Initialise missing weights, then every quantizer tensor that was not loaded from a checkpoint.

        transformers dispatches ``_init_weights`` to each nested ``PreTrainedModel`` (``DetrModel``, its encoder and
        decoder), which know nothing about quantizers; left alone, quantizer tensors missing from a real-valued
        checkpoint would keep uninitialised memory. So they are set here, explicitly and deterministically: weight
        steps to their initial value (``config.weight_step_init``, LSQ's by default) computed from the (loaded or
        freshly initialised) weights, activation quantizers to
        the uncalibrated placeholder (step 1, offset 0), DA affines to gamma 1, beta 0 (still to be fitted under
        `distribution_alignment_init="fit"`). Tensors flagged
        ``_is_hf_initialized`` (loaded from the checkpoint) are left untouched. A packed checkpoint's codes are
        dequantized into the float weights here (``codes * step``, whose fake quantization is exactly itself), so the
        loaded model computes bit-identical outputs and holds float weights like any other.
        """
        super().initialize_weights()
        for module in self.modules():
            if isinstance(module, (QuantLinear, QuantConv2d)):
                unpack_layer(module)
                quantizer = module.weight_quantizer
                # Skip the computation (a 100-candidate search under "mse") when the step was loaded.
                if not getattr(quantizer.raw_step, "_is_hf_initialized", False):
                    init.copy_(quantizer.raw_step, quantizer.initial_step(module.weight))
            elif isinstance(module, LSQActivationQuantizer):
                init.ones_(module.raw_step)
                init.zeros_(module.offset)
                init.ones_(module.signed)
                init.zeros_(module.calibrated)
            elif isinstance(module, DistributionAlignment):
                init.ones_(module.weight)
                init.zeros_(module.bias)
                init.constant_(module.calibrated, module.init == "unit")

        self.config.weight_packing = None  # the model now holds float weights, whatever the checkpoint stored

    def save_pretrained(self, save_directory, *args, pack_weights: bool | None = None, **kwargs):
        """`PreTrainedModel.save_pretrained`, writing every quantized weight as packed integer codes by default.

        Each quantized Conv2d / Linear weight is stored as its b-bit codes packed densely (b bits per value, see
        `qdetr_hf.packing`) beside its per-channel steps, and `config.json` records the packing
        (`weight_packing`); the activation quantizers and every real-valued tensor are saved as usual. Loading the
        folder gives bit-identical outputs. `push_to_hub` and the Trainer's final save go through here too.

        Args:
            pack_weights: `False` writes the float latent weights instead (what training checkpoints need to resume
                exactly). Default: `True`, unless `self.pack_weights_on_save` was set to `False`.
        """
        pack = getattr(self, "pack_weights_on_save", True) if pack_weights is None else pack_weights
        layers = quantized_layers(self)
        if not pack or not layers:
            return super().save_pretrained(save_directory, *args, **kwargs)
        state_dict = kwargs.pop("state_dict", None)
        state_dict, spec = pack_state_dict(self.state_dict() if state_dict is None else state_dict, layers)
        self.config.weight_packing = spec
        try:
            return super().save_pretrained(save_directory, *args, state_dict=state_dict, **kwargs)
        finally:
            self.config.weight_packing = None

    @property
    def is_calibrated(self) -> bool:
        """Whether every activation quantizer has been calibrated (see [`qdetr_hf.calibrate`])."""
        return is_calibrated(self)

    @torch.no_grad()
    def requantize(
        self,
        weight_bits: int | None = None,
        activation_bits: int | None = None,
        layer_weight_bits: dict[str, int] | None = None,
    ) -> list[str]:
        """Change the bit widths of this (trained) model in place, e.g. to continue at 3 bits from a 4-bit student.

        Every weight quantizer whose width changes gets a new step, initialised from the layer's current weights
        (``config.weight_step_init``); every activation quantizer whose width changes is reset and must be calibrated
        again (`qdetr_hf.calibrate(model, batches, only_uncalibrated=True)`; the distillation Trainer does it). The
        first convolution keeps ``first_conv_bits``, the input projection and heads ``head_bits`` and attention
        ``attention_bits`` (``layer_weight_bits`` still sets any layer's weights). New quantizer parameters
        replace the old ones: build the optimizer after calling this. Returns the names of the changed quantizers.

        Args:
            weight_bits: New default weight bits (``None``: unchanged).
            activation_bits: New input-activation bits of the quantized layers (``None``: unchanged).
            layer_weight_bits: New per-layer weight bits (replaces ``config.layer_weight_bits``; ``None``: unchanged).
        """
        config = self.config
        changed: list[str] = []
        if weight_bits is not None:
            config.weight_bits = weight_bits
        if activation_bits is not None:
            config.activation_bits = activation_bits
        if layer_weight_bits is not None:
            config.layer_weight_bits = dict(layer_weight_bits)
        config.validate_quantization()
        self._check_layer_weight_bits()
        first = next(iter(quantized_layers(self.model.backbone))) if config.quantize_backbone else None
        fixed = {f"model.backbone.{first}": config.first_conv_bits} if first is not None else {}
        if config.head_bits is not None:
            fixed.update(dict.fromkeys(self.head_layer_names(), config.head_bits))
        for name, layer in quantized_layers(self).items():
            wanted = self._weight_bits(name, fixed.get(name, config.weight_bits))
            old = layer.weight_quantizer
            if old.bits != wanted:
                new = LSQWeightQuantizer(layer.weight.shape[0], wanted, layer.weight.dim(), init=old.init)
                layer.weight_quantizer = new.to(layer.weight.device)
                layer.weight_quantizer.initialize_from(layer.weight)
                changed.append(f"{name}.weight_quantizer")
            wanted = fixed.get(name, config.activation_bits)
            quantizer = layer.input_quantizer
            if quantizer.bits != wanted:
                replacement = LSQActivationQuantizer(
                    wanted,
                    quantizer.learn_offset,
                    quantizer.offset_init,
                    quantizer.name,
                    quantizer.known_range,
                    quantizer.integer_offset,
                ).to(layer.weight.device)
                layer.input_quantizer = replacement
                changed.append(f"{name}.input_quantizer")
        return changed

    def quantized_modules(self) -> dict[str, nn.Module]:
        """Mapping of module name to every quantized Conv2d / Linear layer and quantized attention block."""
        return {
            name: module
            for name, module in self.named_modules()
            if isinstance(module, (QuantLinear, QuantConv2d, QuantAttention))
        }


RESIDUAL_BLOCK_LAYERS = {"BasicBlock": ("bn2", "act2"), "Bottleneck": ("bn3", "act3")}
"""timm ResNet block class -> (its last BatchNorm before the residual addition, its activation after it)."""


class QuantFrozenBatchNorm2d(DetrFrozenBatchNorm2d):
    """DETR's frozen BatchNorm followed by an LSQ+ quantizer of its output (``output_quantizer``).

    Built by :meth:`wrap` from an existing frozen BatchNorm, sharing its buffers, so checkpoint keys are unchanged.
    """

    def __init__(self, num_features: int, bits: int, name: str, **offset_kwargs) -> None:
        super().__init__(num_features)
        self.output_quantizer = LSQActivationQuantizer(bits, name=name, **offset_kwargs)

    @classmethod
    def wrap(cls, norm: nn.Module, bits: int, name: str, offset_kwargs: dict) -> QuantFrozenBatchNorm2d:
        if isinstance(norm, cls):
            return norm
        if type(norm) is not DetrFrozenBatchNorm2d:
            raise TypeError(
                f"Residual quantization expects DETR's frozen BatchNorm at '{name}', got {type(norm).__name__}."
            )
        layer = cls(norm.weight.numel(), bits, name, **offset_kwargs)
        for key, buffer in norm.named_buffers(recurse=False):
            setattr(layer, key, buffer)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output_quantizer(super().forward(x))


class QuantReLU(nn.ReLU):
    """``nn.ReLU`` followed by an LSQ+ quantizer of its output (``output_quantizer``)."""

    def __init__(self, bits: int, name: str, **offset_kwargs) -> None:
        super().__init__()
        self.output_quantizer = LSQActivationQuantizer(bits, name=name, **offset_kwargs)

    @classmethod
    def wrap(cls, act: nn.Module, bits: int, name: str, offset_kwargs: dict) -> QuantReLU:
        if isinstance(act, cls):
            return act
        if type(act) is not nn.ReLU:
            raise TypeError(f"Residual quantization expects a ReLU at '{name}', got {type(act).__name__}.")
        return cls(bits, name, **offset_kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output_quantizer(super().forward(x))


__all__ = ["QDetrForObjectDetection", "qdetr_attention_forward"]
