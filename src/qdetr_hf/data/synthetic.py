"""Procedurally generated shapes, the package's embedded default dataset: ``SyntheticShapesDataset``."""

from __future__ import annotations

import copy

import numpy as np
from PIL import Image

from qdetr_hf.data.base import CocoAnnotation, DetectionDataset, DetectionExample, ImageInfo, scaled_coco_area_ranges

__all__ = ["SHAPE_NAMES", "SYNTHETIC_DEFAULT_SIZES", "SYNTHETIC_SPLIT_SEED_OFFSETS", "SyntheticShapesDataset"]

SHAPE_NAMES: tuple[str, ...] = ("circle", "square", "triangle")


# Synthetic splits use seeds that never collide for base seeds < 1_000_000.
SYNTHETIC_SPLIT_SEED_OFFSETS: dict[str, int] = {"train": 0, "validation": 1_000_000, "test": 2_000_000}
SYNTHETIC_DEFAULT_SIZES: dict[str, int] = {"train": 2000, "validation": 200, "test": 200}


class SyntheticShapesDataset(DetectionDataset):
    """Procedurally generated shapes on textured backgrounds: the package's embedded default dataset.

    Classes differ by shape only: ``circle``, ``square`` (randomly rotated) and ``triangle`` (equilateral, randomly
    rotated). Colours are drawn independently of the class (re-drawn until they contrast with the background under
    the shape and with any shape they overlap). Shape extents are log-uniform in ``[min_size, max_size]`` (default 6
    px to 60% of the shorter side), so with :func:`scaled_coco_area_ranges` all of small/medium/large occur.
    ``min_objects..max_objects`` objects per image; a placement is rejected when it would leave an existing object
    with less than ``1 - max_occlusion`` of its pixels visible. The background is a colour gradient plus stripes,
    and Gaussian noise covers the whole image (objects included).

    Boxes are tight around the *visible* pixels of each shape (pixel ``(r, c)`` covers ``[c, c+1) x [r, r+1)``, so a
    shape covering columns ``c0..c1`` has ``x = c0, w = c1 - c0 + 1``); ``area`` is the box area.

    Item ``i`` is generated from ``numpy.random.default_rng([seed, i])`` only, so items can be produced lazily, in
    any order and in DataLoader workers, and are identical every time.

    Args:
        num_images: Number of images.
        image_size: Side (int) or ``(height, width)``.
        seed: Dataset seed.
        min_objects: Minimum number of objects per image (>= 1).
        max_objects: Maximum number of objects per image.
        min_size: Smallest shape extent in px (default ``max(6, round(0.05 * shorter side))``).
        max_size: Largest shape extent in px (default ``0.6 * shorter side``).
        max_occlusion: Largest fraction of an object that later objects may cover.
        noise_std: Standard deviation of the pixel noise (0-255 scale).
        cache_bytes: Keep generated items in memory while their pixels take at most this many bytes (``3 H W`` per
            image), so later epochs skip generation; 0 disables. Each DataLoader worker holds its own cache.

    Raises:
        ValueError: On inconsistent arguments.
    """

    def __init__(
        self,
        num_images: int = 1000,
        image_size: int | tuple[int, int] = 128,
        seed: int = 0,
        min_objects: int = 1,
        max_objects: int = 10,
        min_size: float | None = None,
        max_size: float | None = None,
        max_occlusion: float = 0.4,
        noise_std: float = 8.0,
        cache_bytes: int = 0,
    ) -> None:
        super().__init__(dict(enumerate(SHAPE_NAMES)))
        height, width = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        shorter = min(height, width)
        min_size = float(min_size) if min_size is not None else float(max(6, round(0.05 * shorter)))
        max_size = float(max_size) if max_size is not None else 0.6 * shorter
        if num_images < 0:
            raise ValueError(f"num_images must be >= 0, got {num_images}")
        if shorter < 16:
            raise ValueError(f"image_size must be at least 16 px, got {image_size}")
        if not 1 <= min_objects <= max_objects:
            raise ValueError(f"need 1 <= min_objects <= max_objects, got {min_objects}, {max_objects}")
        if not 4 <= min_size <= max_size <= shorter:
            raise ValueError(f"need 4 <= min_size <= max_size <= {shorter}, got {min_size}, {max_size}")
        if not 0.0 <= max_occlusion < 1.0:
            raise ValueError(f"max_occlusion must be in [0, 1), got {max_occlusion}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if cache_bytes < 0:
            raise ValueError(f"cache_bytes must be >= 0, got {cache_bytes}")
        self.num_images = int(num_images)
        self.height, self.width = int(height), int(width)
        self.seed = int(seed)
        self.min_objects, self.max_objects = int(min_objects), int(max_objects)
        self.min_size, self.max_size = min_size, max_size
        self.max_occlusion = float(max_occlusion)
        self.noise_std = float(noise_std)
        self.cache_bytes = int(cache_bytes)
        self._cache: dict[int, tuple[np.ndarray, list[CocoAnnotation]]] = {}
        self._cached_bytes = 0
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        self._pixel_y, self._pixel_x = yy + 0.5, xx + 0.5  # pixel centres

    def __len__(self) -> int:
        """Number of images."""
        return self.num_images

    @property
    def area_ranges(self) -> dict[str, tuple[float, float]]:
        """COCO's size buckets scaled to this image size (:func:`scaled_coco_area_ranges`): at 128 px COCO's own
        thresholds would call 68% of the objects small and none large."""
        return scaled_coco_area_ranges(self.width, self.height)

    # -- generation ---------------------------------------------------------------------------------------------------
    def _background(self, rng: np.random.Generator) -> np.ndarray:
        h, w = self.height, self.width
        c0, c1 = rng.uniform(0, 255, size=(2, 3)).astype(np.float32)
        angle = rng.uniform(0, 2 * np.pi)
        t = np.cos(angle) * self._pixel_x + np.sin(angle) * self._pixel_y
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        image = c0 + t[..., None] * (c1 - c0)
        stripe_angle = rng.uniform(0, np.pi)
        period = rng.uniform(6.0, 0.5 * max(h, w))
        phase = rng.uniform(0, 2 * np.pi)
        s = np.cos(stripe_angle) * self._pixel_x + np.sin(stripe_angle) * self._pixel_y
        stripes = np.sin(2 * np.pi * s / period + phase)
        amplitude = rng.uniform(5.0, 30.0, size=3).astype(np.float32)
        image = image + stripes[..., None] * amplitude
        return np.clip(image, 0, 255).astype(np.float32)

    def _shape_mask(self, rng: np.random.Generator, shape: int, extent: float) -> tuple[np.ndarray, int, int] | None:
        """Rasterise one shape of the given extent at a random position; return (mask, top, left) of its window."""
        h, w = self.height, self.width
        if shape == 0:  # circle
            radius = extent / 2.0
            verts = None
            half_w = half_h = radius
        else:
            n_vertices = 4 if shape == 1 else 3
            theta = rng.uniform(0, 2 * np.pi) + np.arange(n_vertices) * (2 * np.pi / n_vertices)
            verts = np.stack([np.cos(theta), np.sin(theta)], axis=1)
            span = verts.max(axis=0) - verts.min(axis=0)
            verts = verts * (extent / float(span.max()))
            verts -= (verts.max(axis=0) + verts.min(axis=0)) / 2.0  # centre the bounding box on the origin
            half_w, half_h = float(verts[:, 0].max()), float(verts[:, 1].max())
        if 2 * half_w > w - 1 or 2 * half_h > h - 1:
            return None
        cx = rng.uniform(half_w + 0.5, w - half_w - 0.5)
        cy = rng.uniform(half_h + 0.5, h - half_h - 0.5)
        left, right = max(int(np.floor(cx - half_w)), 0), min(int(np.ceil(cx + half_w)) + 1, w)
        top, bottom = max(int(np.floor(cy - half_h)), 0), min(int(np.ceil(cy + half_h)) + 1, h)
        px = self._pixel_x[top:bottom, left:right] - cx
        py = self._pixel_y[top:bottom, left:right] - cy
        if verts is None:
            mask = px * px + py * py <= radius * radius
        else:
            # Convex polygon with counter-clockwise vertices: inside = left of (or on) every edge.
            edges = np.roll(verts, -1, axis=0) - verts
            cross = edges[:, 0, None, None] * (py[None] - verts[:, 1, None, None]) - edges[:, 1, None, None] * (
                px[None] - verts[:, 0, None, None]
            )
            mask = (cross >= 0).all(axis=0)
        if mask.sum() < 9:
            return None
        return mask, top, left

    def _pick_colour(self, rng: np.random.Generator, under: np.ndarray, neighbours: list[np.ndarray]) -> np.ndarray:
        """Random colour contrasting with the mean colour ``under`` the shape and with overlapped shapes."""
        best, best_score = None, -1.0
        for _ in range(24):
            colour = rng.uniform(0, 255, size=3).astype(np.float32)
            score = float(np.linalg.norm(colour - under)) / 110.0
            for other in neighbours:
                score = min(score, float(np.linalg.norm(colour - other)) / 90.0)
            if score >= 1.0:
                return colour
            if score > best_score:
                best, best_score = colour, score
        assert best is not None
        return best

    def generate(self, index: int) -> tuple[np.ndarray, list[CocoAnnotation]]:
        """Generate item ``index``.

        Args:
            index: Item index (negative allowed).

        Returns:
            ``(image uint8 (H, W, 3), annotations)``; with a cache the image is a read-only array.
        """
        index = self._check_index(index)
        cached = self._cache.get(index)
        if cached is not None:  # copies of the annotations, so callers cannot change the cache
            return cached[0], copy.deepcopy(cached[1])
        pixels, annotations = self._generate(index)
        if self._cached_bytes + pixels.nbytes <= self.cache_bytes:
            pixels.flags.writeable = False
            self._cache[index] = (pixels, copy.deepcopy(annotations))
            self._cached_bytes += pixels.nbytes
        return pixels, annotations

    def _generate(self, index: int) -> tuple[np.ndarray, list[CocoAnnotation]]:
        rng = np.random.default_rng([self.seed, index])
        h, w = self.height, self.width
        image = self._background(rng)
        owner = np.full((h, w), -1, dtype=np.int16)
        full_area: list[int] = []
        visible = np.zeros(0, dtype=np.int64)  # visible pixel count of each placed object
        colours: list[np.ndarray] = []
        shapes: list[int] = []
        target = int(rng.integers(self.min_objects, self.max_objects + 1))
        log_lo, log_hi = np.log(self.min_size), np.log(self.max_size)
        for _ in range(target):
            shape = int(rng.integers(len(SHAPE_NAMES)))
            extent = float(np.exp(rng.uniform(log_lo, log_hi)))
            for attempt in range(30):
                if attempt and attempt % 10 == 0:
                    extent = max(self.min_size, extent * 0.75)
                placed = self._shape_mask(rng, shape, extent)
                if placed is None:
                    continue
                mask, top, left = placed
                window = owner[top : top + mask.shape[0], left : left + mask.shape[1]]
                covered = window[mask]
                covered = covered[covered >= 0]
                hit = np.bincount(covered, minlength=len(full_area))
                if covered.size and (visible - hit < (1.0 - self.max_occlusion) * np.asarray(full_area)).any():
                    continue
                region = image[top : top + mask.shape[0], left : left + mask.shape[1]]
                neighbours = [colours[j] for j in np.unique(covered).tolist()]
                colour = self._pick_colour(rng, region[mask].mean(axis=0), neighbours)
                region[mask] = colour
                window[mask] = len(full_area)
                visible = np.append(visible - hit, int(mask.sum()))
                full_area.append(int(mask.sum()))
                colours.append(colour)
                shapes.append(shape)
                break
        if self.noise_std > 0:
            image += rng.standard_normal(size=image.shape, dtype=np.float32) * self.noise_std
        pixels = np.clip(np.rint(image), 0, 255).astype(np.uint8)

        annotations: list[CocoAnnotation] = []
        for j, shape in enumerate(shapes):
            rows = np.flatnonzero((owner == j).any(axis=1))
            cols = np.flatnonzero((owner == j).any(axis=0))
            x0, y0 = float(cols[0]), float(rows[0])
            bw, bh = float(cols[-1] - cols[0] + 1), float(rows[-1] - rows[0] + 1)
            annotations.append({"bbox": [x0, y0, bw, bh], "category_id": shape, "area": bw * bh, "iscrowd": 0})
        return pixels, annotations

    def __getitem__(self, index: int) -> DetectionExample:
        """Generate item ``index`` (image and annotations in one pass)."""
        index = self._check_index(index)
        pixels, annotations = self.generate(index)
        return {"image": Image.fromarray(pixels, mode="RGB"), "image_id": index, "annotations": annotations}

    def load_image(self, index: int) -> Image.Image:
        """Generate image ``index``."""
        return Image.fromarray(self.generate(index)[0], mode="RGB")

    def get_image_info(self, index: int) -> ImageInfo:
        """Image record; ``file_name`` is ``<index:06d>.png``."""
        index = self._check_index(index)
        return {"id": index, "file_name": f"{index:06d}.png", "width": self.width, "height": self.height}

    def get_annotations(self, index: int) -> list[CocoAnnotation]:
        """Annotations of item ``index`` (generates the item)."""
        return self.generate(index)[1]
