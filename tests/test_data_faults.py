"""Bad input to the dataset loaders: corrupt images, wrong sizes, VOC folders without splits, near-duplicate class
names and file names that escape their folder."""

from __future__ import annotations

import gc
import json
import warnings
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from qdetr_hf.data import (
    CocoDetectionDataset,
    DataQualityWarning,
    SyntheticShapesDataset,
    VocDetectionDataset,
    export_coco,
    load_detection_dataset,
)


def _write_image(path: Path, width: int, height: int, value: int = 90) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height), (value, 30, 200 - value)).save(path)


def _coco_json(path: Path, images: list[dict], annotations: list[dict] | None = None) -> Path:
    path.write_text(
        json.dumps({"images": images, "categories": [{"id": 1, "name": "cell"}], "annotations": annotations or []})
    )
    return path


def _voc_xml(filename: str, objects: list[tuple[str, int, int, int, int]]) -> str:
    boxes = "".join(
        f"<object><name>{name}</name><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax>"
        "</bndbox></object>"
        for name, x0, y0, x1, y1 in objects
    )
    return f"<annotation><filename>{filename}</filename>{boxes}</annotation>"


# ----------------------------------------------------------------------------------------------------------------------
# Corrupt images and sizes (COCO)
# ----------------------------------------------------------------------------------------------------------------------
def test_a_truncated_image_error_names_the_file(tmp_path: Path) -> None:
    _write_image(tmp_path / "images" / "good.jpg", 64, 48)
    noise = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "images" / "cut.jpg", quality=95)
    data = (tmp_path / "images" / "cut.jpg").read_bytes()
    (tmp_path / "images" / "cut.jpg").write_bytes(data[: len(data) // 2])  # the header survives, the pixels do not
    annotation_file = _coco_json(
        tmp_path / "ann.json",
        [
            {"id": 1, "file_name": "good.jpg", "width": 64, "height": 48},
            {"id": 2, "file_name": "cut.jpg", "width": 64, "height": 48},
        ],
    )
    ds = CocoDetectionDataset(tmp_path / "images", annotation_file)
    assert ds[0]["image"].size == (64, 48)
    with pytest.raises(OSError, match=r"cut\.jpg.*ann\.json.*(truncated|Truncated)"):
        ds[1]
    # Not an image at all: named too (whether found when reading sizes or when loading).
    (tmp_path / "images" / "junk.jpg").write_bytes(b"this is not a JPEG")
    junk = _coco_json(tmp_path / "junk.json", [{"id": 1, "file_name": "junk.jpg", "width": 64, "height": 48}])
    with pytest.raises(OSError, match=r"junk\.jpg"):
        CocoDetectionDataset(tmp_path / "images", junk)[0]


def test_a_json_size_that_disagrees_with_the_image_file_is_corrected_with_one_warning(tmp_path: Path) -> None:
    _write_image(tmp_path / "images" / "big.png", 100, 80)
    _write_image(tmp_path / "images" / "also.png", 60, 60)
    _write_image(tmp_path / "images" / "right.png", 30, 20)
    annotation_file = _coco_json(
        tmp_path / "ann.json",
        [
            {"id": 1, "file_name": "big.png", "width": 50, "height": 40},  # half the real size
            {"id": 2, "file_name": "also.png", "width": 60, "height": 30},
            {"id": 3, "file_name": "right.png", "width": 30, "height": 20},
        ],
        [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [60, 50, 20, 20], "area": 400.0},  # outside 50 x 40
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "area": 400.0},
            {"id": 3, "image_id": 2, "category_id": 1, "bbox": [5, 25, 10, 20], "area": 200.0},
        ],
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = CocoDetectionDataset(tmp_path / "images", annotation_file)
    quality = [str(w.message) for w in caught if issubclass(w.category, DataQualityWarning)]
    assert len(quality) == 1, quality
    assert "2 of 3 images" in quality[0] and "big.png (JSON 50x40, file 100x80)" in quality[0]
    assert "also.png (JSON 60x30, file 60x60)" in quality[0] and "right.png" not in quality[0]
    # The file is authoritative: nothing was clipped or dropped against the wrong size.
    assert ds.box_fixes == []
    assert [a["bbox"] for a in ds.get_annotations(0)] == [[60.0, 50.0, 20.0, 20.0], [10.0, 10.0, 20.0, 20.0]]
    assert ds.get_annotations(1)[0]["bbox"] == [5.0, 25.0, 10.0, 20.0]
    assert ds.get_image_info(0) == {"id": 1, "file_name": "big.png", "width": 100, "height": 80}
    assert [(s.file_name, s.json_size, s.file_size) for s in ds.size_mismatches] == [
        ("big.png", (50, 40), (100, 80)),
        ("also.png", (60, 30), (60, 60)),
    ]


# ----------------------------------------------------------------------------------------------------------------------
# VOC folders without ImageSets/Main (labelImg's layout)
# ----------------------------------------------------------------------------------------------------------------------
def _labelimg_folder(root: Path, n: int = 10) -> Path:
    for k in range(n):
        _write_image(root / "JPEGImages" / f"img{k:02d}.jpg", 32, 24, value=10 * k)
        (root / "Annotations").mkdir(parents=True, exist_ok=True)
        (root / "Annotations" / f"img{k:02d}.xml").write_text(
            _voc_xml(f"img{k:02d}.jpg", [("cell" if k % 2 else "blob", 2, 3, 12, 15)])
        )
    return root


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Where `datasets` would cache by default (~/.cache/huggingface/datasets), redirected into tmp_path."""
    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    return cache


def test_a_voc_folder_without_image_sets_loads_every_xml_file_with_a_deterministic_split(
    tmp_path: Path, hf_cache: Path
) -> None:
    root = _labelimg_folder(tmp_path / "labelimg")
    everything = load_detection_dataset(str(root), split="trainval")
    assert isinstance(everything, VocDetectionDataset)
    assert everything.ids == [f"img{k:02d}" for k in range(10)]
    assert everything.id2label == {0: "blob", 1: "cell"}
    train = load_detection_dataset(str(root))  # split "train" by default
    val = load_detection_dataset(str(root), split="validation")
    assert len(train) == 8 and len(val) == 2
    assert set(train.ids) | set(val.ids) == set(everything.ids) and not set(train.ids) & set(val.ids)
    # Deterministic, and the user chooses the fraction and the seed.
    assert load_detection_dataset(str(root), split="val").ids == val.ids
    assert VocDetectionDataset(root, split="val", val_fraction=0.5).ids != val.ids
    assert len(VocDetectionDataset(root, split="val", val_fraction=0.5)) == 5
    reseeded = [VocDetectionDataset(root, split="val", split_seed=seed).ids for seed in range(4)]
    assert any(ids != val.ids for ids in reseeded)
    # Image ids are positions among all XML files, as with split files.
    assert sorted(val.get_image_info(i)["id"] for i in range(2)) == sorted(everything.ids.index(i) for i in val.ids)
    with pytest.raises(FileNotFoundError, match=r"ImageSets/Main/test\.txt"):
        load_detection_dataset(str(root), split="test")
    with pytest.raises(ValueError, match="val_fraction"):
        VocDetectionDataset(root, split="val", val_fraction=1.5)
    assert not hf_cache.exists()


def test_a_failed_local_load_writes_nothing_to_the_datasets_cache(tmp_path: Path, hf_cache: Path) -> None:
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "readme.txt").write_text("not a detection dataset\n")
    with pytest.raises(ValueError) as error:
        load_detection_dataset(str(notes))  # `datasets` reads it as text: no image or objects column
    assert not hf_cache.exists()
    assert "notes is not a VOC root, a COCO folder" in str(error.value) and "missing ['image', 'objects']" in str(
        error.value
    )
    # An Annotations/ folder whose images are missing fails as VOC, naming the image, not in `datasets`.
    broken = tmp_path / "broken"
    (broken / "Annotations").mkdir(parents=True)
    (broken / "JPEGImages").mkdir()
    (broken / "Annotations" / "a.xml").write_text(_voc_xml("a.jpg", [("cell", 1, 1, 5, 5)]))
    with pytest.raises(FileNotFoundError, match=r"no image for 'a'"):
        load_detection_dataset(str(broken))
    assert not hf_cache.exists() or not any(hf_cache.iterdir())


def test_a_local_data_folder_is_prepared_outside_the_datasets_cache(tmp_path: Path, hf_cache: Path) -> None:
    folder = tmp_path / "imagefolder"
    for k in range(2):
        _write_image(folder / f"{k}.png", 24, 16, value=30 * k)
    rows = [{"file_name": f"{k}.png", "objects": {"bbox": [[1.0, 2.0, 3.0, 4.0]], "category": ["a"]}} for k in range(2)]
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    ds = load_detection_dataset(str(folder))
    assert len(ds) == 2 and ds[1]["annotations"][0]["bbox"] == [1.0, 2.0, 3.0, 4.0]
    assert not hf_cache.exists()
    prepared = Path(ds.hf_dataset.cache_files[0]["filename"])
    assert prepared.is_file() and tmp_path not in prepared.parents
    temporary = next(p for p in prepared.parents if p.name.startswith("qdetr-hf-datasets-"))
    del ds
    gc.collect()
    assert not temporary.exists()  # removed with the dataset


# ----------------------------------------------------------------------------------------------------------------------
# Class names that differ only by case or whitespace (VOC)
# ----------------------------------------------------------------------------------------------------------------------
def test_voc_class_names_that_differ_only_by_case_or_whitespace_are_warned_about(tmp_path: Path) -> None:
    root = tmp_path / "voc"
    objects = {
        "a": [("RBC", 1, 1, 5, 5), ("WBC", 2, 2, 8, 8)],
        "b": [("rbc", 1, 1, 5, 5), ("RBC ", 3, 3, 9, 9)],
        "c": [("Red Cell", 1, 1, 5, 5), ("red  cell", 2, 2, 6, 6)],
    }
    for stem, objs in objects.items():
        _write_image(root / "JPEGImages" / f"{stem}.jpg", 16, 16)
        (root / "Annotations").mkdir(parents=True, exist_ok=True)
        (root / "Annotations" / f"{stem}.xml").write_text(_voc_xml(f"{stem}.jpg", objs))
    with pytest.warns(DataQualityWarning, match=r"differ only by case or whitespace") as caught:
        ds = VocDetectionDataset(root)
    message = "; ".join(str(w.message) for w in caught if "differ only" in str(w.message))
    assert "'RBC' (2 objects), 'rbc' (1 object, b.xml)" in message
    assert "'Red Cell'" in message and "'red  cell'" in message and "'WBC'" not in message
    # The classes stay as written (surrounding whitespace aside): the warning says how to merge them.
    assert sorted(ds.id2label.values()) == ["RBC", "Red Cell", "WBC", "rbc", "red  cell"]
    assert "class_names" in message
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # names given explicitly: no warning
        VocDetectionDataset(root, class_names=["RBC", "Red Cell", "WBC", "rbc", "red  cell"])


# ----------------------------------------------------------------------------------------------------------------------
# File names that escape their folder
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["../../evil.png", "<absolute>", "sub/../../evil.png", "..\\..\\evil.png"])
def test_export_coco_refuses_file_names_that_leave_the_output_folder(tmp_path: Path, name: str, monkeypatch) -> None:
    name = str(tmp_path / "evil.png") if name == "<absolute>" else name
    dataset = SyntheticShapesDataset(num_images=2, image_size=32, seed=1)
    info = dataset.get_image_info
    monkeypatch.setattr(dataset, "get_image_info", lambda i: {**info(i), "file_name": name} if i == 1 else info(i))
    with pytest.raises(ValueError, match=r"image 1 .*file name .*(absolute|outside)"):
        export_coco(dataset, tmp_path / "export")
    assert not (tmp_path / "evil.png").exists()
    assert not list((tmp_path / "export").glob("**/*.png"))  # checked before anything is written


@pytest.mark.parametrize("name", ["../outside.png", "/etc/hostname", "a/../../outside.png"])
def test_the_coco_loader_refuses_file_names_outside_its_images_folder(tmp_path: Path, name: str) -> None:
    _write_image(tmp_path / "outside.png", 8, 8)
    (tmp_path / "images").mkdir()
    annotation_file = _coco_json(tmp_path / "ann.json", [{"id": 7, "file_name": name, "width": 8, "height": 8}])
    with pytest.raises(ValueError, match=r"ann\.json: image 7 has file name .*(absolute|outside)"):
        CocoDetectionDataset(tmp_path / "images", annotation_file)
    # Sub-folders inside images_dir are fine.
    _write_image(tmp_path / "images" / "sub" / "ok.png", 8, 8)
    fine = _coco_json(tmp_path / "fine.json", [{"id": 1, "file_name": "sub/./ok.png", "width": 8, "height": 8}])
    assert CocoDetectionDataset(tmp_path / "images", fine)[0]["image"].size == (8, 8)


def test_the_voc_loader_refuses_an_xml_filename_outside_its_images_folder(tmp_path: Path) -> None:
    root = tmp_path / "voc"
    _write_image(tmp_path / "secret.jpg", 8, 8)
    _write_image(root / "JPEGImages" / "a.jpg", 8, 8)
    (root / "Annotations").mkdir(parents=True)
    (root / "Annotations" / "a.xml").write_text(_voc_xml("../../secret.jpg", [("cell", 1, 1, 4, 4)]))
    with pytest.raises(ValueError, match=r"a\.xml.*<filename> '\.\./\.\./secret\.jpg'.*outside"):
        VocDetectionDataset(root)
