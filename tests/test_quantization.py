"""LSQ/LSQ+ quantizers, quantized layers, Distribution Alignment and calibration."""

from __future__ import annotations

import math
import os
import warnings

import pytest
import torch
import torch.multiprocessing as mp
from conftest import free_port
from torch import nn
from transformers.models.detr.modeling_detr import eager_attention_forward

from qdetr_hf import (
    DistributionAlignment,
    LSQActivationQuantizer,
    LSQWeightQuantizer,
    QuantAttention,
    QuantConv2d,
    QuantLinear,
    calibrate,
    is_calibrated,
    lsq_fake_quantize,
    quant_layers,
    quantization,
    quantization_disabled,
)
from qdetr_hf import quantizers as quantizers_module
from qdetr_hf.quantization import MSE_SAMPLES_PER_BATCH, MSE_STEP_MULTIPLIERS, STEP_EPS, quant_range


def test_quant_range():
    assert quant_range(4, signed=True) == (-8, 7)
    assert quant_range(4, signed=False) == (0, 15)
    assert quant_range(2, signed=True) == (-2, 1)
    assert quant_range(8, signed=False) == (0, 255)


@pytest.mark.parametrize("bits", [0, 1, 9, 16, 3.5, True, "4"])
def test_bad_bit_width_is_rejected(bits):
    with pytest.raises(ValueError, match="between 2 and 8"):
        LSQWeightQuantizer(4, bits)
    with pytest.raises(ValueError, match="between 2 and 8"):
        LSQActivationQuantizer(bits)


def test_weight_quantizer_forward_and_step_gradient_match_lsq_formulas():
    # 3-bit signed: Qn = -4, Qp = 3. One step per output channel (row).
    quantizer = LSQWeightQuantizer(2, bits=3, weight_ndim=2)
    with torch.no_grad():
        quantizer.raw_step.copy_(torch.tensor([[0.1], [0.25]]))
    weight = torch.tensor([[0.28, -0.12, 0.06, -0.70], [1.0, 0.2, -0.4, 0.9]], requires_grad=True)
    out = quantizer(weight)
    # Row 0: w/s = [2.8, -1.2, 0.6, -7] -> clip/round [3, -1, 1, -4] -> x 0.1.
    # Row 1: w/s = [4, 0.8, -1.6, 3.6] -> clip/round [3, 1, -2, 3] -> x 0.25.
    expected = torch.tensor([[0.3, -0.1, 0.1, -0.4], [0.75, 0.25, -0.5, 0.75]])
    torch.testing.assert_close(out, expected)

    out.sum().backward()
    # d/ds: round(v) - v inside, Qn below, Qp above; scaled by 1/sqrt(N * Qp) with N = 4 weights *per channel*.
    # Row 0: 0.2 + 0.2 + 0.4 + (-4) = -3.2; row 1: 3 + 0.2 + (-0.4) + 3 = 5.8.
    g = 1.0 / math.sqrt(4 * 3)
    torch.testing.assert_close(quantizer.raw_step.grad, torch.tensor([[-3.2 * g], [5.8 * g]]))
    # Straight-through estimator: gradient 1 inside the clipping range, 0 outside.
    torch.testing.assert_close(weight.grad, torch.tensor([[1.0, 1.0, 1.0, 0.0], [0.0, 1.0, 1.0, 0.0]]))


def test_weight_quantizer_lsq_init_is_per_channel():
    quantizer = LSQWeightQuantizer(2, bits=4, weight_ndim=4)
    weight = torch.tensor([1.0, -3.0, 2.0, 2.0]).reshape(1, 4, 1, 1).repeat(2, 1, 1, 1)
    weight[1] *= 10
    quantizer.initialize_from(weight)
    # 2 * mean|w| / sqrt(Qp = 7): mean|w| = 2 for channel 0 and 20 for channel 1.
    expected = torch.tensor([4 / math.sqrt(7), 40 / math.sqrt(7)]).reshape(2, 1, 1, 1)
    torch.testing.assert_close(quantizer.step, expected)


def _calibrated(quantizer: LSQActivationQuantizer, minimum: float, step: float, offset: float):
    quantizer.set_from_statistics(mean_abs=1.0, minimum=minimum, maximum=10.0)
    with torch.no_grad():
        quantizer.raw_step.fill_(step)
        quantizer.offset.fill_(offset)
    return quantizer


def test_activation_quantizer_lsq_plus_forward_and_gradients():
    # Unsigned 2-bit (calibration saw min >= 0): Qn = 0, Qp = 3; s = 0.5, z = 0.1.
    quantizer = _calibrated(LSQActivationQuantizer(2, learn_offset=True), minimum=0.0, step=0.5, offset=0.1)
    assert not bool(quantizer.signed)
    x = torch.tensor([[-0.3, 0.2, 0.45, 1.0, 2.5]], requires_grad=True)  # one sample of N = 5 features
    out = quantizer(x)
    # v = (x - z) / s = [-0.8, 0.2, 0.7, 1.8, 4.8] -> clip/round [0, 0, 1, 2, 3] -> s * q + z.
    torch.testing.assert_close(out, torch.tensor([[0.1, 0.1, 0.6, 1.1, 1.6]]))
    out.sum().backward()
    g = 1.0 / math.sqrt(5 * 3)
    # d/ds: [Qn=0, -0.2, 0.3, 0.2, Qp=3] -> 3.3; d/dz: 1 outside the range (2 elements), 0 inside.
    torch.testing.assert_close(quantizer.raw_step.grad, torch.tensor(3.3 * g))
    torch.testing.assert_close(quantizer.offset.grad, torch.tensor(2 * g))
    torch.testing.assert_close(x.grad, torch.tensor([[0.0, 1.0, 1.0, 1.0, 0.0]]))


def test_integer_zero_point_forward_is_onnx_arithmetic_and_gradients_are_lsq_plus():
    # Unsigned 2-bit, s = 0.5, z = 0.3: the offset counts k = round(0.6) = 1 whole step.
    quantizer = LSQActivationQuantizer(2, learn_offset=True, integer_offset=True)
    quantizer = _calibrated(quantizer, minimum=0.0, step=0.5, offset=0.3)
    x = torch.tensor([[-0.3, 0.2, 0.45, 1.0, 2.5, 3.0]], requires_grad=True)
    out = quantizer(x)
    # round(x / s) = [-1, 0, 1, 2, 5, 6]; minus k and clamped to [0, 3]: [0, 0, 0, 1, 3, 3]; s * (q + k):
    torch.testing.assert_close(out, torch.tensor([[0.5, 0.5, 0.5, 1.0, 2.0, 2.0]]))
    with torch.no_grad():  # the inference path computes the same numbers
        torch.testing.assert_close(quantizer(x), out)
    out.sum().backward()
    g = 1.0 / math.sqrt(6 * 3)
    # v = x / s - k = [-1.6, -0.6, -0.1, 1.0, 4.0, 5.0]; inside (levels 0 and 1 reached without clamping): q - v =
    # 0.1 and 0; outside: q = 0, 0, 3, 3 -> d/ds = 6.1; d/dz = 1 for the 4 clamped elements.
    torch.testing.assert_close(quantizer.raw_step.grad, torch.tensor(6.1 * g))
    torch.testing.assert_close(quantizer.offset.grad, torch.tensor(4 * g))
    torch.testing.assert_close(x.grad, torch.tensor([[0.0, 0.0, 1.0, 1.0, 0.0, 0.0]]))


def test_integer_zero_point_shift_stays_inside_the_uint8_container():
    # An unsigned 8-bit grid cannot start above zero with a uint8 zero point: k is limited to <= 0.
    quantizer = _calibrated(LSQActivationQuantizer(8, integer_offset=True), minimum=0.0, step=0.1, offset=0.55)
    torch.testing.assert_close(quantizer(torch.tensor([[0.0, 0.26, 30.0]])), torch.tensor([[0.0, 0.3, 25.5]]))


def test_activation_quantizer_signed_range_and_per_sample_gradient_scale():
    # Signed 3-bit: Qn = -4, Qp = 3; batch of 2 samples with 3 features each -> N = 3 (per sample, not 6).
    quantizer = _calibrated(LSQActivationQuantizer(3, learn_offset=False), minimum=-1.0, step=1.0, offset=0.0)
    x = torch.tensor([[-5.0, -1.4, 0.3], [2.6, 3.2, 9.0]], requires_grad=True)
    out = quantizer(x)
    torch.testing.assert_close(out, torch.tensor([[-4.0, -1.0, 0.0], [3.0, 3.0, 3.0]]))
    out.sum().backward()
    # local: [-4 (below), 0.4, -0.3, 0.4, 3 (above, 3.2 > Qp), 3 (above)] -> 2.5
    torch.testing.assert_close(quantizer.raw_step.grad, torch.tensor(2.5 / math.sqrt(3 * 3)))
    assert quantizer.offset.grad is None  # plain LSQ: the offset does not train


def test_uncalibrated_activation_quantizer_raises():
    layer = QuantLinear(4, 3)
    with pytest.raises(RuntimeError, match="not calibrated"):
        layer(torch.randn(2, 4))


def test_fake_quant_runs_in_float32_under_autocast():
    quantizer = _calibrated(LSQActivationQuantizer(8), minimum=-1.0, step=0.0123, offset=0.0371)
    x = torch.randn(4, 64) * 2
    reference = quantizer(x.bfloat16().float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = quantizer(x.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, reference.bfloat16(), rtol=0, atol=0)
    # Computing the same thing in bfloat16 arithmetic gives different levels: the test above would notice.
    v = ((x.bfloat16() - 0.0371) / 0.0123).clamp(-128, 127).round() * 0.0123 + 0.0371
    assert not torch.equal(v.bfloat16(), reference.bfloat16())


def test_gradients_reach_weights_steps_and_offsets():
    layer = QuantLinear(6, 5, weight_bits=3, activation_bits=3)
    x = torch.randn(8, 6)
    # A bare QuantLinear takes no pixel_values, so its quantizers are initialised directly.
    layer.weight_quantizer.initialize_from(layer.weight)
    layer.input_quantizer.set_from_statistics(x.abs().mean().item(), x.min().item(), x.max().item())
    layer(x).pow(2).sum().backward()
    for name, tensor in [
        ("weight", layer.weight),
        ("bias", layer.bias),
        ("weight step", layer.weight_quantizer.raw_step),
        ("input step", layer.input_quantizer.raw_step),
        ("input offset", layer.input_quantizer.offset),
    ]:
        assert tensor.grad is not None and tensor.grad.abs().sum() > 0, name


def test_steps_driven_through_zero_keep_the_layer_finite_and_quantize_by_their_magnitude():
    layer = QuantConv2d(3, 4, 3, weight_bits=2, activation_bits=2)
    x = torch.randn(2, 3, 8, 8)
    layer.weight_quantizer.initialize_from(layer.weight)
    layer.input_quantizer.set_from_statistics(x.abs().mean().item(), x.min().item(), x.max().item())
    optimizer = torch.optim.SGD(layer.parameters(), lr=5.0)
    raw_signs: set[float] = set()
    for _ in range(200):
        optimizer.zero_grad()
        # Pushes every step towards (and past) zero.
        loss = 100 * (layer.weight_quantizer.step.sum() + layer.input_quantizer.step) + layer(x).abs().mean()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in layer.parameters() if p.grad is not None)
        optimizer.step()
        raw_signs.update(torch.sign(layer.weight_quantizer.raw_step.detach()).flatten().tolist())
        raw_signs.add(torch.sign(layer.input_quantizer.raw_step.detach()).item())
        assert torch.isfinite(layer(x)).all()
    assert -1.0 in raw_signs  # the stored steps really were driven past zero
    # A negative stored step quantizes exactly like its magnitude, and a zero one like the STEP_EPS floor: no 0 / 0
    # on the exact zeros of a post-ReLU input.
    fresh = QuantConv2d(3, 4, 3, weight_bits=2, activation_bits=2, learn_offset=False)
    relu_x = torch.relu(x)
    fresh.weight_quantizer.initialize_from(fresh.weight)
    fresh.input_quantizer.set_from_statistics(relu_x.abs().mean().item(), 0.0, relu_x.max().item())
    with torch.no_grad():
        reference = fresh(relu_x)
        fresh.weight_quantizer.raw_step.neg_()
        fresh.input_quantizer.raw_step.neg_()
        assert torch.equal(fresh(relu_x), reference)
        fresh.input_quantizer.raw_step.zero_()
        at_zero = fresh(relu_x)
        fresh.input_quantizer.raw_step.fill_(STEP_EPS)
        assert torch.isfinite(at_zero).all() and torch.equal(at_zero, fresh(relu_x))


def test_quant_layers_share_parameters_with_the_float_layer():
    linear = nn.Linear(4, 3)
    quantized = QuantLinear.from_float(linear, weight_bits=4, activation_bits=4)
    assert quantized.weight is linear.weight and quantized.bias is linear.bias
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=1, bias=False)
    qconv = QuantConv2d.from_float(conv, weight_bits=4, activation_bits=4)
    assert qconv.weight is conv.weight and qconv.bias is None and qconv.stride == (2, 2)
    x = torch.randn(2, 3, 8, 8)
    with quantization_disabled(qconv):
        torch.testing.assert_close(qconv(x), conv(x))


def test_from_float_keeps_geometry_device_dtype_and_the_hf_init_mark():
    conv = nn.Conv2d(4, 6, (3, 1), stride=(2, 1), padding=(1, 0), dilation=1, groups=2, padding_mode="reflect")
    conv._is_hf_initialized = True
    qconv = QuantConv2d.from_float(conv.double(), weight_bits=3, activation_bits=5, name="c")
    assert (qconv.kernel_size, qconv.stride, qconv.padding, qconv.groups, qconv.padding_mode) == (
        (3, 1),
        (2, 1),
        (1, 0),
        2,
        "reflect",
    )
    assert qconv.weight is conv.weight and qconv.bias is conv.bias and qconv._is_hf_initialized
    assert qconv.weight.dtype == torch.float64 and qconv.weight_quantizer.bits == 3
    assert qconv.input_quantizer.bits == 5 and qconv.input_quantizer.name == "c"
    linear = QuantLinear.from_float(nn.Linear(5, 2, bias=False), integer_offset=True)
    assert linear.bias is None and linear.input_quantizer.integer_offset
    assert not getattr(linear, "_is_hf_initialized", False)


def test_bit_checks_and_init_names_are_the_configs():
    from qdetr_hf import configuration_qdetr

    # One implementation, in the torch-free configuration module.
    assert quantizers_module.check_bits is configuration_qdetr.check_bits
    assert quantizers_module.OFFSET_INITS is configuration_qdetr.OFFSET_INITS
    assert quantizers_module.WEIGHT_STEP_INITS is configuration_qdetr.WEIGHT_STEP_INITS
    assert quant_layers.ALIGNMENT_INITS is configuration_qdetr.ALIGNMENT_INITS
    assert quant_layers.SOFTMAX_INITS is configuration_qdetr.SOFTMAX_INITS
    assert configuration_qdetr.check_bits(8, "x") == 8
    with pytest.raises(ValueError, match=r"QDetrConfig\.weight_bits must be an integer between 2 and 8, got 9\."):
        configuration_qdetr.QDetrConfig(weight_bits=9)
    with pytest.raises(ValueError, match="softmax_init must be one of"):
        QuantAttention(8, 4, softmax_init="minmax")


def test_lsq_per_channel_matches_pytorch_learnable_fake_quantize():
    """The symmetric per-channel case against ``torch._fake_quantize_learnable_per_channel_affine``.

    PyTorch scales the step gradient by its ``grad_factor`` argument: passing LSQ's ``1 / sqrt(N * Qp)`` makes the
    two agree. The definitions differ only for ``x / s`` in ``(Qp, Qp + 0.5)`` or ``(Qn - 0.5, Qn)``: PyTorch tests the
    range on the rounded value (inside, ``round(v) - v``), LSQ on the unrounded one (outside, ``Qp`` / ``Qn``).
    """
    bits, channels, per_channel = 4, 4, 50
    qn, qp = quant_range(bits, signed=True)
    steps = torch.tensor([0.5, 0.25, 0.125, 0.0625])  # powers of two: x / s is exact in both implementations
    generator = torch.Generator().manual_seed(0)
    v = (torch.rand(channels, per_channel, generator=generator) * 2 - 1) * (qp + 3)  # some values clip
    agree = ~(((v > qp) & (v < qp + 0.5)) | ((v < qn) & (v > qn - 0.5)))
    grad = torch.randn(channels, per_channel, generator=generator)
    grad_factor = 1.0 / math.sqrt(per_channel * qp)

    def ours(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        quantizer = LSQWeightQuantizer(channels, bits, weight_ndim=2)
        with torch.no_grad():
            quantizer.raw_step.copy_(steps[:, None])
        weight = weight.clone().requires_grad_(True)
        out = quantizer(weight)
        out.backward(grad)
        return out.detach(), weight.grad, quantizer.raw_step.grad.reshape(-1)

    def pytorch(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        weight = weight.clone().requires_grad_(True)
        scale = steps.clone().requires_grad_(True)
        out = torch._fake_quantize_learnable_per_channel_affine(
            weight, scale, torch.zeros(channels), 0, qn, qp, grad_factor
        )
        out.backward(grad)
        return out.detach(), weight.grad, scale.grad

    weight = v * steps[:, None]
    (out, grad_x, _), (ref_out, ref_grad_x, _) = ours(weight), pytorch(weight)
    assert not agree.all()  # the case where the definitions differ is present ...
    assert torch.equal(out, ref_out)  # ... and changes no forward value
    assert torch.equal(grad_x[agree], ref_grad_x[agree])
    assert not torch.equal(grad_x, ref_grad_x)

    # Without values in the two bands every element agrees, so the per-channel step gradients do too.
    v_out = torch.where(v > qp, v + 0.5, torch.where(v < qn, v - 0.5, v))
    weight = v_out * steps[:, None]
    (out, grad_x, grad_s), (ref_out, ref_grad_x, ref_grad_s) = ours(weight), pytorch(weight)
    assert torch.equal(out, ref_out) and torch.equal(grad_x, ref_grad_x)
    torch.testing.assert_close(grad_s, ref_grad_s, rtol=1e-5, atol=1e-6)
    assert (grad_x == 0).any() and (grad_x != 0).any()  # both clipped and passed-through values were compared


class _ReluNet(nn.Module):
    """A minimal model taking ``pixel_values``, as calibrate() expects."""

    def __init__(self, offset_init: str = "zero") -> None:
        super().__init__()
        self.first = QuantLinear(4, 8, weight_bits=4, activation_bits=4, offset_init=offset_init, name="first")
        self.second = QuantLinear(8, 2, weight_bits=4, activation_bits=4, offset_init=offset_init, name="second")

    def forward(self, pixel_values: torch.Tensor, pixel_mask=None) -> torch.Tensor:
        return self.second(torch.relu(self.first(pixel_values)))


def test_calibration_sets_sign_steps_and_persists():
    torch.manual_seed(0)
    net = _ReluNet()
    for q in (net.first, net.second):
        q.weight_quantizer.initialize_from(q.weight)
    batches = [torch.randn(5, 4), torch.randn(3, 4) * 3]
    assert not is_calibrated(net)
    calibrate(net, batches)
    assert is_calibrated(net)

    inputs = torch.cat(batches)
    # Calibration runs real-valued: the second layer's statistics come from the unquantized first layer.
    hidden = torch.relu(nn.functional.linear(inputs, net.first.weight, net.first.bias))
    # First layer sees signed data: Qp = 7; second sees ReLU output: unsigned, Qp = 15.
    assert bool(net.first.input_quantizer.signed) and not bool(net.second.input_quantizer.signed)
    torch.testing.assert_close(net.first.input_quantizer.step, 2 * inputs.abs().mean() / math.sqrt(7))
    torch.testing.assert_close(net.second.input_quantizer.step, 2 * hidden.abs().mean() / math.sqrt(15))

    reloaded = _ReluNet()
    reloaded.load_state_dict(net.state_dict())
    assert is_calibrated(reloaded)
    torch.testing.assert_close(reloaded(inputs), net(inputs))


def test_calibration_rejects_empty_input():
    with pytest.raises(ValueError, match="no batches"):
        calibrate(_ReluNet(), [])


def _calibration_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "input_quantizer" in k or "alignment" in k}


def test_calibration_rejects_non_finite_statistics_and_marks_nothing_calibrated():
    torch.manual_seed(0)
    data = torch.randn(6, 4)
    nan_pixel = data.clone()
    nan_pixel[2, 1] = float("nan")
    net = _ReluNet()
    before = _calibration_state(net)
    with pytest.raises(ValueError, match=r"non-finite.*'first'.*'second'.*nothing was calibrated"):
        calibrate(net, [data, nan_pixel])
    assert not any(bool(q.input_quantizer.calibrated) for q in (net.first, net.second))
    for key, value in _calibration_state(net).items():
        assert torch.equal(value, before[key]), key
    # A calibrated model keeps its calibration when a re-calibration fails; an inf with the min/max init (which
    # would give an infinite step) is refused the same way.
    calibrate(net, [data])
    calibrated = _calibration_state(net)
    infinite = data.clone()
    infinite[0, 0] = float("inf")
    with pytest.raises(ValueError, match="'first'"):
        calibrate(net, [infinite])
    for key, value in _calibration_state(net).items():
        assert torch.equal(value, calibrated[key]), key
    minmax = _ReluNet("minmax")
    with pytest.raises(ValueError, match="non-finite"):
        calibrate(minmax, [infinite])
    assert not is_calibrated(minmax)
    # A fitted Distribution Alignment is not marked calibrated by the failed call either.
    alignment = DistributionAlignment(head_dim=4, init="fit")
    with pytest.raises(ValueError, match="non-finite"):
        calibrate(_AlignOnly(alignment), [nan_pixel.reshape(1, 1, 6, 4)])
    assert not bool(alignment.calibrated)


def test_calibration_of_a_detector_names_the_stem_for_a_nan_pixel(tiny_teacher_dir):
    from qdetr_hf import QDetrForObjectDetection

    model = QDetrForObjectDetection.from_pretrained(tiny_teacher_dir)
    images = torch.randn(2, 3, 64, 64)
    images[1, 0, 10, 20] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite.*'model\.backbone\.model\.conv1\.0'.*hold 1 NaN/inf values"):
        calibrate(model, [images])
    assert not any(bool(q.calibrated) for q in quantization.activation_quantizers(model))


def test_calibration_warns_about_degenerate_statistics(recwarn):
    torch.manual_seed(0)
    net = _ReluNet()
    with torch.no_grad():
        net.first.bias.copy_(torch.linspace(-1.0, 1.0, 8))
    # All-zero inputs: the first layer sees a constant (its step falls to the floor); the second layer's input is
    # relu(bias), which still varies across features.
    with pytest.warns(UserWarning, match=r"degenerate.*'first' \(constant input 0\)") as caught:
        calibrate(net, [torch.zeros(3, 4)])
    messages = [str(w.message) for w in caught if "degenerate" in str(w.message)]
    assert len(messages) == 1 and "'second'" not in messages[0]
    assert is_calibrated(net)  # a warning, not an error: the model can still be used
    # Healthy data: no warning.
    recwarn.clear()
    calibrate(_ReluNet(), [torch.randn(5, 4)])
    assert not [w for w in recwarn if "degenerate" in str(w.message)]


def test_calibration_of_a_detector_on_blank_images_warns_about_the_stem(tiny_teacher_dir):
    from qdetr_hf import QDetrForObjectDetection

    model = QDetrForObjectDetection.from_pretrained(tiny_teacher_dir)
    with pytest.warns(UserWarning, match=r"degenerate.*'model\.backbone\.model\.conv1\.0' \(constant input"):
        calibrate(model, [torch.zeros(2, 3, 64, 64)])
    # Varied images: no warning, although the first decoder layer's value projection only ever sees zeros (DETR's
    # decoder starts from zero queries): an exact zero input is the model's structure, and is quantized exactly.
    model = QDetrForObjectDetection.from_pretrained(tiny_teacher_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        calibrate(model, [torch.randn(2, 3, 64, 64)])
    v_proj = model.model.decoder.layers[0].self_attn.v_proj.input_quantizer
    assert v_proj.step.item() == pytest.approx(STEP_EPS) and torch.equal(v_proj(torch.zeros(3)), torch.zeros(3))


def _calibrate_rank(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(0)
        net = _ReluNet()
        # Each rank sees different data, as DDP ranks with their own shards would.
        data = torch.randn(6, 4, generator=torch.Generator().manual_seed(100 + rank)) * (1 + rank)
        calibrate(net, [data])
        torch.save({k: v for k, v in net.state_dict().items() if "input_quantizer" in k}, f"{out_dir}/rank{rank}.pt")
        torch.manual_seed(0)
        searched = _ReluNet("mse")
        calibrate(searched, [data])
        steps = {k: v for k, v in searched.state_dict().items() if "input_quantizer" in k}
        torch.save(steps, f"{out_dir}/mse_rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_distributed_calibration_gives_identical_steps_on_every_rank(tmp_path):
    mp.spawn(_calibrate_rank, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    rank0 = torch.load(tmp_path / "rank0.pt")
    rank1 = torch.load(tmp_path / "rank1.pt")
    assert rank0.keys() == rank1.keys()
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    # And they equal a single-process calibration on the union of both ranks' data.
    torch.manual_seed(0)
    net = _ReluNet()
    union = [torch.randn(6, 4, generator=torch.Generator().manual_seed(100 + r)) * (1 + r) for r in range(2)]
    calibrate(net, union)
    for key, value in net.state_dict().items():
        if "input_quantizer" in key:
            torch.testing.assert_close(rank0[key], value)
    # The "mse" step search reduces its errors across ranks too: same steps everywhere, as on the union.
    mse0, mse1 = torch.load(tmp_path / "mse_rank0.pt"), torch.load(tmp_path / "mse_rank1.pt")
    torch.manual_seed(0)
    searched = _ReluNet("mse")
    calibrate(searched, union)
    for key, value in searched.state_dict().items():
        if "input_quantizer" in key:
            assert torch.equal(mse0[key], mse1[key]), key
            torch.testing.assert_close(mse0[key], value)
    # Rank 1's data alone would give a different step, so the statistics really were reduced.
    alone = _ReluNet()
    calibrate(alone, union[1:])
    assert not torch.allclose(alone.first.input_quantizer.step, rank0["first.input_quantizer.raw_step"])


def test_distribution_alignment_standardises_queries_before_its_affine():
    da = DistributionAlignment(head_dim=8)
    query = torch.randn(2, 3, 5, 8) * 4 + 2.5  # (batch, heads, tokens, head_dim)
    out = da(query)
    torch.testing.assert_close(out.mean(-1), torch.zeros(2, 3, 5), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.var(-1, unbiased=False), torch.ones(2, 3, 5), atol=1e-3, rtol=0)
    with torch.no_grad():
        da.weight.fill_(2.0)
        da.bias.copy_(torch.arange(8.0))
    torch.testing.assert_close(da(query), 2.0 * out + torch.arange(8.0))


class _AlignOnly(nn.Module):
    def __init__(self, alignment: DistributionAlignment) -> None:
        super().__init__()
        self.alignment = alignment

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.alignment(pixel_values)


def test_fitted_distribution_alignment_recovers_a_known_affine():
    # Tokens u_t standardised over head_dim, then q = 3 u + 1.5: the standardised form of q is u, so the
    # least-squares fit must find gamma = 3 and beta = 1.5 in every dimension and reproduce q exactly.
    u = torch.nn.functional.layer_norm(torch.randn(4, 2, 50, 8), (8,), eps=0.0)
    query = 3.0 * u + 1.5
    da = DistributionAlignment(head_dim=8, eps=1e-12, init="fit")
    assert not bool(da.calibrated) and not is_calibrated(_AlignOnly(da))
    # Calibration batches pass through unchanged: the q quantizer after DA is calibrated on the real-valued query.
    calibrate(_AlignOnly(da), [query[:2], query[2:]])
    assert bool(da.calibrated)
    torch.testing.assert_close(da.weight.detach(), torch.full((8,), 3.0), atol=1e-4, rtol=0)
    torch.testing.assert_close(da.bias.detach(), torch.full((8,), 1.5), atol=1e-4, rtol=0)
    torch.testing.assert_close(da(query), query, atol=1e-4, rtol=0)
    # The paper's unit init leaves the standardised query: a very different tensor here.
    assert (DistributionAlignment(head_dim=8)(query) - query).abs().max() > 1.0
    with pytest.raises(ValueError, match="'unit' or 'fit'"):
        DistributionAlignment(head_dim=8, init="ones")


def test_quant_attention_without_quantizers_matches_library_eager_attention():
    attention = QuantAttention(8, head_dim=4, align_queries=False)
    module = nn.Module()
    q, k, v = (torch.randn(2, 2, 5, 4) for _ in range(3))
    mask = torch.zeros(2, 1, 5, 5)
    mask[:, :, :, -1] = torch.finfo(torch.float32).min
    with quantization_disabled(attention):
        out, probs = attention(module, q, k, v, mask, scaling=0.5)
    ref_out, ref_probs = eager_attention_forward(module, q, k, v, mask, scaling=0.5)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(probs, ref_probs)
    assert torch.all(probs[..., -1] == 0)


def test_cached_range_follows_loaded_state():
    quantizer = _calibrated(LSQActivationQuantizer(2), minimum=0.0, step=1.0, offset=0.0)  # unsigned: [0, 3]
    x = torch.tensor([[-2.0, 2.0]])
    assert quantizer(x).tolist() == [[0.0, 2.0]]  # the range is now cached
    signed = _calibrated(LSQActivationQuantizer(2), minimum=-1.0, step=1.0, offset=0.0)  # signed: [-2, 1]
    quantizer.load_state_dict(signed.state_dict())
    assert quantizer(x).tolist() == [[-2.0, 1.0]]
    quantizer.load_state_dict(LSQActivationQuantizer(2).state_dict())  # an uncalibrated state
    with pytest.raises(RuntimeError, match="not calibrated"):
        quantizer(x)


def test_inference_path_gives_the_same_numbers():
    x = torch.randn(4, 16) * 3
    step, offset = torch.tensor(0.37, requires_grad=True), torch.tensor(-0.2, requires_grad=True)
    with_grad = lsq_fake_quantize(x, step, offset, -8.0, 7.0, 0.1)
    with torch.no_grad():
        without = lsq_fake_quantize(x, step, offset, -8.0, 7.0, 0.1)
    assert with_grad.requires_grad and not without.requires_grad
    assert torch.equal(with_grad.detach(), without)


def test_softmax_quantizer_covers_the_unit_range():
    attention = QuantAttention(8, head_dim=4, softmax_init="unit_range")
    lsq = QuantAttention(8, head_dim=4, softmax_init="lsq")
    probs = torch.softmax(torch.randn(2, 2, 5, 64) * 4, dim=-1)  # confident attention: some weights near 1
    for module in (attention, lsq):
        module.softmax_quantizer._observer = None
        module.softmax_quantizer.set_from_statistics(probs.abs().mean().item(), probs.min().item(), probs.max().item())
    unit = attention.softmax_quantizer
    assert not bool(unit.signed) and unit.step.item() == pytest.approx(1 / 255) and unit.offset.item() == 0.0
    assert (unit(probs) - probs).abs().max() <= 0.5 / 255 + 1e-7  # rounding error only, nothing clipped
    # LSQ's statistics-based init clips at about 32 / L_k = 0.5 here: confident weights lose a lot.
    assert (lsq.softmax_quantizer(probs) - probs).abs().max() > 0.2
    with pytest.raises(ValueError, match="softmax_init"):
        QuantAttention(8, head_dim=4, softmax_init="minmax")
    with pytest.raises(ValueError, match="known_range"):
        LSQActivationQuantizer(8, known_range=(1.0, 0.0))


def test_attention_dropout_does_not_push_probabilities_past_the_softmax_quantizer():
    # Confident attention (weights up to ~1) with dropout 0.5: the kept weights are scaled by 2. They must be the
    # quantized weights scaled by 2 (quantize, then drop), not weights above 1 clipped to 1 by the [0, 1] quantizer.
    attention = QuantAttention(8, head_dim=4)
    q, k, v = (torch.randn(2, 2, 5, 4) * 3 for _ in range(3))
    for quantizer, x in ((attention.q_quantizer, q), (attention.k_quantizer, k), (attention.v_quantizer, v)):
        quantizer.set_from_statistics(x.abs().mean().item(), x.min().item(), x.max().item())
    attention.softmax_quantizer.set_from_statistics(0.2, 0.0, 1.0)
    module = nn.Module()
    module.eval()
    _, quantized = attention(module, q, k, v, None, scaling=2.0, dropout=0.5)
    assert quantized.max() > 0.9  # some weights would exceed 1 once scaled by 1 / (1 - p) = 2
    module.train()
    out, dropped = attention(module, q, k, v, None, scaling=2.0, dropout=0.5)
    kept = dropped != 0
    assert kept.any() and (~kept).any()
    torch.testing.assert_close(dropped[kept], 2.0 * quantized[kept], rtol=0, atol=1e-6)
    torch.testing.assert_close(out, torch.matmul(dropped, attention.v_quantizer(v)).transpose(1, 2))


def test_mse_weight_init_recovers_the_step_of_weights_on_a_grid():
    # Channel 0 lies exactly on the 4-bit grid with step 0.1 (and uses its extreme level): zero error at step 0.1,
    # which the search must find. LSQ's init (2 mean|w| / sqrt(7)) is a different, lossy step for it.
    grid = torch.tensor([-7.0, -3.0, 0.0, 1.0, 5.0, 7.0]) * 0.1
    outlier = torch.tensor([0.01, -0.02, 0.015, 0.0, -0.01, 1.0])  # one large weight: clipping it pays off
    weight = torch.stack([grid, outlier])
    quantizer = LSQWeightQuantizer(2, bits=4, weight_ndim=2, init="mse")
    step = quantizer.mse_init(weight).flatten()
    torch.testing.assert_close(step[0], torch.tensor(0.1), rtol=1e-6, atol=0)

    def error(s: torch.Tensor) -> torch.Tensor:
        q = torch.clamp(torch.round(weight / s[:, None]), -8, 7) * s[:, None]
        return (q - weight).pow(2).mean(dim=1)

    lsq = quantizer.lsq_init(weight).flatten()
    assert error(step)[0] < 1e-12 < error(lsq)[0]
    # Every channel's error is at most that of the unclipped step and of LSQ's init.
    assert torch.all(error(step) <= error(weight.abs().amax(1) / 7) + 1e-12)
    assert torch.all(error(step) <= error(lsq) + 1e-12)
    quantizer.initialize_from(weight)
    torch.testing.assert_close(quantizer.step.flatten(), step)


def test_unknown_weight_step_init_is_rejected():
    with pytest.raises(ValueError, match="Weight step init"):
        LSQWeightQuantizer(2, bits=4, init="percentile")


class _Quantize(nn.Module):
    """One activation quantizer behind calibrate()'s ``pixel_values`` interface."""

    def __init__(self, quantizer: LSQActivationQuantizer) -> None:
        super().__init__()
        self.quantizer = quantizer

    def forward(self, pixel_values: torch.Tensor, pixel_mask=None) -> torch.Tensor:
        return self.quantizer(pixel_values)


def test_mse_activation_init_finds_the_step_of_inputs_on_a_grid(monkeypatch):
    # Inputs on the 4-bit signed grid with step c, using both extreme levels: only step c quantizes them without
    # error. LSQ's step is 2 mean|k| c / sqrt(7); put c / (LSQ step) among the candidates and the search must pick it.
    c = 0.37
    levels = torch.tensor([-8.0, -5.0, -1.0, 0.0, 2.0, 3.0, 7.0])
    x = (levels * c).repeat(10)
    exact = math.sqrt(7) / (2 * levels.abs().mean().item())
    monkeypatch.setattr(quantizers_module, "MSE_STEP_MULTIPLIERS", [exact * f for f in (0.25, 0.5, 0.9, 1.0, 1.1, 2.0)])
    model = _Quantize(LSQActivationQuantizer(4, offset_init="mse"))
    calibrate(model, [x[:35], x[35:]])
    quantizer = model.quantizer
    torch.testing.assert_close(quantizer.step, torch.tensor(c), rtol=1e-5, atol=0)
    assert (quantizer(x) - x).abs().max() < 1e-5
    lsq = _Quantize(LSQActivationQuantizer(4))
    calibrate(lsq, [x])
    assert (lsq(x) - x).abs().max() > 0.01


def test_mse_activation_init_refines_8bit_steps_and_keeps_known_ranges():
    torch.manual_seed(0)
    data = torch.distributions.Laplace(0.0, 1.0).sample((4, 40_000))  # more values than one batch's sample
    model = _Quantize(LSQActivationQuantizer(8, offset_init="mse"))
    lsq = _Quantize(LSQActivationQuantizer(8))
    calibrate(model, [data[:2], data[2:]])
    calibrate(lsq, [data[:2], data[2:]])
    multiplier = (model.quantizer.step / lsq.quantizer.step).item()
    # LSQ's 8-bit step (2 mean|x| / sqrt(127)) is several times coarser than the error-minimising one.
    assert multiplier < 0.5 and min(abs(multiplier - m) for m in MSE_STEP_MULTIPLIERS) < 1e-5
    error, lsq_error = ((q(data) - data).pow(2).mean() for q in (model, lsq))
    assert error < 0.25 * lsq_error
    # The softmax quantizer's analytic [0, 1] range is kept, whatever the init.
    attention = QuantAttention(8, head_dim=4, offset_init="mse")
    probs = torch.softmax(torch.randn(2, 2, 5, 64), dim=-1)
    attention.softmax_quantizer.set_from_statistics(probs.abs().mean().item(), probs.min().item(), probs.max().item())
    assert not attention.softmax_quantizer.searches_step and attention.q_quantizer.searches_step
    assert attention.softmax_quantizer.step.item() == pytest.approx(1 / 255)
    assert data[:2].numel() > MSE_SAMPLES_PER_BATCH


def test_unknown_activation_init_is_rejected():
    with pytest.raises(ValueError, match="offset_init"):
        LSQActivationQuantizer(4, offset_init="percentile")
