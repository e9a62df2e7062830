"""Writing files so that a reader never sees half of one: one scheme, one helper per kind.

Every file beit_scale writes for others to read (checkpoint side files and pointers, best
weights, exports, metrics rewrites, study results) is written to `.NAME.tmp-PID` in the same
folder, flushed to disk, and renamed over NAME: a crash leaves the old file or the new one,
never a torn one.  (models/dvae.py keeps its own three lines: models import nothing but torch.)
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator


def temp_path_for(out: Path) -> Path:
    return out.with_name(f".{out.name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def atomic_path(out: str | Path) -> Iterator[Path]:
    """Yield a temp path next to `out`; on success it is fsynced and renamed to `out`, on an
    error it is removed and `out` is untouched."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(out)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(out: str | Path, text: str) -> Path:
    with atomic_path(out) as tmp:
        tmp.write_text(text)
    return Path(out)


def save_safetensors(sd: dict, out: str | Path, metadata: dict | None = None) -> Path:
    """`sd` as a safetensors file (metadata values as strings), written atomically."""
    from safetensors.torch import save_file
    with atomic_path(out) as tmp:
        save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp),
                  metadata={k: str(v) for k, v in (metadata or {}).items()})
    return Path(out)
