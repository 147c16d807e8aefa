"""Shared fixtures: tiny DETR / Q-DETR configurations with a randomly initialised timm backbone (no download)."""

from __future__ import annotations

import os
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
