"""The distiller interface: what a distillation method reads from teacher and student, and what it returns."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class DetectorOutputs:
    """What a distiller may read from one model's forward pass on the training batch.

    Attributes:
        logits: ``(B, Q, num_labels + 1)`` class logits of the final decoder layer (last column: no object).
        pred_boxes: ``(B, Q, 4)`` normalised cxcywh boxes of the final decoder layer.
        outputs: The model's full output (``DetrObjectDetectionOutput``); holds ``encoder_last_hidden_state``,
            ``cross_attentions`` and ``decoder_hidden_states`` when the distiller asked for them.
        co_attended: Decoder layer index (non-negative) -> ``(B, Q, d_model)`` co-attended feature, the decoder
            cross-attention output before its output projection (captured with forward pre-hooks).
        model: The unwrapped model (for distillers that run extra decoder passes, e.g. KD-DETR).
        pixel_values: The batch images.
        pixel_mask: The batch pixel mask, or ``None``.
    """

    logits: torch.Tensor
    pred_boxes: torch.Tensor
    outputs: Any
    co_attended: dict[int, torch.Tensor] = field(default_factory=dict)
    model: nn.Module | None = None
    pixel_values: torch.Tensor | None = None
    pixel_mask: torch.Tensor | None = None


class Distiller(nn.Module):
    """Base class of a distillation loss between a frozen teacher DETR and a (quantized) student DETR.

    A distiller declares what it needs from the two forward passes and returns a dictionary of named terms.
    Keys starting with ``"loss_"`` are loss terms, **already multiplied by their weight**: the trainer adds their sum to
    the detector's ground-truth loss. Other keys are statistics, logged but not optimised (they should be detached).

    Attributes:
        name: Short method name used on the command line and in logs.
        co_attended_layers: Decoder layers (Python indices, negative allowed) whose co-attended features are captured
            for both models.
        needs_attentions: Run both models with ``output_attentions=True`` (cross-attention maps; the teacher is loaded
            with eager attention for this).
        needs_hidden_states: Run both models with ``output_hidden_states=True``.
    """

    name: str = "distiller"
    co_attended_layers: tuple[int, ...] = ()
    needs_attentions: bool = False
    needs_hidden_states: bool = False

    def forward(
        self, student: DetectorOutputs, teacher: DetectorOutputs, labels: Sequence[dict[str, torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        """Compute the distillation terms for one batch.

        Args:
            student: Outputs of the student (with gradients).
            teacher: Outputs of the frozen teacher (no gradients).
            labels: The DETR-style labels of the batch (``class_labels``, normalised cxcywh ``boxes``).

        Returns:
            Named terms; ``loss_*`` entries are weighted loss terms, the rest are logged statistics.
        """
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"name={self.name!r}"


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a transformers DETR-style detection model (``model.model.decoder.layers``)."""
    base = getattr(model, "model", None)
    decoder = getattr(base, "decoder", None)
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise TypeError(
            f"{type(model).__name__} does not look like a transformers DETR detection model "
            "(expected `model.model.decoder.layers`)."
        )
    return layers


def resolve_layers(layers: Sequence[int], num_layers: int, who: str = "model") -> tuple[int, ...]:
    """Turn Python-style layer indices (negative allowed) into sorted non-negative ones, checking the range."""
    resolved = set()
    for index in layers:
        if not -num_layers <= index < num_layers:
            raise ValueError(f"Decoder layer index {index} is out of range for a {who} with {num_layers} layers.")
        resolved.add(index % num_layers)
    return tuple(sorted(resolved))


@contextmanager
def capture_co_attended_features(model: nn.Module, layers: Sequence[int]) -> Iterator[dict[int, torch.Tensor]]:
    """Capture the co-attended feature of the given decoder layers during the forward passes inside the block.

    The co-attended feature is ``softmax(q k^T) v`` with heads concatenated, i.e. the input of
    ``decoder.layers[i].encoder_attn.o_proj``; a forward pre-hook records it (the last call wins, so gradient
    checkpointing's recomputation is harmless). Works for any transformers DETR, quantized or not.

    Yields:
        A dictionary filled during the forward pass: non-negative layer index -> ``(B, Q, d_model)`` tensor.
    """
    all_layers = decoder_layers(model)
    captured: dict[int, torch.Tensor] = {}
    handles = []
    for index in resolve_layers(layers, len(all_layers)):

        def hook(module: nn.Module, args: tuple, index: int = index) -> None:
            captured[index] = args[0]

        handles.append(all_layers[index].encoder_attn.o_proj.register_forward_pre_hook(hook))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def check_label_spaces(teacher_config: Any, student_config: Any) -> None:
    """Raise a clear ``ValueError`` when teacher and student do not predict the same classes in the same order."""
    teacher = {int(k): str(v) for k, v in teacher_config.id2label.items()}
    student = {int(k): str(v) for k, v in student_config.id2label.items()}
    if teacher == student:
        return
    if len(teacher) != len(student):
        raise ValueError(
            f"Teacher and student label spaces differ: the teacher has {len(teacher)} classes, the student "
            f"{len(student)}. Distillation needs the same classes in the same order (config.id2label)."
        )
    differences = [f"{i}: teacher {teacher.get(i)!r} vs student {student.get(i)!r}" for i in sorted(teacher)]
    differences = [d for d, i in zip(differences, sorted(teacher)) if teacher.get(i) != student.get(i)]
    raise ValueError(
        "Teacher and student label spaces differ (config.id2label): "
        + "; ".join(differences[:10])
        + (" ..." if len(differences) > 10 else "")
    )
