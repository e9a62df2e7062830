"""The paper's ablation settings and the pictures: pixel-regression targets (mim.target=pixels),
random masking (data.mask_mode=random), last-layer attention maps (python -m beit_scale.viz)."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from beit_scale.config import ConfigError, build_config
from beit_scale.data.masking import MaskingGenerator, RandomMaskingGenerator, build_masker
from beit_scale.models.beit import BeitForMIM
from beit_scale.models.mim_pixels import (denormalize_patches, patchify, pixel_regression_loss, pixel_targets,
                                          unpatchify)
from beit_scale.models.zoo import build_model, get_config


# ----------------------------------------------------------------------------- pixel targets


def test_pixel_loss_equals_the_hand_computed_value_on_masked_patches_only():
    # One grey image 2x4, patch 2: patch 0 holds 0, 1, 2, 3 (row-major), patch 1 is flat (4s).
    img = torch.tensor([[[[0., 1., 4., 4.], [2., 3., 4., 4.]]]])
    assert patchify(img, 2).tolist() == [[[0., 1., 2., 3.], [4., 4., 4., 4.]]]
    # Patch 0 normalized: mean 1.5, variance 1.25 -> (-1.5, -0.5, 0.5, 1.5) / sqrt(1.25 + 1e-6).
    s = math.sqrt(1.25 + 1e-6)
    assert torch.allclose(pixel_targets(img, 2)[0, 0], torch.tensor([-1.5, -0.5, 0.5, 1.5]) / s)
    mask0 = torch.tensor([[True, False]])
    # prediction 1 everywhere: mean((1 - t)^2) = 1 - 2 mean(t) + mean(t^2) = 1 + 1.25 / (1.25 + 1e-6)
    loss = pixel_regression_loss(torch.ones(1, 4), img, mask0, 2)
    assert loss.item() == pytest.approx(1 + 1.25 / (1.25 + 1e-6), rel=1e-6)
    # The visible patch does not enter the loss: change its pixels, same loss.
    img2 = img.clone()
    img2[..., 2:] = torch.tensor([[9., -3.], [7., 0.5]])
    assert pixel_regression_loss(torch.ones(1, 4), img2, mask0, 2).item() == pytest.approx(loss.item(), rel=1e-7)
    # Masking the flat patch instead: its normalized target is 0, the loss is mean(pred^2).
    pred = torch.tensor([[1., 2., 0., -2.]])
    assert pixel_regression_loss(pred, img, torch.tensor([[False, True]]), 2).item() == pytest.approx(9 / 4)
    with pytest.raises(ValueError, match="do not match"):
        pixel_regression_loss(torch.ones(2, 4), img, mask0, 2)


def test_patch_layout_is_row_column_channel_and_invertible():
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 6)
    p = patchify(x, 2)  # grid 2x3, 12 values per patch
    assert p.shape == (2, 6, 12)
    # patch (row 1, col 2) of image 1: first value is pixel (2, 4) channel 0, then channel 1, 2
    assert p[1, 5, :3].tolist() == [x[1, 0, 2, 4].item(), x[1, 1, 2, 4].item(), x[1, 2, 2, 4].item()]
    assert p[1, 5, 3].item() == x[1, 0, 2, 5].item()  # then the next column
    assert torch.equal(unpatchify(p, 2, (2, 3)), x)
    assert torch.allclose(denormalize_patches(pixel_targets(x, 2), x, 2), p, atol=1e-3)


def test_pixel_head_has_patch_size_squared_times_three_outputs_and_trains():
    cfg = get_config("beit_debug", img_size=32)
    model = BeitForMIM(cfg, target="pixels")
    assert model.lm_head.out_features == cfg.patch_size ** 2 * 3 == 768
    assert BeitForMIM(cfg).lm_head.out_features == cfg.vocab_size  # tokens: the vocabulary
    x = torch.randn(2, 3, 32, 32)
    mask = torch.tensor([[True, False, False, True], [False, True, False, False]])
    out = model(x, mask)
    assert out.shape == (3, 768)
    pixel_regression_loss(out, x, mask, cfg.patch_size).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    with pytest.raises(ValueError, match="unknown MIM target"):
        BeitForMIM(cfg, target="rgb")


# ----------------------------------------------------------------------------- random masking


@pytest.mark.parametrize("count", [0, 1, 75, 195, 196])
def test_random_masking_exact_count(count):
    gen = RandomMaskingGenerator((14, 14), num_masking_patches=count)
    for seed in range(50):
        m = gen(np.random.default_rng(seed))
        assert m.shape == (14, 14) and m.dtype == bool and int(m.sum()) == count


def test_random_masking_is_uniform_reproducible_and_resumable():
    gen = RandomMaskingGenerator((14, 14), 75)
    masks = np.stack([gen(np.random.default_rng(s)) for s in range(2000)])
    freq = masks.mean(0)  # every patch masked ~75/196 = 0.383 of the time (5 sigma: +-0.055)
    assert np.abs(freq - 75 / 196).max() < 0.055
    assert len({m.tobytes() for m in masks[:100]}) == 100
    again = RandomMaskingGenerator((14, 14), 75)
    assert all(np.array_equal(again(np.random.default_rng(s)), masks[s]) for s in range(20))
    # Resuming the generator's own rng continues the same sequence bit-exactly.
    g1 = RandomMaskingGenerator(seed=7)
    [g1() for _ in range(3)]
    state = json.loads(json.dumps(g1.state_dict()))  # survives a JSON round trip (task state)
    tail = [g1() for _ in range(3)]
    g2 = RandomMaskingGenerator(seed=123)
    g2.load_state_dict(state)
    assert all(np.array_equal(a, g2()) for a in tail)


def test_random_masking_through_the_dataset_keying(tmp_path):
    """The dataset draws each mask from an rng keyed by the sample's (index, seed), as for blocks:
    the same key gives the same mask from a fresh dataset (what resume relies on)."""
    from beit_scale.data.datasets import MIMDataset, SafeImageFolder
    from beit_scale.data.transforms import MIMTransform
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        Image.fromarray(np.full((40, 40, 3), 60 if c == "a" else 200, np.uint8)).save(tmp_path / c / "0.png")

    def dataset(mode):
        return MIMDataset(SafeImageFolder(tmp_path), MIMTransform(32, 16), build_masker(mode, (2, 2), 2))
    a, b = dataset("random"), dataset("random")
    for key in [(0, 5), (1, 5), (1, 6)]:
        ma, mb = a[key][2], b[key][2]
        assert ma.dtype == torch.bool and int(ma.sum()) == 2 and torch.equal(ma, mb)
    assert len({tuple(a[(0, s)][2].tolist()) for s in range(30)}) > 3  # the seed matters


def test_build_masker_modes():
    assert isinstance(build_masker("block", 14, 75, min_num_patches=16), MaskingGenerator)
    assert isinstance(build_masker("random", 14, 75), RandomMaskingGenerator)
    with pytest.raises(ValueError, match="unknown mask mode 'blocks'"):
        build_masker("blocks", 14, 75)
    with pytest.raises(ValueError, match="does not fit"):
        build_masker("random", 14, 197)


# ----------------------------------------------------------------------------- config


def test_ablation_settings_are_validated_in_the_config():
    cfg, _, _ = build_config("mim", None, ["mim.target=pixels", "data.mask_mode=random"])
    assert (cfg.mim.target, cfg.data.mask_mode) == ("pixels", "random")
    default, _, _ = build_config("mim")
    assert (default.mim.target, default.data.mask_mode) == ("tokens", "block")
    with pytest.raises(ConfigError, match="mim.target='pixel': must be 'tokens' or 'pixels'"):
        build_config("mim", None, ["mim.target=pixel"])
    with pytest.raises(ConfigError, match="data.mask_mode='blockwise': must be 'block' or 'random'"):
        build_config("mim", None, ["data.mask_mode=blockwise"])
    with pytest.raises(ConfigError, match="uses no tokenizer.*remove it"):
        build_config("mim", None, ["mim.target=pixels", "tokenizer.checkpoint=/t.safetensors"])


# ----------------------------------------------------------------------------- attention maps


def test_attention_probabilities_rows_sum_to_one_and_match_the_fast_path():
    torch.manual_seed(0)
    model = build_model("beit_debug", task="classify", img_size=32, drop_path_rate=0.0).eval()
    for blk in model.blocks:  # non-trivial attention: random rel-pos tables, larger q/k weights
        blk.attn.rel_pos.table.data.normal_(0, 1.0)
        blk.attn.qkv.weight.data.mul_(20)
    x = torch.randn(3, 3, 32, 32)
    attn = model.last_attention(x)
    assert attn.shape == (3, model.cfg.num_heads, 5, 5)
    assert torch.allclose(attn.sum(-1), torch.ones(3, model.cfg.num_heads, 5), atol=1e-5)
    assert attn.std() > 0.05  # not uniform, so the check above says something
    # The explicit softmax path computes the same block output as scaled_dot_product_attention.
    with torch.no_grad():
        fast = model.forward_features(x)
        model.blocks[-1].attn.keep_probs = True
        slow = model.forward_features(x)
    assert torch.allclose(fast, slow, atol=1e-5)
    assert model.blocks[-1].attn.probs is not None  # (left on by hand above)
    model.blocks[-1].attn.keep_probs = False


def _images(tmp_path, n):
    paths = []
    for i in range(n):
        arr = np.zeros((50, 70, 3), np.uint8)
        arr[10:30, 20 + 5 * i:45] = (255, 40 * i, 0)
        paths.append(tmp_path / f"im{i}.png")
        Image.fromarray(arr).save(paths[-1])
    return [str(p) for p in paths]


def test_attention_cli_writes_the_figure_from_an_exported_file(tmp_path, capsys):
    from beit_scale import viz
    from beit_scale.io import save_safetensors
    torch.manual_seed(0)
    mim = BeitForMIM(get_config("beit_debug", img_size=48)).eval()
    src = save_safetensors(mim.state_dict(), tmp_path / "mim.safetensors",
                           {"model_config": json.dumps(mim.cfg.to_dict())})
    # The backbone the CLI loads computes exactly the MIM model's attention.
    x = torch.randn(1, 3, 48, 48)
    assert torch.allclose(viz.load_backbone(src).last_attention(x), mim.last_attention(x))
    imgs = _images(tmp_path, 2)
    out = tmp_path / "attn.png"
    viz.main(["attention", str(src), "--images", *imgs, "--out", str(out), "--points", "0.2,0.2", "0.9,0.5"])
    S, pad = 48, viz.PAD
    with Image.open(out) as im:  # 2 images x (image + 2 maps)
        assert im.size == (3 * S + 4 * pad, 2 * S + 3 * pad)
    viz.main(["attention", str(src), "--images", imgs[0], "--out", str(out), "--per-head"])
    with Image.open(out) as im:  # 3 default points x (image + 2 heads)
        assert im.size == (3 * S + 4 * pad, 3 * S + 4 * pad)
    assert "per head" in capsys.readouterr().out


# ----------------------------------------------------------------------------- decoded-prediction grid


def test_prediction_grid_rows_shapes_range_and_round_trip(tokenizer_file):
    from beit_scale.data.transforms import IMAGENET_MEAN, IMAGENET_STD
    from beit_scale.models.dvae import load_tokenizer
    from beit_scale.train import viz_callbacks as vc
    torch.manual_seed(0)
    img01 = torch.rand(2, 3, 32, 32)
    x = (img01 - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    mask = torch.tensor([[True, False, False, True], [False, True, True, False]])
    # Pixels: predicting the true normalized targets reproduces the input; a wrong prediction
    # changes the masked patches only.
    true = pixel_targets(x, 16)[mask]
    rows = vc.pixel_rows(x, mask, true, 16)
    assert len(rows) == 3 and all(r.shape == (2, 3, 32, 32) for r in rows)
    assert torch.allclose(rows[2], img01, atol=1e-4) and torch.allclose(rows[0], img01, atol=1e-5)
    wrong = vc.pixel_rows(x, mask, torch.randn_like(true) * 3, 16)[2]
    m = mask.view(2, 1, 2, 2).repeat_interleave(16, 2).repeat_interleave(16, 3).expand(-1, 3, -1, -1)
    assert torch.allclose(wrong[~m], img01[~m], atol=1e-4) and not torch.allclose(wrong[m], img01[m], atol=1e-2)
    assert torch.equal(rows[1][m], torch.full_like(rows[1][m], vc.MASK_GREY))
    # Tokens: 4 rows; predicting the true tokens gives the true tokens' reconstruction.
    tok = load_tokenizer(tokenizer_file).eval()  # vocab 64, 112 px -> 14x14 tokens
    img = torch.rand(2, 3, 224, 224)
    ids = torch.randint(0, 64, (2, 196))
    mask = torch.zeros(2, 196, dtype=torch.bool)
    mask[:, 30:90] = True
    trows = vc.token_rows(tok, img, mask, ids, ids[mask], 16)
    assert len(trows) == 4 and all(r.shape == (2, 3, 224, 224) for r in trows)
    assert torch.equal(trows[2], trows[3])
    other = vc.token_rows(tok, img, mask, ids, (ids[mask] + 1) % 64, 16)[3]
    assert not torch.equal(other, trows[2])
    grid = vc.make_grid(trows)
    assert grid.shape == (3, 4 * 224 + 5 * 2, 2 * 224 + 3 * 2)  # rows: kinds, columns: images, 2 px padding
    assert 0 <= grid.min() and grid.max() <= 1


# ----------------------------------------------------------------------------- real runs

DEBUG = ["model.name=beit_debug", "model.drop_path=0.0", "data.num_workers=0", "train.log_every=1",
         "train.eval_batches=1", "optim.warmup_steps=1", "optim.lr=1e-3", "train.micro_batch=4",
         "train.global_batch=8", "checkpoint.resume=none"]


@pytest.fixture(scope="module")
def pixel_runs(tmp_path_factory):
    """ONE 2-rank launch under ZeRO 2: MIM with pixel targets and random masks (3 steps, pictures
    every 2 steps); the same run stopped at step 2 and resumed; fine-tuning from the first (2 steps)."""
    from launching import run_ranks
    tmp = tmp_path_factory.mktemp("pixels")
    mim = DEBUG + ["train.max_steps=3", "mim.target=pixels", "data.mask_mode=random", "train.image_log_every=2"]
    runs = [{"stage": "mim", "deepspeed_config": "ds_configs/zero2.json", "run_dir": str(tmp / "mim"), "set": mim},
            {"stage": "mim", "deepspeed_config": "ds_configs/zero2.json", "run_dir": str(tmp / "mim_resumed"),
             "set": mim + ["train.stop_at_step=2"]},
            {"stage": "mim", "deepspeed_config": "ds_configs/zero2.json", "run_dir": str(tmp / "mim_resumed"),
             "set": mim + ["checkpoint.resume=auto"]},
            {"stage": "classify", "deepspeed_config": "ds_configs/zero2.json", "run_dir": str(tmp / "ft"),
             "set": DEBUG + ["train.max_steps=2", f"init.from={tmp / 'mim'}", "model.num_classes=10"]}]
    spec = tmp / "spec.json"
    spec.write_text(json.dumps({"runs": runs}))
    codes, logs = run_ranks(2, ["tests/drivers/multi_run.py", str(spec)], tmp / "logs", timeout=600)
    assert codes == [0, 0], logs[-5000:]
    return tmp, logs


def test_pixel_pretraining_under_zero2_on_two_ranks(pixel_runs):
    from launching import losses, read_metrics
    from beit_scale.train.checkpoint.layout import read_manifest
    tmp, logs = pixel_runs
    mim = tmp / "mim"
    train = losses(mim)
    assert sorted(train) == [1, 2, 3] and all(math.isfinite(v) and 0 < v < 10 for v in train.values())
    ev = read_metrics(mim, "eval")[-1]
    assert 0 < ev["val_pixel_mse"] < 10 and ev["val_pixel_mse_zero"] > 0.5 and "val_mim_acc" not in ev
    manifest = read_manifest(mim / "checkpoints" / "step_00000003")
    assert manifest["config"]["mim"]["target"] == "pixels" and manifest["config"]["data"]["mask_mode"] == "random"
    assert manifest["extra"]["task"]["tokenizer_checkpoint"] is None
    assert not (mim / "tokenizer").exists() and "training the default tokenizer" not in logs
    assert "MIM target pixels, random masking" in logs
    # Stopped at step 2 and resumed: the same random masks, so the same losses, bit for bit.
    assert "resumed from" in logs and losses(tmp / "mim_resumed") == train
    # the head has patch^2 * 3 outputs in the saved weights
    from beit_scale.train.checkpoint.reader import consolidated_state_dict
    sd, _ = consolidated_state_dict(mim)
    assert sd["lm_head.weight"].shape == (768, 64)


def test_prediction_grid_written_at_the_configured_steps_by_rank0_only(pixel_runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from beit_scale.train.viz_callbacks import PNG_NAME, TB_TAG
    mim = pixel_runs[0] / "mim"
    events = list((mim / "tensorboard").glob("events.*"))
    assert len(events) == 1  # one writer: rank 0's
    ev = EventAccumulator(str(mim / "tensorboard"), size_guidance={"images": 0})
    ev.Reload()
    imgs = ev.Images(TB_TAG)
    assert [e.step for e in imgs] == [2, 3]  # every 2 steps and the last; never twice per step
    rows, cols = 3, 4  # input, masked, prediction x the first 4 images of the micro batch
    assert (imgs[-1].width, imgs[-1].height) == (cols * 224 + (cols + 1) * 2, rows * 224 + (rows + 1) * 2)
    with Image.open(mim / PNG_NAME) as im:
        assert im.size == (imgs[-1].width, imgs[-1].height)
        arr = np.asarray(im)
    assert arr[2:226, 2:226].std() > 0  # an image, not a blank
    from beit_scale.train.run import final_report  # what launch/pretrain.py (and `make demo`) prints last
    report = final_report(mim)
    assert f"predictions  {mim / PNG_NAME}" in report and "MIM pixels   MSE" in report


def test_export_finetune_and_attention_maps_from_a_pixel_run(pixel_runs, tmp_path):
    from launching import losses
    from beit_scale import viz
    from beit_scale.train.export import export_checkpoint
    tmp, logs = pixel_runs
    assert sorted(losses(tmp / "ft")) == [1, 2] and all(math.isfinite(v) for v in losses(tmp / "ft").values())
    assert f"init.from {tmp / 'mim'} [mim checkpoint step 3]" in logs
    assert "MIM head, final norm and [MASK] token dropped" in logs
    ours, meta = export_checkpoint(tmp / "mim", "safetensors", out=tmp_path / "ours.safetensors")
    assert meta["mim_target"] == "pixels" and "vocab_size" not in meta
    timm_file, tmeta = export_checkpoint(tmp / "mim", "timm", out=tmp_path / "timm.safetensors")  # verifies in timm
    assert tmeta["format"] == "timm.beit"
    imgs = _images(tmp_path, 1)
    for src in (tmp / "mim", tmp / "ft", timm_file):  # MIM run, classification run, timm export
        out = tmp_path / f"attn_{Path(src).name}.png"
        viz.main(["attention", str(src), "--images", *imgs, "--out", str(out)])
        with Image.open(out) as im:
            assert im.size == (4 * 224 + 5 * viz.PAD, 224 + 2 * viz.PAD)
