"""CombinedDistiller: several distillation methods on the same forward passes."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_detr_kwargs
from transformers import DetrConfig, DetrForObjectDetection

from qdetr_hf.distillers import (
    CombinedDistiller,
    DetectorOutputs,
    Distiller,
    DRDDistiller,
    IDaDetDistiller,
    QSKDDistiller,
)

LABELS = [
    {"class_labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4]])},
    {"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.3]])},
]


def _outputs(model: torch.nn.Module, seed: int) -> DetectorOutputs:
    """Random final-layer predictions and co-attended features of both decoder layers of a tiny DETR (2 x 8 queries)."""
    generator = torch.Generator().manual_seed(seed)
    boxes = torch.cat(
        [0.3 + 0.4 * torch.rand(2, 8, 2, generator=generator), 0.1 + 0.3 * torch.rand(2, 8, 2, generator=generator)], -1
    )
    features = {layer: torch.randn(2, 8, 32, generator=generator, requires_grad=True) for layer in (0, 1)}
    return DetectorOutputs(
        logits=torch.randn(2, 8, 4, generator=generator),
        pred_boxes=boxes,
        outputs=None,
        co_attended=features,
        model=model,
    )


@pytest.fixture(scope="module")
def tiny_detr():
    return DetrForObjectDetection(DetrConfig(**tiny_detr_kwargs())).eval()


def test_each_method_sees_its_own_layers_and_the_terms_are_theirs(tiny_detr):
    student, teacher = _outputs(tiny_detr, 0), _outputs(tiny_detr, 1)
    drd, ida = DRDDistiller(layers=(-1,)), IDaDetDistiller(layers=(0, 1))
    combined = CombinedDistiller([drd, ida])
    assert combined.name == "drd+ida" and combined.co_attended_layers == (-1, 0, 1)
    terms = combined(student, teacher, LABELS)

    last_only = {1: student.co_attended[1]}, {1: teacher.co_attended[1]}
    alone = drd(
        DetectorOutputs(student.logits, student.pred_boxes, None, last_only[0], tiny_detr),
        DetectorOutputs(teacher.logits, teacher.pred_boxes, None, last_only[1], tiny_detr),
        LABELS,
    )
    assert torch.equal(terms["loss_drd"], alone["loss_drd"])  # DRD on the last layer only ...
    assert not torch.allclose(drd(student, teacher, LABELS)["loss_drd"], alone["loss_drd"])  # ... which matters
    ida_alone = ida(student, teacher, LABELS)
    assert set(terms) == set(alone) | set(ida_alone)
    for name, value in ida_alone.items():
        assert torch.equal(terms[name], value), name


def test_requirements_are_the_union_of_the_methods():
    combined = CombinedDistiller([DRDDistiller(), QSKDDistiller()])
    assert combined.name == "drd+qskd" and combined.co_attended_layers == (-1,)
    assert combined.needs_attentions and combined.needs_hidden_states and combined.needs_decoder_inputs
    assert not CombinedDistiller([DRDDistiller(), IDaDetDistiller()]).needs_attentions
    # The parts' own parameters (a QSKD adapter between widths, IDa-Det's learned variance) are the combination's.
    with_parameters = CombinedDistiller([QSKDDistiller(student_dim=16, teacher_dim=32), IDaDetDistiller()])
    assert set(dict(with_parameters.named_parameters())) == {
        "distillers.0.adapter.weight",
        "distillers.0.adapter.bias",
        "distillers.1.log_variance",
    }


class _Constant(Distiller):
    def __init__(self, name: str, term: str) -> None:
        super().__init__()
        self.name, self.term = name, term

    def forward(self, student, teacher, labels):
        return {self.term: torch.tensor(1.0)}


def test_bad_combinations_are_clear_errors(tiny_detr):
    with pytest.raises(ValueError, match="at least two distillers, got 1"):
        CombinedDistiller([DRDDistiller()])
    with pytest.raises(ValueError, match="same method twice"):
        CombinedDistiller([DRDDistiller(), DRDDistiller(tau=0.5)])
    clash = CombinedDistiller([_Constant("a", "loss_x"), _Constant("b", "loss_x")])
    with pytest.raises(ValueError, match=r"'b' returns terms another method returns: \['loss_x'\]"):
        clash(_outputs(tiny_detr, 0), _outputs(tiny_detr, 1), LABELS)
