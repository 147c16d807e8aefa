"""Shared fixtures: tiny DETR / Q-DETR configurations with a randomly initialised timm backbone (no download)."""

from __future__ import annotations

import importlib.util
import os
import socket
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]
BCCD_ROOT = REPO_ROOT / ".." / "shared" / "data" / "bccd"

TINY_BACKBONE = {
    "model_type": "timm_backbone",
    "backbone": "test_resnet",
    "features_only": True,
    "use_pretrained_backbone": False,
    "out_indices": [1, 2, 3],
}
TINY_DETR = {
    "backbone_config": TINY_BACKBONE,
    "d_model": 32,
    "encoder_layers": 1,
    "decoder_layers": 2,
    "encoder_ffn_dim": 64,
    "decoder_ffn_dim": 64,
    "encoder_attention_heads": 2,
    "decoder_attention_heads": 2,
    "num_queries": 8,
    "num_labels": 3,
    "dropout": 0.0,
}


def load_script(path: Path, module_name: str):
    """Import the script at ``path`` (not a package module) as module ``module_name``."""
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def load_example(name: str):
    """Import ``examples/<name>.py`` as module ``name``."""
    return load_script(REPO_ROOT / "examples" / f"{name}.py", name)


def free_port() -> int:
    """A free local TCP port for a test's gloo process group."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tiny_detr_kwargs(**overrides) -> dict:
    """Keyword arguments of a tiny DETR config (d_model 32, 1 encoder / 2 decoder layers, 8 queries, 3 labels)."""
    kwargs = {**TINY_DETR, "backbone_config": dict(TINY_BACKBONE)}
    kwargs.update(overrides)
    return kwargs


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture
def images() -> torch.Tensor:
    """A batch of two 64 x 64 random images."""
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


SHAPES = {0: "circle", 1: "square", 2: "triangle"}


def tiny_training_args(output_dir, **overrides):
    """QDetrTrainingArguments for short CPU test runs: log every step, no saving, no reports, seed 0."""
    from qdetr_hf.trainer import QDetrTrainingArguments

    kwargs = {
        "output_dir": str(output_dir),
        "per_device_train_batch_size": 4,
        "max_steps": 2,
        "learning_rate": 1e-4,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": True,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "seed": 0,
        "calibration_batches": 2,
    }
    kwargs.update(overrides)
    return QDetrTrainingArguments(**kwargs)


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory):
    """A tiny real-valued DETR teacher (synthetic-shapes label space, 64 px processor) saved to disk."""
    from transformers import DetrConfig, DetrForObjectDetection

    from qdetr_hf.data import default_image_processor

    torch.manual_seed(0)
    config = DetrConfig(**tiny_detr_kwargs(id2label=SHAPES, label2id={v: k for k, v in SHAPES.items()}))
    path = tmp_path_factory.mktemp("teacher")
    DetrForObjectDetection(config).save_pretrained(path)
    default_image_processor(64).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_shapes():
    """16 synthetic 64 px training images and the matching collator."""
    from qdetr_hf.data import DetrCollator, SyntheticShapesDataset, default_image_processor

    dataset = SyntheticShapesDataset(num_images=16, image_size=64, seed=3, max_objects=4)
    return dataset, DetrCollator(default_image_processor(64))
