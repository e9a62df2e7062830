"""The file list of an ImageFolder, built once and cached with a fingerprint.

Listing 1.28M files on a shared filesystem takes minutes, on every rank and every restart. The
list is written once to a cache file; later starts read it and check a fingerprint instead of
listing: the modification times of the folder's directories (root, class folders, nested
folders), one ``stat`` per directory (~1,000 for ImageNet) rather than a listing of every file.
Adding, removing or renaming a file changes its directory's mtime, so a changed folder is
listed anew and the cache is never used stale (replacing a file's content in place changes no
path, so the index stays right). Filesystems with coarse mtimes (1 s) can miss a change made in
the same second the index was built; the index therefore refuses to trust any directory whose
mtime is within 2 s of the build and lists again next time.

Layout: ``<cache dir>/<sha1 of the folder's real path>.json`` holding the classes, per
directory its class and file names (relative), and the fingerprint. Written atomically, so
a waiting rank never reads half of it. Rank 0 builds it; the others call with ``wait=True`` and
poll for a valid index (``$BEIT_SCALE_INDEX_WAIT_S``, default 1800 s, then list themselves); one
built in this job is taken even if it is too fresh to be trusted by a later start, so the ranks
always agree on the list.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from beit_scale.io import atomic_write_text

VERSION = 1
_SETTLE_NS = 2_000_000_000  # a directory modified this close to the build is not trusted
# Waiting ranks take an index built since shortly before this process started: rank 0's, in this
# job, even when it is not trusted for later starts (the ranks then still agree on the list).
_JOB_SKEW_NS = 60_000_000_000
_PROCESS_START_NS = time.time_ns()


@dataclass
class FolderIndex:
    classes: list[str]
    samples: list[tuple[str, int]]  # (path relative to the root, class index), sorted
    source: str                     # "listed" or "cache"


def default_cache_dir() -> Path:
    base = os.environ.get("BEIT_SCALE_DATA_CACHE")
    return (Path(base) if base else Path("~/.cache/beit_scale").expanduser()) / "file_index"


def cache_file(root: Path, cache_dir: Path) -> Path:
    key = hashlib.sha1(os.path.realpath(root).encode()).hexdigest()[:16]
    return cache_dir / f"{key}.json"


def list_folder(root: Path, extensions: tuple[str, ...]) -> tuple[list[str], list[list]]:
    """``(classes, dirs)``; ``dirs = [[rel_dir, class_index, [file names]], ...]`` in the
    order ImageFolder samples are listed (sorted classes, sorted walk, sorted names)."""
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    dirs = []
    for c, name in enumerate(classes):
        for dirpath, dirnames, files in os.walk(root / name, followlinks=True):
            dirnames.sort()
            names = [f for f in sorted(files)
                     if f.lower().endswith(extensions) and not f.startswith(".")]
            dirs.append([os.path.relpath(dirpath, root), c, names])
    return classes, dirs


def fingerprint(root: Path, rel_dirs: list[str]) -> tuple[str, int]:
    """(hash of every directory's mtime, newest mtime in ns); OSError if one is gone."""
    h = hashlib.sha1()
    newest = 0
    for rel in [".", *rel_dirs]:
        m = os.stat(root / rel).st_mtime_ns
        newest = max(newest, m)
        h.update(f"{rel}\0{m}\n".encode())
    return h.hexdigest(), newest


def _read_valid(path: Path, root: Path, extensions, built_after: int | None = None
                ) -> FolderIndex | None:
    """The cached index if its fingerprint matches the folder now. An index built within
    ``_SETTLE_NS`` of a directory change is used only by waiters, and only if it was built after
    ``built_after`` (in this job, by rank 0)."""
    try:
        rec = json.loads(path.read_text())
        if rec.get("version") != VERSION or rec.get("extensions") != list(extensions):
            return None
        if not rec.get("trusted") and (built_after is None or rec.get("built_ns", 0) < built_after):
            return None
        fp, _ = fingerprint(root, [d for d, _, _ in rec["dirs"]])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if fp != rec.get("fingerprint"):
        return None
    return FolderIndex(rec["classes"], _samples(rec["dirs"]), "cache")


def _samples(dirs: list[list]) -> list[tuple[str, int]]:
    return [(os.path.join(d, f) if d != "." else f, c) for d, c, names in dirs for f in names]


def build_index(root: Path, extensions, out: Path | None) -> FolderIndex:
    """List the folder; write the cache file ``out`` (if given and writable)."""
    t_build = time.time_ns()
    classes, dirs = list_folder(root, extensions)
    if out is not None:
        fp, newest = fingerprint(root, [d for d, _, _ in dirs])
        rec = {"version": VERSION, "root": os.path.realpath(root), "extensions": list(extensions),
               "fingerprint": fp, "trusted": newest < t_build - _SETTLE_NS, "built_ns": t_build,
               "classes": classes, "dirs": dirs}
        try:
            atomic_write_text(out, json.dumps(rec, separators=(",", ":")))
        except OSError as e:
            warnings.warn(f"could not cache the file list of {root} in {out}: {e}", RuntimeWarning)
    return FolderIndex(classes, _samples(dirs), "listed")


def load_index(root: str | os.PathLike, extensions: tuple[str, ...], *, cache=None,
               wait: bool = False, poll_s: float = 0.5) -> FolderIndex:
    """The folder's file list: from a valid cache file, else listed (and cached).

    ``cache``: a cache directory (the trainer uses the run dir), None for
    ``default_cache_dir()``, False for no cache (list every time).
    ``wait``: another process is building the index; poll for it instead of listing."""
    root = Path(root)
    if cache is False:
        return build_index(root, extensions, None)
    out = cache_file(root, Path(cache) if cache is not None else default_cache_dir())
    found = _read_valid(out, root, extensions)
    if found is not None:
        return found
    if wait:
        deadline = time.monotonic() + float(os.environ.get("BEIT_SCALE_INDEX_WAIT_S", 1800))
        while time.monotonic() < deadline:
            time.sleep(poll_s)
            found = _read_valid(out, root, extensions, built_after=_PROCESS_START_NS - _JOB_SKEW_NS)
            if found is not None:
                return found
        warnings.warn(f"no valid file index for {root} appeared in {out}; listing here",
                      RuntimeWarning)
    return build_index(root, extensions, out)
