"""Tests for qdetr_hf.visualization: equal tiles whatever the photo size, boxes at the right pixels, ground truth."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from qdetr_hf.visualization import PALETTE, detection_grid, draw_detections, save_detection_grid

GREY = (128, 128, 128)
ID2LABEL = {0: "cat", 1: "dog"}


def _detections(boxes: list[list[float]], labels: list[int], scores: list[float]) -> dict[str, torch.Tensor]:
    return {"boxes": torch.tensor(boxes).reshape(-1, 4), "labels": torch.tensor(labels), "scores": torch.tensor(scores)}


def _pixels_of(picture: Image.Image, color: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Rows and columns of the pixels of exactly ``color``."""
    return np.nonzero((np.asarray(picture) == np.array(color, dtype=np.uint8)).all(axis=-1))


def test_photos_of_different_sizes_give_tiles_of_one_size_and_a_bounded_grid() -> None:
    sizes = [(5000, 300), (200, 2000)] * 4  # (width, height): very wide and very tall photos
    images = [Image.new("RGB", size, GREY) for size in sizes]
    detections = [_detections([[10.0, 10.0, w / 2, h / 2]], [k % 2], [0.9]) for k, (w, h) in enumerate(sizes)]
    tile = 256
    for image, det in zip(images, detections):
        assert draw_detections(image, det, ID2LABEL, tile_size=tile).size == (tile, tile)
    grid = detection_grid(images, detections, ID2LABEL, columns=4, tile_size=tile)
    # 4 tiles per row, 2 rows, whatever the photos: the same grid as for eight small photos.
    small = [Image.new("RGB", (20, 20), GREY) for _ in sizes]
    assert grid.size == detection_grid(small, detections, ID2LABEL, columns=4, tile_size=tile).size
    assert 4 * tile < grid.width <= 4 * tile + 5 * tile // 8
    assert 2 * tile < grid.height <= 2 * tile + 3 * tile // 8
    # The boxes are drawn, in their class colours.
    assert all(_pixels_of(grid, PALETTE[label])[0].size > 0 for label in (0, 1))
    with_truth = detection_grid(images, detections, ID2LABEL, columns=4, tile_size=tile, ground_truth=detections)
    assert with_truth.width <= 2 * grid.width  # ground truth beside the predictions: at most twice as wide


def test_a_known_box_is_drawn_at_its_pixels() -> None:
    # A square image fills the tile: box edges land on the given pixels.
    square = Image.new("RGB", (100, 100), GREY)
    picture = np.asarray(draw_detections(square, _detections([[20, 30, 60, 80]], [0], [0.9]), ID2LABEL, tile_size=100))
    red = np.array(PALETTE[0], dtype=np.uint8)
    assert (picture[70, 20] == red).all() and (picture[70, 60] == red).all()  # left and right edges, below the label
    assert (picture[80, 40] == red).all()  # bottom edge
    assert (picture[70, 19] == GREY).all() and (picture[70, 62] == GREY).all()  # outside
    assert (picture[70, 40] == GREY).all()  # inside, not filled
    # A 200 x 100 image is halved and centred (25 px of letterbox above and below): the box follows it.
    wide = Image.new("RGB", (200, 100), GREY)
    picture = np.asarray(draw_detections(wide, _detections([[40, 20, 120, 80]], [0], [0.9]), ID2LABEL, tile_size=100))
    # [40, 20, 120, 80] * 0.5 + (0, 25) = [20, 35, 60, 65]
    assert (picture[55, 20] == red).all() and (picture[55, 60] == red).all() and (picture[65, 40] == red).all()
    assert (picture[55, 40] == GREY).all() and (picture[66, 40] == GREY).all()
    assert (picture[10, 50] != GREY).any() and (picture[90, 50] != GREY).any()  # letterbox, not image
    # Without tile_size the image keeps its size (times `scale`), as before.
    picture = np.asarray(draw_detections(wide, _detections([[40, 20, 120, 80]], [0], [0.9]), ID2LABEL, scale=2))
    assert picture.shape == (200, 400, 3) and (picture[100, 80] == red).all() and (picture[100, 160] == GREY).all()


def test_predictions_below_the_threshold_are_not_drawn() -> None:
    image = Image.new("RGB", (100, 100), GREY)
    det = _detections([[20, 30, 60, 80], [10, 10, 30, 30]], [0, 1], [0.9, 0.3])
    picture = draw_detections(image, det, ID2LABEL, threshold=0.5, tile_size=100)
    assert _pixels_of(picture, PALETTE[0])[0].size > 0 and _pixels_of(picture, PALETTE[1])[0].size == 0
    assert _pixels_of(draw_detections(image, det, ID2LABEL, threshold=0.2, tile_size=100), PALETTE[1])[0].size > 0


@pytest.mark.parametrize("as_annotations", [True, False])
def test_ground_truth_is_drawn_beside_the_predictions(as_annotations: bool) -> None:
    image = Image.new("RGB", (100, 100), GREY)
    predictions = [_detections([[10, 30, 95, 80]], [0], [0.9])]  # a "cat" (red), wide enough for its label
    truth = (
        [[{"bbox": [10.0, 20.0, 40.0, 50.0], "category_id": 1, "area": 2000.0, "iscrowd": 0}]]  # a "dog" (green)
        if as_annotations
        else [{"boxes": torch.tensor([[10.0, 20.0, 50.0, 70.0]]), "labels": torch.tensor([1])}]
    )
    plain = detection_grid([image], predictions, ID2LABEL, tile_size=100)
    grid = detection_grid([image], predictions, ID2LABEL, tile_size=100, ground_truth=truth)
    assert _pixels_of(plain, PALETTE[1])[0].size == 0  # no ground truth without the argument
    assert grid.width > plain.width + 100 and grid.height >= plain.height
    green_rows, green_cols = _pixels_of(grid, PALETTE[1])
    red_rows, red_cols = _pixels_of(grid, PALETTE[0])
    # The ground truth is the left picture, the predictions the right one, each with its box's extent in pixels.
    assert green_cols.max() < grid.width // 2 <= red_cols.min()
    assert (green_cols.max() - green_cols.min(), green_rows.max() - green_rows.min()) == (40, 50)
    assert (red_cols.max() - red_cols.min(), red_rows.max() - red_rows.min()) == (85, 50)
    # Both boxes start at x = 10 in their pictures: the right picture starts a tile (100 px) and a gap further right.
    assert 100 < red_cols.min() - green_cols.min() <= 110


def test_save_detection_grid_keeps_the_old_call_and_checks_its_arguments(tmp_path: Path) -> None:
    images = [Image.new("RGB", (64, 48), GREY), Image.new("RGB", (640, 480), GREY)]
    detections = [_detections([[1, 2, 30, 40]], [0], [0.8]), _detections([], [], [])]
    path = save_detection_grid(images, detections, ID2LABEL, tmp_path / "sub" / "detections.png", threshold=0.5)
    assert path == tmp_path / "sub" / "detections.png"
    with Image.open(path) as saved:
        expected = detection_grid(images, detections, ID2LABEL, threshold=0.5)
        assert saved.size == expected.size
        np.testing.assert_array_equal(np.asarray(saved.convert("RGB")), np.asarray(expected))
    with pytest.warns(FutureWarning, match="scale"):
        save_detection_grid(images, detections, ID2LABEL, tmp_path / "old.png", 0.5, 4, 2)
    with pytest.raises(ValueError, match="as many detections as images"):
        save_detection_grid(images, detections[:1], ID2LABEL, tmp_path / "x.png")
    with pytest.raises(ValueError, match="one ground truth per image"):
        detection_grid(images, detections, ID2LABEL, ground_truth=detections[:1])
    with pytest.raises(ValueError, match="'boxes' and 'labels'"):
        detection_grid(images, [{"boxes": torch.zeros(0, 4)}] * 2, ID2LABEL)
