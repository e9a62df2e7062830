"""Tar shards (WebDataset layout) with random access by sample index.

    python -m beit_scale.data.shards write IMAGEFOLDER OUT [--shard-size 1GB]

Writes ``OUT/shard-000000.tar, ...`` and ``OUT/index.json``. Each sample ``i`` (in
``SafeImageFolder`` order) is two tar members with one basename, as WebDataset expects:
``<i:09d>.<ext>`` (the file's bytes, unchanged) and ``<i:09d>.cls`` (the class index as text).
``index.json`` is a wids shard index (``"__kind__": "wids-shard-index-v1"``, a ``shardlist`` of
``{"url", "nsamples", "filesize"}``, urls relative to the index), which the ``webdataset``
package's ``wids.ShardListDataset`` reads, plus our own keys: ``classes``, and per shard the
byte ``offset`` and ``size`` of each sample's image member, its label and source name.

``ShardFolder(OUT)`` reads sample ``i`` with one seek and one read (no scan of the tar), so it
serves ``dataset[(index, seed)]`` exactly as ``SafeImageFolder`` does: the resumable sampler,
exact mid-epoch resume, elastic resume and worker-count independence hold unchanged, and the
samples are the folder's for the same keys (same bytes, same labels). A member that cannot be
read whole (a truncated shard) or decoded is skipped, counted and reported like a bad file,
named ``shard-000000.tar:<i:09d>.jpg (<source path>)``.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import re
import sys
import tarfile
from pathlib import Path

from beit_scale.io import atomic_path, atomic_write_text

from .datasets import SafeImageFolder

INDEX = "index.json"
_UNITS = {"": 1, "B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "TB": 10 ** 12,
          "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30}


def parse_size(text: str) -> int:
    """``"1GB"`` -> 10**9, ``"512MiB"`` -> 2**29, ``"1000"`` -> 1000."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"not a size: {text!r} (examples: 1GB, 500MB, 2GiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> int:
    """Append a member; return the offset of its data in the tar file."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644  # fixed metadata: reproducible shards
    tar.addfile(info, io.BytesIO(data))
    # The data ends the member, padded to the next 512-byte block.
    return tar.offset - -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def write_shards(folder_root: str | os.PathLike, out: str | os.PathLike,
                 shard_size: int = 10 ** 9) -> Path:
    """Convert an ImageFolder into shards of at most ``shard_size`` bytes (at least one sample
    each); returns the index path. Each shard and the index are written atomically."""
    folder = SafeImageFolder(folder_root)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shards: list[dict] = []
    i, n = 0, len(folder)
    while i < n:
        name = f"shard-{len(shards):06d}.tar"
        entries = []
        with atomic_path(out / name) as tmp:
            with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
                while i < n and (not entries or tar.offset < shard_size):
                    path, label = folder.samples[i]
                    ext = Path(path).suffix.lower().lstrip(".") or "img"
                    data = folder.read_bytes(i)
                    offset = _add(tar, f"{i:09d}.{ext}", data)
                    _add(tar, f"{i:09d}.cls", str(label).encode())
                    entries.append([offset, len(data), label, ext,
                                    os.path.relpath(path, folder.root)])
                    i += 1
        shards.append({"url": name, "nsamples": len(entries),
                       "filesize": (out / name).stat().st_size, "samples": entries})
    index = {"__kind__": "wids-shard-index-v1", "wids_version": 1, "name": folder.root.name,
             "classes": folder.classes, "shardlist": shards}
    return atomic_write_text(out / INDEX, json.dumps(index, separators=(",", ":")))


class ShardFolder(SafeImageFolder):
    """The samples of a sharded dataset (``write_shards``), with ``SafeImageFolder``'s interface:
    ``classes``, ``samples = [(name, class_index)]``, ``load``, ``load_good``, ``candidates``,
    ``verify``, ``bad_files``, ``journal``."""

    def __init__(self, root: str | os.PathLike, *, journal: str | os.PathLike | None = None,
                 **_ignored):
        self.root = Path(root).expanduser()
        index_path = self.root / INDEX
        if not index_path.is_file():
            raise FileNotFoundError(
                f"{index_path} not found: data.format=shards expects a folder written by "
                f"`python -m beit_scale.data.shards write IMAGEFOLDER {self.root}`")
        index = json.loads(index_path.read_text())
        self.index_source = "shards"
        self.classes = list(index["classes"])
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self._where: list[tuple[int, int, int]] = []  # (shard number, offset, size)
        self._urls: list[str] = []
        self.samples = []
        for s, shard in enumerate(index["shardlist"]):
            self._urls.append(shard["url"])
            for offset, size, label, _ext, name in shard["samples"]:
                self._where.append((s, offset, size))
                self.samples.append((name, label))
        if not self.samples:
            raise ValueError(f"empty dataset: {index_path} lists no samples")
        self.targets = [t for _, t in self.samples]
        self.journal = journal
        self.bad_files = []
        self._bad = set()
        self._files: dict[int, object] = {}
        self._pid = os.getpid()

    def _file(self, s: int):
        if self._pid != os.getpid():  # a forked DataLoader worker: never share file offsets
            self._files, self._pid = {}, os.getpid()
        f = self._files.get(s)
        if f is None:
            f = self._files[s] = open(self.root / self._urls[s], "rb")
        return f

    def read_bytes(self, i: int) -> bytes:
        s, offset, size = self._where[i]
        f = self._file(s)
        f.seek(offset)
        data = f.read(size)
        if len(data) != size:
            raise OSError(f"truncated shard member: {len(data)} of {size} bytes")
        return data

    def name(self, i: int) -> str:
        s, _, _ = self._where[i]
        return f"{self._urls[s]}:{i:09d} ({self.samples[i][0]})"

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_files"] = {}  # open files do not travel to spawned workers
        return state

    def __repr__(self) -> str:
        return f"ShardFolder({self.root}, {len(self.samples)} images in {len(self._urls)} shards, " \
               f"{len(self.classes)} classes)"


def open_folder(path: str | os.PathLike, fmt: str = "folder", **kwargs) -> SafeImageFolder:
    """``data.format`` -> the folder object: ``"folder"`` (ImageFolder) or ``"shards"``."""
    if fmt == "shards":
        return ShardFolder(path, **kwargs)
    if fmt == "folder":
        return SafeImageFolder(path, **kwargs)
    raise ValueError(f"unknown data format {fmt!r}: expected 'folder' or 'shards'")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m beit_scale.data.shards", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write", help="convert an ImageFolder (one split) into tar shards")
    w.add_argument("imagefolder")
    w.add_argument("out")
    w.add_argument("--shard-size", default="1GB", type=parse_size)
    args = ap.parse_args(argv)
    index = write_shards(args.imagefolder, args.out, args.shard_size)
    rec = json.loads(index.read_text())
    total = sum(s["nsamples"] for s in rec["shardlist"])
    print(f"wrote {total} samples in {len(rec['shardlist'])} shard(s) and {index}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
