"""The stages, one task each, by name: tokenizer, mim, classify, segment.

  base.py       the Task contract (abstract base class) and the helpers tasks share
  tokenizer.py  the discrete VAE            mim.py  masked image modeling
  classify.py   fine-tuning / linear probing     segment.py  semantic segmentation
"""
from __future__ import annotations

from beit_scale.train.tasks.base import Task
from beit_scale.train.tasks.classify import ClassifyTask
from beit_scale.train.tasks.mim import MIMTask
from beit_scale.train.tasks.segment import SegmentTask
from beit_scale.train.tasks.tokenizer import TokenizerTask

STAGE_TASKS: dict[str, type[Task]] = {"tokenizer": TokenizerTask, "mim": MIMTask, "classify": ClassifyTask,
                                      "segment": SegmentTask}


def make_task(cfg, tokenizer_path=None) -> Task:
    """The Task of `cfg.stage` (MIM takes the tokenizer file its targets come from)."""
    if cfg.stage == "mim":
        return MIMTask(cfg, tokenizer_path)
    return STAGE_TASKS[cfg.stage](cfg)
