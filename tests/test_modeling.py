"""QDetrConfig / QDetrForObjectDetection: structure, checkpoint conversion, save/load, Auto classes, remote code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import tiny_detr_kwargs
from PIL import Image
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForObjectDetection,
    DetrConfig,
    DetrForObjectDetection,
    DetrImageProcessor,
    pipeline,
)

from qdetr_hf import (
    DistributionAlignment,
    LSQActivationQuantizer,
    LSQWeightQuantizer,
    QDetrConfig,
    QDetrForObjectDetection,
    QuantConv2d,
    QuantLinear,
    calibrate,
    quantization_disabled,
)


def tiny_qdetr(**overrides) -> QDetrForObjectDetection:
    return QDetrForObjectDetection(QDetrConfig(**tiny_detr_kwargs(**overrides)))


@pytest.fixture
def detr_checkpoint(tmp_path):
    """A real-valued tiny DETR saved to disk, as a stand-in for e.g. facebook/detr-resnet-50."""
    model = DetrForObjectDetection(DetrConfig(**tiny_detr_kwargs())).eval()
    path = tmp_path / "detr"
    model.save_pretrained(path)
    DetrImageProcessor(size={"height": 64, "width": 64}).save_pretrained(path)
    return path, model


def test_config_defaults_follow_the_paper():
    config = QDetrConfig(**tiny_detr_kwargs())
    assert (config.weight_bits, config.activation_bits, config.attention_bits, config.first_conv_bits) == (4, 4, 8, 8)
    assert config.bit_notation == "4-4-8"
    assert config.distribution_alignment == "cross_attention"
    assert config.distribution_alignment_eps == 1e-5
    assert config.quantize_backbone and config.quantize_encoder and config.quantize_decoder
    assert config.activation_offset
    assert config.softmax_quantizer_init == "unit_range"
    assert config.model_type == "qdetr"


@pytest.mark.parametrize(
    ("field", "value", "error"),
    [
        ("weight_bits", 1, ValueError),
        ("weight_bits", 9, ValueError),
        ("activation_bits", 0, ValueError),
        ("attention_bits", 16, ValueError),
        ("first_conv_bits", 1, ValueError),
        ("distribution_alignment", "queries", ValueError),
        ("activation_offset_init", "percentile", ValueError),
        ("softmax_quantizer_init", "minmax", ValueError),
        ("weight_step_init", "minmax", ValueError),
        ("distribution_alignment_eps", 0.0, ValueError),
        ("weight_bits", 3.5, Exception),  # strict dataclass type check
        ("backbone_residual_bits", 1, ValueError),
        ("backbone_residual_bits", True, Exception),
        ("head_bits", 9, ValueError),
    ],
)
def test_bad_config_values_raise_naming_the_field(field, value, error):
    with pytest.raises(error, match=field):
        QDetrConfig(**tiny_detr_kwargs(**{field: value}))


def test_minmax_init_needs_offsets():
    with pytest.raises(ValueError, match="activation_offset"):
        QDetrConfig(**tiny_detr_kwargs(activation_offset=False, activation_offset_init="minmax"))


def test_quantized_layers_are_where_the_paper_puts_them():
    model = tiny_qdetr()
    detr = model.model
    convs = [m for m in detr.backbone.model.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(isinstance(m, QuantConv2d) for m in convs)
    assert convs[0].weight_quantizer.bits == 8 and convs[0].input_quantizer.bits == 8  # first conv: 8 bits
    assert all(m.weight_quantizer.bits == 4 and m.input_quantizer.bits == 4 for m in convs[1:])
    for layer in list(detr.encoder.layers) + list(detr.decoder.layers):
        attentions = [layer.self_attn] + ([layer.encoder_attn] if hasattr(layer, "encoder_attn") else [])
        for attention in attentions:
            for proj in (attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj):
                assert isinstance(proj, QuantLinear)
            assert attention.attn_quantizer.q_quantizer.bits == 8
            assert attention.attn_quantizer.softmax_quantizer.bits == 8
        assert isinstance(layer.mlp.fc1, QuantLinear) and isinstance(layer.mlp.fc2, QuantLinear)
    # Real-valued: input projection, query embeddings, heads, norms.
    assert type(detr.input_projection) is nn.Conv2d
    assert type(model.class_labels_classifier) is nn.Linear
    assert all(type(layer) is nn.Linear for layer in model.bbox_predictor.layers)
    assert type(detr.query_position_embeddings) is nn.Embedding
    assert type(detr.decoder.layers[0].self_attn_layer_norm) is nn.LayerNorm


@pytest.mark.parametrize(
    ("location", "self_da", "cross_da"),
    [("cross_attention", False, True), ("self_attention", True, False), ("both", True, True), ("none", False, False)],
)
def test_distribution_alignment_location(location, self_da, cross_da):
    model = tiny_qdetr(distribution_alignment=location)
    for layer in model.model.decoder.layers:
        assert (layer.self_attn.attn_quantizer.alignment is not None) == self_da
        assert (layer.encoder_attn.attn_quantizer.alignment is not None) == cross_da
    for layer in model.model.encoder.layers:
        assert layer.self_attn.attn_quantizer.alignment is None


def test_backbone_only_stage_leaves_transformer_real_valued():
    model = tiny_qdetr(quantize_encoder=False, quantize_decoder=False)
    assert any(isinstance(m, QuantConv2d) for m in model.model.backbone.modules())
    for part in (model.model.encoder, model.model.decoder):
        assert not any(isinstance(m, (QuantLinear, LSQActivationQuantizer)) for m in part.modules())


def test_forward_matches_detr_signature_and_outputs(images):
    model = tiny_qdetr()
    calibrate(model, [images])
    labels = [
        {"class_labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3], [0.3, 0.6, 0.1, 0.1]])},
        {"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.4, 0.4, 0.5, 0.5]])},
    ]
    out = model(pixel_values=images, pixel_mask=torch.ones(2, 64, 64, dtype=torch.long), labels=labels)
    assert out.logits.shape == (2, 8, 4) and out.pred_boxes.shape == (2, 8, 4)
    assert set(out.loss_dict) >= {"loss_ce", "loss_bbox", "loss_giou"}
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert model.model.decoder.layers[0].encoder_attn.attn_quantizer.q_quantizer.raw_step.grad is not None


def test_uncalibrated_model_raises_a_clear_error(images):
    model = tiny_qdetr()
    assert not model.is_calibrated
    with pytest.raises(RuntimeError, match=r"calibrate\(model, batches\)"):
        model(pixel_values=images)


def test_without_quantizers_the_model_computes_detr(detr_checkpoint, images):
    path, detr = detr_checkpoint
    model = QDetrForObjectDetection.from_pretrained(path, distribution_alignment="none").eval()
    detr.set_attn_implementation("eager")
    with quantization_disabled(model):
        ours = model(pixel_values=images)
    ref = detr(pixel_values=images)
    torch.testing.assert_close(ours.logits, ref.logits)
    torch.testing.assert_close(ours.pred_boxes, ref.pred_boxes)


def test_mse_weight_step_init_survives_conversion_and_reloading(detr_checkpoint, tmp_path):
    path, _ = detr_checkpoint
    model = QDetrForObjectDetection.from_pretrained(path, weight_step_init="mse")
    layers = [m for m in model.modules() if isinstance(m, (QuantLinear, QuantConv2d))]
    for layer in layers:
        expected = layer.weight_quantizer.mse_init(layer.weight)
        torch.testing.assert_close(layer.weight_quantizer.raw_step, expected, rtol=0, atol=0)
    assert any(
        not torch.equal(layer.weight_quantizer.raw_step, layer.weight_quantizer.lsq_init(layer.weight))
        for layer in layers
    )
    model.save_pretrained(tmp_path, pack_weights=False)  # float latent weights: the state dict must come back exactly
    reloaded = QDetrForObjectDetection.from_pretrained(tmp_path)
    assert reloaded.config.weight_step_init == "mse"
    for a, b in zip(model.state_dict().values(), reloaded.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_converting_a_real_valued_checkpoint(detr_checkpoint):
    path, detr = detr_checkpoint
    model = QDetrForObjectDetection.from_pretrained(path, weight_bits=3, activation_bits=3)
    assert model.config.model_type == "qdetr" and model.config.weight_bits == 3
    # Every real weight is loaded.
    detr_state = detr.state_dict()
    ours = model.state_dict()
    for key, value in detr_state.items():
        assert torch.equal(ours[key], value), key
    # Every quantizer tensor is initialised deterministically (guards the v5 uninitialised-memory trap).
    n_weight, n_act = 0, 0
    for name, module in model.named_modules():
        if isinstance(module, (QuantLinear, QuantConv2d)):
            step = module.weight_quantizer.raw_step
            assert torch.isfinite(step).all() and (step > 0).all(), name
            torch.testing.assert_close(step, module.weight_quantizer.lsq_init(module.weight), rtol=0, atol=0)
            n_weight += 1
        elif isinstance(module, LSQActivationQuantizer):
            assert module.raw_step.item() == 1.0 and module.offset.item() == 0.0, name
            assert bool(module.signed) and not bool(module.calibrated), name
            n_act += 1
        elif isinstance(module, DistributionAlignment):
            assert torch.equal(module.weight, torch.ones_like(module.weight))
            assert torch.equal(module.bias, torch.zeros_like(module.bias))
    assert n_weight > 20 and n_act > n_weight
    # Deterministic: converting twice gives the same quantizer state.
    again = QDetrForObjectDetection.from_pretrained(path, weight_bits=3, activation_bits=3)
    for (key, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), key


def test_residual_stream_quantizers_convert_a_real_valued_checkpoint(detr_checkpoint, images, tmp_path):
    path, detr = detr_checkpoint
    model = QDetrForObjectDetection.from_pretrained(path, backbone_residual_bits=8)
    # Every real weight and BatchNorm buffer is loaded under its usual key.
    ours = model.state_dict()
    for key, value in detr.state_dict().items():
        assert torch.equal(ours[key], value), key
    backbone = model.model.backbone.model
    residual = {
        name.removesuffix(".output_quantizer")
        for name, m in backbone.named_modules()
        if name.endswith("output_quantizer") and isinstance(m, LSQActivationQuantizer)
    }
    # test_resnet: two BasicBlocks (bn2, act2) and a Bottleneck (bn3, act3), two of them with a downsample branch.
    assert residual == {
        "layer1.0.bn2", "layer1.0.act2", "layer2.0.bn2", "layer2.0.act2", "layer2.0.downsample.2",
        "layer3.0.bn3", "layer3.0.act3", "layer3.0.downsample.2",
    }  # fmt: skip
    assert all(m.bits == 8 for n, m in backbone.named_modules() if n.endswith("output_quantizer"))
    assert not model.is_calibrated
    calibrate(model, [images])
    model.eval()
    expected = model(pixel_values=images).logits
    with quantization_disabled(model):  # the residual quantizers change the numbers only while enabled
        assert not torch.equal(model(pixel_values=images).logits, expected)
    model.save_pretrained(tmp_path)
    reloaded = QDetrForObjectDetection.from_pretrained(tmp_path).eval()
    assert reloaded.config.backbone_residual_bits == 8
    assert torch.equal(reloaded(pixel_values=images).logits, expected)


def test_save_load_round_trip_is_bit_identical(tmp_path, images):
    model = tiny_qdetr(weight_bits=2, activation_bits=3)
    calibrate(model, [images])
    # Move the learned tensors away from their init so the round trip really carries them.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (LSQWeightQuantizer, LSQActivationQuantizer)):
                module.raw_step.mul_(1.1)
    model.eval()
    expected = model(pixel_values=images)
    model.save_pretrained(tmp_path)
    reloaded = QDetrForObjectDetection.from_pretrained(tmp_path).eval()
    assert reloaded.is_calibrated
    out = reloaded(pixel_values=images)
    assert torch.equal(out.logits, expected.logits)
    assert torch.equal(out.pred_boxes, expected.pred_boxes)


def test_fitted_distribution_alignment_is_calibrated_saved_and_reloaded(tmp_path, detr_checkpoint, images):
    model = QDetrForObjectDetection.from_pretrained(
        detr_checkpoint[0], distribution_alignment="both", distribution_alignment_init="fit"
    )
    alignments = [m for m in model.modules() if isinstance(m, DistributionAlignment)]
    assert alignments and not any(bool(a.calibrated) for a in alignments) and not model.is_calibrated
    calibrate(model, [images])
    assert model.is_calibrated
    assert all(not torch.equal(a.weight, torch.ones_like(a.weight)) for a in alignments)
    model.eval()
    expected = model(pixel_values=images)
    model.save_pretrained(tmp_path / "fitted")
    reloaded = QDetrForObjectDetection.from_pretrained(tmp_path / "fitted").eval()
    assert reloaded.is_calibrated and reloaded.config.distribution_alignment_init == "fit"
    assert torch.equal(reloaded(pixel_values=images).logits, expected.logits)
    with pytest.raises(ValueError, match="distribution_alignment_init"):
        QDetrConfig(distribution_alignment_init="identity")


def test_auto_classes_are_registered(tmp_path, images):
    config = AutoConfig.for_model("qdetr", **tiny_detr_kwargs())
    assert isinstance(config, QDetrConfig)
    model = AutoModelForObjectDetection.from_config(config)
    assert isinstance(model, QDetrForObjectDetection)
    calibrate(model, [images])
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "qdetr"
    assert saved["auto_map"] == {
        "AutoConfig": "configuration_qdetr.QDetrConfig",
        "AutoModelForObjectDetection": "modeling_qdetr.QDetrForObjectDetection",
    }
    for name in (
        "configuration_qdetr.py",
        "modeling_qdetr.py",
        "quantization.py",
        "quantizers.py",
        "quant_layers.py",
        "calibration.py",
        "transformers_compat.py",
    ):
        assert (tmp_path / name).is_file(), name
    assert isinstance(AutoModelForObjectDetection.from_pretrained(tmp_path), QDetrForObjectDetection)


@pytest.fixture
def saved_qdetr(tmp_path, images):
    model = tiny_qdetr()
    calibrate(model, [images])
    model.eval()
    path = tmp_path / "qdetr"
    model.save_pretrained(path)
    DetrImageProcessor(size={"height": 64, "width": 64}).save_pretrained(path)
    torch.save({"images": images, "logits": model(pixel_values=images).logits}, tmp_path / "expected.pt")
    return path


@pytest.mark.slow
def test_trust_remote_code_in_a_clean_process(saved_qdetr):
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["qdetr_hf"] = None  # make `import qdetr_hf` fail: only the saved folder's code may be used
        import numpy as np, torch
        from PIL import Image
        from transformers import AutoModelForObjectDetection, pipeline
        expected = torch.load({str(saved_qdetr.parent / "expected.pt")!r})
        model = AutoModelForObjectDetection.from_pretrained({str(saved_qdetr)!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        assert torch.equal(model(pixel_values=expected["images"]).logits, expected["logits"])
        detector = pipeline("object-detection", model={str(saved_qdetr)!r}, trust_remote_code=True)
        result = detector(Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)), threshold=0.0)
        assert len(result) > 0 and set(result[0]) == {{"score", "label", "box"}}
        print("REMOTE-OK")
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=saved_qdetr.parent, env=env, timeout=300
    )
    assert result.returncode == 0 and "REMOTE-OK" in result.stdout, result.stderr[-3000:]


def test_object_detection_pipeline(saved_qdetr):
    detector = pipeline("object-detection", model=str(saved_qdetr))
    image = Image.fromarray((np.random.default_rng(0).random((64, 80, 3)) * 255).astype(np.uint8))
    result = detector(image, threshold=0.0)
    assert len(result) == 8  # one per query
    assert all(0 <= r["box"]["xmin"] <= r["box"]["xmax"] <= 80 for r in result)
    assert {r["label"] for r in result} <= set(detector.model.config.id2label.values())


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("distribution_alignment", "crossattention"),
        ("distribution_alignment_init", "fitted"),
        ("distribution_alignment_eps", 0.0),
        ("attention_bits", 99),
        ("softmax_quantizer_init", "unit"),
        ("backbone_residual_bits", 1),
        ("head_bits", 0),
    ],
)
def test_from_pretrained_overrides_are_validated_like_the_config(detr_checkpoint, field, value):
    with pytest.raises(ValueError, match=field):
        QDetrForObjectDetection.from_pretrained(detr_checkpoint[0], **{field: value})


def test_a_trained_qdetr_keeps_its_bit_widths(tmp_path, images):
    model = tiny_qdetr()
    calibrate(model, [images])
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"weight_bits 4 -> 2"):
        QDetrForObjectDetection.from_pretrained(tmp_path, weight_bits=2)
    with pytest.raises(ValueError, match=r"activation_bits 4 -> 3"):
        AutoModelForObjectDetection.from_pretrained(tmp_path, activation_bits=3)
    # Same widths, or other settings (e.g. Q-DETR's second stage quantizing more parts), still load.
    assert QDetrForObjectDetection.from_pretrained(tmp_path, weight_bits=4).is_calibrated


@pytest.mark.parametrize("other", ["bert", "yolos"])
def test_a_non_detr_checkpoint_is_refused_naming_its_type(tmp_path, other):
    AutoConfig.for_model(other).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=f"'{other}' model, not DETR"):
        QDetrForObjectDetection.from_pretrained(tmp_path)


def test_a_missing_local_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"Model folder not found: .*no-such-run"):
        QDetrForObjectDetection.from_pretrained(tmp_path / "no-such-run")
    with pytest.raises(FileNotFoundError, match=r"not found: \./runs/typo"):
        QDetrForObjectDetection.from_pretrained("./runs/typo")


def test_frozen_backbone_weights_keep_their_values_but_their_quantizers_learn(images):
    """DETR freezes backbone weights of a transformers-ResNet backbone by name (in transformers 5.23 its check matches
    no stage, so every one; a timm backbone has none frozen). Q-DETR leaves their quantizers trainable, a decision:
    the steps adapt to the frozen weights as they do everywhere else, at no cost. One step moves the steps only."""
    backbone_config = {
        "model_type": "resnet",
        "embedding_size": 8,
        "hidden_sizes": [8, 16, 16, 16],
        "depths": [1, 1, 1, 1],
        "layer_type": "basic",
        "out_features": ["stage2", "stage3", "stage4"],
    }
    model = QDetrForObjectDetection(
        QDetrConfig(**tiny_detr_kwargs(backbone_config=backbone_config, use_timm_backbone=False))
    ).train()
    calibrate(model, [images])
    frozen = {
        n: m
        for n, m in model.model.backbone.named_modules()
        if isinstance(m, QuantConv2d) and not m.weight.requires_grad
    }
    assert "model.embedder.embedder.convolution" in frozen  # the stem
    assert all(layer.weight_quantizer.raw_step.requires_grad for layer in frozen.values())
    assert all(layer.input_quantizer.raw_step.requires_grad for layer in frozen.values())
    before = {n: (layer.weight.clone(), layer.weight_quantizer.raw_step.clone()) for n, layer in frozen.items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    labels = [{"class_labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.3, 0.3]])}] * 2
    model(pixel_values=images, labels=labels).loss.backward()
    optimizer.step()
    assert all(torch.equal(frozen[n].weight, weight) for n, (weight, _) in before.items())
    assert any(not torch.equal(frozen[n].weight_quantizer.raw_step, step) for n, (_, step) in before.items())
