"""QSKD's Attention-Guided Feature Distillation: encoder features weighted by the selected queries' attention."""

from __future__ import annotations

import torch
from torch import nn

from qdetr_hf.box_ops import (
    compute_dtype,
)

_ATTENTION_REDUCTIONS = ("max", "sum")
_CHANNEL_REDUCTIONS = ("mean", "sum")


@torch.no_grad()
def attention_foreground_mask(
    cross_attention: torch.Tensor,
    selected: torch.Tensor,
    token_mask: torch.Tensor | None = None,
    reduction: str = "max",
) -> torch.Tensor:
    """QSKD's foreground mask over the encoder tokens from the teacher's decoder cross-attention of selected queries.

    ``A = mean over heads`` of the attention map; ``M_p = reduce_{q selected} A[q, p]`` with ``reduce`` = max (default)
    or sum; padded tokens (``token_mask`` False) are set to 0; then each image is divided by its maximum so ``M`` lies
    in [0, 1] with 1 at the most attended token (project choice: max-normalisation rather than min-max, so tokens
    that no selected query attends to keep weight 0). Images without selected queries get ``M = 0``.

    Args:
        cross_attention: (B, heads, Q, HW) attention probabilities of one decoder layer, or (B, Q, HW) already
            head-averaged.
        selected: (B, Q) bool, the queries whose attention builds the mask (the teacher's GQS selection).
        token_mask: (B, HW) bool, True for real (non-padded) tokens; ``None``: every token is real.
        reduction: ``"max"`` or ``"sum"`` over the selected queries.

    Returns:
        (B, HW) float mask in [0, 1] (detached).

    Raises:
        ValueError: On inconsistent shapes or an unknown ``reduction``.
    """
    if reduction not in _ATTENTION_REDUCTIONS:
        raise ValueError(f"reduction must be one of {_ATTENTION_REDUCTIONS}, got {reduction!r}")
    if not isinstance(cross_attention, torch.Tensor) or cross_attention.ndim not in (3, 4):
        raise ValueError(
            "cross_attention must have shape (B, heads, Q, HW) or (B, Q, HW), got "
            f"{tuple(getattr(cross_attention, 'shape', ()))}"
        )
    attention = cross_attention.detach()
    attention = attention.to(compute_dtype(attention))
    if attention.ndim == 4:
        attention = attention.mean(dim=1)
    batch, num_queries, num_tokens = attention.shape
    if not isinstance(selected, torch.Tensor) or selected.dtype != torch.bool or selected.shape != (batch, num_queries):
        raise ValueError(
            f"selected must be a bool tensor of shape {(batch, num_queries)}, got "
            f"{getattr(selected, 'dtype', type(selected).__name__)} {tuple(getattr(selected, 'shape', ()))}"
        )
    attention = torch.where(selected.to(attention.device)[..., None], attention, 0.0)
    mask = attention.amax(dim=1) if reduction == "max" else attention.sum(dim=1)  # (B, HW)
    if token_mask is not None:
        if token_mask.shape != (batch, num_tokens):
            raise ValueError(f"token_mask must have shape {(batch, num_tokens)}, got {tuple(token_mask.shape)}")
        mask = torch.where(token_mask.to(device=mask.device, dtype=torch.bool), mask, 0.0)
    peak = mask.amax(dim=-1, keepdim=True)
    return torch.where(peak > 0, mask / peak.clamp_min(torch.finfo(mask.dtype).tiny), 0.0)


def attention_guided_feature_loss(
    student_memory: torch.Tensor,
    teacher_memory: torch.Tensor,
    mask: torch.Tensor,
    adapter: nn.Module | None = None,
    channel_reduction: str = "mean",
) -> torch.Tensor:
    """QSKD's attention-guided feature loss ``Σ M·||F_T − φ(F_S)||² / Σ M`` on the encoder memory.

    The per-token distance is the squared L2 norm over channels, **averaged** over the teacher's channels by default
    (``channel_reduction="mean"``, project choice: keeps the term's scale independent of ``d_model``; ``"sum"`` is
    the literal squared norm, ``d_model`` times larger). The sums over tokens run over the whole batch (pooled, so
    the value does not depend on how images are split into batches). Where ``Σ M = 0`` the loss is an exact 0 that
    is still connected to ``student_memory`` in the autograd graph. Tokens with ``M = 0`` never reach the gradient
    (their difference is masked before squaring), so they may hold anything. The teacher memory is detached; computed
    in float32 (float64 stays float64).

    Args:
        student_memory: (B, HW, d_S) student encoder output (``encoder_last_hidden_state``).
        teacher_memory: (B, HW, d_T) teacher encoder output.
        mask: (B, HW) non-negative weights (:func:`attention_foreground_mask`), detached.
        adapter: φ, mapping d_S to d_T (e.g. ``nn.Linear``); ``None`` is the identity (needs d_S = d_T).
        channel_reduction: ``"mean"`` or ``"sum"`` over channels.

    Returns:
        0-dim loss tensor.

    Raises:
        ValueError: On inconsistent shapes, widths that differ without an adapter, or an unknown reduction.
    """
    if channel_reduction not in _CHANNEL_REDUCTIONS:
        raise ValueError(f"channel_reduction must be one of {_CHANNEL_REDUCTIONS}, got {channel_reduction!r}")
    if student_memory.ndim != 3 or teacher_memory.ndim != 3:
        raise ValueError(
            "student_memory and teacher_memory must have shape (B, HW, d), got "
            f"{tuple(student_memory.shape)} and {tuple(teacher_memory.shape)}"
        )
    if student_memory.shape[:2] != teacher_memory.shape[:2]:
        raise ValueError(
            "student and teacher encoder memories must cover the same tokens (same B and HW; same backbone stride "
            f"and input size), got {tuple(student_memory.shape)} and {tuple(teacher_memory.shape)}"
        )
    if mask.shape != student_memory.shape[:2]:
        raise ValueError(f"mask must have shape {tuple(student_memory.shape[:2])}, got {tuple(mask.shape)}")
    projected = adapter(student_memory) if adapter is not None else student_memory
    if projected.shape[-1] != teacher_memory.shape[-1]:
        raise ValueError(
            f"encoder widths differ (student {student_memory.shape[-1]}"
            + (f", adapted to {projected.shape[-1]}" if adapter is not None else "")
            + f", teacher {teacher_memory.shape[-1]}): QSKD needs an adapter φ mapping the student width to the "
            "teacher width (QSKDDistiller(student_dim=..., teacher_dim=...))"
        )
    dtype = compute_dtype(projected)
    weight = mask.detach().to(device=projected.device, dtype=dtype)
    keep = weight > 0
    difference = torch.where(keep[..., None], projected.to(dtype) - teacher_memory.detach().to(dtype), 0.0)
    distance = difference.square().mean(dim=-1) if channel_reduction == "mean" else difference.square().sum(dim=-1)
    total = torch.where(keep, weight, 0.0).sum()
    return (weight * distance).sum() / total.clamp_min(torch.finfo(dtype).tiny)
