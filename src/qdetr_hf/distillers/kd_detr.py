"""KD-DETR's consistent distillation points (specific and general sampling) and their weighted KL / L1 / GIoU loss."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from qdetr_hf.box_ops import center_to_corners, compute_dtype, elementwise_generalized_box_iou
from qdetr_hf.distillers.base import (
    DetectorOutputs,
    Distiller,
    check_non_negative,
    check_positive,
    layer_stack,
    run_decoder,
    run_decoder_sets,
)

__all__ = [
    "GENERAL_DISTRIBUTIONS",
    "QUERY_WEIGHTINGS",
    "KDDETRDistiller",
    "kd_detr_query_weights",
    "kd_detr_set_loss",
    "sample_general_queries",
]

QueryWeighting = Literal["softmax", "sigmoid", "none"]
GeneralDistribution = Literal["normal", "teacher"]

#: Ways of turning the teacher's final-layer logits into the per-query weight ``w_i`` (see :func:`kd_detr_query_weights`).
QUERY_WEIGHTINGS: tuple[str, ...] = ("softmax", "sigmoid", "none")
#: Distributions of the general-sampling queries (see :func:`sample_general_queries`).
GENERAL_DISTRIBUTIONS: tuple[str, ...] = ("normal", "teacher")


def kd_detr_query_weights(teacher_logits: torch.Tensor, mode: QueryWeighting = "softmax") -> torch.Tensor:
    """KD-DETR's per-query distillation weight ``w_i`` from the teacher's final-layer class logits (detached).

    The paper and the authors' code use ``w_i = max_c sigmoid(z_ic)``, written for sigmoid (focal-loss) DETRs.
    DETR's classifier is a softmax over the object classes plus a last "no object" column, so the modes are:

    * ``"softmax"`` (default, project choice for softmax DETRs): ``w_i = max_{c < C} softmax(z_i)_c``, the largest
      probability of an *object* class (the no-object column takes part in the softmax but is never the max), i.e. the
      teacher's confidence that query i is a foreground object, as DETR's post-processing scores it;
    * ``"sigmoid"`` (the paper / authors' code): ``w_i = max_{c < C} sigmoid(z_ic)``, over the object columns only;
    * ``"none"``: ``w_i = 1`` (the ablation rows without weights).

    Args:
        teacher_logits: ``(..., C + 1)`` logits, last column = no object.
        mode: ``"softmax"``, ``"sigmoid"`` or ``"none"``.

    Returns:
        ``(...)`` weights in [0, 1] (float32, float64 stays float64), without gradient.

    Raises:
        ValueError: On an unknown mode or logits with fewer than two columns (no object class).
    """
    if mode not in QUERY_WEIGHTINGS:
        raise ValueError(f"KD-DETR query weighting must be one of {QUERY_WEIGHTINGS}, got {mode!r}")
    if not isinstance(teacher_logits, torch.Tensor) or teacher_logits.ndim < 1 or teacher_logits.shape[-1] < 2:
        raise ValueError(
            "teacher_logits must be a (..., C + 1) tensor with at least one object class and the no-object column, "
            f"got shape {tuple(getattr(teacher_logits, 'shape', ()))}"
        )
    logits = teacher_logits.detach().to(compute_dtype(teacher_logits))
    if mode == "none":
        return torch.ones(logits.shape[:-1], dtype=logits.dtype, device=logits.device)
    if mode == "softmax":
        return logits.softmax(dim=-1)[..., :-1].amax(dim=-1)
    return logits[..., :-1].sigmoid().amax(dim=-1)


def kd_detr_set_loss(
    student_logits: torch.Tensor,
    student_boxes: torch.Tensor,
    teacher_logits: torch.Tensor,
    teacher_boxes: torch.Tensor,
    weights: torch.Tensor,
    temperature: float = 10.0,
    cls_weight: float = 1.0,
    l1_weight: float = 5.0,
    giou_weight: float = 2.0,
    *,
    validate: bool = True,
) -> dict[str, torch.Tensor]:
    """KD-DETR's loss on one set of distillation points: weighted KL + L1 + (1 - GIoU), summed over student layers.

    For query ``i`` of image ``b`` and student decoder layer ``l`` (every layer is compared with the teacher's final
    layer, as in the authors' code):

    * ``KL_lbi = T² · Σ_c p^T_bic (log p^T_bic - log p^S_lbic)`` with ``p = softmax(z / T)`` over all ``C + 1``
      columns (the no-object column included);
    * ``L1_lbi = mean over the 4 cxcywh coordinates of |b^S_lbi - b^T_bi|`` (authors' code: mean, not DETR's sum);
    * ``G_lbi = 1 - GIoU(b^S_lbi, b^T_bi)``.

    Each term is ``Σ_l Σ_{b,i} w_bi · term_lbi / Σ_{b,i} w_bi``: a weighted mean over the batch's queries (a query of
    weight 0 contributes nothing), summed over the student's layers. The result is
    ``loss = cls_weight · KL + l1_weight · L1 + giou_weight · G``. Normalising the KL by the weight sum is a project
    choice: the authors' code averages the KL over the classes (``.mean(1)``) and sums it over the queries without
    normalising, while it normalises the two box terms by the weight sum as here. The teacher side is detached; the
    loss is computed in float32 (float64 stays float64) and is an exact 0, still connected to the student's
    predictions, when every weight is 0.

    Args:
        student_logits: ``(B, N, C + 1)`` or, for L decoder layers, ``(L, B, N, C + 1)``.
        student_boxes: ``(B, N, 4)`` or ``(L, B, N, 4)`` normalised cxcywh boxes (same layout as the logits).
        teacher_logits: ``(B, N, C + 1)`` final-layer logits of the teacher for the same queries.
        teacher_boxes: ``(B, N, 4)`` final-layer boxes of the teacher.
        weights: ``(B, N)`` non-negative query weights (see :func:`kd_detr_query_weights`); used detached.
        temperature: Softmax temperature T of the KL (authors' code: 10); the KL is multiplied by T².
        cls_weight: Weight of the KL term (authors' code: 1).
        l1_weight: Weight of the L1 term (authors' code: 5).
        giou_weight: Weight of the 1 - GIoU term (authors' code: 2).
        validate: Check the weights (finite, >= 0) and the boxes (not degenerate) on the host; ``False`` makes no
            host synchronisation.

    Returns:
        ``{"loss": weighted sum, "cls": KL term, "l1": L1 term, "giou": 1 - GIoU term, "weight_sum": Σ w}``, all 0-dim;
        the three terms are unweighted (before ``cls_weight`` / ``l1_weight`` / ``giou_weight``).

    Raises:
        ValueError: On inconsistent shapes, a non-positive temperature, or (with ``validate``) negative or non-finite
            weights or degenerate boxes.
    """
    check_positive(temperature, "temperature")
    check_non_negative(cls_weight, "cls_weight")
    check_non_negative(l1_weight, "l1_weight")
    check_non_negative(giou_weight, "giou_weight")
    s_logits, s_boxes = layer_stack(student_logits, student_boxes)
    batch, num_queries, num_columns = s_logits.shape[1:]
    if teacher_logits.shape != (batch, num_queries, num_columns):
        raise ValueError(
            f"teacher_logits must have shape {(batch, num_queries, num_columns)} (one final layer, same queries and "
            f"classes as the student), got {tuple(teacher_logits.shape)}"
        )
    if teacher_boxes.shape != (batch, num_queries, 4):
        raise ValueError(f"teacher_boxes must have shape {(batch, num_queries, 4)}, got {tuple(teacher_boxes.shape)}")
    if weights.shape != (batch, num_queries):
        raise ValueError(f"weights must have shape {(batch, num_queries)}, got {tuple(weights.shape)}")

    dtype = compute_dtype(s_logits)
    device = s_logits.device
    w = weights.detach().to(device=device, dtype=dtype)
    if validate and w.numel() > 0 and not bool(((w >= 0) & torch.isfinite(w)).all()):
        raise ValueError("KD-DETR query weights must be finite and >= 0")

    # Classification: KL(p_T || p_S) of the temperature-softened distributions, times T^2.
    s_log_prob = F.log_softmax(s_logits.to(dtype) / temperature, dim=-1)
    t_log_prob = F.log_softmax(teacher_logits.detach().to(device=device, dtype=dtype) / temperature, dim=-1)
    kl = F.kl_div(s_log_prob, t_log_prob.expand_as(s_log_prob), reduction="none", log_target=True).sum(dim=-1)
    kl = kl * temperature**2  # (L, B, N)

    # Boxes: L1 averaged over the four coordinates, and 1 - GIoU.
    s_box = s_boxes.to(dtype)
    t_box = teacher_boxes.detach().to(device=device, dtype=dtype).expand_as(s_box)
    l1 = (s_box - t_box).abs().mean(dim=-1)
    giou = 1.0 - elementwise_generalized_box_iou(center_to_corners(s_box), center_to_corners(t_box), validate=validate)

    weight_sum = w.sum()
    # Exact 0 / tiny = 0 when every weight is 0 (still connected to the student through the products below).
    norm = weight_sum.clamp(min=torch.finfo(dtype).tiny)
    cls_term = (kl * w).sum() / norm
    l1_term = (l1 * w).sum() / norm
    giou_term = (giou * w).sum() / norm
    loss = cls_weight * cls_term + l1_weight * l1_term + giou_weight * giou_term
    return {"loss": loss, "cls": cls_term, "l1": l1_term, "giou": giou_term, "weight_sum": weight_sum.detach()}


def _rank_and_world_size() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def sample_general_queries(
    num_queries: int,
    dim: int,
    distribution: GeneralDistribution = "normal",
    std: float = 1.0,
    reference: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    rank: int | None = None,
    world_size: int | None = None,
) -> torch.Tensor:
    """Draw one set of KD-DETR general-sampling queries (object-query position embeddings for plain DETR).

    * ``"normal"``: i.i.d. ``N(0, std²)`` entries (authors' code: ``N(0, 1)`` pre-sigmoid anchors).
    * ``"teacher"`` (project option): a diagonal Gaussian fitted to ``reference`` (the teacher's learned query
      embeddings): entry ``j`` is ``N(mean_j, (std · sd_j)²)`` with the per-dimension mean and (population) standard
      deviation of the reference rows.

    Draws come from ``generator`` when one is given, otherwise from the global RNG of ``device`` (checkpointed and
    restored per process by the transformers ``Trainer``). Under ``torch.distributed`` every process draws
    ``world_size`` sets and keeps the one of its rank: the transformers ``Trainer`` seeds every process with the same
    seed, so a plain draw would give every rank the same set, whereas the authors' code (seed + rank) gives every rank
    its own; this keeps the RNG streams of the processes in step and the sets different.

    Args:
        num_queries: Number of queries N (>= 1).
        dim: Embedding size (d_model).
        distribution: ``"normal"`` or ``"teacher"``.
        std: Standard deviation (``"normal"``) or multiplier of the fitted standard deviation (``"teacher"``); > 0.
        reference: ``(Q, dim)`` reference embeddings, required by ``"teacher"``.
        generator: Optional random generator (its own device is used for the draw).
        device: Device of the result (default: the reference's device, else CPU).
        dtype: Dtype of the result.
        rank: Process rank (default: from ``torch.distributed``, 0 when not initialised).
        world_size: Number of processes (default: from ``torch.distributed``, 1 when not initialised).

    Returns:
        ``(num_queries, dim)`` tensor without gradient.

    Raises:
        ValueError: On a bad count, size, distribution, std, reference or rank.
    """
    if isinstance(num_queries, bool) or not isinstance(num_queries, int) or num_queries < 1:
        raise ValueError(f"num_queries must be an integer >= 1, got {num_queries!r}")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be an integer >= 1, got {dim!r}")
    if distribution not in GENERAL_DISTRIBUTIONS:
        raise ValueError(f"general-sampling distribution must be one of {GENERAL_DISTRIBUTIONS}, got {distribution!r}")
    check_positive(std, "std")
    if distribution == "teacher" and (
        reference is None or reference.ndim != 2 or reference.shape[-1] != dim or reference.shape[0] < 1
    ):
        raise ValueError(
            f"the 'teacher' distribution needs reference embeddings of shape (Q, {dim}), got "
            f"{None if reference is None else tuple(reference.shape)}"
        )
    default_rank, default_world = _rank_and_world_size()
    rank = default_rank if rank is None else rank
    world_size = default_world if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if device is None:
        device = reference.device if reference is not None else torch.device("cpu")
    draw_device = generator.device if generator is not None else device
    noise = torch.randn((world_size, num_queries, dim), generator=generator, device=draw_device)[rank]
    noise = noise.to(device=device, dtype=torch.float32)
    if distribution == "normal":
        queries = std * noise
    else:
        ref = reference.detach().to(device=device, dtype=torch.float32)
        queries = ref.mean(dim=0) + std * ref.std(dim=0, correction=0) * noise
    return queries.to(dtype)


def _query_embeddings(model: nn.Module, who: str) -> torch.Tensor:
    base = getattr(model, "model", None)
    embedding = getattr(base, "query_position_embeddings", None)
    weight = getattr(embedding, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        raise TypeError(
            f"KD-DETR needs the {who}'s learned object queries at `model.model.query_position_embeddings.weight` "
            f"(a transformers DETR); {type(model).__name__} has none."
        )
    return weight


class KDDETRDistiller(Distiller):
    """KD-DETR: distillation on consistent distillation points (Wang et al., CVPR 2024, arXiv 2211.08071).

    Detection queries of teacher and student are not paired; KD-DETR instead decodes *extra* query sets, the
    distillation points, with both models on the same inputs, so every student prediction has a consistent teacher
    partner. Each set is decoded on its own (:func:`~qdetr_hf.distillers.base.run_decoder_sets`, reusing the encoder
    memory of the training forward), never mixed into the detection queries' self-attention, so the detection outputs
    and the ground-truth loss are unchanged. For plain DETR a query is a learned object-query position
    embedding, so the extra sets are extra position embeddings.

    * **Specific sampling** (``specific=True``): the teacher's learned query embeddings
      (``teacher.model.model.query_position_embeddings.weight``, detached) are fed to the *student's* decoder; the
      target is the teacher's normal final-layer output (``teacher.logits`` / ``teacher.pred_boxes``), so no extra
      teacher pass. The student may have another number of queries (the set is the teacher's).
    * **General sampling** (``general=True``): a fresh random query set each step (see
      :func:`sample_general_queries`), decoded by both models (the teacher under ``torch.no_grad``).

    Each set gets :func:`kd_detr_set_loss` with weights from the teacher's final-layer logits of that set
    (:func:`kd_detr_query_weights`): weighted ``T²``-scaled KL (T = 10) + 5 · weighted L1 + 2 · weighted (1 - GIoU),
    every student decoder layer against the teacher's final layer, normalised by the sum of the weights and summed
    over layers. Returned terms: ``loss_kd_specific = specific_weight · L_specific`` and
    ``loss_kd_general = general_weight · L_general`` (only for enabled sets; the trainer adds them to the
    ground-truth loss, ``L = L_det + Σ sets`` as in the paper), plus detached statistics ``kd_<set>_cls``,
    ``kd_<set>_l1``, ``kd_<set>_giou`` (unweighted terms) and ``kd_<set>_weight`` (mean query weight).

    Cost: one extra student decoder pass over a batch with the encoder memory repeated once per set (two sets of the
    same size share the pass) and one no-grad teacher decoder pass for the general set; no extra backbone or encoder
    pass; inference is unchanged. Both sets feed the same query embeddings to both decoders, so
    teacher and student need the same ``d_model`` (a clear ``ValueError`` otherwise); they must predict the same
    classes (checked by the trainer). Under bf16 / fp16 training the trainer calls the distiller under the same autocast
    as the forward passes, so the extra passes run in the captured encoder memory's precision (do the same in your
    own loops).

    ``forward`` makes no host synchronisation (the set losses are called with ``validate=False``: their weights are
    the teacher's probabilities and their boxes sigmoid outputs).

    Choices that are ours (the paper and authors' code are for sigmoid-classifier DAB/Deformable DETRs):

    * ``weighting="softmax"`` (max object-class softmax probability; the reference's sigmoid form is
      ``weighting="sigmoid"``), see :func:`kd_detr_query_weights`;
    * the KL is normalised by the weight sum and summed over classes (authors' code: averaged over classes, not
      normalised), see :func:`kd_detr_set_loss`;
    * ``num_general_queries=None`` uses the teacher's number of queries (the authors' 300 is DAB-DETR's query count),
      so the general set costs one detection-sized decoder pass per model (300 queries cost in proportion to their
      number, many detection decodings for a model with few queries);
    * ``general_distribution="teacher"``: random queries on the scale of the teacher's learned ones. The default
      ``N(0, 1)`` follows the authors' code; note that a DETR initialised by transformers starts its query embeddings
      at std 0.02 (``config.init_std``), so for a teacher trained from that init ``N(0, 1)`` queries lie far outside
      the learned ones and ``"teacher"`` is the better fit;
    * under ``torch.distributed`` each rank draws its own general set (see :func:`sample_general_queries`); the weight
      normaliser is per process and per batch, not all-reduced.

    Args:
        specific: Enable specific sampling (paper: on).
        general: Enable general sampling (paper: on).
        specific_weight: Multiplier of the specific-set loss (authors' code: 1).
        general_weight: Multiplier of the general-set loss (authors' code: 1).
        temperature: KL temperature T (authors' code: 10; the KL is scaled by T²).
        cls_weight: Weight of the KL term (authors' code: 1).
        l1_weight: Weight of the L1 term (authors' code: 5).
        giou_weight: Weight of the 1 - GIoU term (authors' code: 2).
        weighting: Per-query weights: ``"softmax"`` (default, project choice), ``"sigmoid"`` (paper) or ``"none"``.
        num_general_queries: Size of the general set; ``None`` (default) = the teacher's number of queries.
        general_distribution: ``"normal"`` (default, authors' code) or ``"teacher"`` (project option).
        general_std: Std of ``"normal"`` (authors' code: 1) or multiplier of the fitted std of ``"teacher"``.
        all_layers: Distil every student decoder layer (authors' code) or only the last one (``False``).
        generator: Optional ``torch.Generator`` for the general set; by default the global RNG (restored with the
            Trainer's checkpoints; a given generator's state is not checkpointed).

    Raises:
        ValueError: On invalid settings or when both sets are disabled.
    """

    name = "kd_detr"
    needs_decoder_inputs = True

    def __init__(
        self,
        specific: bool = True,
        general: bool = True,
        specific_weight: float = 1.0,
        general_weight: float = 1.0,
        temperature: float = 10.0,
        cls_weight: float = 1.0,
        l1_weight: float = 5.0,
        giou_weight: float = 2.0,
        weighting: QueryWeighting = "softmax",
        num_general_queries: int | None = None,
        general_distribution: GeneralDistribution = "normal",
        general_std: float = 1.0,
        all_layers: bool = True,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if not (specific or general):
            raise ValueError("KD-DETR needs at least one set of distillation points: specific=True or general=True.")
        for value, name in (
            (specific_weight, "specific_weight"),
            (general_weight, "general_weight"),
            (cls_weight, "cls_weight"),
            (l1_weight, "l1_weight"),
            (giou_weight, "giou_weight"),
        ):
            check_non_negative(value, name)
        check_positive(temperature, "KD-DETR temperature")
        if weighting not in QUERY_WEIGHTINGS:
            raise ValueError(f"KD-DETR weighting must be one of {QUERY_WEIGHTINGS}, got {weighting!r}")
        if num_general_queries is not None and (
            isinstance(num_general_queries, bool) or not isinstance(num_general_queries, int) or num_general_queries < 1
        ):
            raise ValueError(f"num_general_queries must be None or an integer >= 1, got {num_general_queries!r}")
        if general_distribution not in GENERAL_DISTRIBUTIONS:
            raise ValueError(
                f"general_distribution must be one of {GENERAL_DISTRIBUTIONS}, got {general_distribution!r}"
            )
        check_positive(general_std, "general_std")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        self.specific = bool(specific)
        self.general = bool(general)
        self.specific_weight = specific_weight
        self.general_weight = general_weight
        self.temperature = temperature
        self.cls_weight = cls_weight
        self.l1_weight = l1_weight
        self.giou_weight = giou_weight
        self.weighting = weighting
        self.num_general_queries = num_general_queries
        self.general_distribution = general_distribution
        self.general_std = general_std
        self.all_layers = bool(all_layers)
        self.generator = generator

    def _set_terms(
        self,
        prefix: str,
        multiplier: float,
        student_logits: torch.Tensor,
        student_boxes: torch.Tensor,
        teacher_logits: torch.Tensor,
        teacher_boxes: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        if not self.all_layers:
            student_logits, student_boxes = student_logits[-1:], student_boxes[-1:]
        weights = kd_detr_query_weights(teacher_logits, self.weighting)
        parts = kd_detr_set_loss(
            student_logits,
            student_boxes,
            teacher_logits,
            teacher_boxes,
            weights,
            temperature=self.temperature,
            cls_weight=self.cls_weight,
            l1_weight=self.l1_weight,
            giou_weight=self.giou_weight,
            validate=False,  # softmax/sigmoid weights and sigmoid boxes of the two models
        )
        return {
            f"loss_kd_{prefix}": multiplier * parts["loss"],
            f"kd_{prefix}_cls": parts["cls"].detach(),
            f"kd_{prefix}_l1": parts["l1"].detach(),
            f"kd_{prefix}_giou": parts["giou"].detach(),
            f"kd_{prefix}_weight": weights.mean().detach() if weights.numel() else weights.sum(),
        }

    def forward(
        self, student: DetectorOutputs, teacher: DetectorOutputs, labels: Sequence[Mapping[str, torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        """Decode the enabled distillation-point sets and return their weighted losses and statistics.

        Args:
            student: Student outputs with ``model`` and ``decoder_inputs`` (``needs_decoder_inputs``).
            teacher: Teacher outputs with ``model``, ``logits``, ``pred_boxes`` and, for the general set,
                ``decoder_inputs``.
            labels: Unused (KD-DETR does not look at the ground truth).

        Returns:
            ``loss_kd_specific`` / ``loss_kd_general`` (enabled sets) and the ``kd_*`` statistics.

        Raises:
            ValueError: On missing models or decoder inputs, different ``d_model``, class counts or batch sizes.
            TypeError: If a model is not a transformers DETR with learned query embeddings.
        """
        if student.model is None or teacher.model is None:
            raise ValueError("KD-DETR runs extra decoder passes: DetectorOutputs.model must be set for both models.")
        if not student.decoder_inputs:
            raise ValueError(
                "KD-DETR needs the student's captured decoder inputs (needs_decoder_inputs=True); got none."
            )
        if self.general and not teacher.decoder_inputs:
            raise ValueError(
                "KD-DETR's general sampling needs the teacher's captured decoder inputs (needs_decoder_inputs=True)."
            )
        student_queries = _query_embeddings(student.model, "student")
        teacher_queries = _query_embeddings(teacher.model, "teacher")
        student_dim = student.decoder_inputs["encoder_hidden_states"].shape[-1]
        teacher_dim = teacher_queries.shape[-1]
        if student_dim != teacher_dim:
            raise ValueError(
                f"KD-DETR feeds the same query embeddings to both decoders, so teacher and student need the same "
                f"d_model; got teacher {teacher_dim} and student {student_dim}."
            )
        if student.logits.shape[-1] != teacher.logits.shape[-1]:
            raise ValueError(
                f"KD-DETR compares class distributions: the teacher predicts {teacher.logits.shape[-1]} columns "
                f"(classes + no object), the student {student.logits.shape[-1]}."
            )
        batch = student.decoder_inputs["encoder_hidden_states"].shape[0]
        if teacher.logits.shape[0] != batch:
            raise ValueError(f"batch sizes differ: student {batch}, teacher {teacher.logits.shape[0]}")

        sets: dict[str, torch.Tensor] = {}
        if self.specific:
            sets["specific"] = teacher_queries.detach().to(device=student_queries.device, dtype=student_queries.dtype)
        if self.general:
            num = self.num_general_queries if self.num_general_queries is not None else teacher_queries.shape[0]
            sets["general"] = sample_general_queries(
                num,
                teacher_dim,
                distribution=self.general_distribution,
                std=self.general_std,
                reference=teacher_queries.detach(),
                generator=self.generator,
                device=student_queries.device,
                dtype=student_queries.dtype,
            )
        # Both sets in one student decoder pass when they are the same size (the default): half the decoder calls.
        decoded = dict(zip(sets, run_decoder_sets(student.model, student.decoder_inputs, list(sets.values()))))
        terms: dict[str, torch.Tensor] = {}
        if self.specific:
            s_logits, s_boxes, _ = decoded["specific"]
            terms.update(
                self._set_terms(
                    "specific",
                    self.specific_weight,
                    s_logits,
                    s_boxes,
                    teacher.logits.detach(),
                    teacher.pred_boxes.detach(),
                )
            )
        if self.general:
            s_logits, s_boxes, _ = decoded["general"]
            with torch.no_grad():
                t_queries = sets["general"].to(device=teacher_queries.device, dtype=teacher_queries.dtype)
                t_logits, t_boxes, _ = run_decoder(teacher.model, teacher.decoder_inputs, t_queries)
            terms.update(self._set_terms("general", self.general_weight, s_logits, s_boxes, t_logits[-1], t_boxes[-1]))
        return terms

    def extra_repr(self) -> str:
        return (
            f"specific={self.specific}, general={self.general}, weighting={self.weighting!r}, "
            f"temperature={self.temperature}, weights=(cls {self.cls_weight}, l1 {self.l1_weight}, "
            f"giou {self.giou_weight}), num_general_queries={self.num_general_queries}, "
            f"general_distribution={self.general_distribution!r}, general_std={self.general_std}"
        )
