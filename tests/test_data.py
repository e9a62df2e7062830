"""Synthetic dataset generation, corruption-tolerant folders, keyed sample datasets."""
import hashlib
import json
import os
import shutil
import socket

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from beit_scale.data import datasets as D
from beit_scale.data import synthetic as S
from beit_scale.data.transforms import (ClassifyTransform, MIMTransform, TokenizerTransform,
                                        denormalize)

TINY = dict(num_classes=3, train_per_class=4, val_per_class=2, image_size=64, verbose=False)


def _hashes(root):
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, root)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    return S.ensure_synthetic_imagefolder(tmp_path_factory.mktemp("syn") / "tiny", **TINY)


def _masker():
    try:
        from beit_scale.data.masking import MaskingGenerator
        return MaskingGenerator(input_size=(14, 14), num_masking_patches=75)
    except ImportError:  # the masking module is owned elsewhere; keep these tests independent
        def m(rng):
            flat = np.zeros(196, bool)
            flat[rng.choice(196, 75, replace=False)] = True
            return flat.reshape(14, 14)
        return m


# ----------------------------------------------------------------------------- synthetic


def test_generation_layout_and_determinism(tiny_root, tmp_path):
    names = S.class_names(3)
    assert sorted(p.name for p in (tiny_root / "train").iterdir()) == names
    assert len(list((tiny_root / "val" / names[0]).glob("*.jpg"))) == 2
    assert json.loads((tiny_root / "labels.json").read_text())["classes"] == names
    again = S.ensure_synthetic_imagefolder(tmp_path / "again", **TINY)
    assert _hashes(again) == _hashes(tiny_root)  # same seed -> same bytes
    other = S.ensure_synthetic_imagefolder(tmp_path / "other", **{**TINY, "seed": 1})
    h1, h2 = _hashes(other), _hashes(tiny_root)
    assert all(h1[k] != h2[k] for k in h1 if k.endswith(".jpg"))


def test_cache_reused_and_foreign_dir_refused(tiny_root, tmp_path):
    f = tiny_root / "train" / S.class_names(3)[0] / "00000.jpg"
    mtime = f.stat().st_mtime_ns
    assert S.ensure_synthetic_imagefolder(tiny_root, **TINY) == tiny_root
    assert f.stat().st_mtime_ns == mtime  # not regenerated
    foreign = tmp_path / "mine"
    (foreign / "x").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="refusing"):
        S.ensure_synthetic_imagefolder(foreign, **TINY)
    assert (foreign / "x").is_dir()


def test_default_root_env(monkeypatch, tmp_path):
    monkeypatch.setenv(S.ENV_CACHE, str(tmp_path))
    assert S.default_root() == tmp_path / "synthetic_v1"


def test_other_params_replace_old_set(tmp_path):
    root = S.ensure_synthetic_imagefolder(tmp_path / "d", **TINY)
    with pytest.warns(UserWarning, match="replacing"):
        S.ensure_synthetic_imagefolder(root, **{**TINY, "train_per_class": 1})
    assert len(list((root / "train" / S.class_names(3)[0]).iterdir())) == 1
    assert json.loads((root / S.MARKER).read_text())["train_per_class"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["d"]  # no temp/old dirs left behind


def test_stale_tmp_dir_is_cleaned_and_ignored(tmp_path):
    # A crashed generator on this host (pid that cannot exist) left a half-written dir.
    stale = tmp_path / f".d.tmp-{socket.gethostname()}-999999999-deadbeef"
    (stale / "train").mkdir(parents=True)
    root = S.ensure_synthetic_imagefolder(tmp_path / "d", **TINY)
    assert not stale.exists()
    assert (root / S.MARKER).exists()
    # The marker is written last, so a directory without it is never taken as complete.
    tmp = tmp_path / "manual"
    S._generate_into(tmp, S.SyntheticParams(3, 4, 2, 64))
    assert json.loads((tmp / S.MARKER).read_text())["num_classes"] == 3


def test_lost_race_is_harmless(tmp_path, monkeypatch):
    """Another rank renames its copy into place first: ours must fail over to theirs."""
    root = tmp_path / "d"
    real_rename = os.rename

    def rename(src, dst):
        if str(dst) == str(root) and not root.exists():
            winner = tmp_path / "winner"
            S._generate_into(winner, S.SyntheticParams(**{k: v for k, v in TINY.items()
                                                          if k != "verbose"}))
            real_rename(winner, root)
        return real_rename(src, dst)

    monkeypatch.setattr(S.os, "rename", rename)
    assert S.ensure_synthetic_imagefolder(root, **TINY) == root
    assert (root / S.MARKER).exists()
    assert [p.name for p in tmp_path.iterdir()] == ["d"]  # loser's temp dir removed


# ----------------------------------------------------------------------------- folders


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.path") as e:
        D.SafeImageFolder(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(e.value)
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    (tmp_path / "empty" / "cls" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="empty dataset"):
        D.SafeImageFolder(tmp_path / "empty")


def test_corrupt_files_skipped_counted_and_substituted(tiny_root, tmp_path):
    root = tmp_path / "c"
    shutil.copytree(tiny_root / "train", root)
    cls0 = root / S.class_names(3)[0]
    good = (cls0 / "00000.jpg").read_bytes()
    (cls0 / "00001.jpg").write_bytes(good[: len(good) // 2])  # truncated JPEG
    (cls0 / "00002.jpg").write_bytes(b"this is not an image")
    folder = D.SafeImageFolder(root)
    paths = [p for p, _ in folder.samples]
    i_trunc, i_junk = paths.index(str(cls0 / "00001.jpg")), paths.index(str(cls0 / "00002.jpg"))

    ds = D.ClassifyDataset(folder, ClassifyTransform(train=False, size=64))
    with pytest.warns(RuntimeWarning) as rec:
        img, label = ds[(i_trunc, 5)]
    messages = [str(w.message) for w in rec]
    assert any("00001.jpg" in m for m in messages) and any("00002.jpg" in m for m in messages)
    assert img.shape == (3, 64, 64) and label == 0
    # Substitute is the next readable file: both bad files are skipped -> index of 00003.jpg.
    ref, _ = ds[(i_junk + 1, 5)]
    assert torch.equal(img, ref)
    assert {p for p, _ in folder.bad_files} == {paths[i_trunc], paths[i_junk]}
    assert {paths[i_trunc], paths[i_junk]} <= {p for p, _ in D.bad_file_report()}
    assert "unreadable" in D.bad_file_summary()
    assert len(folder.verify()) == 2  # counted once each, not once per access


# ----------------------------------------------------------------------------- samples


def test_mim_sample_shapes_mask_and_determinism(tiny_root):
    ds = D.MIMDataset(tiny_root / "train", MIMTransform(), _masker())
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = ds[(3, 11)]
    after = torch.rand(3)
    assert torch.equal(before, after)  # the caller's RNG is untouched
    img224, img112, mask = a
    assert img224.shape == (3, 224, 224) and img224.dtype == torch.float32
    assert img112.shape == (3, 112, 112) and 0 <= img112.min() and img112.max() <= 1
    assert mask.shape == (196,) and mask.dtype == torch.bool and int(mask.sum()) == 75
    b = ds[(3, 11)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    c = ds[(3, 12)]
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[2], c[2])
    assert torch.equal(ds[3][0], ds[(3, 3)][0])  # plain index -> seed = index
    # Both views come from the same crop/flip/jitter: the 224 view, pooled to 112, matches.
    pooled = F.avg_pool2d(denormalize(img224)[None], 2)[0].clamp(0, 1)
    assert (pooled - img112).abs().mean() < 0.03


def test_dataloader_workers_do_not_change_samples(tiny_root):
    ds = D.MIMDataset(tiny_root / "train", MIMTransform(), _masker())
    keys = [(i % len(ds), 1000 + i) for i in range(8)]

    def run(workers):
        dl = DataLoader(ds, batch_size=4, sampler=keys, num_workers=workers)
        return [t for batch in dl for t in batch]

    for x, y in zip(run(0), run(2)):
        assert torch.equal(x, y)


def test_tokenizer_and_classify_datasets(tiny_root):
    tok = D.TokenizerDataset(tiny_root / "train", TokenizerTransform(112))
    (x,) = tok[(0, 1)]
    assert x.shape == (3, 112, 112) and 0 <= x.min() and x.max() <= 1
    assert torch.equal(x, tok[(0, 1)][0])
    cls = D.ClassifyDataset(tiny_root / "val", ClassifyTransform(train=False, size=96))
    img, label = cls[len(cls) - 1]
    assert img.shape == (3, 96, 96) and label == 2 and cls.num_classes == 3
    train = D.build_dataset("classify", tiny_root, "train", input_size=96)
    assert train[(0, 1)][0].shape == (3, 96, 96)
    with pytest.raises(TypeError, match="key"):
        cls["a"]
