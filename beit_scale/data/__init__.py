"""Data: the embedded synthetic dataset, corruption-tolerant folders, transforms, masking.
(Shards: ``beit_scale.data.shards``, not imported here so that ``python -m`` runs it cleanly.)"""
from .datasets import (ClassifyDataset, MIMDataset, SafeImageFolder, TokenizerDataset,
                       bad_file_report, bad_file_summary, build_dataset, parse_key, read_journal,
                       resolve_data_root, seeded)
from .synthetic import ensure_synthetic_imagefolder
from .transforms import ClassifyTransform, MIMTransform, TokenizerTransform, to_float_image

__all__ = [
    "ClassifyDataset", "MIMDataset", "SafeImageFolder", "TokenizerDataset", "bad_file_report",
    "bad_file_summary", "build_dataset", "parse_key", "read_journal", "resolve_data_root", "seeded",
    "ensure_synthetic_imagefolder", "ClassifyTransform", "MIMTransform", "TokenizerTransform",
    "to_float_image",
]
