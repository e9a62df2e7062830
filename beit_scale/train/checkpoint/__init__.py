"""All checkpoint I/O.

  layout.py   the on-disk layout and the questions one may ask of it without a process group
              (complete checkpoints, verify against the manifest, read the manifest)
  manager.py  CheckpointManager: save / select / load / retain, atomic pointers, elastic resume;
              it saves named stateful objects (each with state_dict()/load_state_dict())
  reader.py   reading weights out of checkpoints and other files: consolidated fp32 state dicts,
              and the weight import behind `init.from` (runs, checkpoints, exports, timm files)
"""
from beit_scale.train.checkpoint.layout import (COMPLETE, DS_LATEST, LATEST, MANIFEST, TASK_STATE,
                                                complete_checkpoints_in, file_crc32, read_manifest, step_of,
                                                tag_for, verify)
from beit_scale.train.checkpoint.manager import TRAINER, CheckpointManager, Stateful

__all__ = ["COMPLETE", "DS_LATEST", "LATEST", "MANIFEST", "TASK_STATE", "complete_checkpoints_in", "file_crc32",
           "read_manifest", "step_of", "tag_for", "verify", "TRAINER", "CheckpointManager", "Stateful"]
