"""Detection datasets (COCO JSON, Pascal VOC, Hub `datasets`, synthetic shapes) and the DETR batch collator."""

from qdetr_hf.data.base import (
    CocoAnnotation,
    DetectionDataset,
    DetectionExample,
    ImageInfo,
    scaled_coco_area_ranges,
)
from qdetr_hf.data.coco import CocoDetectionDataset
from qdetr_hf.data.collator import DetrCollator, default_image_processor, hflip_example
from qdetr_hf.data.export import export_coco, to_hf_dataset
from qdetr_hf.data.hub import HubDetectionDataset
from qdetr_hf.data.loading import DatasetArguments, load_detection_dataset
from qdetr_hf.data.sanitize import BoxFix, DataQualityWarning, ImageSizeMismatch
from qdetr_hf.data.splits import canonical_split
from qdetr_hf.data.synthetic import (
    SHAPE_NAMES,
    SYNTHETIC_DEFAULT_SIZES,
    SYNTHETIC_SPLIT_SEED_OFFSETS,
    SyntheticShapesDataset,
)
from qdetr_hf.data.voc import IMAGE_SUFFIXES, VocDetectionDataset, find_voc_root

__all__ = [
    "IMAGE_SUFFIXES",
    "SHAPE_NAMES",
    "SYNTHETIC_DEFAULT_SIZES",
    "SYNTHETIC_SPLIT_SEED_OFFSETS",
    "BoxFix",
    "CocoAnnotation",
    "CocoDetectionDataset",
    "DataQualityWarning",
    "DatasetArguments",
    "DetectionDataset",
    "DetectionExample",
    "DetrCollator",
    "HubDetectionDataset",
    "ImageInfo",
    "ImageSizeMismatch",
    "SyntheticShapesDataset",
    "VocDetectionDataset",
    "canonical_split",
    "default_image_processor",
    "export_coco",
    "find_voc_root",
    "hflip_example",
    "load_detection_dataset",
    "scaled_coco_area_ranges",
    "to_hf_dataset",
]
