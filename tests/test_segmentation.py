"""Segmentation pieces that need no engine: metrics, sliding windows, decoders, data."""
import math
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from beit_scale.data.segmentation import (FLAG_NAMES, SegEvalTransform, SegmentationDataset,
                                          SegTrainTransform, check_num_classes, find_pairs)
from beit_scale.data.synthetic import (SEG_CLASSES, ensure_synthetic_imagefolder,
                                       ensure_synthetic_segmentation)
from beit_scale.models.beit import resize_rel_pos_bias_table
from beit_scale.models.decoders import (DECODERS, SegHeadConfig, backbone_weights_for,
                                        build_segmenter, evenly_spaced_blocks)
from beit_scale.models.seg_eval import (confusion_matrix, seg_metrics, slide_inference,
                                        whole_inference, window_starts)
from beit_scale.models.zoo import build_model, get_config

HEAD = dict(channels=16, aux_channels=8, groups=4)


def test_metrics_hand_computed_with_ignored_pixels_and_absent_classes():
    # K=4. Counted pixels (label != 255): gt0 -> pred 0,0,1; gt1 -> pred 1,2. Class 2 is absent
    # from the truth but predicted once (IoU 0, Acc undefined); class 3 appears nowhere (NaN).
    label = torch.tensor([[0, 0, 0, 1, 1, 255, 255]])
    pred = torch.tensor([[0, 0, 1, 1, 2, 3, 0]])
    cm = confusion_matrix(pred, label, 4)
    assert cm.tolist() == [[2, 1, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    m = seg_metrics(cm)
    assert m["IoU"][:3] == pytest.approx([2 / 3, 1 / 3, 0.0]) and math.isnan(m["IoU"][3])
    assert m["mIoU"] == pytest.approx(1 / 3)
    assert m["mAcc"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert m["aAcc"] == pytest.approx(3 / 5)
    # a sum of per-image matrices is the matrix of the union (what the all-reduce relies on)
    halves = confusion_matrix(pred[:, :3], label[:, :3], 4) + confusion_matrix(pred[:, 3:], label[:, 3:], 4)
    assert torch.equal(halves, cm)


def _conv_fn():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 5, 3, padding=1)
    return lambda x: conv(x) + x.mean(dim=(1, 2, 3), keepdim=True)  # not translation invariant


@torch.no_grad()
def test_slide_equals_whole_when_one_window_covers():
    fn, img = _conv_fn(), torch.randn(2, 3, 24, 24)
    assert torch.equal(slide_inference(fn, img, 5, crop=24, stride=16), fn(img))
    assert torch.equal(whole_inference(fn, img, 24), fn(img))
    # a smaller image is padded for the window and cut back
    small = torch.randn(1, 3, 20, 17)
    ref = fn(torch.nn.functional.pad(small, (0, 7, 0, 4)))[..., :20, :17]
    assert torch.allclose(slide_inference(fn, small, 5, crop=24, stride=8), ref)


@torch.no_grad()
def test_slide_overlaps_are_averaged():
    assert window_starts(10, 6, 4) == [0, 4] and window_starts(11, 6, 4) == [0, 4, 5]
    calls = []

    def fn(x):  # window k (in call order) predicts the constant k+1 everywhere
        calls.append(1)
        return torch.full((x.shape[0], 2, *x.shape[-2:]), float(len(calls)))

    out = slide_inference(fn, torch.zeros(1, 3, 6, 10), 2, crop=6, stride=4, max_batch=1)
    assert len(calls) == 2
    assert out[0, 0, 0].tolist() == [1.0] * 4 + [1.5] * 2 + [2.0] * 4
    # batching windows does not change the result (a pointwise fn on a random image)
    img = torch.randn(2, 3, 13, 19)
    fn2 = _conv_fn()
    a = slide_inference(fn2, img, 5, crop=8, stride=5, max_batch=2)
    b = slide_inference(fn2, img, 5, crop=8, stride=5, max_batch=64)
    assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("decoder", DECODERS)
def test_decoder_output_size_and_every_parameter_gets_a_gradient(decoder):
    torch.manual_seed(0)
    model = build_segmenter(get_config("beit_debug", img_size=32, depth=4),
                            SegHeadConfig(num_classes=5, decoder=decoder, **HEAD))
    x = torch.randn(2, 3, 32, 32)
    y = torch.randint(0, 5, (2, 32, 32))
    y[0, :8] = 255
    loss, metrics = model.loss(x, y)
    loss.backward()
    assert set(metrics) == {"loss_main", "loss_aux"}
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []
    model.eval()
    assert model(x).shape == (2, 5, 32, 32)
    assert evenly_spaced_blocks(12) == (2, 5, 8, 11)
    # all-ignored batch: a zero loss, not NaN
    assert model.loss(x, torch.full_like(y, 255))[0].item() == 0.0


def test_pretrained_backbone_loads_with_rel_pos_resized_to_seg_grid():
    """MIM checkpoint (shared table, 2x2 grid) -> segmenter at 4x4 with per-layer tables."""
    torch.manual_seed(0)
    mim = build_model("beit_debug", task="mim", img_size=32)
    with torch.no_grad():
        mim.shared_rel_pos.table.normal_()
    seg = build_segmenter(get_config("beit_debug", img_size=64), SegHeadConfig(num_classes=3, **HEAD))
    sd, dropped = backbone_weights_for(seg, mim.state_dict())
    missing, unexpected = seg.load_state_dict(sd, strict=False)
    assert unexpected == [] and missing and all(k.startswith(("neck.", "decode_head.", "aux_head."))
                                                for k in missing)
    expected = resize_rel_pos_bias_table(mim.shared_rel_pos.table.detach(), (2, 2), (4, 4))
    assert all(torch.equal(b.attn.rel_pos.table, expected) for b in seg.blocks)
    assert torch.equal(seg.blocks[1].mlp.fc2.weight, mim.blocks[1].mlp.fc2.weight)
    clf_sd, dropped = backbone_weights_for(seg, build_model("beit_debug", img_size=64).state_dict())
    assert "head.weight" in dropped and "fc_norm.weight" in dropped


@pytest.fixture(scope="module")
def seg_root(tmp_path_factory):
    return ensure_synthetic_segmentation(tmp_path_factory.mktemp("seg") / "syn", train_per_class=2,
                                         val_per_class=1, image_size=64, verbose=False)


def test_synthetic_masks_deterministic_and_same_images(seg_root, tmp_path):
    again = ensure_synthetic_segmentation(tmp_path / "again", train_per_class=2, val_per_class=1,
                                          image_size=64, verbose=False)
    plain = ensure_synthetic_imagefolder(tmp_path / "plain", train_per_class=2, val_per_class=1,
                                         image_size=64, verbose=False)
    pairs = find_pairs(seg_root, "train")
    assert len(pairs) == 20
    seen = set()
    for img, mask in pairs:
        rel = img[len(str(seg_root)) + 1:]
        assert (again / rel).read_bytes() == (plain / rel).read_bytes() == (seg_root / rel).read_bytes()
        m = np.asarray(Image.open(mask))
        assert m.shape == (64, 64) and m.max() < len(SEG_CLASSES)
        assert np.array_equal(m, np.asarray(Image.open(mask.replace(str(seg_root), str(again)))))
        seen |= set(np.unique(m).tolist())
    assert len(seen) >= 8  # background + most of the 10 families in 20 images
    assert not (plain / "masks").exists()
    check_num_classes(seg_root, pairs, len(SEG_CLASSES), False)
    with pytest.raises(ValueError, match="model.num_classes=11"):
        check_num_classes(seg_root, pairs, 6, False)


def test_bad_samples_counted_not_fatal(tmp_path):
    img_dir, mask_dir = tmp_path / "images" / "training", tmp_path / "annotations" / "training"
    img_dir.mkdir(parents=True), mask_dir.mkdir(parents=True)
    rgb = Image.fromarray(np.full((20, 24, 3), 100, np.uint8))
    lab = np.ones((20, 24), np.uint8)
    lab[0, :5] = 0      # "other": ignored by reduce_zero_label, not a problem
    lab[1, :3] = 9      # -> class 8, outside num_classes=4: 3 bad pixels
    for name in ("a", "b", "c", "d"):
        rgb.save(img_dir / f"{name}.jpg")
    (img_dir / "b.jpg").write_bytes(b"not a jpeg")                              # unreadable
    Image.fromarray(lab).save(mask_dir / "a.png")
    Image.fromarray(lab).save(mask_dir / "b.png")
    Image.fromarray(lab[:10]).save(mask_dir / "c.png")                          # size mismatch
    Image.fromarray(np.full((20, 24), 2, np.uint8)).save(mask_dir / "d.png")
    pairs = find_pairs(tmp_path, "train")
    with pytest.raises(ValueError, match="model.num_classes>=9"):
        check_num_classes(tmp_path, pairs, 4, True)
    ds = SegmentationDataset(pairs, SegTrainTransform(16, photometric=False), 4, reduce_zero_label=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        samples = [ds[(i, i)] for i in range(len(ds))]
    flags = sum(s[3] for s in samples)
    # a: 3 bad pixels; b: unreadable -> c: mismatched -> d; c: mismatched -> d; d: clean.
    # Counts are per replacement (a bad file met twice counts twice).
    assert dict(zip(FLAG_NAMES, flags.tolist())) == {"unreadable": 1, "size_mismatch": 2,
                                                     "bad_label_pixels": 3}
    for img, y, hw, _ in samples:
        assert img.shape == (3, 16, 16) and y.shape == (16, 16) and hw.tolist() == [16, 16]
        assert set(np.unique(y.numpy())) <= {0, 1, 255}
    ev = SegmentationDataset(pairs, SegEvalTransform(16), 4, reduce_zero_label=True)
    img, y, hw, _ = ev[3]
    assert img.shape == (3, 32, 32) and hw.tolist() == [16, 19]
    assert (y[:16, :19] == 1).all() and (y[16:] == 255).all() and (y[:, 19:] == 255).all()


def test_train_transform_reproducible_per_key(seg_root):
    ds = SegmentationDataset(find_pairs(seg_root, "train"), SegTrainTransform(32), len(SEG_CLASSES))
    a, b = ds[(3, 7)], ds[(3, 7)]
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(ds[(3, 8)][0], a[0])


@pytest.mark.parametrize("decoder", DECODERS)
def test_memory_model_params_exact_and_peak_within_15_percent(decoder):
    """Parameter count exact; activations (saved + transient, fp32, SDPA math path as on CPU)
    against the CPU tensor high-water mark of a forward+backward whose gradient buffers exist
    already (as DeepSpeed's do across steps)."""
    import beit_scale.scaling.memory as mm
    from beit_scale.train.mem_probe import CpuTensorHighWater

    cfg = get_config("beit_debug", img_size=64, depth=4)
    head = SegHeadConfig(num_classes=40, decoder=decoder, channels=32, aux_channels=16, groups=8)
    torch.manual_seed(0)
    model = build_segmenter(cfg, head).train()
    assert mm.count_params(cfg, "segment", head=head).total == sum(p.numel() for p in model.parameters())
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    B = 2
    x, y = torch.randn(B, 3, 64, 64), torch.randint(0, 40, (B, 64, 64), dtype=torch.uint8)
    probe = CpuTensorHighWater().start()
    model.loss(x, y)[0].backward()
    peak = probe.stop()
    est = mm.estimate(cfg, 1, 1, B, precision="fp32", attention="math", task="segment", head=head)
    assert abs(est.activations_bytes - peak) <= 0.15 * peak, (est.activations_bytes, peak)


def test_memory_cli_segmentation(capsys):
    import json as _json
    import beit_scale.scaling.memory as mm
    assert mm.main(["--task", "seg", "--img-size", "640", "--decoder", "upernet", "--micro-batch", "2",
                    "--json"]) == 0
    out = _json.loads(capsys.readouterr().out)
    assert out["task"] == "segment" and out["img_size"] == 640
    assert out["num_params"] == mm.count_params("beit_base_patch16_224", "segment", 640).total
    assert out["breakdown"]["act_decoder_saved"] > 0 and out["breakdown"]["act_seg_loss_saved"] > 0


def test_poly_schedule_and_embedded_segment_defaults():
    from beit_scale.config import build_config
    from beit_scale.train import run
    from beit_scale.train.optim import lr_factor
    from beit_scale.train.tasks import make_task
    assert lr_factor(4, 5, 105, 1.0, 0.0, "poly") == 1.0
    assert lr_factor(55, 5, 105, 1.0, 0.0, "poly") == pytest.approx(0.5)      # linear to min_lr
    assert lr_factor(105, 5, 105, 1.0, 0.1, "poly") == pytest.approx(0.1)
    cfg, _, _ = build_config("segment", None, [], defaults=run.EMBEDDED["segment"])
    task = make_task(cfg)
    assert task.name == "segment" and cfg.optim.schedule == "poly"
    with torch.device("meta"):
        model = task._plain_model()
    assert model.cfg.img_size == 128 and model.head_cfg.num_classes == len(SEG_CLASSES)
