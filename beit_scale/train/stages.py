"""The stages by name: tokenizer, mim, classify -> their Task."""
from __future__ import annotations

from beit_scale.train.finetune import ClassifyTask
from beit_scale.train.tasks import MIMTask, Task, TokenizerTask

STAGE_TASKS = {"tokenizer": TokenizerTask, "mim": MIMTask, "classify": ClassifyTask}


def make_task(cfg, tokenizer_path=None) -> Task:
    """The Task of `cfg.stage` (MIM takes the tokenizer file its targets come from)."""
    if cfg.stage == "mim":
        return MIMTask(cfg, tokenizer_path)
    return STAGE_TASKS[cfg.stage](cfg)
