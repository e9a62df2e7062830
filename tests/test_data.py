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
from beit_scale.data.transforms import (IMAGENET_MEAN, IMAGENET_STD, ClassifyTransform, MIMTransform,
                                        TokenizerTransform, denormalize, to_float_image)

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
    assert img224.shape == (3, 224, 224) and img224.dtype == torch.uint8
    assert img112.shape == (3, 112, 112) and img112.dtype == torch.uint8
    assert mask.shape == (196,) and mask.dtype == torch.bool and int(mask.sum()) == 75
    b = ds[(3, 11)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    c = ds[(3, 12)]
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[2], c[2])
    assert torch.equal(ds[3][0], ds[(3, 3)][0])  # plain index -> seed = index
    # Both views come from the same crop/flip/jitter: the 224 view, pooled to 112, matches.
    pooled = F.avg_pool2d(denormalize(to_float_image(img224, normalize=True))[None], 2)[0].clamp(0, 1)
    assert (pooled - to_float_image(img112, normalize=False)).abs().mean() < 0.03


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
    assert x.shape == (3, 112, 112) and x.dtype == torch.uint8
    assert torch.equal(x, tok[(0, 1)][0])
    cls = D.ClassifyDataset(tiny_root / "val", ClassifyTransform(train=False, size=96))
    img, label = cls[len(cls) - 1]
    assert img.shape == (3, 96, 96) and img.dtype == torch.uint8 and label == 2 and cls.num_classes == 3
    train = D.build_dataset("classify", tiny_root, "train", input_size=96)
    assert train[(0, 1)][0].shape == (3, 96, 96)
    with pytest.raises(TypeError, match="key"):
        cls["a"]


# ----------------------------------------------------------------------------- uint8 transport


def _old_float(x_uint8, normalize):
    """What the pipeline shipped before (torchvision to_tensor, then Normalize), from the uint8 output."""
    from torchvision.transforms import functional as TF
    x = x_uint8.to(torch.float32).div(255)  # to_tensor on a uint8 image
    return TF.normalize(x, IMAGENET_MEAN, IMAGENET_STD) if normalize else x


def test_transforms_ship_uint8_and_device_conversion_matches_the_old_float_pipeline(tiny_root):
    """Every transform returns uint8 CHW; the tasks' conversion on the device (device_images:
    scale, normalise in fp32, then cast) gives exactly the old float pipeline's numbers."""
    from PIL import Image
    from torchvision.transforms import functional as TF
    from beit_scale.train.tasks.base import device_images
    pil = Image.open(sorted((tiny_root / "train").rglob("*.jpg"))[0]).convert("RGB")
    with D.seeded(7):
        big, small = MIMTransform(input_size=64, second_input_size=32)(pil)
    with D.seeded(7):
        tok = TokenizerTransform(48)(pil)
    with D.seeded(7):
        cls = ClassifyTransform(train=True, size=40, rand_augment="rand-m9-mstd0.5-inc1")(pil)
    with D.seeded(7):
        ev = ClassifyTransform(train=False, size=40)(pil)
    cpu = torch.device("cpu")
    for x, normalize in ((big, True), (small, False), (tok, False), (cls, True), (ev, True)):
        assert x.dtype == torch.uint8 and x.ndim == 3 and x.shape[0] == 3
        old = _old_float(x, normalize)
        new = device_images(x[None], cpu, torch.float32, normalize)[0]
        assert new.dtype == torch.float32 and torch.equal(new, old)
        half = device_images(x[None], cpu, torch.bfloat16, normalize)[0]
        assert half.dtype == torch.bfloat16 and torch.equal(half, old.to(torch.bfloat16))
    # The uint8 pixels are the ones the old to_tensor saw (PIL -> tensor, no resampling in between).
    assert torch.equal(TF.to_tensor(pil), _old_float(TF.pil_to_tensor(pil), False))
    # every uint8 level maps to exactly the old value
    levels = torch.arange(256, dtype=torch.uint8).repeat(3, 1).view(3, 16, 16)
    assert torch.equal(to_float_image(levels, normalize=True), _old_float(levels, True))
    assert torch.equal(to_float_image(levels, normalize=False), _old_float(levels, False))


def test_tasks_convert_on_the_device_before_the_model(tiny_root):
    """ClassifyTask and MIMTask hand the model (and the tokenizer) the old float inputs."""
    from beit_scale.config import ExperimentCfg
    from beit_scale.train.tasks.classify import ClassifyTask
    from beit_scale.train.tasks import MIMTask

    seen = {}

    class Engine(torch.nn.Module):
        def __init__(self, out):
            super().__init__()
            self.module = torch.nn.Linear(1, 1)  # fp32 "model": _model_dtype reads its parameters
            self.out = out

        def forward(self, x, *rest, **kw):
            seen["model"] = x
            return self.out(x, *rest)

    cls_ds = D.ClassifyDataset(tiny_root / "train", ClassifyTransform(train=True, size=32))
    batch = torch.utils.data.default_collate([cls_ds[(i, i)] for i in range(4)])
    task = ClassifyTask(ExperimentCfg(stage="classify"))
    task.prepare(torch.device("cpu"))
    task.step(Engine(lambda x: torch.zeros(len(x), 10, requires_grad=True)), batch, 0)
    assert torch.equal(seen["model"], _old_float(batch[0], True))

    mim_ds = D.MIMDataset(tiny_root / "train", MIMTransform(input_size=32, second_input_size=16), _masker())
    batch = torch.utils.data.default_collate([mim_ds[(i, i)] for i in range(3)])

    class Tok(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def get_codebook_indices(self, x):
            seen["tokenizer"] = x
            return torch.arange(196).repeat(len(x), 1).view(len(x), 14, 14)

    mim = MIMTask(ExperimentCfg(stage="mim"))
    mim.tokenizer = Tok()
    logits, labels = mim._targets_and_logits(Engine(lambda x, m: torch.zeros(int(m.sum()), 196)), batch)
    assert torch.equal(seen["model"], _old_float(batch[0], True))
    assert torch.equal(seen["tokenizer"], _old_float(batch[1], False))
    ids = torch.arange(196).repeat(3, 1)
    assert torch.equal(labels, ids[batch[2]])  # the fixed-size gather lists the boolean path's targets


def test_shared_memory_per_batch_is_a_quarter(tiny_root):
    """A MIM batch as shipped by a worker: uint8 images + bool mask, ~4x fewer bytes than float32."""
    ds = D.MIMDataset(tiny_root / "train", MIMTransform(), _masker())
    img224, img112, mask = next(iter(DataLoader(ds, batch_size=4, sampler=[(i, i) for i in range(4)],
                                                num_workers=1)))
    assert img224.dtype == img112.dtype == torch.uint8 and mask.dtype == torch.bool
    shipped = sum(t.numel() * t.element_size() for t in (img224, img112, mask))
    before = (img224.numel() + img112.numel()) * 4 + mask.numel()
    assert shipped == 4 * (3 * 224 * 224 + 3 * 112 * 112 + 196)
    assert before / shipped > 3.99


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_conversion_and_mim_targets_exact_and_without_host_sync():
    """On a GPU: the device conversion equals the CPU (old pipeline) numbers bit for bit, and the
    conversion + fixed-size target gather run with no device->host synchronisation."""
    from beit_scale.train.tasks.base import device_images, masked_positions, uniform_mask_count
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (8, 3, 224, 224), dtype=torch.uint8, generator=g).pin_memory()
    gen = _masker()
    rng = np.random.default_rng(0)
    mask_cpu = torch.from_numpy(np.stack([gen(rng).reshape(-1) for _ in range(8)])).pin_memory()
    ids = torch.randint(0, 8192, (8, 196), device="cuda")
    dev = torch.device("cuda")
    device_images(x, dev, torch.float32, True)  # first call builds the lookup table (one copy)
    device_images(x, dev, torch.float32, False)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        k = uniform_mask_count(mask_cpu)
        mask = mask_cpu.to(dev, non_blocking=True)
        norm = device_images(x, dev, torch.float32, True)
        half = device_images(x, dev, torch.bfloat16, True)
        unit = device_images(x, dev, torch.float32, False)
        labels = ids.gather(1, masked_positions(mask, k)).reshape(-1)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.equal(norm.cpu(), _old_float(x, True))
    assert torch.equal(half.cpu(), _old_float(x, True).to(torch.bfloat16))
    assert torch.equal(unit.cpu(), _old_float(x, False))
    assert torch.equal(labels, ids[mask])
