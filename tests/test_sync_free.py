"""The training step makes no host synchronisation from qdetr_hf's own code (issue 17).

A device-to-host copy (``.item()``, ``bool(tensor)``, ``.tolist()``, ``.cpu()``, ``.numpy()``, ``nonzero``, boolean-mask
indexing, whose output shape depends on the data) makes the host wait for the accelerator's queue. The recorder below
patches those entry points and notes every call whose *calling frame* is a file of the ``qdetr_hf`` package; calls
made by transformers (DETR's own loss and Hungarian matcher, which synchronise for scipy) or by torch itself are not
ours and are filtered out by that file name. Runs on the CPU: the calls are counted, not timed.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
import torch
from conftest import tiny_training_args

import qdetr_hf
from qdetr_hf import QDetrForObjectDetection
from qdetr_hf.box_ops import elementwise_generalized_box_iou, pad_targets, pairwise_generalized_box_iou
from qdetr_hf.distillers import (
    DRDDistiller,
    EncoderMemoryDistiller,
    IDaDetDistiller,
    KDDETRDistiller,
    QSKDDistiller,
    compute_drd,
    group_query_selection,
    kd_detr_set_loss,
    local_alignment_prediction_loss,
)
from qdetr_hf.trainer import QDetrDistillationTrainer, load_teacher

PACKAGE_DIR = os.path.dirname(os.path.abspath(qdetr_hf.__file__)) + os.sep

#: Tensor methods that read device values on the host.
SYNC_METHODS = (
    "item",
    "tolist",
    "cpu",
    "numpy",
    "nonzero",
    "__bool__",
    "__int__",
    "__float__",
    "__index__",
    "__array__",
)

#: (file, function) of the package's unavoidable host steps, excluded from the count.
ALLOWED_SITES = {
    # QSKD's LAPD assignment: scipy's linear_sum_assignment on the host, with data-dependent sizes, as DETR's matcher.
    ("predictions.py", "_assign_within_groups"),
}


@dataclass(frozen=True)
class Site:
    file: str
    line: int
    function: str
    call: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line} in {self.function}(): {self.call}"


def _is_bool_mask(index: object) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool and i.ndim > 0 for i in items)


@contextmanager
def record_host_syncs() -> Iterator[list[Site]]:
    """Record the host-synchronising tensor calls made from ``qdetr_hf`` files inside the block (allowed sites
    excluded)."""
    sites: list[Site] = []

    def note(call: str) -> None:
        frame = sys._getframe(2)  # 0: note, 1: the patch, 2: the caller
        filename = os.path.abspath(frame.f_code.co_filename)
        if filename.startswith(PACKAGE_DIR):
            name = os.path.relpath(filename, PACKAGE_DIR)
            if (os.path.basename(name), frame.f_code.co_name) not in ALLOWED_SITES:
                sites.append(Site(name, frame.f_lineno, frame.f_code.co_name, call))

    names = (*SYNC_METHODS, "__getitem__", "__setitem__")
    originals = {name: getattr(torch.Tensor, name) for name in names}
    own = {name: torch.Tensor.__dict__[name] for name in names if name in torch.Tensor.__dict__}
    original_nonzero = torch.nonzero

    def patch(name: str):
        original = originals[name]

        def method(self, *args, **kwargs):
            note(f"Tensor.{name}")
            return original(self, *args, **kwargs)

        return method

    def getitem(self, index):
        if _is_bool_mask(index):
            note("boolean-mask indexing")
        return originals["__getitem__"](self, index)

    def setitem(self, index, value):
        if _is_bool_mask(index):
            note("boolean-mask assignment")
        return originals["__setitem__"](self, index, value)

    def nonzero(*args, **kwargs):
        note("torch.nonzero")
        return original_nonzero(*args, **kwargs)

    try:
        for name in SYNC_METHODS:
            setattr(torch.Tensor, name, patch(name))
        torch.Tensor.__getitem__ = getitem
        torch.Tensor.__setitem__ = setitem
        torch.nonzero = nonzero
        yield sites
    finally:
        for name in names:  # back to exactly what torch.Tensor had (inherited methods are not copied onto it)
            if name in own:
                setattr(torch.Tensor, name, own[name])
            else:
                delattr(torch.Tensor, name)
        torch.nonzero = original_nonzero


# ---------------------------------------------------------------------------------------------------------------------
# The recorder sees what it should.
# ---------------------------------------------------------------------------------------------------------------------
XYXY = torch.tensor([[[0.1, 0.1, 0.4, 0.5], [0.2, 0.3, 0.9, 0.8]]])
LABELS = [{"class_labels": torch.tensor([0, 1]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.3, 0.4]])}]


def test_the_recorder_sees_the_package_checks_and_not_other_code() -> None:
    before = dict(torch.Tensor.__dict__)
    with record_host_syncs() as sites:
        pairwise_generalized_box_iou(XYXY, XYXY)  # validate=True reads the boxes on the host
        bool(torch.ones(2).all())  # this test file is not the package
        torch.ones(3)[torch.tensor([True, False, True])]  # neither is this
    assert [s.call for s in sites] == ["Tensor.__bool__", "Tensor.__bool__"]
    assert {(s.file, s.function) for s in sites} == {("box_ops.py", "check_corners")}
    assert dict(torch.Tensor.__dict__) == before and torch.nonzero(torch.tensor([0, 1])).tolist() == [[1]]


def test_public_functions_validate_by_default_and_skip_the_host_with_validate_false() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 5, 3, generator=generator)
    boxes = torch.rand(1, 5, 4, generator=generator) * 0.3 + 0.2
    features = torch.randn(1, 5, 8, generator=generator, requires_grad=True)

    def run(validate: bool) -> None:
        pad_targets(LABELS, validate=validate)
        pairwise_generalized_box_iou(XYXY, XYXY, validate=validate)
        elementwise_generalized_box_iou(XYXY, XYXY, validate=validate)
        compute_drd(boxes, boxes, features, features.detach(), LABELS, tau=0.0, validate=validate)
        kd_detr_set_loss(logits, boxes, logits, boxes, torch.ones(1, 5), validate=validate)
        local_alignment_prediction_loss(logits, boxes, logits, boxes, torch.arange(5)[None] - 1, validate=validate)
        # GQS's only remaining host step is transformers' matcher (not counted).
        group_query_selection(logits, boxes, LABELS, validate=validate)

    with record_host_syncs() as checked:
        run(validate=True)
    assert {s.function for s in checked} == {
        "check_corners",
        "pad_targets",
        "kd_detr_set_loss",
        "local_alignment_prediction_loss",
        "group_query_selection",
    }
    with record_host_syncs() as unchecked:
        run(validate=False)
    assert unchecked == [], "\n".join(map(str, unchecked))


# ---------------------------------------------------------------------------------------------------------------------
# A training step with each distiller.
# ---------------------------------------------------------------------------------------------------------------------
DISTILLERS = {
    "drd": lambda: DRDDistiller(tau=0.3),
    "qskd": lambda: QSKDDistiller(tau=0.0),
    "kd_detr": lambda: KDDETRDistiller(),
    "ida": lambda: IDaDetDistiller(tau=0.3),
    "ida_hungarian": lambda: IDaDetDistiller(pairing="hungarian"),
    "memory": lambda: EncoderMemoryDistiller(),
}


@pytest.mark.parametrize("method", list(DISTILLERS))
def test_a_training_step_makes_no_host_synchronisation(method, tmp_path, tiny_teacher_dir, tiny_shapes) -> None:
    dataset, collator = tiny_shapes
    trainer = QDetrDistillationTrainer(
        model=QDetrForObjectDetection.from_pretrained(tiny_teacher_dir),
        args=tiny_training_args(
            tmp_path / "out", max_steps=3, logging_steps=1000, per_device_train_batch_size=2, calibration_batches=1
        ),
        teacher_model=load_teacher(tiny_teacher_dir),
        distiller=DISTILLERS[method](),
        train_dataset=dataset,
        data_collator=collator,
    )
    per_step: list[list[Site]] = []
    training_step = trainer.training_step

    def recorded_step(*args, **kwargs):
        with record_host_syncs() as sites:
            loss = training_step(*args, **kwargs)
        per_step.append(sites)
        return loss

    trainer.training_step = recorded_step
    trainer.train()
    assert len(per_step) == 3
    # The first step after calibration reads each activation quantizer's calibrated buffers once and caches its integer
    # range for the rest of the model's life (LSQActivationQuantizer._calibrated_range); later steps read nothing.
    assert {(s.file, s.function) for s in per_step[0]} <= {
        ("quantizers.py", "_calibrated_range"),
        ("quantizers.py", "range"),
    }
    for step, sites in enumerate(per_step[1:], start=2):
        assert sites == [], f"step {step} with {method}:\n" + "\n".join(map(str, sites))
