"""Tests for KD-DETR: weights, the weighted KL / L1 / GIoU set loss, general sampling and the distiller on tiny DETRs."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import SHAPES, tiny_detr_kwargs, tiny_training_args
from transformers import DetrConfig, DetrForObjectDetection

from qdetr_hf.distillers.base import DetectorOutputs, capture_decoder_inputs, run_decoder
from qdetr_hf.distillers.kd_detr import (
    KDDETRDistiller,
    kd_detr_query_weights,
    kd_detr_set_loss,
    sample_general_queries,
)

LN3 = math.log(3.0)


# ---------------------------------------------------------------------------------------------------------------------
# Query weights. One query, logits over (class 0, class 1, no object):
#   softmax of (0, ln 2, 0) = (1/4, 1/2, 1/4) -> max over the object classes = 1/2.
#   sigmoid of (0, ln 3, 5) over the object columns = (1/2, 3/4) -> 3/4 (sigmoid(5) = 0.993 of the no-object column is
#   ignored); softmax of the same logits: e^5 / (1 + 3 + e^5) on no-object, the best object class 3 / (4 + e^5).
# ---------------------------------------------------------------------------------------------------------------------
def test_query_weights_known_answers() -> None:
    logits = torch.tensor([[[0.0, math.log(2.0), 0.0], [0.0, LN3, 5.0]]])
    torch.testing.assert_close(
        kd_detr_query_weights(logits, "softmax"), torch.tensor([[0.5, 3.0 / (4.0 + math.exp(5.0))]])
    )
    torch.testing.assert_close(kd_detr_query_weights(logits, "sigmoid"), torch.tensor([[2.0 / 3.0, 0.75]]))
    torch.testing.assert_close(kd_detr_query_weights(logits, "none"), torch.ones(1, 2))
    leaf = logits.clone().requires_grad_(True)
    assert not kd_detr_query_weights(leaf).requires_grad  # detached
    with pytest.raises(ValueError, match="weighting must be one of"):
        kd_detr_query_weights(logits, "max")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no-object column"):
        kd_detr_query_weights(torch.zeros(2, 1))


# ---------------------------------------------------------------------------------------------------------------------
# Set loss scene: B = 1, three queries, two columns (one class + no object), T = 10.
#   q0: teacher logits (0, 0) -> p_T = (1/2, 1/2); student 10 * (ln 3, 0) -> p_S = (3/4, 1/4).
#       KL = 1/2 ln(2/3) + 1/2 ln 2 = 1/2 ln(4/3); times T^2 = 50 ln(4/3).
#       teacher box cxcywh (0.5, 0.5, 0.2, 0.2) = xyxy [0.4, 0.4, 0.6, 0.6]; student (0.6, 0.5, 0.2, 0.2) =
#       [0.5, 0.4, 0.7, 0.6]: L1 = mean(0.1, 0, 0, 0) = 0.025; inter 0.02, union 0.06, hull 0.06 -> GIoU 1/3.
#   q1: student == teacher -> every term 0.
#   q2: wildly different (KL and boxes far apart) but weight 0 -> contributes nothing.
# Weights (1, 3, 0): normaliser 4, so KL term = 50 ln(4/3) / 4, L1 term = 0.025 / 4, GIoU term = (2/3) / 4.
# ---------------------------------------------------------------------------------------------------------------------
KL_Q0 = 50.0 * math.log(4.0 / 3.0)
L1_Q0 = 0.025
GIOU_Q0 = 2.0 / 3.0


def _scene() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    teacher_logits = torch.tensor([[[0.0, 0.0], [1.0, -2.0], [-30.0, 30.0]]])
    student_logits = torch.tensor([[[10.0 * LN3, 0.0], [1.0, -2.0], [30.0, -30.0]]])
    teacher_boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.1, 0.2], [0.1, 0.1, 0.05, 0.05]]])
    student_boxes = torch.tensor([[[0.6, 0.5, 0.2, 0.2], [0.3, 0.3, 0.1, 0.2], [0.9, 0.9, 0.1, 0.1]]])
    weights = torch.tensor([[1.0, 3.0, 0.0]])
    return student_logits, student_boxes, teacher_logits, teacher_boxes, weights


def test_set_loss_known_answer() -> None:
    parts = kd_detr_set_loss(*_scene())
    assert parts["cls"].item() == pytest.approx(KL_Q0 / 4.0, rel=1e-5)
    assert parts["l1"].item() == pytest.approx(L1_Q0 / 4.0, rel=1e-5)
    assert parts["giou"].item() == pytest.approx(GIOU_Q0 / 4.0, rel=1e-5)
    expected = (KL_Q0 + 5.0 * L1_Q0 + 2.0 * GIOU_Q0) / 4.0
    assert parts["loss"].item() == pytest.approx(expected, rel=1e-5)
    assert parts["weight_sum"].item() == 4.0
    custom = kd_detr_set_loss(*_scene(), cls_weight=0.5, l1_weight=1.0, giou_weight=0.0)
    assert custom["loss"].item() == pytest.approx((0.5 * KL_Q0 + L1_Q0) / 4.0, rel=1e-5)


def test_set_loss_weight_normalisation_and_zero_weight_query() -> None:
    student_logits, student_boxes, teacher_logits, teacher_boxes, weights = _scene()
    base = kd_detr_set_loss(student_logits, student_boxes, teacher_logits, teacher_boxes, weights)["loss"]
    # Scaling every weight leaves the loss unchanged (normalised by the weight sum).
    scaled = kd_detr_set_loss(student_logits, student_boxes, teacher_logits, teacher_boxes, 7.5 * weights)["loss"]
    torch.testing.assert_close(scaled, base)
    # Dropping the zero-weight query changes nothing (same numerator and normaliser).
    dropped = kd_detr_set_loss(
        student_logits[:, :2], student_boxes[:, :2], teacher_logits[:, :2], teacher_boxes[:, :2], weights[:, :2]
    )["loss"]
    torch.testing.assert_close(dropped, base)
    # ... whereas the same query with weight 1 adds a large term (so the test above could fail).
    heavier = kd_detr_set_loss(
        student_logits, student_boxes, teacher_logits, teacher_boxes, torch.tensor([[1.0, 3.0, 1.0]])
    )["loss"]
    assert heavier.item() > 2 * base.item()
    # Uniform weights: a plain mean over the queries. q2's softened logits are (-3, 3) (teacher) and (3, -3) (student):
    # KL = (s(6) - s(-6)) (log s(6) - log s(-6)) = tanh(3) * 6 with s the sigmoid, times T^2 = 600 tanh(3).
    uniform = kd_detr_set_loss(*_scene()[:4], torch.ones(1, 3) / 3)["cls"]
    assert uniform.item() == pytest.approx((KL_Q0 + 600.0 * math.tanh(3.0)) / 3.0, rel=1e-5)


def test_set_loss_temperature_squared_scaling() -> None:
    # Teacher (0, 0), student T * (ln 3, 0): the softened distributions are the same for every T, so the T^2-scaled KL
    # is T^2 * 1/2 ln(4/3).
    teacher_logits = torch.zeros(1, 1, 2)
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2]]])
    for temperature in (1.0, 4.0, 10.0):
        student_logits = torch.tensor([[[temperature * LN3, 0.0]]])
        parts = kd_detr_set_loss(
            student_logits, boxes, teacher_logits, boxes, torch.ones(1, 1), temperature=temperature
        )
        assert parts["cls"].item() == pytest.approx(temperature**2 * 0.5 * math.log(4.0 / 3.0), rel=1e-5)
        assert parts["l1"].item() == 0.0 and parts["giou"].item() == pytest.approx(0.0, abs=1e-7)


def test_set_loss_sums_every_student_layer_against_the_teacher_final_layer() -> None:
    student_logits, student_boxes, teacher_logits, teacher_boxes, weights = _scene()
    one = kd_detr_set_loss(student_logits, student_boxes, teacher_logits, teacher_boxes, weights)["loss"]
    # Layer 0 equals the teacher (contributes 0), layer 1 is the scene: the sum is the scene's loss.
    layered_logits = torch.stack([teacher_logits, student_logits])
    layered_boxes = torch.stack([teacher_boxes, student_boxes])
    two = kd_detr_set_loss(layered_logits, layered_boxes, teacher_logits, teacher_boxes, weights)["loss"]
    torch.testing.assert_close(two, one)
    # Both layers equal to the scene: twice the loss (summed over layers, one weight normaliser).
    twice = kd_detr_set_loss(
        torch.stack([student_logits] * 2), torch.stack([student_boxes] * 2), teacher_logits, teacher_boxes, weights
    )["loss"]
    torch.testing.assert_close(twice, 2 * one)


def test_set_loss_gradients_are_finite_and_flow_to_the_student_only() -> None:
    student_logits, student_boxes, teacher_logits, teacher_boxes, weights = _scene()
    student_logits = (student_logits * 1e3).requires_grad_(True)  # saturated softmax: log_softmax stays finite
    student_boxes = student_boxes.clone().requires_grad_(True)
    teacher_logits = teacher_logits.clone().requires_grad_(True)
    loss = kd_detr_set_loss(student_logits, student_boxes, teacher_logits, teacher_boxes, weights)["loss"]
    loss.backward()
    assert (
        torch.isfinite(loss) and torch.isfinite(student_logits.grad).all() and torch.isfinite(student_boxes.grad).all()
    )
    assert teacher_logits.grad is None
    assert student_boxes.grad[0, 2].abs().sum() == 0  # zero-weight query: no gradient either
    # All weights zero: an exact 0 that is still connected to the student.
    zero = kd_detr_set_loss(student_logits, student_boxes, teacher_logits.detach(), teacher_boxes, torch.zeros(1, 3))[
        "loss"
    ]
    assert zero.item() == 0.0 and zero.grad_fn is not None


def test_set_loss_validates_inputs() -> None:
    student_logits, student_boxes, teacher_logits, teacher_boxes, weights = _scene()
    with pytest.raises(ValueError, match="teacher_logits must have shape"):
        kd_detr_set_loss(student_logits, student_boxes, teacher_logits[:, :2], teacher_boxes, weights)
    with pytest.raises(ValueError, match="weights must have shape"):
        kd_detr_set_loss(student_logits, student_boxes, teacher_logits, teacher_boxes, weights[0])
    with pytest.raises(ValueError, match="finite and >= 0"):
        kd_detr_set_loss(student_logits, student_boxes, teacher_logits, teacher_boxes, -weights)
    with pytest.raises(ValueError, match="temperature"):
        kd_detr_set_loss(student_logits, student_boxes, teacher_logits, teacher_boxes, weights, temperature=0.0)
    with pytest.raises(ValueError, match="student_boxes must have shape"):
        kd_detr_set_loss(student_logits, student_boxes[:, :2], teacher_logits, teacher_boxes, weights)


def test_set_loss_without_validation_gives_the_same_terms_and_checks_only_shapes() -> None:
    student_logits, student_boxes, teacher_logits, teacher_boxes, weights = _scene()
    checked = kd_detr_set_loss(student_logits, student_boxes, teacher_logits, teacher_boxes, weights)
    unchecked = kd_detr_set_loss(student_logits, student_boxes, teacher_logits, teacher_boxes, weights, validate=False)
    assert {k: v.item() for k, v in checked.items()} == {k: v.item() for k, v in unchecked.items()}
    negative = kd_detr_set_loss(student_logits, student_boxes, teacher_logits, teacher_boxes, -weights, validate=False)
    assert negative["weight_sum"].item() < 0  # computed as given: the caller vouches for its weights
    with pytest.raises(ValueError, match="weights must have shape"):
        kd_detr_set_loss(student_logits, student_boxes, teacher_logits, teacher_boxes, weights[0], validate=False)
    bad_boxes = student_boxes.detach().clone()
    bad_boxes[..., 2] = -0.1  # negative widths: degenerate xyxy boxes
    with pytest.raises(ValueError, match="degenerate box"):
        kd_detr_set_loss(student_logits, bad_boxes, teacher_logits, teacher_boxes, weights)


# ---------------------------------------------------------------------------------------------------------------------
# General sampling.
# ---------------------------------------------------------------------------------------------------------------------
def test_general_queries_distributions_generators_and_ranks() -> None:
    def gen() -> torch.Generator:
        return torch.Generator().manual_seed(11)

    normal = sample_general_queries(20000, 4, std=2.0, generator=gen())
    assert normal.shape == (20000, 4)
    assert normal.mean().abs().item() < 0.05 and normal.std().item() == pytest.approx(2.0, rel=0.02)
    # Same generator seed -> same set; the global RNG is used (and advanced) without one.
    torch.testing.assert_close(
        sample_general_queries(5, 3, generator=gen()), sample_general_queries(5, 3, generator=gen())
    )
    torch.manual_seed(3)
    first = sample_general_queries(5, 3)
    torch.manual_seed(3)
    torch.testing.assert_close(sample_general_queries(5, 3), first)
    assert not torch.equal(sample_general_queries(5, 3), first)
    # "teacher": per-dimension mean / population std of the reference (rows +-1 around (3, -1): mean (3, -1), sd 1 and
    # 0.1 * 1 in the second dimension), std scales the fitted sd.
    reference = torch.tensor([[4.0, -0.9], [2.0, -1.1]])
    fitted = sample_general_queries(20000, 2, "teacher", std=0.5, reference=reference, generator=gen())
    torch.testing.assert_close(fitted.mean(0), torch.tensor([3.0, -1.0]), atol=0.02, rtol=0)
    torch.testing.assert_close(fitted.std(0), torch.tensor([0.5, 0.05]), atol=0, rtol=0.03)
    # Ranks: every process draws world_size sets and keeps its own -> different sets from the same RNG state.
    rank0 = sample_general_queries(6, 3, generator=gen(), rank=0, world_size=2)
    rank1 = sample_general_queries(6, 3, generator=gen(), rank=1, world_size=2)
    all_sets = torch.randn((2, 6, 3), generator=gen())
    torch.testing.assert_close(rank0, all_sets[0])
    torch.testing.assert_close(rank1, all_sets[1])
    assert not torch.allclose(rank0, rank1)
    single = torch.randn((1, 6, 3), generator=gen())[0]
    torch.testing.assert_close(sample_general_queries(6, 3, generator=gen()), single)  # one process: world_size 1
    with pytest.raises(ValueError, match="reference embeddings"):
        sample_general_queries(4, 3, "teacher")
    with pytest.raises(ValueError, match="num_queries"):
        sample_general_queries(0, 3)
    with pytest.raises(ValueError, match="rank"):
        sample_general_queries(4, 3, rank=2, world_size=2)


# ---------------------------------------------------------------------------------------------------------------------
# The distiller on tiny DETRs (d_model 32, 2 decoder layers, 8 queries, 3 classes).
# ---------------------------------------------------------------------------------------------------------------------
def _detr(seed: int, **overrides) -> DetrForObjectDetection:
    # transformers' init (std 0.02) makes a tiny random DETR predict almost the same thing for every query; a larger
    # init and N(0, 1) query embeddings (the scale of the original DETR's) make the outputs depend on the queries.
    torch.manual_seed(seed)
    model = DetrForObjectDetection(DetrConfig(**tiny_detr_kwargs(id2label=SHAPES, init_std=0.2, **overrides)))
    with torch.no_grad():
        model.model.query_position_embeddings.weight.normal_()
    return model.eval()


def _run(model, pixel_values, pixel_mask=None, grad: bool = True) -> DetectorOutputs:
    with torch.set_grad_enabled(grad), capture_decoder_inputs(model) as captured:
        outputs = model(pixel_values=pixel_values, pixel_mask=pixel_mask)
    return DetectorOutputs(
        logits=outputs.logits,
        pred_boxes=outputs.pred_boxes,
        outputs=outputs,
        model=model,
        pixel_values=pixel_values,
        pixel_mask=pixel_mask,
        decoder_inputs=dict(captured),
    )


def _labels(batch: int) -> list[dict[str, torch.Tensor]]:
    return [{"class_labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)} for _ in range(batch)]


@pytest.fixture(scope="module")
def teacher() -> DetrForObjectDetection:
    return _detr(0).requires_grad_(False)


def _distiller(seed: int = 5, **kwargs) -> KDDETRDistiller:
    return KDDETRDistiller(generator=torch.Generator().manual_seed(seed), **kwargs)


def test_specific_set_reproduces_the_teacher_and_an_identical_student_gets_zero_loss(teacher, images) -> None:
    t_out = _run(teacher, images, grad=False)
    queries = teacher.model.query_position_embeddings.weight
    logits, boxes, _ = run_decoder(teacher, t_out.decoder_inputs, queries)
    torch.testing.assert_close(logits[-1], t_out.logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(boxes[-1], t_out.pred_boxes, rtol=0, atol=1e-6)

    twin = copy.deepcopy(teacher).requires_grad_(True)
    terms = _distiller()(_run(twin, images), t_out, _labels(2))
    assert set(terms) == {
        *(f"loss_kd_{s}" for s in ("specific", "general")),
        *(f"kd_{s}_{k}" for s in ("specific", "general") for k in ("cls", "l1", "giou", "weight")),
    }
    # Every student layer is compared with the teacher's *final* layer, so only the last layer gives exactly 0.
    last_only = _distiller(all_layers=False)(_run(twin, images), t_out, _labels(2))
    for name in ("loss_kd_specific", "loss_kd_general"):
        assert last_only[name].item() == pytest.approx(0.0, abs=1e-5), name
        assert terms[name].item() > 1e-3, name  # layer 0 differs from the final layer
    # A different student gets a clearly positive loss.
    other = _distiller()(_run(_detr(1), images), t_out, _labels(2))
    assert other["loss_kd_specific"].item() > 1e-2 and other["loss_kd_general"].item() > 1e-2


def test_set_losses_match_a_direct_computation(teacher, images) -> None:
    student = _detr(1)
    s_out, t_out = _run(student, images), _run(teacher, images, grad=False)
    terms = _distiller(seed=9, weighting="sigmoid", num_general_queries=5)(s_out, t_out, _labels(2))
    # Specific: student decoder on the teacher's queries vs the teacher's own outputs.
    queries = teacher.model.query_position_embeddings.weight
    logits, boxes, _ = run_decoder(student, s_out.decoder_inputs, queries)
    weights = kd_detr_query_weights(t_out.logits, "sigmoid")
    expected = kd_detr_set_loss(logits, boxes, t_out.logits, t_out.pred_boxes, weights)["loss"]
    torch.testing.assert_close(terms["loss_kd_specific"], expected)
    # General: the same 5 random queries (same generator seed) through both decoders.
    general = sample_general_queries(5, 32, generator=torch.Generator().manual_seed(9))
    logits, boxes, _ = run_decoder(student, s_out.decoder_inputs, general)
    t_logits, t_boxes, _ = run_decoder(teacher, t_out.decoder_inputs, general)
    weights = kd_detr_query_weights(t_logits[-1], "sigmoid")
    expected = kd_detr_set_loss(logits, boxes, t_logits[-1], t_boxes[-1], weights)["loss"]
    torch.testing.assert_close(terms["loss_kd_general"], expected)
    torch.testing.assert_close(terms["kd_general_weight"], weights.mean())


def test_distillation_points_do_not_touch_the_detection_queries(teacher, images) -> None:
    student = _detr(1)
    t_out = _run(teacher, images, grad=False)
    s_out = _run(student, images)
    detection_logits = s_out.logits.detach().clone()
    captured = {k: v for k, v in s_out.decoder_inputs.items()}
    terms = _distiller()(s_out, t_out, _labels(2))
    assert torch.equal(s_out.logits, detection_logits)
    assert all(s_out.decoder_inputs[k] is v for k, v in captured.items())  # the captured inputs are not modified
    with torch.no_grad():
        again = student(pixel_values=images).logits
    torch.testing.assert_close(again, detection_logits)
    # Separate passes: changing the student's detection queries changes its detections but not the KD terms (a joint
    # pass would let the distillation points attend to the detection queries).
    with torch.no_grad():
        student.model.query_position_embeddings.weight.mul_(-3.0)
    moved = _run(student, images)
    assert (moved.logits - detection_logits).abs().max() > 1e-3
    moved_terms = _distiller()(moved, t_out, _labels(2))
    for name in ("loss_kd_specific", "loss_kd_general"):
        torch.testing.assert_close(moved_terms[name], terms[name], rtol=0, atol=1e-6)
    # ...whereas decoding the teacher's queries jointly with the detection queries would change the specific set.
    joint = torch.cat([teacher.model.query_position_embeddings.weight, student.model.query_position_embeddings.weight])
    alone = run_decoder(student, moved.decoder_inputs, teacher.model.query_position_embeddings.weight)[0]
    mixed = run_decoder(student, moved.decoder_inputs, joint)[0][:, :, :8]
    assert (alone - mixed).abs().max() > 1e-3


def test_batch_size_independence(teacher, images) -> None:
    student = _detr(1)
    small = _distiller()(_run(student, images), _run(teacher, images, grad=False), _labels(2))
    doubled = torch.cat([images, images])
    large = _distiller()(_run(student, doubled), _run(teacher, doubled, grad=False), _labels(4))
    for name, value in small.items():
        torch.testing.assert_close(large[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_no_nan_on_blank_and_padded_images(teacher) -> None:
    student = _detr(1)
    blank = torch.zeros(3, 3, 64, 64)
    mask = torch.ones(3, 64, 64, dtype=torch.long)
    mask[1, :, 32:] = 0  # right half padding
    mask[2, 40:, :] = 0
    s_out, t_out = _run(student, blank, mask), _run(teacher, blank, mask, grad=False)
    terms = _distiller(weighting="none")(s_out, t_out, _labels(3))
    total = terms["loss_kd_specific"] + terms["loss_kd_general"]
    total.backward()
    assert all(torch.isfinite(v).all() for v in terms.values())
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in student.parameters())


def test_mixed_precision_under_autocast(teacher, images) -> None:
    """Under bf16 the trainer runs the distiller under the same autocast as the forward passes: the extra decoder
    passes then work on the bf16 encoder memory they captured and the loss terms stay float32."""
    student = _detr(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s_out, t_out = _run(student, images), _run(teacher, images, grad=False)
        terms = _distiller()(s_out, t_out, _labels(2))
    assert s_out.decoder_inputs["encoder_hidden_states"].dtype == torch.bfloat16
    reference = _distiller()(_run(student, images), _run(teacher, images, grad=False), _labels(2))
    for name in ("loss_kd_specific", "loss_kd_general"):
        assert terms[name].dtype == torch.float32 and torch.isfinite(terms[name])
        assert terms[name].item() == pytest.approx(reference[name].item(), rel=0.1), name
    terms["loss_kd_specific"].backward()
    assert student.model.decoder.layers[-1].mlp.fc2.weight.grad.dtype == torch.float32


def test_gradients_reach_the_student_decoder_but_not_the_teacher(images) -> None:
    teacher = _detr(0)  # requires_grad left on: the distiller itself must keep the teacher out of the graph
    student = _detr(1)
    t_out = _run(teacher, images, grad=False)
    for kwargs in ({"general": False}, {"specific": False}):
        student.zero_grad(set_to_none=True)
        terms = _distiller(**kwargs)(_run(student, images), t_out, _labels(2))
        loss = sum(v for k, v in terms.items() if k.startswith("loss_"))
        loss.backward()
        for name, param in student.named_parameters():
            # Always zero in DETR: key biases (softmax is shift-invariant) and layer 0's self-attention, whose inputs
            # are all zero (every value equals the bias, so the attention weights do not matter; with zero biases the
            # block outputs zeros, so its LayerNorm weight gets none either).
            degenerate = name.endswith("k_proj.bias") or name.startswith("model.decoder.layers.0.self_attn")
            if name.startswith(("model.decoder.", "class_labels_classifier", "bbox_predictor")) and not degenerate:
                assert param.grad is not None and param.grad.abs().sum() > 0, (kwargs, name)
        # The KD passes reuse the encoder memory of the training forward: the encoder is trained too ...
        assert student.model.encoder.layers[0].mlp.fc1.weight.grad.abs().sum() > 0
        # ... but the student's own detection queries take no part in them.
        assert student.model.query_position_embeddings.weight.grad is None
        assert all(p.grad is None for p in teacher.parameters()), kwargs


def test_student_with_another_number_of_queries(teacher, images) -> None:
    student = _detr(1, num_queries=5)
    terms = _distiller(general=False)(_run(student, images), _run(teacher, images, grad=False), _labels(2))
    assert set(terms) == {
        "loss_kd_specific",
        "kd_specific_cls",
        "kd_specific_l1",
        "kd_specific_giou",
        "kd_specific_weight",
    }
    assert terms["loss_kd_specific"].item() > 0


def test_settings_and_model_mismatches_are_clear_errors(teacher, images) -> None:
    with pytest.raises(ValueError, match="at least one set"):
        KDDETRDistiller(specific=False, general=False)
    with pytest.raises(ValueError, match="weighting"):
        KDDETRDistiller(weighting="focal")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_general_queries"):
        KDDETRDistiller(num_general_queries=0)
    with pytest.raises(ValueError, match="general_distribution"):
        KDDETRDistiller(general_distribution="uniform")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="l1_weight"):
        KDDETRDistiller(l1_weight=-1.0)
    with pytest.raises(ValueError, match="temperature"):
        KDDETRDistiller(temperature=0.0)
    t_out = _run(teacher, images, grad=False)
    narrow = _detr(1, d_model=16, encoder_ffn_dim=32, decoder_ffn_dim=32)
    with pytest.raises(ValueError, match="same d_model; got teacher 32 and student 16"):
        KDDETRDistiller()(_run(narrow, images), t_out, _labels(2))
    s_out = _run(_detr(1), images)
    s_out.decoder_inputs = None
    with pytest.raises(ValueError, match="decoder inputs"):
        KDDETRDistiller()(s_out, t_out, _labels(2))


def test_teacher_scaled_general_queries(teacher, images) -> None:
    student = _detr(1)
    s_out, t_out = _run(student, images), _run(teacher, images, grad=False)
    a = _distiller(seed=2, specific=False, general_distribution="teacher")(s_out, t_out, _labels(2))
    b = _distiller(seed=2, specific=False)(s_out, t_out, _labels(2))
    assert torch.isfinite(a["loss_kd_general"]) and a["loss_kd_general"].item() != b["loss_kd_general"].item()


# ---------------------------------------------------------------------------------------------------------------------
# End to end with the distillation trainer: a quantized student learns to imitate the teacher's distillation points.
# ---------------------------------------------------------------------------------------------------------------------
def test_short_training_run_lowers_the_kd_detr_loss(tmp_path, tiny_teacher_dir, tiny_shapes) -> None:
    from qdetr_hf import QDetrConfig, QDetrForObjectDetection
    from qdetr_hf.trainer import QDetrDistillationTrainer, load_teacher

    torch.manual_seed(1)  # a student that starts far from the teacher
    student = QDetrForObjectDetection(QDetrConfig(**tiny_detr_kwargs(id2label=SHAPES)))
    dataset, collator = tiny_shapes
    args = tiny_training_args(
        tmp_path / "out",
        per_device_train_batch_size=2,
        max_steps=30,
        learning_rate=1e-3,
        lr_scheduler_type="constant",
        calibration_batches=1,
    )
    trainer = QDetrDistillationTrainer(
        model=student,
        args=args,
        teacher_model=load_teacher(tiny_teacher_dir),
        distiller=KDDETRDistiller(),
        train_dataset=dataset,
        data_collator=collator,
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is as fast and does not collapse on a busy machine
    try:
        trainer.train()
    finally:
        torch.set_num_threads(threads)
    logs = [entry for entry in trainer.state.log_history if "loss_kd_specific" in entry]
    assert len(logs) == 30
    for name in ("loss_kd_specific", "loss_kd_general"):
        values = [entry[name] for entry in logs]
        assert all(math.isfinite(v) for v in values)
        first, last = sum(values[:10]) / 10, sum(values[-10:]) / 10
        assert last < 0.8 * first, (name, first, last)
    for entry in logs:
        total = entry["loss_gt"] + entry["loss_kd_specific"] + entry["loss_kd_general"]
        assert entry["loss"] == pytest.approx(total, rel=1e-4)
