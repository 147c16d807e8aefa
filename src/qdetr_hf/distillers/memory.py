"""Encoder-memory imitation: the student's encoder output regressed onto the teacher's, token by token."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from qdetr_hf.box_ops import compute_dtype
from qdetr_hf.distillers.base import DetectorOutputs, Distiller, check_non_negative
from qdetr_hf.distillers.qskd.features import attention_guided_feature_loss

__all__ = ["DEFAULT_MEMORY_WEIGHT", "EncoderMemoryDistiller", "memory_imitation_loss"]

#: Weight of the memory term (project choice): the better of the two weights measured with KD-DETR at 3-3-8 (10 and
#: 30; README "Below 4 bits").
DEFAULT_MEMORY_WEIGHT = 30.0


def memory_imitation_loss(
    student_memory: torch.Tensor, teacher_memory: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Relative squared error of the student's encoder memory: ``Σ m_bt ||s_bt - t_bt||² / Σ m_bt ||t_bt||²``.

    QSKD's feature loss (:func:`~qdetr_hf.distillers.qskd.attention_guided_feature_loss`) over every image token
    instead of its foreground mask, divided by the teacher memory's energy over the same tokens, which makes the term
    scale-free (0 for a perfect copy, 1 for a zero memory) so one weight suits any ``d_model`` and image size. The
    teacher side is detached; the loss is computed in float32 (float64 stays float64).

    Args:
        student_memory: ``(B, T, d)`` encoder output of the student (the decoder's ``encoder_hidden_states``).
        teacher_memory: ``(B, T, d)`` encoder output of the teacher on the same images.
        mask: ``(B, T)`` 1 for image tokens, 0 for padding (the decoder's ``encoder_attention_mask``); ``None``: all.

    Returns:
        The 0-dim loss.

    Raises:
        ValueError: If the shapes differ (the two encoders must see the same token grid and have the same width).
    """
    if student_memory.shape != teacher_memory.shape or student_memory.ndim != 3:
        raise ValueError(
            "Encoder-memory imitation compares the two encoders token by token: they need the same (B, T, d_model) "
            f"memory, got student {tuple(student_memory.shape)} and teacher {tuple(teacher_memory.shape)} "
            "(same d_model and backbone stride needed)."
        )
    dtype = compute_dtype(student_memory)
    teacher = teacher_memory.detach().to(device=student_memory.device, dtype=dtype)
    tokens = torch.ones(teacher.shape[:2], dtype=dtype, device=teacher.device) if mask is None else mask.to(teacher)
    error = attention_guided_feature_loss(student_memory, teacher, tokens)  # masked mean over tokens and channels
    energy = (teacher.square().mean(dim=-1) * tokens).sum() / tokens.sum().clamp(min=1.0)
    return error / energy.clamp(min=torch.finfo(dtype).tiny)


class EncoderMemoryDistiller(Distiller):
    """Encoder-memory imitation (project addition, in none of the papers): ``weight · memory_imitation_loss``.

    DRD, KD-DETR and IDa-Det supervise the decoder (its queries or predictions), and QSKD the encoder memory only
    where the teacher's cross-attention looks; the backbone and encoder, where a 3-bit student loses most
    (``benchmarks/results/low_bit.md``), otherwise learn only through the decoder. This term gives every image token of
    the encoder output a direct target, the teacher's memory, from tensors both forward passes already computed (no
    extra pass). Meant to be combined with a decoder-level method
    (``examples/distill.py --distillation kd_detr+memory``). Returns ``loss_memory`` and the unweighted
    ``memory_relative_error``.

    Args:
        weight: Multiplier of the relative squared error (:data:`DEFAULT_MEMORY_WEIGHT`).

    Raises:
        ValueError: On a negative or non-finite weight.
    """

    name = "memory"
    needs_decoder_inputs = True

    def __init__(self, weight: float = DEFAULT_MEMORY_WEIGHT) -> None:
        super().__init__()
        check_non_negative(weight, "memory weight")
        self.weight = weight

    def forward(
        self, student: DetectorOutputs, teacher: DetectorOutputs, labels: Sequence[Mapping[str, torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        if not student.decoder_inputs or not teacher.decoder_inputs:
            raise ValueError(
                "EncoderMemoryDistiller needs both models' captured decoder inputs (needs_decoder_inputs)."
            )
        error = memory_imitation_loss(
            student.decoder_inputs["encoder_hidden_states"],
            teacher.decoder_inputs["encoder_hidden_states"],
            student.decoder_inputs.get("encoder_attention_mask"),
        )
        return {"loss_memory": self.weight * error, "memory_relative_error": error.detach()}

    def extra_repr(self) -> str:
        return f"weight={self.weight}"
