"""The distiller interface: what a distillation method reads from teacher and student, and what it returns."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from numbers import Real
from typing import Any

import torch
from torch import nn


def check_non_negative(value: Any, name: str) -> None:
    """Raise ValueError unless ``value`` is a finite real number >= 0 (a weight or cost; bools are refused)."""
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def check_positive(value: Any, name: str) -> None:
    """Raise ValueError unless ``value`` is a finite real number > 0 (a scale such as a temperature or a sigma)."""
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


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
        decoder_inputs: Keyword arguments the model passed to its decoder (``inputs_embeds``,
            ``encoder_hidden_states``, ``encoder_attention_mask``, ``spatial_position_embeddings``,
            ``object_queries_position_embeddings``, ...), captured when the distiller sets ``needs_decoder_inputs``;
            re-run the decoder with other queries through :func:`run_decoder`.
    """

    logits: torch.Tensor
    pred_boxes: torch.Tensor
    outputs: Any
    co_attended: dict[int, torch.Tensor] = field(default_factory=dict)
    model: nn.Module | None = None
    pixel_values: torch.Tensor | None = None
    pixel_mask: torch.Tensor | None = None
    decoder_inputs: dict[str, Any] | None = None


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
        needs_decoder_inputs: Capture the decoder's inputs of both models (for extra decoder passes).

    A distiller may own parameters (e.g. a learned variance): the trainer optimises them with the student (no weight
    decay), averages their gradients across processes and stores them in checkpoints.
    """

    name: str = "distiller"
    co_attended_layers: tuple[int, ...] = ()
    needs_attentions: bool = False
    needs_hidden_states: bool = False
    needs_decoder_inputs: bool = False

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


class CombinedDistiller(Distiller):
    """Several distillation methods at once: the union of what they read, the sum of their loss terms.

    ``CombinedDistiller([DRDDistiller(), QSKDDistiller()])`` runs each method on the same forward passes and returns
    all their terms (each method's ``loss_*`` terms keep their own weights; the trainer adds them all to the
    ground-truth loss). Each method sees only the co-attended layers it asked for, so DRD on the last layer and
    IDa-Det on all layers can be combined. A project addition, not from any of the papers: it lets users measure
    whether two methods' signals add up (``examples/distill.py --distillation drd+qskd``).

    Args:
        distillers: Two or more distillers with different names whose term names do not collide.

    Raises:
        ValueError: With fewer than two distillers, a repeated method, or (when called) two methods returning
            the same term name.
    """

    def __init__(self, distillers: Sequence[Distiller]) -> None:
        super().__init__()
        distillers = list(distillers)
        if len(distillers) < 2:
            raise ValueError(f"CombinedDistiller needs at least two distillers, got {len(distillers)}.")
        names = [d.name for d in distillers]
        if len(set(names)) != len(names):
            raise ValueError(f"CombinedDistiller got the same method twice: {names}.")
        self.distillers = nn.ModuleList(distillers)
        self.name = "+".join(names)
        self.co_attended_layers = tuple(dict.fromkeys(i for d in distillers for i in d.co_attended_layers))
        self.needs_attentions = any(d.needs_attentions for d in distillers)
        self.needs_hidden_states = any(d.needs_hidden_states for d in distillers)
        self.needs_decoder_inputs = any(d.needs_decoder_inputs for d in distillers)

    def _view(self, outputs: DetectorOutputs, layers: tuple[int, ...]) -> DetectorOutputs:
        """``outputs`` with only the co-attended features of ``layers`` (Python indices)."""
        if set(layers) == set(self.co_attended_layers):
            return outputs
        if outputs.model is None:
            raise ValueError(
                "CombinedDistiller gives each method its own decoder layers, which needs DetectorOutputs.model."
            )
        keep = resolve_layers(layers, len(decoder_layers(outputs.model))) if layers else ()
        return replace(outputs, co_attended={i: f for i, f in outputs.co_attended.items() if i in keep})

    def forward(
        self, student: DetectorOutputs, teacher: DetectorOutputs, labels: Sequence[dict[str, torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        terms: dict[str, torch.Tensor] = {}
        for distiller in self.distillers:
            layers = distiller.co_attended_layers
            part = distiller(self._view(student, layers), self._view(teacher, layers), labels)
            clash = sorted(set(part) & set(terms))
            if clash:
                raise ValueError(
                    f"CombinedDistiller: '{distiller.name}' returns terms another method returns: {clash}."
                )
            terms.update(part)
        return terms


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


def stacked_co_attended_features(
    student: DetectorOutputs, teacher: DetectorOutputs, method: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The captured co-attended features of both models as ``(L, B, Qs, d)`` and ``(L, B, Qt, d)`` tensors.

    Raises:
        ValueError: If the two models captured different numbers of layers (or none), or their widths or batch sizes
            differ (the features are compared one to one).
    """
    student_layers = sorted(student.co_attended)
    teacher_layers = sorted(teacher.co_attended)
    if len(student_layers) != len(teacher_layers) or not student_layers:
        raise ValueError(
            f"{method} needs the co-attended features of the same number of decoder layers for both models; captured "
            f"student layers {student_layers}, teacher layers {teacher_layers}."
        )
    student_features = torch.stack([student.co_attended[i] for i in student_layers])
    teacher_features = torch.stack([teacher.co_attended[i] for i in teacher_layers])
    if student_features.shape[-1] != teacher_features.shape[-1]:
        raise ValueError(
            f"{method} compares co-attended features, so teacher and student need the same d_model; got teacher "
            f"{teacher_features.shape[-1]} and student {student_features.shape[-1]}."
        )
    if student_features.shape[1] != teacher_features.shape[1]:
        raise ValueError(
            f"batch sizes differ: student {student_features.shape[1]}, teacher {teacher_features.shape[1]}"
        )
    return student_features, teacher_features


@contextmanager
def capture_decoder_inputs(model: nn.Module, enabled: bool = True) -> Iterator[dict[str, Any]]:
    """Capture the keyword arguments of ``model.model.decoder``'s forward call inside the block (if ``enabled``)."""
    captured: dict[str, Any] = {}
    if not enabled:
        yield captured
        return
    decoder_layers(model)  # validates the model layout
    decoder = model.model.decoder

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured.clear()
        captured.update(kwargs)

    handle = decoder.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield captured
    finally:
        handle.remove()


#: The captured decoder inputs another query set reuses: the encoder memory, its padding mask and its positions.
_MEMORY_INPUTS = ("encoder_hidden_states", "encoder_attention_mask", "spatial_position_embeddings")


def run_decoder(
    model: nn.Module, decoder_inputs: dict[str, Any], query_position_embeddings: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Decode another set of queries with ``model``'s decoder and heads, reusing a captured forward's encoder memory.

    The new queries are decoded in their own pass (they never attend to the detection queries), as KD-DETR requires.

    Args:
        model: A transformers DETR detection model (``DetrForObjectDetection`` or ``QDetrForObjectDetection``).
        decoder_inputs: What :func:`capture_decoder_inputs` recorded during the model's forward on the batch.
        query_position_embeddings: ``(B, N, d_model)`` or ``(N, d_model)`` object-query position embeddings.

    Returns:
        ``(logits (L, B, N, C + 1), boxes (L, B, N, 4), hidden (L, B, N, d_model))`` for every decoder layer, each
        exactly as DETR's heads see it (the last layer reproduces the model's own ``logits`` / ``pred_boxes`` when the
        model's query embeddings are passed).
    """
    if not decoder_inputs:
        raise ValueError("run_decoder needs the captured decoder inputs of a forward pass (needs_decoder_inputs=True).")
    memory = decoder_inputs["encoder_hidden_states"]
    batch = memory.shape[0]
    if query_position_embeddings.dim() == 2:
        query_position_embeddings = query_position_embeddings.unsqueeze(0).expand(batch, -1, -1)
    decoder = model.model.decoder
    kwargs = {k: v for k, v in decoder_inputs.items() if k in _MEMORY_INPUTS}
    states = []
    hidden = torch.zeros_like(query_position_embeddings)

    def keep(module: nn.Module, args: tuple, output: Any) -> None:
        states.append(output[0] if isinstance(output, tuple) else output)

    handles = [layer.register_forward_hook(keep) for layer in decoder.layers]
    try:
        decoder(inputs_embeds=hidden, object_queries_position_embeddings=query_position_embeddings, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return layer_predictions(model, states)


def run_decoder_sets(
    model: nn.Module, decoder_inputs: dict[str, Any], query_sets: Sequence[torch.Tensor]
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """:func:`run_decoder` for several query sets at once: sets of the same size share one pass over a batch that
    repeats the encoder memory once per set, so the decoder's per-call overhead is paid once, not once per set.

    Every set still decodes on its own (a query attends only to the queries of its own image and set), and nothing in
    the decoder mixes batch elements (Distribution Alignment standardises per token; the quantizers' steps are
    fixed), so each result equals what its own :func:`run_decoder` call returns, up to float summation order. Sets of
    different sizes fall back to one pass each.

    Args:
        model: A transformers DETR detection model.
        decoder_inputs: What :func:`capture_decoder_inputs` recorded during the model's forward on the batch.
        query_sets: ``(B, N, d_model)`` or ``(N, d_model)`` object-query position embeddings, one tensor per set.

    Returns:
        One ``(logits, boxes, hidden)`` triple per set, in order, shaped as :func:`run_decoder`'s.
    """
    if not decoder_inputs:
        raise ValueError("run_decoder needs the captured decoder inputs of a forward pass (needs_decoder_inputs=True).")
    if len(query_sets) < 2 or len({queries.shape[-2] for queries in query_sets}) > 1:
        return [run_decoder(model, decoder_inputs, queries) for queries in query_sets]
    batch = decoder_inputs["encoder_hidden_states"].shape[0]
    queries = torch.cat([q.unsqueeze(0).expand(batch, -1, -1) if q.dim() == 2 else q for q in query_sets])
    repeated = {
        k: v.repeat(len(query_sets), *([1] * (v.dim() - 1))) if isinstance(v, torch.Tensor) else v
        for k, v in decoder_inputs.items()
        if k in _MEMORY_INPUTS
    }
    logits, boxes, hidden = run_decoder(model, repeated, queries)
    return list(zip(logits.split(batch, 1), boxes.split(batch, 1), hidden.split(batch, 1), strict=True))


def layer_predictions(
    model: nn.Module, layer_outputs: Sequence[torch.Tensor], includes_final: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Class logits and boxes of every decoder layer from the layers' raw outputs, exactly as DETR's heads see them.

    DETR's heads read each layer's output through the decoder LayerNorm; with ``auxiliary_loss`` the decoder applies
    it after every layer and then once more to the last one (which the main head sees). The raw outputs are what
    forward hooks on ``decoder.layers[i]`` return. ``outputs.decoder_hidden_states`` holds them too, except its last
    entry: transformers 5.23 ties that one to ``last_hidden_state``, the final layer's output already through the
    LayerNorm (see :func:`hidden_state_predictions`).

    Args:
        model: A transformers DETR detection model.
        layer_outputs: Raw outputs of consecutive decoder layers, the first of them first.
        includes_final: Whether the last entry is the final decoder layer's (with ``auxiliary_loss`` its LayerNorm is
            then applied twice); ``False`` for intermediate layers only.

    Returns:
        ``(logits (L, B, Q, C + 1), boxes (L, B, Q, 4), normed states (L, B, Q, d_model))``.
    """
    decoder = model.model.decoder
    normed = [decoder.layernorm(state) for state in layer_outputs]
    if includes_final and model.config.auxiliary_loss:
        normed[-1] = decoder.layernorm(normed[-1])
    per_layer = torch.stack(normed)
    logits = model.class_labels_classifier(per_layer)
    boxes = model.bbox_predictor(per_layer).sigmoid()
    return logits, boxes, per_layer


def layer_stack(logits: torch.Tensor, boxes: torch.Tensor, who: str = "student") -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's ``(B, N, C)`` / ``(B, N, 4)`` predictions, or several layers' ``(L, B, N, ·)``, as
    ``(L, B, N, C)`` logits and ``(L, B, N, 4)`` boxes; a ValueError names ``who`` when the two disagree."""
    if logits.ndim not in (3, 4) or boxes.ndim != logits.ndim:
        raise ValueError(
            f"{who}_logits and {who}_boxes must both be (B, N, ·) or both (L, B, N, ·), got "
            f"{tuple(logits.shape)} and {tuple(boxes.shape)}"
        )
    logits = logits if logits.ndim == 4 else logits.unsqueeze(0)
    boxes = boxes if boxes.ndim == 4 else boxes.unsqueeze(0)
    if boxes.shape != (*logits.shape[:3], 4):
        raise ValueError(f"{who}_boxes must have shape {(*logits.shape[:3], 4)}, got {tuple(boxes.shape)}")
    return logits, boxes


def hidden_state_predictions(detector: DetectorOutputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Class logits ``(L, B, Q, C + 1)`` and boxes ``(L, B, Q, 4)`` of every decoder layer of a forward pass run with
    ``output_hidden_states=True``.

    ``outputs.decoder_hidden_states`` is ``(decoder input, layer 1 output, ..., layer L output)``. In transformers 5.23
    (``capture_outputs`` with ``tie_last_hidden_states``) the intermediate entries are the layers' raw outputs, but the
    last one is replaced by ``last_hidden_state``: layer L's output already through the decoder LayerNorm (twice with
    ``auxiliary_loss``), which the heads must not normalise again. So layers ``1..L-1`` are rebuilt from their raw
    outputs (:func:`layer_predictions`) and layer L's predictions are the model's own ``logits`` / ``pred_boxes``.

    Raises:
        ValueError: If the outputs have no ``decoder_hidden_states`` or ``detector.model`` is missing.
    """
    hidden = getattr(detector.outputs, "decoder_hidden_states", None)
    if hidden is None or detector.model is None:
        raise ValueError(
            "Per-layer predictions need the model's decoder_hidden_states (run it with output_hidden_states=True) "
            "and DetectorOutputs.model."
        )
    logits, boxes = detector.logits.unsqueeze(0), detector.pred_boxes.unsqueeze(0)
    if len(hidden) > 2:
        inner_logits, inner_boxes, _ = layer_predictions(detector.model, hidden[1:-1], includes_final=False)
        logits = torch.cat([inner_logits.to(logits.dtype), logits])
        boxes = torch.cat([inner_boxes.to(boxes.dtype), boxes])
    return logits, boxes


def check_label_spaces(first: Any, second: Any, names: tuple[str, str] = ("teacher", "student")) -> None:
    """Raise a clear ``ValueError`` when two label spaces do not hold the same classes in the same order.

    Args:
        first: A config with ``id2label`` (teacher, student) or an ``id -> class name`` mapping (a dataset's).
        second: The same for the other side.
        names: How the message calls the two sides.
    """
    one, two = ({int(k): str(v) for k, v in getattr(side, "id2label", side).items()} for side in (first, second))
    if one == two:
        return
    first_name, second_name = names
    if len(one) != len(two):
        raise ValueError(
            f"{first_name.capitalize()} and {second_name} label spaces differ: the {first_name} has {len(one)} "
            f"classes {sorted(one.values())}, the {second_name} {len(two)} classes {sorted(two.values())}. They must "
            "be the same classes in the same order (config.id2label)."
        )
    differences = [
        f"{i}: {first_name} {one.get(i)!r} vs {second_name} {two.get(i)!r}"
        for i in sorted(one)
        if one.get(i) != two.get(i)
    ]
    raise ValueError(
        f"{first_name.capitalize()} and {second_name} label spaces differ (config.id2label): "
        + "; ".join(differences[:10])
        + (" ..." if len(differences) > 10 else "")
    )
