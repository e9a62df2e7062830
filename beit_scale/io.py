"""Writing files so that a reader never sees half of one: one helper each.

Every file beit_scale writes for others (checkpoint side files, best weights, exports, the
tokenizer) goes through a temp file in the same folder and an atomic rename.
"""
from __future__ import annotations

import os
from pathlib import Path


def _tmp_for(out: Path) -> Path:
    return out.with_name("." + out.name + ".tmp")


def atomic_write_text(out: str | Path, text: str) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_for(out)
    tmp.write_text(text)
    os.replace(tmp, out)
    return out


def save_safetensors(sd: dict, out: str | Path, metadata: dict | None = None) -> Path:
    """`sd` as a safetensors file (string metadata), written atomically."""
    from safetensors.torch import save_file
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_for(out)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp),
              metadata={k: str(v) for k, v in (metadata or {}).items()})
    os.replace(tmp, out)
    return out
