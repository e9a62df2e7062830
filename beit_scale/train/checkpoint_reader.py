"""Reading beit_scale checkpoints: which folder, and its full fp32 weights.

`consolidated_state_dict(run_dir_or_checkpoint)` accepts a run dir (its newest valid checkpoint),
a checkpoints dir or a checkpoint folder (`.../checkpoints/step_00000100`) and returns
(fp32 state dict, manifest).

ZeRO 1-3 checkpoints hold fp32 master weights partitioned across ranks; DeepSpeed's
zero_to_fp32 merges them (through the engine module).  ZeRO 0 has no partitions: the module
weights are in the model-states file (a torch pickle written by DeepSpeed; it must be loaded
with weights_only=False, which is why we only ever hand out safetensors to others).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from beit_scale.train.checkpoint import COMPLETE, MANIFEST, CheckpointManager, complete_checkpoints_in


def resolve_checkpoint(path: str | Path, checksums: bool = False) -> Path:
    """A checkpoint folder from a run dir / checkpoints dir / checkpoint folder; checksums=True
    also checks every file's CRC32 (a run dir then falls back past a corrupted newest one)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if (p / "checkpoints").is_dir():
        p = p / "checkpoints"
    if p.name == "checkpoints" and p.is_dir():
        for c in reversed(complete_checkpoints_in(p)):
            if CheckpointManager.verify(c, checksums=checksums) is None:
                return c
        raise FileNotFoundError(f"{path}: no complete, intact checkpoint in {p} (saves that did not finish "
                                f"have no {COMPLETE} marker; checksum failures are skipped too)")
    if not (p / MANIFEST).exists():
        raise FileNotFoundError(f"{path}: not a run dir or beit_scale checkpoint folder (no {MANIFEST})")
    reason = CheckpointManager.verify(p, checksums=checksums)
    if reason:
        raise ValueError(f"{path}: checkpoint unusable: {reason}")
    return p


def consolidated_state_dict(path: str | Path, checksums: bool = False) -> tuple[dict, dict]:
    ckpt = resolve_checkpoint(path, checksums=checksums)
    manifest = json.loads((ckpt / MANIFEST).read_text())
    if manifest["zero_stage"] == 0:
        blob = torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        sd = {k: v.float() if v.is_floating_point() else v for k, v in blob["module"].items()}
    else:
        from beit_scale.train.parallelize import fp32_state_dict_from_zero_checkpoint
        sd = fp32_state_dict_from_zero_checkpoint(ckpt.parent, tag=ckpt.name)
        sd = {k: v.float().contiguous() for k, v in sd.items()}
    # Buffers (e.g. relative_position_index) are not in DeepSpeed's fp32 partitions; the model rebuilds them.
    return sd, manifest
