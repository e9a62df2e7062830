"""Patch size 14 (beit_giant_patch14_224's geometry): the MIM data path follows the model's patch
size, and the tokenizer grid must match the patch grid, with a clear error when it cannot."""
import json
import math
import os

import pytest
import torch

from beit_scale.config import ConfigError, build_config
from beit_scale.models.dvae import DVAE, DVAEConfig, save_tokenizer
from beit_scale.train import run
from beit_scale.train.tasks import MIMTask
from launching import losses, read_metrics, run_ranks


@pytest.fixture(scope="module")
def tokenizer128(tmp_path_factory):
    """A random dVAE for 128 px views: 8x downsampling -> 16x16 tokens, one per 14 px patch at 224."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tok128") / "tokenizer.safetensors"
    save_tokenizer(DVAE(DVAEConfig(vocab_size=64, image_size=128, hidden_dim=16)), path)
    return path


def _task(*sets, tokenizer=None):
    cfg, _, _ = build_config("mim", None, list(sets), defaults=run.EMBEDDED["mim"])
    return MIMTask(cfg, tokenizer)


def test_patch14_mim_trains(tmp_path, tokenizer128):
    """A patch-14 debug model (16x16 patches at 224 px) pretrains a few steps, 1 rank, real launcher."""
    run_dir = tmp_path / "mim14"
    sets = ["model.name=beit_debug_patch14", "model.drop_path=0.0", "data.num_workers=0",
            "data.second_input_size=128", "data.num_mask_patches=100",  # ~40% of 256
            f"tokenizer.checkpoint={tokenizer128}", "tokenizer.vocab_size=64", "train.max_steps=3",
            "train.global_batch=4", "train.micro_batch=4", "train.log_every=1", "train.eval_batches=1",
            "optim.warmup_steps=1", "optim.lr=1e-3"]
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"runs": [{"stage": "mim", "deepspeed_config": "ds_configs/zero2.json",
                                          "run_dir": str(run_dir), "set": sets}]}))
    codes, logs = run_ranks(1, ["tests/drivers/patch14_run.py", str(spec)], tmp_path / "logs", timeout=600)
    assert codes == [0], logs[-4000:]
    got = losses(run_dir)
    assert sorted(got) == [1, 2, 3] and all(math.isfinite(v) for v in got.values())
    ev = read_metrics(run_dir, "eval")[-1]
    assert 0 <= ev["val_mim_acc"] <= 1


def test_patch14_datasets_use_the_model_grid(tokenizer128):
    task = _task("model.name=beit_giant_patch14_224", "data.second_input_size=128",
                 tokenizer=tokenizer128)
    task.check_geometry()
    assert task.model_config().patch_size == 14
    ds = task._datasets("train")
    assert ds.masker.shape == (16, 16)
    img, tok, mask = ds[(0, 0)]
    assert img.shape == (3, 224, 224) and tok.shape == (3, 128, 128)
    assert mask.shape == (256,) and int(mask.sum()) == 75
    # 200 masked patches fit a 16x16 grid (the old check, patch 16 hard-coded, refused > 196)
    _task("model.name=beit_giant_patch14_224", "data.second_input_size=128",
          "data.num_mask_patches=200").check_geometry()


@pytest.mark.parametrize("sets,message", [
    # the default 112 px tokenizer view gives 14x14 tokens; a patch-14 model has 16x16 patches at 224
    ([], "data.second_input_size=112: the tokenizer downsamples by 8, giving 14x14 target tokens, but "
         "beit_giant_patch14_224 sees 16x16 patches (224px / patch 14); MIM needs one target per patch, so set "
         "data.second_input_size=128"),
    (["data.second_input_size=128", "data.num_mask_patches=257"], "larger than the 16x16 = 256 patch grid"),
    (["data.second_input_size=100"], "giving 12.5x12.5 target tokens"),
    (["data.input_size=112", "data.second_input_size=64"], "model.img_size=224 but data.input_size=112"),
])
def test_patch14_geometry_errors(sets, message):
    with pytest.raises(ConfigError) as e:
        _task("model.name=beit_giant_patch14_224", *sets).check_geometry()
    assert message in str(e.value)


def test_launcher_refuses_a_mismatched_tokenizer_grid_before_starting(capsys, tokenizer_file):
    """Through the launcher (exit 2, nothing started): patch 14 with the conftest's 112 px tokenizer."""
    rc = run.main("mim", ["--run_dir", "/nonexistent/should_not_be_created", "--set",
                          "model.name=beit_giant_patch14_224", "--set", f"tokenizer.checkpoint={tokenizer_file}",
                          "--set", "tokenizer.vocab_size=64"])
    err = capsys.readouterr().err
    assert rc == run.CONFIG_ERROR_EXIT and "set data.second_input_size=128" in err
    assert not os.path.exists("/nonexistent/should_not_be_created")


def test_launcher_checks_the_grids_before_training_a_default_tokenizer(capsys, tmp_path):
    """No tokenizer given: the launcher would train one first; a patch-14 model with the default
    112 px tokenizer view must fail before that, not after a whole tokenizer run."""
    rc = run.main("mim", ["--run_dir", str(tmp_path / "run"), "--set", "model.name=beit_giant_patch14_224"])
    captured = capsys.readouterr()
    assert rc == run.CONFIG_ERROR_EXIT and "set data.second_input_size=128" in captured.err
    assert "training the default tokenizer" not in captured.out and not (tmp_path / "run" / "tokenizer").exists()
