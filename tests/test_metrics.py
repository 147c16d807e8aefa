"""Tests for qdetr_hf.metrics: COCO metrics vs pycocotools, the offline evaluate module, post-processing, Trainer glue."""

from __future__ import annotations

import contextlib
import io
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from transformers import EvalPrediction

from qdetr_hf.metrics import (
    COCO_DETECTION_METRIC_PATH,
    COCO_METRIC_KEYS,
    CocoEvaluator,
    compute_coco_metrics,
    detection_gather_for_metrics,
    load_coco_metric,
    make_compute_metrics,
    post_process_detections,
)

# ----------------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------------


def _random_set(seed: int, num_images: int = 20, num_labels: int = 3) -> tuple[list[dict], list[dict]]:
    """Random GT (all size buckets, some empty images, a crowd box) and noisy, partly wrong, scored detections."""
    rng = np.random.default_rng(seed)
    predictions, references = [], []
    for i in range(num_images):
        image_id = 100 + 3 * i  # non-contiguous ids
        h, w = int(rng.integers(200, 600)), int(rng.integers(200, 600))
        m = int(rng.integers(0, 7)) if i % 5 else 0  # every 5th image has no ground truth
        side = rng.choice([12.0, 50.0, 150.0], size=(m, 1)) * rng.uniform(0.6, 1.4, size=(m, 2))
        xy = rng.uniform(0, 1, size=(m, 2)) * (np.array([w, h]) - side)
        gt = np.concatenate([xy, xy + side], axis=1)
        gt_labels = rng.integers(0, num_labels, size=m)
        iscrowd = np.zeros(m, dtype=np.int64)
        if i == 3 and m:
            iscrowd[0] = 1
        # detections: jittered copies of the GT (sometimes with the wrong class) plus random false positives
        jitter = rng.normal(0, 0.12, size=gt.shape) * np.repeat(side, 2, axis=1)
        det = gt + jitter
        det_labels = np.where(rng.uniform(size=m) < 0.15, (gt_labels + 1) % num_labels, gt_labels)
        n_fp = int(rng.integers(0, 5))
        fp_side = rng.uniform(10, 200, size=(n_fp, 2))
        fp_xy = rng.uniform(0, 1, size=(n_fp, 2)) * np.maximum(np.array([w, h]) - fp_side, 1)
        det = np.concatenate([det, np.concatenate([fp_xy, fp_xy + fp_side], axis=1)])
        det[:, 2:] = np.maximum(det[:, 2:], det[:, :2])  # keep x2 >= x1, y2 >= y1
        det_labels = np.concatenate([det_labels, rng.integers(0, num_labels, size=n_fp)])
        scores = rng.uniform(0.05, 1.0, size=len(det))
        references.append(
            {"image_id": image_id, "boxes": gt, "labels": gt_labels, "iscrowd": iscrowd, "orig_size": (h, w)}
        )
        predictions.append({"image_id": image_id, "boxes": det, "scores": scores, "labels": det_labels})
    return predictions, references


def _pycocotools_direct(
    predictions: list[dict], references: list[dict], cat_ids: list[int] | None = None
) -> np.ndarray:
    """The official evaluation written out by hand: COCO-format dicts (xywh), COCO(), loadRes, COCOeval."""
    images, annotations, results = [], [], []
    for ref in references:
        h, w = ref["orig_size"]
        images.append({"id": ref["image_id"], "height": h, "width": w})
        for box, label, crowd in zip(ref["boxes"], ref["labels"], ref["iscrowd"]):
            x1, y1, x2, y2 = (float(v) for v in box)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": ref["image_id"],
                    "category_id": int(label),
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1),
                    "iscrowd": int(crowd),
                }
            )
    for pred in predictions:
        for box, score, label in zip(pred["boxes"], pred["scores"], pred["labels"]):
            x1, y1, x2, y2 = (float(v) for v in box)
            results.append(
                {
                    "image_id": pred["image_id"],
                    "category_id": int(label),
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "score": float(score),
                }
            )
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {
            "images": images,
            "annotations": annotations,
            "categories": [{"id": c} for c in range(3)],
        }
        gt.createIndex()
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, iouType="bbox")
        if cat_ids is not None:
            ev.params.catIds = cat_ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


def _one_box_case(pred_box: list[float]) -> dict[str, float]:
    refs = [{"image_id": 1, "boxes": [[0.0, 0.0, 100.0, 100.0]], "labels": [0]}]
    preds = [{"image_id": 1, "boxes": [pred_box], "scores": [0.9], "labels": [0]}]
    return compute_coco_metrics(preds, refs, num_labels=1)


# ----------------------------------------------------------------------------------------------------------------------
# compute_coco_metrics
# ----------------------------------------------------------------------------------------------------------------------


def test_perfect_predictions_give_ap_one() -> None:
    _, references = _random_set(seed=0)
    perfect = [
        {
            "image_id": r["image_id"],
            "boxes": r["boxes"],
            "scores": np.linspace(0.9, 0.5, len(r["boxes"])),
            "labels": r["labels"],
        }
        for r in references
    ]
    metrics = compute_coco_metrics(perfect, references, num_labels=3)
    assert set(metrics) == set(COCO_METRIC_KEYS)
    assert all(isinstance(v, float) for v in metrics.values())
    for key in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR10", "AR100"):
        assert metrics[key] == pytest.approx(1.0, abs=1e-9), key


def test_iou_between_050_and_075() -> None:
    # GT [0, 0, 100, 100], prediction shifted 20 px right [20, 0, 120, 100]:
    # intersection 80 * 100 = 8000, union 10000 + 10000 - 8000 = 12000, IoU = 0.667.
    # Matched at IoU thresholds 0.50, 0.55, 0.60, 0.65 (4 of 10) -> AP50 = 1, AP75 = 0, AP = 0.4.
    metrics = _one_box_case([20.0, 0.0, 120.0, 100.0])
    assert metrics["AP50"] == pytest.approx(1.0, abs=1e-9)
    assert metrics["AP75"] == 0.0
    assert metrics["AP"] == pytest.approx(0.4, abs=1e-9)
    assert metrics["AR100"] == pytest.approx(0.4, abs=1e-9)
    # the 100x100 box (area 10000 > 96^2) is "large": no small/medium GT -> pycocotools' -1 is kept
    assert metrics["APs"] == -1.0 and metrics["APm"] == -1.0 and metrics["ARs"] == -1.0
    assert metrics["APl"] == pytest.approx(0.4, abs=1e-9)
    # perfect single box for comparison
    assert _one_box_case([0.0, 0.0, 100.0, 100.0])["AP75"] == pytest.approx(1.0, abs=1e-9)


def test_matches_pycocotools_on_random_set() -> None:
    predictions, references = _random_set(seed=1)
    expected = _pycocotools_direct(predictions, references)
    metrics = compute_coco_metrics(predictions, references, num_labels=3, per_class=True)
    assert 0.1 < metrics["AP"] < 0.95  # a non-trivial case
    for key, value in zip(COCO_METRIC_KEYS, expected):
        assert metrics[key] == pytest.approx(float(value), abs=1e-9), key
    for cat in range(3):
        assert metrics[f"AP_{cat}"] == pytest.approx(
            float(_pycocotools_direct(predictions, references, cat_ids=[cat])[0]), abs=1e-9
        )


def test_accepts_tensors_and_area_field() -> None:
    predictions, references = _random_set(seed=2, num_images=6)
    as_tensors = lambda d: {k: torch.as_tensor(np.asarray(v)) for k, v in d.items()}  # noqa: E731
    expected = compute_coco_metrics(predictions, references)
    got = compute_coco_metrics([as_tensors(p) for p in predictions], [as_tensors(r) for r in references])
    assert got == pytest.approx(expected, abs=1e-6)  # float32 tensors vs float64 arrays
    # a given area overrides w*h for the size buckets: declare every GT "small"
    small = [{**r, "area": np.full(len(r["boxes"]), 10.0)} for r in references]
    with_area = compute_coco_metrics(predictions, small)
    assert with_area["APm"] == -1.0 and with_area["APl"] == -1.0
    # every GT is now in the "small" bucket, so small-object recall is the overall recall (detections are matched
    # the same way; only unmatched detections outside the bucket are ignored, which changes APs but not ARs)
    assert with_area["ARs"] == pytest.approx(with_area["AR100"], abs=1e-12)
    assert expected["ARs"] != pytest.approx(expected["AR100"], abs=1e-3)


def test_no_predictions_and_empty_images() -> None:
    _, references = _random_set(seed=3, num_images=5)
    metrics = compute_coco_metrics([], references, num_labels=3)
    assert metrics["AP"] == 0.0 and metrics["AR100"] == 0.0
    # images without GT only: everything undefined
    empty_refs = [{"image_id": 1, "boxes": np.zeros((0, 4)), "labels": []}]
    detections = [{"image_id": 1, "boxes": [[0, 0, 10, 10]], "scores": [0.5], "labels": [0]}]
    assert set(compute_coco_metrics(detections, empty_refs).values()) == {-1.0}
    # detections on an empty image are false positives for the other images
    one = [{"image_id": 2, "boxes": [[0.0, 0.0, 50.0, 50.0]], "labels": [0]}]
    hit = [{"image_id": 2, "boxes": [[0.0, 0.0, 50.0, 50.0]], "scores": [0.4], "labels": [0]}]
    fp_first = compute_coco_metrics([*detections, *hit], [*empty_refs, *one])
    assert fp_first["AP50"] == pytest.approx(0.5, abs=0.01)  # precision 1/2 at the only recall level
    assert compute_coco_metrics(hit, [*empty_refs, *one])["AP50"] == pytest.approx(1.0, abs=1e-9)


def test_bad_inputs_raise() -> None:
    refs = [
        {"image_id": 1, "boxes": [[0.0, 0.0, 10.0, 10.0]], "labels": [0]},
        {"image_id": 2, "boxes": [[0.0, 0.0, 10.0, 10.0]], "labels": [1]},
    ]
    preds = [{"image_id": 1, "boxes": [[0.0, 0.0, 10.0, 10.0]], "scores": [0.9], "labels": [0]}]
    with pytest.raises(ValueError, match="duplicate image_id 1"):
        compute_coco_metrics(preds, [refs[0], refs[0]])
    with pytest.raises(ValueError, match="duplicate image_id 1"):
        compute_coco_metrics([preds[0], preds[0]], refs)
    with pytest.raises(ValueError, match="label 1 is out of range"):
        compute_coco_metrics(preds, refs, num_labels=1)
    with pytest.raises(ValueError, match="label 7 is out of range"):
        compute_coco_metrics([{**preds[0], "labels": [7]}], refs, num_labels=3)
    with pytest.raises(ValueError, match="label -1"):
        compute_coco_metrics([{**preds[0], "labels": [-1]}], refs)
    with pytest.raises(ValueError, match="image_id 5 has no entry in references"):
        compute_coco_metrics([{**preds[0], "image_id": 5}], refs)
    with pytest.raises(ValueError, match=r"shape \(N, 4\)"):
        compute_coco_metrics([{**preds[0], "boxes": [[0.0, 0.0, 10.0]]}], refs)
    with pytest.raises(ValueError, match="x2 >= x1"):
        compute_coco_metrics([{**preds[0], "boxes": [[5.0, 5.0, 2.0, 10.0]]}], refs)
    with pytest.raises(ValueError, match="expected 1 values"):
        compute_coco_metrics([{**preds[0], "scores": [0.9, 0.1]}], refs)


# ----------------------------------------------------------------------------------------------------------------------
# evaluate module
# ----------------------------------------------------------------------------------------------------------------------


def test_evaluate_module_offline_matches() -> None:
    """Loaded from the package path (run with HF_HUB_OFFLINE=1: nothing may be fetched)."""
    import evaluate

    predictions, references = _random_set(seed=4)
    expected = compute_coco_metrics(predictions, references, num_labels=3)

    metric = evaluate.load(COCO_DETECTION_METRIC_PATH, keep_in_memory=True)
    assert isinstance(metric, evaluate.EvaluationModule)
    metric.add_batch(predictions=predictions[:7], references=references[:7])
    # second batch: tensors, and references without the optional fields
    metric.add_batch(
        predictions=[
            {k: torch.as_tensor(np.asarray(v, dtype=np.float64)) for k, v in p.items()} for p in predictions[7:]
        ],
        references=[
            {"image_id": r["image_id"], "boxes": r["boxes"], "labels": r["labels"], "iscrowd": r["iscrowd"]}
            for r in references[7:]
        ],
    )
    got = metric.compute(num_labels=3)
    assert got == pytest.approx(expected, abs=1e-12)

    # the card's example, through load_coco_metric
    metric = load_coco_metric(keep_in_memory=True)
    refs = [{"image_id": 1, "boxes": [[0, 0, 100, 100]], "labels": [0]}]
    preds = [{"image_id": 1, "boxes": [[20, 0, 120, 100]], "scores": [0.9], "labels": [0]}]
    result = metric.compute(predictions=preds, references=refs)
    assert (round(result["AP"], 6), round(result["AP50"], 6), result["AP75"]) == (0.4, 1.0, 0.0)


# ----------------------------------------------------------------------------------------------------------------------
# post-processing
# ----------------------------------------------------------------------------------------------------------------------


def test_post_process_matches_detr_image_processor() -> None:
    from transformers import DetrImageProcessor

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 30, 6, generator=gen) * 3
    boxes = torch.rand(3, 30, 4, generator=gen) * 0.5 + 0.1
    sizes = torch.tensor([[480, 640], [300, 200], [1000, 750]])
    reference = DetrImageProcessor().post_process_object_detection(
        SimpleNamespace(logits=logits, pred_boxes=boxes), threshold=0.0, target_sizes=sizes
    )
    ours = post_process_detections(logits, boxes, sizes, top_k=None)
    top5 = post_process_detections(logits.numpy(), boxes.numpy(), sizes.tolist(), top_k=5)
    for ref, got, got5 in zip(reference, ours, top5):
        order = torch.sort(ref["scores"], descending=True, stable=True).indices
        assert len(got["scores"]) == 30
        torch.testing.assert_close(got["scores"], ref["scores"][order])
        assert torch.equal(got["labels"], ref["labels"][order])
        torch.testing.assert_close(got["boxes"], ref["boxes"][order])
        assert torch.all(got["scores"][:-1] >= got["scores"][1:])
        torch.testing.assert_close(got5["boxes"], got["boxes"][:5])
        assert torch.equal(got5["labels"], got["labels"][:5])
    with pytest.raises(ValueError, match="target_sizes"):
        post_process_detections(logits, boxes, sizes[:2])
    with pytest.raises(ValueError, match="pred_boxes"):
        post_process_detections(logits, boxes[..., :2], sizes)


def test_post_process_without_sizes_keeps_normalised_xyxy_and_ranks_like_the_processor() -> None:
    from torchvision.ops import box_convert
    from transformers import DetrImageProcessor

    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 12, 4, generator=gen, dtype=torch.float64) * 2
    boxes = torch.rand(2, 12, 4, generator=gen, dtype=torch.float64) * 0.5 + 0.1
    ours = post_process_detections(logits, boxes, None, top_k=4)
    reference = DetrImageProcessor().post_process_object_detection(
        SimpleNamespace(logits=logits, pred_boxes=boxes), threshold=-1.0
    )
    for image, (got, ref) in enumerate(zip(ours, reference)):
        order = torch.sort(ref["scores"], descending=True, stable=True).indices[:4]
        assert got["boxes"].dtype == torch.float64 and got["boxes"].shape == (4, 4)
        torch.testing.assert_close(got["boxes"], ref["boxes"][order])
        torch.testing.assert_close(got["boxes"], box_convert(boxes[image, order], "cxcywh", "xyxy"))
        assert torch.equal(got["labels"], ref["labels"][order])
        torch.testing.assert_close(got["scores"], ref["scores"][order])
    half = post_process_detections(logits.half(), boxes.half(), [[10, 20], [30, 40]], top_k=2)
    assert half[0]["scores"].dtype == torch.float32 and half[0]["boxes"].dtype == torch.float32


# ----------------------------------------------------------------------------------------------------------------------
# Trainer adapter
# ----------------------------------------------------------------------------------------------------------------------

NUM_LABELS = 3  # logits (B, Q, 4) have the same shape as pred_boxes: the adapter must rely on their order
NUM_QUERIES = 6


def _trainer_batches(seed: int, wrong_class: bool = False) -> tuple[list[tuple], list[list[dict]], list[dict]]:
    """Per-batch (loss_dict, logits, pred_boxes, hidden) tuples and target dicts, as the Trainer hands them over."""
    rng = np.random.default_rng(seed)
    predictions, label_ids, references = [], [], []
    image_id = 0
    for batch_size in (2, 3, 1):
        logits = np.full((batch_size, NUM_QUERIES, NUM_LABELS + 1), -10.0, dtype=np.float32)
        logits[..., NUM_LABELS] = 10.0  # every query "no object" by default
        pred_boxes = rng.uniform(0.2, 0.8, size=(batch_size, NUM_QUERIES, 4)).astype(np.float32) * [1, 1, 0.2, 0.2]
        targets = []
        for b in range(batch_size):
            m = int(rng.integers(1, 4))
            boxes = np.concatenate([rng.uniform(0.3, 0.7, (m, 2)), rng.uniform(0.05, 0.4, (m, 2))], axis=1)
            labels = rng.integers(0, NUM_LABELS, size=m)
            h, w = int(rng.integers(100, 800)), int(rng.integers(100, 800))
            pred_boxes[b, :m] = boxes
            logits[b, np.arange(m), NUM_LABELS] = -10.0
            logits[b, np.arange(m), (labels + 1) % NUM_LABELS if wrong_class else labels] = 10.0
            targets.append(
                {
                    "boxes": boxes.astype(np.float32),
                    "class_labels": labels,
                    "orig_size": np.array([h, w]),
                    "size": np.array([64, 64]),
                    "area": np.full(m, 123.0, dtype=np.float32),  # resized-image area: must be ignored
                    "image_id": np.array([image_id]),
                }
            )
            cx, cy, bw, bh = boxes.T
            references.append(
                {
                    "image_id": image_id,
                    "boxes": np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], 1) * [w, h, w, h],
                    "labels": labels,
                }
            )
            image_id += 1
        loss_dict = {"loss_ce": np.array(0.1, dtype=np.float32), "loss_bbox": np.array(0.2, dtype=np.float32)}
        hidden = rng.normal(size=(batch_size, NUM_QUERIES, 8)).astype(np.float32)
        predictions.append((loss_dict, logits, pred_boxes, hidden))
        label_ids.append(targets)
    return predictions, label_ids, references


def test_trainer_adapter_known_answers() -> None:
    predictions, label_ids, _ = _trainer_batches(seed=5)
    compute_metrics = make_compute_metrics(id2label={0: "a", 1: "b", 2: "c"})
    metrics = compute_metrics(EvalPrediction(predictions=predictions, label_ids=label_ids))
    assert set(metrics) == set(COCO_METRIC_KEYS)
    assert metrics["AP"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["AR100"] == pytest.approx(1.0, abs=1e-6)

    wrong, wrong_labels, _ = _trainer_batches(seed=5, wrong_class=True)
    assert compute_metrics(EvalPrediction(predictions=wrong, label_ids=wrong_labels))["AP"] < 0.05

    # boxes swapped between images of a batch -> localisation errors lower AP
    shuffled = [(d, lg, bx[::-1].copy(), h) for d, lg, bx, h in predictions]
    assert compute_metrics(EvalPrediction(predictions=shuffled, label_ids=label_ids))["AP"] < 0.9


def test_trainer_adapter_matches_direct_computation() -> None:
    predictions, label_ids, references = _trainer_batches(seed=6)
    rng = np.random.default_rng(0)
    noisy = [
        (
            d,
            lg + rng.normal(0, 10, lg.shape).astype(np.float32),
            np.clip(bx + rng.normal(0, 0.03, bx.shape), 0.01, 0.99).astype(np.float32),
            h,
        )
        for d, lg, bx, h in predictions
    ]
    evaluator = CocoEvaluator(id2label={0: "a", 1: "b", 2: "c"}, per_class=True)
    metrics = evaluator(EvalPrediction(predictions=noisy, label_ids=label_ids))

    sizes = [t["orig_size"] for batch in label_ids for t in batch]
    detections = [
        det
        for (_, lg, bx, _), batch in zip(noisy, label_ids)
        for det in post_process_detections(lg, bx.astype(np.float64), np.stack([t["orig_size"] for t in batch]))
    ]
    assert len(detections) == len(sizes) == len(references)
    preds = [{"image_id": r["image_id"], **d} for r, d in zip(references, detections)]
    expected = compute_coco_metrics(preds, references, num_labels=NUM_LABELS, per_class=True)
    assert 0.05 < expected["AP"] < 0.95
    for key in COCO_METRIC_KEYS:
        assert metrics[key] == pytest.approx(expected[key], abs=1e-9), key
    assert metrics["AP_b"] == pytest.approx(expected["AP_1"], abs=1e-9)

    # batch_eval_metrics mode: one batch per call, result on the last call
    evaluator_b = CocoEvaluator(id2label={0: "a", 1: "b", 2: "c"}, per_class=True)
    partial = [
        evaluator_b(EvalPrediction(predictions=p, label_ids=t), compute_result=False)
        for p, t in zip(noisy[:-1], label_ids[:-1])
    ]
    assert partial == [{}, {}]
    final = evaluator_b(EvalPrediction(predictions=noisy[-1], label_ids=label_ids[-1]), compute_result=True)
    assert final == pytest.approx(metrics, abs=1e-12)


def test_trainer_adapter_errors() -> None:
    predictions, label_ids, _ = _trainer_batches(seed=7)
    evaluator = CocoEvaluator(id2label={i: str(i) for i in range(5)})  # logits would need 6 columns
    with pytest.raises(ValueError, match="could not find DETR logits"):
        evaluator(EvalPrediction(predictions=predictions, label_ids=label_ids))
    label_ids[1][0]["image_id"] = label_ids[0][0]["image_id"]
    with pytest.raises(ValueError, match="duplicate image_id 0"):
        make_compute_metrics()(EvalPrediction(predictions=predictions, label_ids=label_ids))
    with pytest.raises(ValueError, match="prediction batches"):
        make_compute_metrics()(EvalPrediction(predictions=predictions[:2], label_ids=label_ids))


def test_with_real_trainer_evaluate(tmp_path: Any) -> None:
    """A tiny random DETR through Trainer.evaluate: the adapter sees the real output format (both Trainer modes)."""
    from transformers import DetrConfig, DetrForObjectDetection, ResNetConfig, Trainer, TrainingArguments

    torch.manual_seed(0)
    backbone = ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 8, 16, 16], depths=[1, 1, 1, 1], layer_type="basic", out_features=["stage4"]
    )
    id2label = {0: "a", 1: "b", 2: "c"}
    config = DetrConfig(
        use_timm_backbone=False,
        backbone_config=backbone,
        use_pretrained_backbone=False,
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=16,
        decoder_ffn_dim=16,
        num_queries=NUM_QUERIES,
        num_labels=NUM_LABELS,
        id2label=id2label,
        label2id={v: k for k, v in id2label.items()},
    )
    model = DetrForObjectDetection(config).eval()

    # GT per image: the box and class the model predicts with query 0 (a hit) plus a random box (mostly a miss)
    gen = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(5, 3, 64, 64, generator=gen)
    with torch.no_grad():
        outputs = model(pixel_values=pixel_values)
    dataset = [
        {
            "pixel_values": pixel_values[i],
            "labels": {
                "class_labels": torch.stack([outputs.logits[i, 0, :-1].argmax(), torch.tensor(i % 3)]),
                "boxes": torch.stack([outputs.pred_boxes[i, 0], torch.rand(4, generator=gen) * 0.4 + 0.1]),
                "orig_size": torch.tensor([100 + 10 * i, 120]),
                "image_id": torch.tensor([i + 10]),
            },
        }
        for i in range(5)
    ]

    def collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
        return {"pixel_values": torch.stack([x["pixel_values"] for x in batch]), "labels": [x["labels"] for x in batch]}

    # expected: the model run by hand, post-processed, GT converted to absolute xyxy in the original size
    sizes = torch.stack([x["labels"]["orig_size"] for x in dataset])
    detections = post_process_detections(outputs.logits, outputs.pred_boxes.double(), sizes)
    references = []
    for x in dataset:
        (h, w), (cx, cy, bw, bh) = x["labels"]["orig_size"].tolist(), x["labels"]["boxes"].double().T
        xyxy = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], 1) * torch.tensor([w, h, w, h])
        references.append(
            {"image_id": int(x["labels"]["image_id"]), "boxes": xyxy, "labels": x["labels"]["class_labels"]}
        )
    preds = [{"image_id": r["image_id"], **d} for r, d in zip(references, detections)]
    expected = compute_coco_metrics(preds, references, num_labels=NUM_LABELS)
    assert 0.05 < expected["AP"] < 0.95  # non-trivial numbers to compare

    class DetectionTrainer(Trainer):
        def evaluation_loop(self, *args: Any, **kwargs: Any) -> Any:
            self.gather_function = detection_gather_for_metrics(self.accelerator)
            return super().evaluation_loop(*args, **kwargs)

    def evaluate(trainer_cls: type[Trainer], batch_eval_metrics: bool) -> dict[str, float]:
        args = TrainingArguments(
            str(tmp_path),
            per_device_eval_batch_size=2,  # 5 images: the last batch has 1
            remove_unused_columns=False,
            eval_do_concat_batches=False,
            batch_eval_metrics=batch_eval_metrics,
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
        )
        trainer = trainer_cls(
            model=model,
            args=args,
            eval_dataset=dataset,
            data_collator=collate,
            compute_metrics=make_compute_metrics(id2label),
        )
        return trainer.evaluate()

    for batch_eval_metrics in (False, True):
        result = evaluate(DetectionTrainer, batch_eval_metrics)
        for key in COCO_METRIC_KEYS:
            assert result[f"eval_{key}"] == pytest.approx(expected[key], abs=1e-6), (batch_eval_metrics, key)

    # The stock Trainer slices the last batch's per-image tensors to the remainder (orig_size (2,) -> (1,), boxes
    # (2, 4) -> (1, 4)). The adapter must not turn that into a silently wrong AP: a clear error, or (should
    # transformers/accelerate fix it) the right numbers.
    try:
        result = evaluate(Trainer, batch_eval_metrics=False)
    except ValueError as error:
        assert "detection_gather_for_metrics" in str(error)
    else:
        assert [result[f"eval_{key}"] for key in COCO_METRIC_KEYS] == pytest.approx(
            [expected[key] for key in COCO_METRIC_KEYS], abs=1e-6
        )


def test_custom_area_ranges_move_objects_between_buckets() -> None:
    # One 20 x 20 box (area 400 px²): COCO calls it small (< 32²); with buckets scaled to a 128 x 128 image
    # (small < 54.6, large > 491.5 px²) it is medium.
    from qdetr_hf.data import scaled_coco_area_ranges

    references = [{"image_id": 1, "boxes": [[10.0, 10.0, 30.0, 30.0]], "labels": [0]}]
    predictions = [{"image_id": 1, "boxes": [[10.0, 10.0, 30.0, 30.0]], "scores": [0.9], "labels": [0]}]
    coco = compute_coco_metrics(predictions, references, num_labels=1)
    assert (coco["APs"], coco["APm"], coco["APl"]) == pytest.approx((1.0, -1.0, -1.0))
    scaled = compute_coco_metrics(predictions, references, num_labels=1, area_ranges=scaled_coco_area_ranges(128, 128))
    assert (scaled["APs"], scaled["APm"], scaled["APl"]) == pytest.approx((-1.0, 1.0, -1.0))
    assert scaled["AP"] == pytest.approx(1.0) and coco["AP"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="area_ranges"):
        compute_coco_metrics(predictions, references, area_ranges={"small": (0, 1)})
