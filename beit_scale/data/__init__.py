"""Data: the embedded synthetic dataset, corruption-tolerant folders, transforms, masking."""
from .datasets import (ClassifyDataset, MIMDataset, SafeImageFolder, TokenizerDataset,
                       bad_file_report, bad_file_summary, build_dataset, parse_key,
                       resolve_data_root, seeded)
from .synthetic import ensure_synthetic_imagefolder
from .transforms import ClassifyTransform, MIMTransform, TokenizerTransform, to_float_image

__all__ = [
    "ClassifyDataset", "MIMDataset", "SafeImageFolder", "TokenizerDataset", "bad_file_report",
    "bad_file_summary", "build_dataset", "parse_key", "resolve_data_root", "seeded",
    "ensure_synthetic_imagefolder", "ClassifyTransform", "MIMTransform", "TokenizerTransform",
    "to_float_image",
]
