#!/usr/bin/env python
"""Train a real-valued DETR teacher on any supported dataset (synthetic shapes, COCO JSON, Pascal VOC, Hub datasets).

The small teacher shipped in ``examples/teacher-synthetic`` was trained with (about 35 minutes on 2 CPU cores):

    python examples/train_teacher.py --output_dir runs/teacher-synthetic --max_steps 10000 \
        --backbone_pretraining_steps 1500 --num_train_images 8000 --export_dir examples/teacher-synthetic

The BCCD benchmark teacher (benchmarks/teachers/bccd, about 30 minutes on 2 CPU cores):

    python examples/train_teacher.py --dataset_name ../shared/data/bccd --train_split trainval --eval_split test \
        --image_size 256 --num_queries 40 --per_device_train_batch_size 8 --max_steps 5000 \
        --backbone_pretraining_steps 800 --eval_steps 1000 --save_steps 1000 --output_dir runs/teacher-bccd \
        --export_dir benchmarks/teachers/bccd

Fine-tune a Hub DETR on your data instead of training from scratch (the label space is replaced):

    accelerate launch examples/train_teacher.py --model_name_or_path facebook/detr-resnet-101 \\
        --dataset_name ../shared/data/bccd --image_size 512 --output_dir runs/teacher-bccd --max_steps 20000
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import DetrConfig, DetrForObjectDetection, HfArgumentParser, set_seed
from transformers.models.detr.modeling_detr import DetrFrozenBatchNorm2d, replace_batch_norm

from qdetr_hf.data import DatasetArguments, DetrCollator, default_image_processor
from qdetr_hf.metrics import make_compute_metrics
from qdetr_hf.trainer import (
    QDetrDistillationTrainer,
    QDetrTrainingArguments,
    configure_cpu_threads,
    prepare_output_dir,
)

logger = logging.getLogger("train_teacher")


@dataclass
class TeacherModelArguments:
    """Which DETR to train: an existing checkpoint, or a new one built from the architecture fields below."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Start from this DETR (Hub id or folder). None: build from the fields below."}
    )
    backbone: str = field(default="test_resnet", metadata={"help": "timm backbone name (randomly initialised)."})
    backbone_out_indices: list[int] = field(
        default_factory=lambda: [1, 2, 3], metadata={"help": "timm feature stages; the last one feeds DETR."}
    )
    d_model: int = 128
    encoder_layers: int = 2
    decoder_layers: int = 3
    attention_heads: int = 8
    ffn_dim: int = 512
    num_queries: int = 20
    dropout: float = 0.0
    auxiliary_loss: bool = field(default=True, metadata={"help": "DETR's auxiliary decoding losses."})


@dataclass
class DataArguments(DatasetArguments):
    """Dataset selection (see qdetr_hf.data.load_detection_dataset) and the input size."""

    image_size: int = field(default=128, metadata={"help": "Longest side of the network input."})
    backbone_pretraining_steps: int = field(
        default=0,
        metadata={
            "help": "From scratch only: first train the backbone for this many steps on a dense task built from the "
            "same boxes (which class covers each feature-map cell), the stand-in for the ImageNet-pretrained "
            "backbone DETR normally starts from. 0 disables it."
        },
    )
    backbone_pretraining_learning_rate: float = field(
        default=1e-3, metadata={"help": "AdamW learning rate of the dense backbone pre-training."}
    )
    export_dir: str | None = field(
        default=None,
        metadata={"help": "Also write a clean copy (model, processor, metrics, card; no checkpoints) to this folder."},
    )


def build_model(model_args: TeacherModelArguments, id2label: dict[int, str]) -> DetrForObjectDetection:
    label2id = {v: k for k, v in id2label.items()}
    if model_args.model_name_or_path:
        return DetrForObjectDetection.from_pretrained(
            model_args.model_name_or_path,
            id2label=id2label,
            label2id=label2id,
            ignore_mismatched_sizes=True,
            auxiliary_loss=model_args.auxiliary_loss,
        )
    config = DetrConfig(
        backbone_config={
            "model_type": "timm_backbone",
            "backbone": model_args.backbone,
            "features_only": True,
            "use_pretrained_backbone": False,
            "out_indices": model_args.backbone_out_indices,
        },
        d_model=model_args.d_model,
        encoder_layers=model_args.encoder_layers,
        decoder_layers=model_args.decoder_layers,
        encoder_attention_heads=model_args.attention_heads,
        decoder_attention_heads=model_args.attention_heads,
        encoder_ffn_dim=model_args.ffn_dim,
        decoder_ffn_dim=model_args.ffn_dim,
        num_queries=model_args.num_queries,
        dropout=model_args.dropout,
        auxiliary_loss=model_args.auxiliary_loss,
        id2label=id2label,
        label2id=label2id,
    )
    return DetrForObjectDetection(config)


@torch.no_grad()
def initialize_like_original_detr(model: DetrForObjectDetection) -> None:
    """Re-initialise the transformer and heads of a from-scratch DETR as the original DETR code does.

    transformers initialises DETR's linear layers and object-query embeddings with N(0, 0.02) (meant for loading
    pretrained weights on top). From scratch that makes the queries negligible next to the LayerNorm-ed decoder
    states, so all query slots behave alike and DETR sits on its "predict the class prior" plateau for thousands of
    steps. The original code (facebookresearch/detr) uses ``nn.Embedding``'s N(0, 1) queries, Xavier-uniform
    transformer weights and PyTorch's default initialisation of the input projection and the heads.
    """
    detr = model.model
    for module in (detr.encoder, detr.decoder):
        for param in module.parameters():
            if param.dim() > 1:
                nn.init.xavier_uniform_(param)
    nn.init.normal_(detr.query_position_embeddings.weight)
    detr.input_projection.reset_parameters()
    model.class_labels_classifier.reset_parameters()
    for layer in model.bbox_predictor.layers:
        layer.reset_parameters()


def use_trainable_batch_norm(model: DetrForObjectDetection) -> int:
    """Give a randomly initialised backbone trainable BatchNorm for training from scratch; returns how many.

    DETR replaces the backbone's BatchNorm by *frozen* BatchNorm, right for a pretrained backbone but not for a
    random one: timm zero-initialises the last BN scale of every residual block, so frozen, every residual branch
    would output zero forever. Call :func:`freeze_batch_norm` before saving to get DETR's layout back.
    """
    backbone = model.model.backbone.model
    count = 0
    for name, module in list(backbone.named_modules()):
        if isinstance(module, DetrFrozenBatchNorm2d):
            bn = nn.BatchNorm2d(module.weight.numel())
            with torch.no_grad():
                bn.weight.copy_(module.weight)
                bn.bias.copy_(module.bias)
            parent, _, attr = name.rpartition(".")
            setattr(backbone.get_submodule(parent) if parent else backbone, attr, bn)
            count += 1
    return count


def freeze_batch_norm(model: DetrForObjectDetection) -> None:
    """Fold the learned BatchNorm statistics back into DETR's frozen BatchNorm (same checkpoint keys)."""
    with torch.no_grad():
        replace_batch_norm(model.model.backbone.model)


def dense_targets(labels: list[dict], height: int, width: int, num_labels: int) -> torch.Tensor:
    """Per-cell class targets on a ``height x width`` grid: the class of the smallest box covering the cell centre,
    ``num_labels`` (background) elsewhere. Boxes are normalised cxcywh (the collator's labels)."""
    ys = (torch.arange(height, dtype=torch.float32) + 0.5) / height
    xs = (torch.arange(width, dtype=torch.float32) + 0.5) / width
    targets = torch.full((len(labels), height, width), num_labels, dtype=torch.long)
    for index, label in enumerate(labels):  # data preparation, not loss math
        boxes, classes = label["boxes"], label["class_labels"]
        if boxes.numel() == 0:
            continue
        x0, y0 = boxes[:, 0] - boxes[:, 2] / 2, boxes[:, 1] - boxes[:, 3] / 2
        x1, y1 = boxes[:, 0] + boxes[:, 2] / 2, boxes[:, 1] + boxes[:, 3] / 2
        inside = (
            (ys[None, :, None] >= y0[:, None, None])
            & (ys[None, :, None] <= y1[:, None, None])
            & (xs[None, None, :] >= x0[:, None, None])
            & (xs[None, None, :] <= x1[:, None, None])
        )  # (n, H, W)
        area = (boxes[:, 2] * boxes[:, 3])[:, None, None].expand_as(inside)
        smallest = torch.where(inside, area, torch.inf).argmin(dim=0)
        covered = inside.any(dim=0)
        targets[index][covered] = classes[smallest[covered]]
    return targets


def pretrain_backbone(model, dataset, collator, steps: int, batch_size: int, learning_rate: float, seed: int) -> None:
    """Dense pre-training of the backbone: a 1x1 classifier on its last feature map learns which class (or
    background) covers each cell. Gives the from-scratch backbone shape-aware features before DETR's set loss."""
    backbone = model.model.backbone.model
    channels = model.model.backbone.intermediate_channel_sizes[-1]
    num_labels = model.config.num_labels
    head = nn.Conv2d(channels, num_labels + 1, kernel_size=1)
    params = [p for p in backbone.parameters() if p.requires_grad] + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=1e-4)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=True, collate_fn=collator, generator=torch.Generator().manual_seed(seed)
    )
    backbone.train()
    step, running = 0, None
    while step < steps:
        for batch in loader:
            features = backbone(batch["pixel_values"])[-1]
            targets = dense_targets(batch["labels"], *features.shape[-2:], num_labels)
            weight = torch.ones(num_labels + 1)
            weight[-1] = 0.25  # background dominates the cells
            loss = nn.functional.cross_entropy(head(features), targets, weight=weight)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
            step += 1
            if step % 100 == 0 or step == steps:
                logger.info(f"backbone pre-training step {step}/{steps}: dense loss {running:.4f}")
            if step >= steps:
                break


def export(model, processor, metrics, data_args, training_args, folder: Path, argv: list[str] | None) -> None:
    """Save the teacher without checkpoints, with its measured metrics and a short card saying how it was made."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    (folder / "eval_results.json").write_text(json.dumps(metrics, indent=2))
    command = " ".join(["python examples/train_teacher.py", *(sys.argv[1:] if argv is None else argv)])
    rows = "\n".join(
        f"| {key.removeprefix('eval_')} | {100 * value:.1f} |" for key, value in metrics.items() if "AP" in key
    )
    config = model.config
    (folder / "README.md").write_text(
        f"""---
library_name: transformers
pipeline_tag: object-detection
tags: [object-detection, detr, qdetr-hf]
---

# Real-valued DETR teacher for `{data_args.dataset_name}`

A small DETR ({config.backbone_config.backbone} backbone, d_model {config.d_model}, {config.encoder_layers} encoder
/ {config.decoder_layers} decoder layers, {config.num_queries} queries, {model.num_parameters() / 1e6:.2f} M
parameters) trained from scratch by qdetr-hf's `examples/train_teacher.py` for {training_args.max_steps} steps of
batch {training_args.per_device_train_batch_size} at {data_args.image_size} px, to be the frozen teacher of
`examples/distill.py --teacher_model_name_or_path <this folder>`. Classes: {", ".join(config.id2label.values())}.

Measured on the `{data_args.eval_split}` split ({data_args.num_eval_images if data_args.dataset_name == "synthetic" else "all"} images), COCO metrics in %:

| metric | value |
|---|---|
{rows}

Reproduce with:

```bash
{command}
```
"""
    )


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = HfArgumentParser((TeacherModelArguments, DataArguments, QDetrTrainingArguments))
    defaults = ["--output_dir", "runs/teacher", "--per_device_train_batch_size", "16", "--learning_rate", "2e-4"]
    defaults += ["--max_steps", "12000", "--lr_scheduler_type", "cosine", "--warmup_steps", "200"]
    defaults += ["--eval_strategy", "steps", "--eval_steps", "2000", "--save_steps", "2000", "--logging_steps", "100"]
    defaults += ["--save_total_limit", "2", "--per_device_eval_batch_size", "32", "--report_to", "none"]
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(defaults + (argv or sys.argv[1:]))
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    set_seed(training_args.seed)
    logger.info(f"PyTorch uses {configure_cpu_threads(training_args)} CPU thread(s) per process")

    settings = {
        **{f"model.{k}": v for k, v in asdict(model_args).items()},
        **{f"data.{k}": getattr(data_args, k) for k in ("dataset_name", "dataset_format", "train_split", "image_size")},
    }
    with training_args.main_process_first(desc="output folder"):
        checkpoint = prepare_output_dir(
            training_args.output_dir,
            settings,
            overwrite=training_args.overwrite_output_dir,
            resume_from_checkpoint=training_args.resume_from_checkpoint,
            write=training_args.should_save,
        )
    train_dataset, eval_dataset = data_args.load(data_args.image_size, training_args.seed)
    model = build_model(model_args, train_dataset.id2label)
    processor = default_image_processor(data_args.image_size)
    if not model_args.model_name_or_path:
        initialize_like_original_detr(model)
        logger.info(f"Training from scratch with {use_trainable_batch_norm(model)} trainable BatchNorm layers")
        if data_args.backbone_pretraining_steps > 0:
            pretrain_backbone(
                model,
                train_dataset,
                DetrCollator(processor, augment=data_args.augment),
                data_args.backbone_pretraining_steps,
                training_args.per_device_train_batch_size,
                data_args.backbone_pretraining_learning_rate,
                training_args.seed,
            )
    logger.info(f"Teacher: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters")

    trainer = QDetrDistillationTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=DetrCollator(processor, augment=data_args.augment),
        processing_class=processor,
        compute_metrics=make_compute_metrics(id2label=model.config.id2label, area_ranges=eval_dataset.area_ranges),
    )
    trainer.train(resume_from_checkpoint=checkpoint)
    freeze_batch_norm(model)
    metrics = trainer.evaluate()
    trainer.save_model(training_args.output_dir)
    with open(Path(training_args.output_dir) / "eval_results.json", "w") as handle:
        json.dump(metrics, handle, indent=2)
    if data_args.export_dir and trainer.is_world_process_zero():
        export(model, processor, metrics, data_args, training_args, Path(data_args.export_dir), argv)
    logger.info("Teacher evaluation: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if "AP" in k))
    return metrics


if __name__ == "__main__":
    main()
