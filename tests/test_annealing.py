"""Bit-width annealing: in-place width changes of the quantizers, the schedule, and the Trainer callback."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn
from transformers import TrainerControl, TrainerState, get_scheduler

from qdetr_hf import BitWidthAnnealing
from qdetr_hf.annealing import annealed_level
from qdetr_hf.quantization import LSQActivationQuantizer, LSQWeightQuantizer, QuantLinear


def test_an_activation_quantizer_keeps_its_span_across_widths():
    unsigned = LSQActivationQuantizer(3)
    unsigned.set_from_statistics(mean_abs=1.0, minimum=0.0, maximum=7.0)  # unsigned 3-bit range [0, 7]
    with torch.no_grad():
        unsigned.raw_step.fill_(0.5)
        unsigned.offset.fill_(0.25)
    parameter = unsigned.raw_step
    unsigned.forward(torch.zeros(1))  # fill the cached range of the 3-bit quantizer
    unsigned.set_bits(4)
    assert unsigned.raw_step is parameter and unsigned.bits == 4
    torch.testing.assert_close(unsigned.step, torch.tensor(0.5 * 7 / 15))
    # Lowest and highest levels stay at 0.25 and 0.25 + 3.5; the 16 levels in between are all reached.
    ramp = torch.linspace(-1.0, 5.0, 2001)
    out = unsigned(ramp)
    torch.testing.assert_close(out.min(), torch.tensor(0.25))
    torch.testing.assert_close(out.max(), torch.tensor(3.75))
    assert out.unique().numel() == 16

    signed = LSQActivationQuantizer(4)
    signed.set_from_statistics(mean_abs=1.0, minimum=-1.0, maximum=1.0)
    with torch.no_grad():
        signed.raw_step.fill_(0.3)
    signed.set_bits(2)  # levels -8..7 x 0.3 (span 4.5) -> -2..1 x 1.5 (span 4.5)
    torch.testing.assert_close(signed.step, torch.tensor(1.5))
    assert signed(torch.linspace(-9.0, 9.0, 101)).unique().tolist() == pytest.approx([-3.0, -1.5, 0.0, 1.5])
    with pytest.raises(ValueError, match="bits"):
        signed.set_bits(9)


def test_a_weight_quantizer_changes_width_in_place():
    quantizer = LSQWeightQuantizer(2, 4)
    parameter = quantizer.raw_step
    quantizer.set_bits(2)
    assert (quantizer.bits, quantizer.qn, quantizer.qp) == (2, -2, 1) and quantizer.raw_step is parameter
    codes = quantizer.codes(torch.tensor([[-9.0, 9.0], [0.4, -0.6]]))
    assert codes.tolist() == [[-2, 1], [0, -1]]


def test_the_level_falls_one_bit_at_evenly_spaced_steps():
    levels = [annealed_level(8, 3, step, 500) for step in (0, 99, 100, 250, 499, 500, 10_000)]
    assert levels == [8, 8, 7, 6, 4, 3, 3]
    assert [annealed_level(4, 3, step, 400) for step in (0, 399, 400)] == [4, 4, 3]
    assert annealed_level(4, 4, 0, 400) == 4  # nothing to anneal


def _student() -> nn.Module:
    model = nn.Module()
    model.low = QuantLinear(4, 3, weight_bits=2, activation_bits=3, weight_init="mse")
    model.wide = QuantLinear(4, 3, weight_bits=8, activation_bits=8)  # an 8-bit layer (first conv, heads)
    for layer in (model.low, model.wide):
        layer.input_quantizer.set_from_statistics(mean_abs=1.0, minimum=0.0, maximum=4.0)
        layer.weight_quantizer.initialize_from(layer.weight)
    return model


def _widths(model: nn.Module) -> tuple[int, int, int, int]:
    return (
        model.low.weight_quantizer.bits,
        model.low.input_quantizer.bits,
        model.wide.weight_quantizer.bits,
        model.wide.input_quantizer.bits,
    )


def _end_step(callback, state, optimizer, scheduler=None, save=False):
    control = TrainerControl(should_save=save, should_evaluate=save)
    callback.on_step_end(None, state, control, optimizer=optimizer, lr_scheduler=scheduler)
    return control


def test_the_callback_anneals_to_the_model_widths_and_holds_back_checkpoints():
    model = _student()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.rand(2, 4)
    (model.low(x) + model.wide(x)).sum().backward()
    optimizer.step()  # every parameter now has Adam moments
    callback = BitWidthAnnealing(model, start_bits=4, fraction=0.5)
    assert callback.end_bits == 2
    state = TrainerState(max_steps=8, global_step=0)
    calibrated = model.low.input_quantizer.step.detach().clone()
    callback.on_train_begin(None, state, TrainerControl(), optimizer=optimizer)
    assert _widths(model) == (4, 4, 8, 8)  # the 8-bit layer keeps its width
    # The 4-bit weight step is the mse rule's at 4 bits; the input step keeps the span of the 3-bit levels.
    torch.testing.assert_close(
        model.low.weight_quantizer.raw_step, model.low.weight_quantizer.mse_init(model.low.weight)
    )
    torch.testing.assert_close(model.low.input_quantizer.step, calibrated * 7 / 15)
    assert model.low.weight_quantizer.raw_step not in optimizer.state  # moments of a changed step are forgotten
    assert model.low.weight in optimizer.state and model.wide.weight_quantizer.raw_step in optimizer.state

    # Anneal over 4 of the 8 steps, from 4 to 2 bits: 3 bits after 2 steps, 2 bits after 4.
    seen = []
    for step in range(1, 9):
        state.global_step = step
        control = _end_step(callback, state, optimizer, save=True)
        seen.append((_widths(model)[:2], control.should_save, control.should_evaluate))
    assert seen[:5] == [
        ((4, 4), False, False),
        ((3, 3), False, False),
        ((3, 3), False, False),
        ((2, 3), True, True),  # the input keeps its own 3 bits; the weights reach 2 and checkpoints resume
        ((2, 3), True, True),
    ]
    assert callback.finished and _widths(model) == (2, 3, 8, 8)
    torch.testing.assert_close(model.low.input_quantizer.step, calibrated)  # back at 3 bits, same span


def test_the_anneal_follows_a_refitted_schedule_and_a_short_run_ends_at_the_model_widths():
    model = _student()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=0, num_training_steps=100)
    callback = BitWidthAnnealing(model, start_bits=4, fraction=0.5)
    state = TrainerState(max_steps=100, global_step=0)
    callback.on_train_begin(None, state, TrainerControl(), optimizer=optimizer, lr_scheduler=scheduler)
    assert callback.anneal_steps(state, scheduler) == 50
    # A time limit refits the schedule to 20 steps: the anneal now ends after 10.
    scheduler.lr_lambdas = [
        functools.partial(f.func, **{**f.keywords, "num_training_steps": 20}) for f in scheduler.lr_lambdas
    ]
    state.global_step = 5
    _end_step(callback, state, optimizer, scheduler)
    assert _widths(model)[:2] == (3, 3)
    state.global_step = 6  # training stops here, before the anneal's end
    _end_step(callback, state, optimizer, scheduler)
    callback.on_train_end(None, state, TrainerControl(), optimizer=optimizer)
    assert _widths(model) == (2, 3, 8, 8) and callback.finished


def test_a_resumed_run_is_not_annealed_again():
    model = _student()
    callback = BitWidthAnnealing(model, start_bits=4)
    callback.on_train_begin(None, TrainerState(max_steps=100, global_step=40), TrainerControl())
    assert callback.finished and _widths(model) == (2, 3, 8, 8)


def test_bad_annealing_settings_are_refused():
    model = _student()
    with pytest.raises(ValueError, match="Nothing to anneal from 2 bits"):
        BitWidthAnnealing(model, start_bits=2)
    with pytest.raises(ValueError, match="fraction"):
        BitWidthAnnealing(model, start_bits=4, fraction=1.0)
    with pytest.raises(ValueError, match="bits"):
        BitWidthAnnealing(model, start_bits=9)
