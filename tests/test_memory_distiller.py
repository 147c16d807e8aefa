"""Encoder-memory imitation: the relative squared error on hand-built memories, its gradient, masks and wiring."""

from __future__ import annotations

import pytest
import torch

from qdetr_hf.distillers import DetectorOutputs, EncoderMemoryDistiller, memory_imitation_loss

TEACHER = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])  # one image, two tokens, d_model 2: energies 1 and 4


def test_relative_error_is_zero_for_a_copy_one_for_a_zero_memory_and_follows_the_mask():
    assert memory_imitation_loss(TEACHER.clone(), TEACHER).item() == 0.0
    assert memory_imitation_loss(torch.zeros_like(TEACHER), TEACHER).item() == 1.0
    student = torch.tensor([[[2.0, 0.0], [5.0, 5.0]]])  # squared errors 1 and 25 + 9 = 34
    assert memory_imitation_loss(student, TEACHER).item() == pytest.approx(35 / 5)
    # The second token is padding: only the first one's error and energy count.
    assert memory_imitation_loss(student, TEACHER, torch.tensor([[1, 0]])).item() == pytest.approx(1 / 1)


def test_gradient_is_the_analytic_one_and_the_teacher_gets_none():
    student = torch.tensor([[[2.0, 0.0], [5.0, 5.0]]], requires_grad=True)
    teacher = TEACHER.clone().requires_grad_()
    memory_imitation_loss(student, teacher, torch.tensor([[1, 1]])).backward()
    # d/ds of sum ||s - t||^2 / sum ||t||^2 = 2 (s - t) / 5
    torch.testing.assert_close(student.grad, 2 * (student.detach() - TEACHER) / 5)
    assert teacher.grad is None


def test_memories_of_different_shapes_are_refused():
    with pytest.raises(ValueError, match="same d_model"):
        memory_imitation_loss(torch.zeros(1, 2, 3), TEACHER)


def _outputs(memory: torch.Tensor, mask: torch.Tensor | None) -> DetectorOutputs:
    empty = torch.zeros(memory.shape[0], 1, 2)
    inputs = {"encoder_hidden_states": memory, "encoder_attention_mask": mask}
    return DetectorOutputs(logits=empty, pred_boxes=empty, outputs=None, decoder_inputs=inputs)


def test_distiller_weights_the_error_and_reads_the_students_padding_mask():
    student = torch.tensor([[[2.0, 0.0], [5.0, 5.0]]])
    distiller = EncoderMemoryDistiller(weight=3.0)
    assert distiller.needs_decoder_inputs
    terms = distiller(_outputs(student, torch.tensor([[1, 0]])), _outputs(TEACHER, None), labels=[])
    assert terms["memory_relative_error"].item() == pytest.approx(1.0)
    assert terms["loss_memory"].item() == pytest.approx(3.0)
    with pytest.raises(ValueError, match="memory weight"):
        EncoderMemoryDistiller(weight=-1.0)
    with pytest.raises(ValueError, match="decoder inputs"):
        distiller(DetectorOutputs(logits=student, pred_boxes=student, outputs=None), _outputs(TEACHER, None), [])
