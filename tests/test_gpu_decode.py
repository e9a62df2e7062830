"""data.decode=cuda (beit_scale/data/gpu_decode.py): workers ship JPEG bytes + the drawn plan, the
task decodes and augments on the device. The device function runs on CPU tensors too, which is how
it is checked here; the real GPU agreement test runs wherever CUDA is present."""
import pytest
import torch
from torch.utils.data import DataLoader

from beit_scale.config import ConfigError, build_config
from beit_scale.data import datasets as D
from beit_scale.data import gpu_decode as G
from beit_scale.data.transforms import ClassifyTransform, MIMTransform
from test_input_pipeline import UNREADABLE, _jpeg, _masker, _png, _smooth_rgb, mixed_folder


def _files():
    """Colour (4:2:0) JPEGs of two sizes, a 4:4:4 one and a grayscale one: what the device decodes."""
    return [_jpeg(_smooth_rgb(500, 375)), _jpeg(_smooth_rgb(97, 131, seed=4), quality=75),
            _encode(_smooth_rgb(160, 120, seed=6), subsampling=0), _jpeg(_smooth_rgb(150, 200, seed=5).convert("L"))]


def _encode(img, **kw):
    import io
    b = io.BytesIO()
    img.save(b, "JPEG", quality=90, **kw)
    return b.getvalue()


def _agreement(device, seeds=range(3)):
    """Max and mean |device path - CPU path| (levels of 255) over files x seeds, per view,
    for MIM (224, 112) and fine-tuning's train transform (224)."""
    worst = {"mim224": [0, 0.0], "mim112": [0, 0.0], "cls224": [0, 0.0]}
    for tf, names in ((MIMTransform(), ("mim224", "mim112")), (ClassifyTransform(train=True), ("cls224",))):
        dd = G.DeviceDecode(tf)
        for data in _files():
            for seed in seeds:
                with D.seeded(seed):
                    want = tf(tf.decode(data))
                with D.seeded(seed):
                    enc = dd.decode(data)
                assert enc.data is not None  # a JPEG: decoded on the device, not in the worker
                got = G.EncodedBatch.collate(tf, [enc]).decode(device)
                want = want if isinstance(want, tuple) else (want,)
                for name, w, g in zip(names, want, got):
                    assert g.device.type == torch.device(device).type and g.dtype == torch.uint8
                    assert g.shape[1:] == w.shape
                    d = (g[0].cpu().int() - w.int()).abs()
                    worst[name][0] = max(worst[name][0], int(d.max()))
                    worst[name][1] = max(worst[name][1], float(d.float().mean()))
    return worst


def test_device_path_on_cpu_reproduces_cpu_views():
    """Same draws (crop, flip, jitter order and factors), same resize/jitter code: on CPU tensors
    torchvision's decoder and simplejpeg are both libjpeg-turbo (islow IDCT, fancy upsampling),
    so the views come out identical (measured: max 0, mean 0 on every view). Tolerance: max <= 2,
    mean <= 0.1 levels."""
    worst = _agreement("cpu")
    for name, (mx, mean) in worst.items():
        assert mx <= 2 and mean <= 0.1, (name, worst)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the real nvJPEG decode)")
def test_cuda_decode_agrees_with_cpu_path():
    """nvJPEG's IDCT/chroma upsampling and CUDA's float resize round differently from the CPU's;
    stated tolerance: mean |diff| <= 1.5 levels of 255 per view (the fast-vs-plain tolerance of
    docs/data.md). The max is printed (not measured yet: no GPU where this was written)."""
    worst = _agreement("cuda")
    print("cuda vs cpu path (max, mean):", worst)
    for name, (_, mean) in worst.items():
        assert mean <= 1.5, (name, worst)


def test_jpeg_check_in_the_worker():
    good = _jpeg(_smooth_rgb(64, 48))
    assert G.jpeg_size(good) == (64, 48)
    assert G.jpeg_size(_png(_smooth_rgb(8, 8))) is None and G.jpeg_size(b"") is None
    with pytest.raises(ValueError, match="end-of-image"):
        G.jpeg_size(good[: len(good) // 2])
    with pytest.raises(ValueError):
        G.jpeg_size(good[:20])  # not even a complete header


def test_cuda_mode_dataset_collate_and_unreadable_files(tmp_path):
    """In cuda mode the loader yields (EncodedBatch, mask) / (EncodedBatch, label); JPEGs travel as
    bytes, the PNGs as worker-decoded views; the unreadable files are counted once each in the
    workers and substituted exactly as on the CPU path, and decoding the batch gives the CPU
    path's views and the same masks/labels."""
    paths = mixed_folder(tmp_path / "mixed")
    journal = tmp_path / "journal"
    folder = D.SafeImageFolder(tmp_path / "mixed", journal=journal)
    tf = MIMTransform()
    ds = D.MIMDataset(folder, G.DeviceDecode(tf), _masker)
    cpu = D.MIMDataset(D.SafeImageFolder(tmp_path / "mixed"), tf, _masker)
    keys = [(i, 7 * epoch + i) for epoch in range(2) for i in range(len(ds))]
    batches = list(DataLoader(ds, batch_size=4, sampler=keys, num_workers=2, collate_fn=G.collate))
    assert sorted(p for p, _ in D.read_journal(journal)) == sorted(paths[k] for k in UNREADABLE)
    names = [p for p, _ in folder.samples]
    png = {names.index(paths[k]) for k in ("rgba", "png16")}
    bad = {names.index(paths[k]) for k in UNREADABLE}

    def used(i):  # the index a key's sample comes from: its own, or the next readable one
        return next(j % len(names) for j in range(i, i + len(names)) if j % len(names) not in bad)
    k = 0
    for enc, mask in batches:
        assert isinstance(enc, G.EncodedBatch) and mask.dtype == torch.bool and len(enc) == len(mask)
        # the plans are plain python (a tensor per sample would cost a shared-memory block each)
        assert not any(torch.is_tensor(x) for p in enc.plans if p for x in (*p[:2], *(p[2] or ())))
        big, small = enc.decode("cpu")
        for r in range(len(enc)):
            want_big, want_small, want_mask = cpu[keys[k]]
            assert torch.equal(big[r], want_big) and torch.equal(small[r], want_small)
            assert torch.equal(mask[r], want_mask)
            idx = used(keys[k][0])
            # a PNG is decoded in the worker; a JPEG (or an unreadable file's JPEG substitute) is not
            assert (enc.views[r] is not None) == (idx in png), (names[idx], enc.spans[r])
            k += 1
    assert k == len(keys)
    # Slicing (eval's valid rows) keeps rows and plans together.
    enc, mask = batches[0]
    assert torch.equal(enc[1:3].decode("cpu")[0], enc.decode("cpu")[0][1:3])
    # Fine-tuning: a bad file's substitute brings its own label, as on the CPU path.
    cls_tf = ClassifyTransform(train=True)
    cds = D.ClassifyDataset(folder, G.DeviceDecode(cls_tf))
    ccpu = D.ClassifyDataset(D.SafeImageFolder(tmp_path / "mixed"), cls_tf)
    enc, labels = G.collate([cds[key] for key in keys[:len(ds)]])
    (img,) = enc.decode("cpu")
    for r, key in enumerate(keys[:len(ds)]):
        want, label = ccpu[key]
        assert torch.equal(img[r], want) and int(labels[r]) == label
    # Splits that decode on the CPU (classification eval) go through the same collate unchanged.
    plain = G.collate([ccpu[0], ccpu[1]])
    assert plain[0].shape == (2, 3, 224, 224) and plain[0].dtype == torch.uint8


def _cuda(monkeypatch, available):
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1 if available else 0)
    monkeypatch.setattr(torch.cuda, "init", lambda: None)


def test_decode_cuda_is_refused_without_cuda_and_unsupported_stages(monkeypatch):
    from beit_scale.train.tasks import make_task
    from beit_scale.train.tasks.base import decoded
    cfg, _, _ = build_config("mim", None, ["data.decode=cuda", "mim.target=pixels"])
    _cuda(monkeypatch, False)
    with pytest.raises(ConfigError, match=r"data\.decode=cuda needs a CUDA GPU.*set data\.decode=cpu"):
        make_task(cfg).preflight()
    _cuda(monkeypatch, True)
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    with pytest.raises(ConfigError, match="DS_ACCELERATOR=cpu"):
        make_task(cfg).preflight()
    monkeypatch.delenv("DS_ACCELERATOR")
    task = make_task(cfg)
    task.preflight()  # CUDA present: accepted
    assert task.collate_fn() is G.collate
    assert isinstance(task.loader_transform(MIMTransform()), G.DeviceDecode)
    # The tasks' wiring: their datasets in cuda mode, collated and decoded as the step does,
    # give the cpu-mode batch (on CPU tensors: identical).
    for stage, extra in (("mim", ["mim.target=pixels"]), ("classify", ["finetune.rand_augment=null"])):
        gpu_task = make_task(build_config(stage, None, ["data.decode=cuda", *extra])[0])
        cpu_task = make_task(build_config(stage, None, extra)[0])
        keys = [(0, 3), (5, 11)]
        gpu_ds = gpu_task.train_dataset()
        assert isinstance(gpu_ds.transform, G.DeviceDecode) and isinstance(gpu_ds[0][0], G.Encoded)
        got = decoded(gpu_task.collate_fn()([gpu_ds[k] for k in keys]), torch.device("cpu"))
        want = torch.utils.data.default_collate([cpu_task.train_dataset()[k] for k in keys])
        assert len(got) == len(want) and all(torch.equal(g, w) for g, w in zip(got, want)), stage
    ra = build_config("classify", None, ["data.decode=cuda", "finetune.rand_augment=rand-m9-mstd0.5",
                                         "init.from=scratch"])[0]
    with pytest.raises(ConfigError, match="rand_augment.*set data.decode=cpu"):
        make_task(ra).preflight()
    tok, _, _ = build_config("tokenizer", None, ["data.decode=cuda"])
    with pytest.raises(ConfigError, match="not supported by the tokenizer stage.*data.decode=cpu"):
        make_task(tok).preflight()
    # The default stays the CPU path: no collate hook, the transform unwrapped, batches untouched.
    default = make_task(build_config("mim", None, ["mim.target=pixels"])[0])
    assert default.cfg.data.decode == "cpu" and default.collate_fn() is None
    tf = MIMTransform()
    assert default.loader_transform(tf) is tf
    batch = (torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.ones(2))
    assert decoded(batch, torch.device("cpu")) is batch
    with pytest.raises(ConfigError, match="data.decode"):
        build_config("mim", None, ["data.decode=gpu"])
