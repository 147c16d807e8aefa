"""Tests for qdetr_hf.data: synthetic shapes, COCO/VOC/Hub loaders, dispatch and the DETR collator."""

from __future__ import annotations

import json
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.detr.modeling_detr import DetrObjectDetectionOutput

from qdetr_hf import data as data_module
from qdetr_hf.data import (
    BoxFix,
    CocoDetectionDataset,
    DataQualityWarning,
    DetectionDataset,
    DetrCollator,
    HubDetectionDataset,
    SyntheticShapesDataset,
    VocDetectionDataset,
    default_image_processor,
    export_coco,
    hflip_example,
    load_detection_dataset,
    scaled_coco_area_ranges,
    to_hf_dataset,
)

BCCD_PARENT = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "bccd"
BCCD_ROOT = BCCD_PARENT / "BCCD"
needs_bccd = pytest.mark.skipif(not BCCD_ROOT.is_dir(), reason=f"BCCD data not found at {BCCD_ROOT}")

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def _pixels(image: Image.Image) -> np.ndarray:
    return np.array(image, dtype=np.uint8)


def _assert_same_items(a: DetectionDataset, b: DetectionDataset, atol: float = 0.0) -> None:
    assert len(a) == len(b)
    assert a.id2label == b.id2label
    for i in range(len(a)):
        ea, eb = a[i], b[i]
        assert ea["image_id"] == eb["image_id"]
        np.testing.assert_array_equal(_pixels(ea["image"]), _pixels(eb["image"]))
        assert len(ea["annotations"]) == len(eb["annotations"])
        for x, y in zip(ea["annotations"], eb["annotations"]):
            assert x["category_id"] == y["category_id"]
            np.testing.assert_allclose(x["bbox"], y["bbox"], atol=atol)


# ----------------------------------------------------------------------------------------------------------------------
# Synthetic shapes
# ----------------------------------------------------------------------------------------------------------------------
def test_synthetic_is_deterministic_and_order_independent() -> None:
    first = SyntheticShapesDataset(num_images=8, seed=3)
    second = SyntheticShapesDataset(num_images=8, seed=3)
    backwards = [second[i] for i in reversed(range(8))][::-1]  # generated in the opposite order
    for i in range(8):
        a = first[i]
        np.testing.assert_array_equal(_pixels(a["image"]), _pixels(backwards[i]["image"]))
        assert a["annotations"] == backwards[i]["annotations"]
        assert a["annotations"] == first.get_annotations(i)
        np.testing.assert_array_equal(_pixels(a["image"]), _pixels(first.load_image(i)))
    other = SyntheticShapesDataset(num_images=8, seed=4)
    for i in range(8):
        assert not np.array_equal(_pixels(first[i]["image"]), _pixels(other[i]["image"]))
    # Items differ from each other within one dataset too.
    assert not np.array_equal(_pixels(first[0]["image"]), _pixels(first[1]["image"]))


def test_synthetic_distribution_over_200_images() -> None:
    ds = SyntheticShapesDataset(num_images=200, image_size=128, seed=0)
    assert ds.id2label == {0: "circle", 1: "square", 2: "triangle"}
    assert ds.label2id == {"circle": 0, "square": 1, "triangle": 2}
    assert ds.num_labels == 3
    ranges = scaled_coco_area_ranges(128, 128)
    counts, classes, areas = [], Counter(), []
    for i in range(len(ds)):
        ex = ds[i]
        assert ex["image"].mode == "RGB" and ex["image"].size == (128, 128)
        assert ex["image_id"] == i
        counts.append(len(ex["annotations"]))
        for ann in ex["annotations"]:
            x, y, w, h = ann["bbox"]
            assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= 128 and y + h <= 128
            assert max(w, h) <= 0.6 * 128 + 1
            assert ann["area"] == w * h and ann["iscrowd"] == 0
            classes[ann["category_id"]] += 1
            areas.append(ann["area"])
    assert min(counts) >= 1 and max(counts) <= 10
    assert {1, 10} <= set(counts), f"object counts should span 1..10, got {sorted(set(counts))}"
    total = sum(classes.values())
    assert set(classes) == {0, 1, 2}
    assert all(n / total > 0.25 for n in classes.values()), classes
    areas_np = np.array(areas)
    small = (areas_np < ranges["small"][1]).mean()
    large = (areas_np >= ranges["medium"][1]).mean()
    medium = 1.0 - small - large
    assert small > 0.03 and medium > 0.2 and large > 0.2, (small, medium, large)


def test_synthetic_boxes_are_tight_and_colour_is_not_the_class() -> None:
    # One object and no noise: the object's pixels are exactly one colour, so its tight box is measurable.
    ds = SyntheticShapesDataset(num_images=60, seed=11, min_objects=1, max_objects=1, noise_std=0.0)
    colours: dict[int, list[np.ndarray]] = {0: [], 1: [], 2: []}
    for i in range(len(ds)):
        ex = ds[i]
        (ann,) = ex["annotations"]
        x, y, w, h = (int(v) for v in ann["bbox"])
        pixels = _pixels(ex["image"]).reshape(-1, 3)
        inside = _pixels(ex["image"])[y : y + h, x : x + w].reshape(-1, 3)
        values, counts = np.unique(inside, axis=0, return_counts=True)
        colour = values[counts.argmax()]
        rows, cols = np.nonzero((pixels == colour).all(axis=1).reshape(128, 128))
        assert (cols.min(), rows.min(), cols.max() + 1 - cols.min(), rows.max() + 1 - rows.min()) == (x, y, w, h)
        colours[ann["category_id"]].append(colour.astype(float))
    for label, values in colours.items():
        assert len(values) >= 8, f"class {label} too rare"
        assert (np.std(values, axis=0) > 40).all(), f"colours of class {label} are not spread out"


def test_synthetic_image_size_tuple_and_bad_arguments() -> None:
    ex = SyntheticShapesDataset(num_images=2, image_size=(96, 160), seed=0)[1]
    assert ex["image"].size == (160, 96)
    for ann in ex["annotations"]:
        x, y, w, h = ann["bbox"]
        assert x + w <= 160 and y + h <= 96
    with pytest.raises(ValueError, match="min_objects"):
        SyntheticShapesDataset(min_objects=0)
    with pytest.raises(ValueError, match="min_size"):
        SyntheticShapesDataset(image_size=64, min_size=50, max_size=40)
    with pytest.raises(IndexError):
        SyntheticShapesDataset(num_images=3)[3]


def test_scaled_area_ranges_known_values() -> None:
    ranges = scaled_coco_area_ranges(640, 480)
    assert ranges["small"] == (0.0, 1024.0) and ranges["medium"] == (1024.0, 9216.0)
    ranges = scaled_coco_area_ranges(128, 128)
    assert ranges["small"][1] == pytest.approx(1024 * 128 * 128 / (640 * 480))
    with pytest.raises(ValueError):
        scaled_coco_area_ranges(0, 10)


# ----------------------------------------------------------------------------------------------------------------------
# COCO
# ----------------------------------------------------------------------------------------------------------------------
def test_coco_export_import_round_trip(tmp_path: Path) -> None:
    synthetic = SyntheticShapesDataset(num_images=6, seed=5)
    annotation_file = export_coco(synthetic, tmp_path / "export")
    assert annotation_file == tmp_path / "export" / "annotations.json"
    assert sorted(p.name for p in (tmp_path / "export" / "images").iterdir()) == [f"{i:06d}.png" for i in range(6)]
    loaded = CocoDetectionDataset(tmp_path / "export" / "images", annotation_file)
    _assert_same_items(synthetic, loaded)
    assert loaded.original_category_ids == {0: 0, 1: 1, 2: 2}
    assert loaded.box_fixes == []
    # pycocotools reads the export too.
    from pycocotools.coco import COCO

    coco = COCO(str(annotation_file))
    assert len(coco.getImgIds()) == 6
    assert len(coco.getAnnIds()) == sum(len(synthetic.get_annotations(i)) for i in range(6))
    assert sorted(coco.getCatIds()) == [0, 1, 2]


def _write_image(path: Path, width: int, height: int, value: int = 90) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height), (value, value, value)).save(path)


def test_coco_remaps_category_ids_and_fixes_boxes(tmp_path: Path) -> None:
    _write_image(tmp_path / "images" / "a.png", 50, 40)
    _write_image(tmp_path / "images" / "b.png", 30, 30)
    coco = {
        "images": [
            {"id": 17, "file_name": "a.png", "width": 50, "height": 40},
            {"id": 4, "file_name": "b.png"},  # no size in the JSON: read from the file
        ],
        "categories": [{"id": 90, "name": "zebra"}, {"id": 1, "name": "person"}, {"id": 18, "name": "dog"}],
        "annotations": [
            {"id": 1, "image_id": 17, "category_id": 18, "bbox": [10, 5, 20, 10], "area": 150.0, "iscrowd": 0},
            {"id": 2, "image_id": 17, "category_id": 90, "bbox": [40, 30, 20, 20], "area": 400.0, "iscrowd": 0},
            {"id": 3, "image_id": 17, "category_id": 1, "bbox": [5, 5, 0, 8], "area": 0.0, "iscrowd": 0},
            {"id": 4, "image_id": 4, "category_id": 1, "bbox": [1, 2, 3, 4], "area": 12.0, "iscrowd": 1},
        ],
    }
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    with pytest.warns(DataQualityWarning, match=r"fixed 2 of 4 boxes: 1 clipped.*1 dropped.*a\.png"):
        ds = CocoDetectionDataset(tmp_path / "images", tmp_path / "ann.json")
    assert ds.id2label == {0: "person", 1: "dog", 2: "zebra"}
    assert ds.category_id_map == {1: 0, 18: 1, 90: 2}
    assert ds.original_category_ids == {0: 1, 1: 18, 2: 90}
    a = ds[0]
    assert a["image_id"] == 17
    assert a["annotations"] == [
        {"bbox": [10.0, 5.0, 20.0, 10.0], "category_id": 1, "area": 150.0, "iscrowd": 0},
        {"bbox": [40.0, 30.0, 10.0, 10.0], "category_id": 2, "area": 100.0, "iscrowd": 0},  # clipped to 50x40
    ]
    assert [(f.source, f.box_index, f.action) for f in ds.box_fixes] == [
        ("a.png", 1, "clipped"),
        ("a.png", 2, "dropped"),
    ]
    b = ds[1]
    assert b["image_id"] == 4 and b["annotations"][0]["iscrowd"] == 1
    assert ds.get_image_info(1) == {"id": 4, "file_name": "b.png", "width": 30, "height": 30}
    exported = ds.to_coco_dict()
    assert [c["id"] for c in exported["categories"]] == [0, 1, 2]
    assert [a["category_id"] for a in exported["annotations"]] == [1, 2, 0]


def test_coco_errors_name_the_problem(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    with pytest.raises(FileNotFoundError, match=r"missing\.json"):
        CocoDetectionDataset(tmp_path / "images", tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text(json.dumps({"images": [], "categories": [{"id": 1, "name": "x"}]}))
    with pytest.raises(FileNotFoundError, match="nope"):
        CocoDetectionDataset(tmp_path / "nope", tmp_path / "bad.json")
    (tmp_path / "unknown.json").write_text(
        json.dumps(
            {
                "images": [{"id": 1, "file_name": "x.png", "width": 4, "height": 4}],
                "categories": [{"id": 1, "name": "x"}],
                "annotations": [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [0, 0, 1, 1]}],
            }
        )
    )
    with pytest.raises(ValueError, match="unknown category_id 7"):
        CocoDetectionDataset(tmp_path / "images", tmp_path / "unknown.json")


# ----------------------------------------------------------------------------------------------------------------------
# Pascal VOC
# ----------------------------------------------------------------------------------------------------------------------
@needs_bccd
def test_bccd_splits_classes_and_known_box() -> None:
    sizes = {}
    all_ids: set[str] = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataQualityWarning)
        splits = {split: VocDetectionDataset(BCCD_ROOT, split=split) for split in ("train", "val", "trainval", "test")}
    for split, ds in splits.items():
        sizes[split] = len(ds)
        assert ds.id2label == {0: "Platelets", 1: "RBC", 2: "WBC"}
    assert sizes == {"train": 205, "val": 87, "trainval": 292, "test": 72}
    all_ids = set(splits["trainval"].ids) | set(splits["test"].ids)
    assert len(all_ids) == 364
    assert set(splits["train"].ids) | set(splits["val"].ids) == set(splits["trainval"].ids)
    # Image ids are global (stable across splits) and unique.
    trainval_ids = {splits["trainval"].get_image_info(i)["id"] for i in range(292)}
    test_ids = {splits["test"].get_image_info(i)["id"] for i in range(72)}
    assert len(trainval_ids | test_ids) == 364
    # Known box, BloodImage_00000.xml first object: WBC xmin=260 ymin=177 xmax=491 ymax=376 (1-based inclusive).
    ds = splits["trainval"]
    index = ds.ids.index("BloodImage_00000")
    ex = ds[index]
    assert ex["image"].size == (640, 480) and ex["image"].mode == "RGB"
    assert ex["annotations"][0] == {
        "bbox": [259.0, 176.0, 232.0, 200.0],
        "category_id": 2,
        "area": 46400.0,
        "iscrowd": 0,
    }
    assert len(ex["annotations"]) == 20
    # Box count: 4,888 boxes in BCCD, minus the 2 dropped defects.
    n_boxes = sum(len(d.get_annotations(i)) for d in (splits["trainval"], splits["test"]) for i in range(len(d)))
    assert n_boxes == 4888 - 2


@needs_bccd
def test_bccd_defects_are_found_warned_and_removed() -> None:
    # Found by scanning the XML files: two RBC "boxes" are single points (xmin == xmax and ymin == ymax).
    defect_338 = BoxFix(
        "BloodImage_00338.jpg", 12, "dropped", (503.0, 336.0, 504.0, 337.0),
        "zero extent in the XML (xmax <= xmin or ymax <= ymin)",
    )  # fmt: skip
    defect_343 = BoxFix(
        "BloodImage_00343.jpg", 3, "dropped", (180.0, 328.0, 181.0, 329.0),
        "zero extent in the XML (xmax <= xmin or ymax <= ymin)",
    )  # fmt: skip
    expected = {"train": [defect_343], "val": [defect_338], "trainval": [defect_338, defect_343], "test": []}
    for split, fixes in expected.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = VocDetectionDataset(BCCD_PARENT, split=split)  # the parent folder is accepted too
        quality = [w for w in caught if issubclass(w.category, DataQualityWarning)]
        assert ds.box_fixes == fixes
        assert len(quality) == (1 if fixes else 0), split
        for fix in fixes:
            assert fix.source in str(quality[0].message)
        if fixes:
            assert f"fixed {len(fixes)} of" in str(quality[0].message)
        for i in range(len(ds)):
            info = ds.get_image_info(i)
            for ann in ds.get_annotations(i):
                x, y, w, h = ann["bbox"]
                assert w > 0 and h > 0, (info, ann)
                assert x >= 0 and y >= 0 and x + w <= info["width"] and y + h <= info["height"], (info, ann)
    # The defective files keep their other boxes: 00338 has 14 objects in the XML, 00343 has 12.
    with pytest.warns(DataQualityWarning):
        ds = VocDetectionDataset(BCCD_ROOT, split="trainval")
    assert len(ds.get_annotations(ds.ids.index("BloodImage_00338"))) == 14 - 1
    assert len(ds.get_annotations(ds.ids.index("BloodImage_00343"))) == 12 - 1


def _voc_xml(filename: str, width: int, height: int, objects: list[tuple[str, int, int, int, int, int]]) -> str:
    parts = [
        f"<annotation><filename>{filename}</filename><size><width>{width}</width><height>{height}</height>"
        "<depth>3</depth></size>"
    ]
    for name, x0, y0, x1, y1, difficult in objects:
        parts.append(
            f"<object><name>{name}</name><difficult>{difficult}</difficult><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin>"
            f"<xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"
        )
    return "".join(parts) + "</annotation>"


def _make_voc(root: Path) -> None:
    (root / "Annotations").mkdir(parents=True)
    (root / "ImageSets" / "Main").mkdir(parents=True)
    _write_image(root / "JPEGImages" / "img1.jpg", 40, 30)
    _write_image(root / "JPEGImages" / "img2.jpg", 20, 20)
    objects1 = [
        ("dog", 1, 1, 10, 20, 0),  # whole pixels 1..10 x 1..20 -> [0, 0, 10, 20]
        ("cat", 35, 5, 45, 12, 1),  # difficult, reaches past the right edge (width 40) -> clipped
        ("dog", 0, 3, 5, 8, 0),  # xmin=0 is outside 1-based coordinates -> clipped to x=0
    ]
    (root / "Annotations" / "img1.xml").write_text(_voc_xml("img1.jpg", 40, 30, objects1))
    (root / "Annotations" / "img2.xml").write_text(_voc_xml("img2.jpg", 20, 20, [("zebra", 2, 2, 5, 5, 0)]))
    (root / "ImageSets" / "Main" / "train.txt").write_text("img1\n")
    (root / "ImageSets" / "Main" / "val.txt").write_text("img2\n")


def test_voc_conventions_on_handmade_files(tmp_path: Path) -> None:
    _make_voc(tmp_path / "voc" / "VOC")
    with pytest.warns(DataQualityWarning, match=r"2 clipped.*img1\.jpg"):
        train = VocDetectionDataset(tmp_path / "voc", split="train")
    # Classes come from all XML files (zebra only appears in val), sorted.
    assert train.id2label == {0: "cat", 1: "dog", 2: "zebra"}
    assert train[0]["annotations"] == [
        {"bbox": [0.0, 0.0, 10.0, 20.0], "category_id": 1, "area": 200.0, "iscrowd": 0},
        {"bbox": [34.0, 4.0, 6.0, 8.0], "category_id": 0, "area": 48.0, "iscrowd": 0},
        {"bbox": [0.0, 2.0, 5.0, 6.0], "category_id": 1, "area": 30.0, "iscrowd": 0},
    ]
    assert [(f.box_index, f.action) for f in train.box_fixes] == [(1, "clipped"), (2, "clipped")]
    val = VocDetectionDataset(tmp_path / "voc", split="validation")
    assert len(val) == 1 and val.id2label == train.id2label
    assert val[0]["annotations"][0]["bbox"] == [1.0, 1.0, 4.0, 4.0]
    with pytest.raises(FileNotFoundError, match=r"no split file for split 'test'.*\['train', 'val'\]"):
        VocDetectionDataset(tmp_path / "voc", split="test")
    with pytest.raises(ValueError, match="not in class_names"):
        VocDetectionDataset(tmp_path / "voc", split="val", class_names=["cat", "dog"])
    with pytest.raises(FileNotFoundError, match="not a Pascal VOC root"):
        VocDetectionDataset(tmp_path / "voc" / "VOC" / "Annotations")


# ----------------------------------------------------------------------------------------------------------------------
# Hugging Face datasets
# ----------------------------------------------------------------------------------------------------------------------
def test_hf_round_trip_via_save_to_disk(tmp_path: Path) -> None:
    synthetic = SyntheticShapesDataset(num_images=5, seed=2)
    hf = to_hf_dataset(synthetic, cache_dir=tmp_path / "cache")
    assert len(hf) == 5
    assert hf.features["objects"]["category"].feature.names == ["circle", "square", "triangle"]
    hf.save_to_disk(str(tmp_path / "saved"))
    loaded = HubDetectionDataset(tmp_path / "saved")
    _assert_same_items(synthetic, loaded)
    dispatched = load_detection_dataset(str(tmp_path / "saved"))
    assert isinstance(dispatched, HubDetectionDataset)
    _assert_same_items(synthetic, dispatched)
    # A DatasetDict with a "validation" split is found with split="val".
    datasets.DatasetDict({"train": hf.select([0, 1]), "validation": hf.select([2, 3, 4])}).save_to_disk(
        str(tmp_path / "dict")
    )
    val = load_detection_dataset(str(tmp_path / "dict"), split="val")
    assert len(val) == 3 and val[0]["image_id"] == 2
    with pytest.raises(ValueError, match=r"no split 'test'.*\['train', 'validation'\]"):
        load_detection_dataset(str(tmp_path / "dict"), split="test")


def test_hf_list_of_dicts_int_categories_and_voc_boxes() -> None:
    images = [Image.new("RGB", (20, 10), (k * 40, 0, 0)) for k in range(2)]
    hf = datasets.Dataset.from_dict(
        {
            "img": images,
            "objs": [
                [{"bbox": [1.0, 2.0, 5.0, 6.0], "category": 9}, {"bbox": [15.0, 0.0, 30.0, 8.0], "category": 5}],
                [{"bbox": [3.0, 3.0, 3.0, 9.0], "category": 5}],  # zero width: dropped
            ],
        },
        features=datasets.Features(
            {
                "img": datasets.Image(),
                "objs": datasets.List(
                    {"bbox": datasets.List(datasets.Value("float32")), "category": datasets.Value("int64")}
                ),
            }
        ),
    )
    with pytest.warns(DataQualityWarning, match="row 0"):
        ds = HubDetectionDataset(hf, image_column="img", objects_column="objs", bbox_format="pascal_voc")
        first = ds[0]
    assert ds.id2label == {0: "5", 1: "9"} and ds.original_category_ids == {0: 5, 1: 9}
    assert first["image_id"] == 0
    assert first["annotations"] == [
        {"bbox": [1.0, 2.0, 4.0, 4.0], "category_id": 1, "area": 16.0, "iscrowd": 0},
        {"bbox": [15.0, 0.0, 5.0, 8.0], "category_id": 0, "area": 40.0, "iscrowd": 0},  # clipped to width 20
    ]
    assert ds[1]["annotations"] == []
    ds[1]  # reading a row again does not record its fixes twice
    assert [(f.source, f.box_index, f.action) for f in ds.box_fixes] == [
        ("row 0 (image_id 0)", 1, "clipped"),
        ("row 1 (image_id 1)", 0, "dropped"),
    ]
    with pytest.raises(ValueError, match="missing column"):
        HubDetectionDataset(hf, image_column="image", objects_column="objs")


def test_hf_data_folder_loadable_by_load_dataset(tmp_path: Path) -> None:
    folder = tmp_path / "imagefolder"
    rows = []
    for k in range(3):
        _write_image(folder / f"{k}.png", 24, 16, value=30 * k)
        rows.append(
            {"file_name": f"{k}.png", "objects": {"bbox": [[1.0, 2.0, 3.0, 4.0 + k]], "category": ["b" if k else "a"]}}
        )
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    ds = load_detection_dataset(str(folder), cache_dir=str(tmp_path / "cache"))
    assert isinstance(ds, HubDetectionDataset)
    assert ds.id2label == {0: "a", 1: "b"}
    assert [ds[k]["annotations"][0]["category_id"] for k in range(3)] == [0, 1, 1]
    assert ds[2]["annotations"][0]["bbox"] == [1.0, 2.0, 3.0, 6.0]


# ----------------------------------------------------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------------------------------------------------
def test_dispatch_synthetic_splits_use_disjoint_seeds() -> None:
    train = load_detection_dataset("synthetic", split="train", num_images=4)
    val = load_detection_dataset("synthetic", split="val", num_images=3, image_size=64)
    assert isinstance(train, SyntheticShapesDataset) and isinstance(val, SyntheticShapesDataset)
    assert (len(train), len(val)) == (4, 3)
    assert (train.seed, val.seed) == (0, 1_000_000)
    assert val[0]["image"].size == (64, 64)
    assert load_detection_dataset("synthetic", split="validation", seed=7).seed == 1_000_007
    assert len(load_detection_dataset("synthetic", split="test")) == 200
    with pytest.raises(ValueError, match="synthetic data has splits"):
        load_detection_dataset("synthetic", split="trainval")


def test_dataset_arguments_synthetic_seed_keeps_the_images_whatever_the_training_seed() -> None:
    from qdetr_hf.data.loading import DatasetArguments

    sizes = {"num_train_images": 2, "num_eval_images": 2, "synthetic_cache_mb": 0}
    fixed = DatasetArguments(**sizes, synthetic_seed=7).load(32, seed=1)
    assert [split.seed for split in fixed] == [7, 1_000_007]  # the training seed (1) draws no image
    assert [split.seed for split in DatasetArguments(**sizes).load(32, seed=1)] == [1, 1_000_001]
    for bad in (-1, 1_000_000):  # at 1,000,000 its training images would be another seed's validation images
        with pytest.raises(ValueError, match=rf"synthetic_seed must be in .* got {bad}"):
            DatasetArguments(synthetic_seed=bad)


@needs_bccd
def test_dispatch_voc() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataQualityWarning)
        from_parent = load_detection_dataset(str(BCCD_PARENT), split="validation")
        from_root = load_detection_dataset(str(BCCD_ROOT), split="test", dataset_format="voc")
    assert isinstance(from_parent, VocDetectionDataset) and len(from_parent) == 87
    assert isinstance(from_root, VocDetectionDataset) and len(from_root) == 72


def test_dispatch_coco_layouts(tmp_path: Path) -> None:
    synthetic = SyntheticShapesDataset(num_images=3, seed=9)
    export_coco(synthetic, tmp_path / "export")
    by_file = load_detection_dataset(str(tmp_path / "export" / "annotations.json"))
    by_folder = load_detection_dataset(str(tmp_path / "export"), dataset_format="coco")
    for ds in (by_file, by_folder):
        assert isinstance(ds, CocoDetectionDataset)
        _assert_same_items(synthetic, ds)
    # Official layout: annotations/instances_val2017.json + val2017/.
    official = tmp_path / "coco"
    (official / "annotations").mkdir(parents=True)
    (official / "val2017").mkdir()
    for name in (tmp_path / "export" / "images").iterdir():
        (official / "val2017" / name.name).write_bytes(name.read_bytes())
    (official / "annotations" / "instances_val2017.json").write_text(
        (tmp_path / "export" / "annotations.json").read_text()
    )
    ds = load_detection_dataset(str(official), split="validation")
    assert isinstance(ds, CocoDetectionDataset) and ds.images_dir == official / "val2017"
    _assert_same_items(synthetic, ds)
    with pytest.raises(FileNotFoundError, match=r"no COCO annotations for split 'train'"):
        load_detection_dataset(str(official), split="train", dataset_format="coco")


def test_dispatch_hub_name_calls_load_dataset(monkeypatch: pytest.MonkeyPatch) -> None:
    hf = datasets.Dataset.from_dict(
        {"image": [Image.new("RGB", (8, 8))], "objects": [{"bbox": [[1.0, 1.0, 2.0, 2.0]], "category": [0]}]},
        features=datasets.Features(
            {
                "image": datasets.Image(),
                "objects": {
                    "bbox": datasets.List(datasets.List(datasets.Value("float32"), length=4)),
                    "category": datasets.List(datasets.ClassLabel(names=["coverall", "mask"])),
                },
            }
        ),
    )
    calls: list[tuple[str, str]] = []

    def fake_load_dataset(name: str, split: str | None = None, **kwargs: Any) -> datasets.Dataset:
        calls.append((name, str(split)))
        if split != "validation":
            raise ValueError(f"Unknown split \"{split}\". Should be one of ['train', 'validation'].")
        return hf

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ds = load_detection_dataset("someone/cppe-like", split="val")
    assert calls == [("someone/cppe-like", "val"), ("someone/cppe-like", "validation")]
    assert isinstance(ds, HubDetectionDataset) and ds.id2label == {0: "coverall", 1: "mask"}
    assert ds[0]["annotations"][0]["bbox"] == [1.0, 1.0, 2.0, 2.0]


def test_dispatch_errors_name_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "does-not-exist"
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        load_detection_dataset(str(missing))
    with pytest.raises(FileNotFoundError, match=r"missing\.json"):
        load_detection_dataset("./missing.json")
    with pytest.raises(FileNotFoundError, match="not a Pascal VOC root"):
        load_detection_dataset(str(tmp_path), dataset_format="voc")
    with pytest.raises(ValueError, match="unknown dataset_format 'yolo'"):
        load_detection_dataset(str(tmp_path), dataset_format="yolo")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"notes\.txt is a file but not a COCO \.json"):
        load_detection_dataset(str(tmp_path / "notes.txt"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"empty is not a VOC root, a COCO folder"):
        load_detection_dataset(str(empty), cache_dir=str(tmp_path / "cache"))


# ----------------------------------------------------------------------------------------------------------------------
# Collator
# ----------------------------------------------------------------------------------------------------------------------
def test_collator_shapes_pixels_and_normalised_boxes() -> None:
    ds = SyntheticShapesDataset(num_images=3, seed=1)
    examples = [ds[i] for i in range(3)]
    batch = DetrCollator(default_image_processor(128))(examples)
    assert batch["pixel_values"].shape == (3, 3, 128, 128) and batch["pixel_values"].dtype == torch.float32
    assert batch["pixel_mask"].shape == (3, 128, 128) and batch["pixel_mask"].dtype == torch.long
    assert bool((batch["pixel_mask"] == 1).all())
    # 128 px images are not resized: pixel values are the ImageNet-normalised pixels.
    raw = torch.from_numpy(_pixels(examples[0]["image"])).permute(2, 0, 1).float() / 255.0
    torch.testing.assert_close(batch["pixel_values"][0], (raw - IMAGENET_MEAN) / IMAGENET_STD, atol=1e-5, rtol=0)
    for ex, label in zip(examples, batch["labels"]):
        assert label["class_labels"].dtype == torch.long
        assert label["class_labels"].tolist() == [a["category_id"] for a in ex["annotations"]]
        expected = torch.tensor(
            [
                [(x + w / 2) / 128, (y + h / 2) / 128, w / 128, h / 128]
                for x, y, w, h in (a["bbox"] for a in ex["annotations"])
            ]
        )
        torch.testing.assert_close(label["boxes"], expected)
        assert label["image_id"].tolist() == [ex["image_id"]]
        assert label["orig_size"].tolist() == [128, 128] and label["size"].tolist() == [128, 128]
    # A hand-checked box: item 0 of seed 1.
    x, y, w, h = examples[0]["annotations"][0]["bbox"]
    cx, cy = (x + w / 2) / 128, (y + h / 2) / 128
    assert batch["labels"][0]["boxes"][0].tolist() == pytest.approx([cx, cy, w / 128, h / 128], abs=1e-6)


def test_collator_boxes_are_relative_to_the_unpadded_image() -> None:
    tall = SyntheticShapesDataset(num_images=1, image_size=128, seed=1)[0]
    flat = SyntheticShapesDataset(num_images=1, image_size=(96, 128), seed=2)[0]
    flat["annotations"] = [{"bbox": [10.0, 20.0, 30.0, 40.0], "category_id": 2, "area": 1200.0, "iscrowd": 0}]
    batch = DetrCollator(default_image_processor(128))([tall, flat])
    assert batch["pixel_values"].shape == (2, 3, 128, 128)
    assert bool((batch["pixel_mask"][1, :96] == 1).all()) and bool((batch["pixel_mask"][1, 96:] == 0).all())
    assert bool((batch["pixel_values"][1, :, 96:] == 0).all())
    # cx = 25 / 128, cy = 40 / 96: normalised by the image (96 px high), not by the padded canvas (128 px), as DETR's
    # pred_boxes are, so post-processing with orig_size maps them back to the right pixels.
    torch.testing.assert_close(batch["labels"][1]["boxes"], torch.tensor([[25 / 128, 40 / 96, 30 / 128, 40 / 96]]))
    assert batch["labels"][1]["size"].tolist() == [96, 128] and batch["labels"][1]["orig_size"].tolist() == [96, 128]
    assert batch["labels"][0]["size"].tolist() == [128, 128]
    logits = torch.full((1, 1, 4), -10.0)
    logits[0, 0, 2] = 10.0
    processor = default_image_processor(128)
    result = processor.post_process_object_detection(
        DetrObjectDetectionOutput(logits=logits, pred_boxes=batch["labels"][1]["boxes"][None]),
        threshold=0.5,
        target_sizes=[(96, 128)],
    )[0]
    torch.testing.assert_close(result["boxes"], torch.tensor([[10.0, 20.0, 40.0, 60.0]]))


def test_collator_horizontal_flip() -> None:
    ds = SyntheticShapesDataset(num_images=2, seed=4)
    examples = [ds[0], ds[1]]
    processor = default_image_processor(128)
    plain = DetrCollator(processor)(examples)
    flipped = DetrCollator(processor, augment=True, flip_prob=1.0)(examples)
    torch.testing.assert_close(flipped["pixel_values"], plain["pixel_values"].flip(-1))
    for a, b in zip(plain["labels"], flipped["labels"]):
        mirrored = a["boxes"].clone()
        mirrored[:, 0] = 1.0 - mirrored[:, 0]
        torch.testing.assert_close(b["boxes"], mirrored)
        assert torch.equal(a["class_labels"], b["class_labels"])
    # The input examples are not modified, and random flips with a seeded generator are reproducible and mixed.
    assert examples[0]["annotations"] == ds[0]["annotations"]
    reference_x = plain["labels"][0]["boxes"][0, 0].item()

    def flip_decisions(seed: int) -> list[bool]:
        collator = DetrCollator(processor, augment=True, generator=torch.Generator().manual_seed(seed))
        return [abs(collator([examples[0]])["labels"][0]["boxes"][0, 0].item() - reference_x) > 1e-6 for _ in range(12)]

    first = flip_decisions(0)
    assert first == flip_decisions(0)
    assert any(first) and not all(first)
    with pytest.raises(ValueError, match="flip_prob"):
        DetrCollator(processor, flip_prob=1.5)
    with pytest.raises(ValueError, match="empty batch"):
        DetrCollator(processor)([])


def test_hflip_example_mirrors_the_image_and_a_known_box() -> None:
    pixels = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    ann = {"bbox": [1.0, 0.5, 2.5, 3.0], "category_id": 2, "area": 7.5, "iscrowd": 1}
    example = {"image": Image.fromarray(pixels), "image_id": 5, "annotations": [ann]}
    flipped = hflip_example(example)
    np.testing.assert_array_equal(_pixels(flipped["image"]), pixels[:, ::-1])
    # x -> W - x - w = 6 - 1 - 2.5; everything else kept.
    assert flipped["annotations"] == [{"bbox": [2.5, 0.5, 2.5, 3.0], "category_id": 2, "area": 7.5, "iscrowd": 1}]
    assert flipped["image_id"] == 5 and example["annotations"][0]["bbox"] == [1.0, 0.5, 2.5, 3.0]
    assert hflip_example({**example, "annotations": []})["annotations"] == []


@needs_bccd
def test_collator_resizes_bccd_with_known_box() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataQualityWarning)
        ds = VocDetectionDataset(BCCD_ROOT, split="trainval")
    ex = ds[ds.ids.index("BloodImage_00000")]
    batch = DetrCollator(default_image_processor(128))([ex])
    # 640x480 -> 128x96 (scale 0.2). WBC box [259, 176, 232, 200] -> [51.8, 35.2, 46.4, 40.0] on a 96x128 canvas.
    assert batch["pixel_values"].shape == (1, 3, 96, 128)
    expected = torch.tensor([(51.8 + 23.2) / 128, (35.2 + 20.0) / 96, 46.4 / 128, 40.0 / 96])
    torch.testing.assert_close(batch["labels"][0]["boxes"][0], expected)
    assert len(batch["labels"][0]["boxes"]) == 20


def test_default_image_processor_sizes() -> None:
    assert default_image_processor(128).size["max_height"] == 128
    exact = default_image_processor((64, 96))
    assert (exact.size["height"], exact.size["width"]) == (64, 96)
    with pytest.raises(ValueError, match="positive"):
        default_image_processor(0)
    assert data_module.__doc__ is not None and data_module.__doc__.startswith("Detection datasets")


def test_synthetic_cache_returns_the_same_items_and_respects_its_budget(monkeypatch):
    plain = SyntheticShapesDataset(num_images=6, image_size=32, seed=3)
    cached = SyntheticShapesDataset(num_images=6, image_size=32, seed=3, cache_bytes=2 * 32 * 32 * 3)
    calls = []  # items the cached dataset had to generate
    generate = SyntheticShapesDataset._generate
    monkeypatch.setattr(
        SyntheticShapesDataset, "_generate", lambda self, i: (self is cached and calls.append(i)) or generate(self, i)
    )
    for _ in range(2):  # two epochs
        for i in range(6):
            expected, got = plain[i], cached[i]
            assert np.array_equal(np.asarray(got["image"]), np.asarray(expected["image"]))
            assert got["annotations"] == expected["annotations"]
    # The budget holds two images: items 0 and 1 are generated once, the others in every epoch.
    assert sorted(calls) == [0, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    # Callers may modify what they get without corrupting the cache.
    cached[0]["annotations"][0]["bbox"][0] = -100.0
    assert cached[0]["annotations"] == plain[0]["annotations"]
    with pytest.raises(ValueError, match="cache_bytes"):
        SyntheticShapesDataset(num_images=1, cache_bytes=-1)
