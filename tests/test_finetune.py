"""Fine-tuning: layer-decay groups, init.from loading (MIM checkpoints, timm files, resolution
change, bad files), and real 2-rank fine-tuning under ZeRO 2 / 3 with evaluation that does not
depend on the number of ranks, plus intermediate fine-tuning onto a dataset with fewer classes."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launching import REPO, read_metrics, run_ranks
from beit_scale.config import ConfigError
from beit_scale.models.zoo import build_model, get_config
from beit_scale.train.checkpoint.reader import load_init_weights


def _rand_(model, seed=0):
    """Fill every parameter with noise, so that copies are distinguishable from fresh inits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model


def _save_st(sd, path):
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


# ----------------------------------------------------------------------------- layer decay

def test_layer_decay_groups_and_optimizer_lrs():
    from beit_scale.train import optim
    model = build_model("beit_debug", task="classify", num_classes=10)
    depth, decay, lr = model.cfg.depth, 0.65, 1e-3

    def expected_layer(name):
        if name.startswith(("patch_embed.", "cls_token", "pos_embed")):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return depth + 1  # fc_norm, head

    groups = optim.param_groups(model, 0.05, decay)
    seen = set()
    for g in groups:
        for name in g["param_names"]:
            assert g["lr_scale"] == pytest.approx(decay ** (depth + 1 - expected_layer(name))), name
            seen.add(name)
    assert seen == {n for n, _ in model.named_parameters()}
    assert any(g["lr_scale"] == 1.0 for g in groups if "head.weight" in g["param_names"])
    opt, sched = optim.build_optimizer_and_schedule(groups, lr, (0.9, 0.999), 1e-8, 0, 10, 0.0)
    by_param = {id(p): pg["lr"] for pg in opt.param_groups for p in pg["params"]}
    for name, p in model.named_parameters():
        assert by_param[id(p)] == pytest.approx(lr * decay ** (depth + 1 - expected_layer(name)))
    # weight decay: none on 1-D tensors and the rel-pos tables, some on matrices
    wd = {n: g["weight_decay"] for g in groups for n in g["param_names"]}
    assert wd["blocks.0.attn.rel_pos.table"] == 0 and wd["blocks.0.norm1.weight"] == 0
    assert wd["blocks.1.mlp.fc1.weight"] == 0.05


# ----------------------------------------------------------------------------- init.from

@pytest.fixture(scope="module")
def mim_file(tmp_path_factory):
    mim = _rand_(build_model("beit_debug", task="mim", vocab_size=64))
    assert mim.shared_rel_pos is not None
    path = tmp_path_factory.mktemp("init") / "mim.safetensors"
    return _save_st(mim.state_dict(), path), mim.state_dict()


def test_init_from_mim_weights(mim_file):
    path, src = mim_file
    model = build_model("beit_debug", task="classify", num_classes=10)
    fresh_head = model.head.weight.clone()
    rep = load_init_weights(model, path)
    assert {"mask_token", "lm_head.weight", "lm_head.bias", "norm.weight", "norm.bias"} <= set(rep.unexpected)
    assert set(rep.missing) == {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"}
    sd = model.state_dict()
    for i in range(model.cfg.depth):  # the shared table copied into every block, exactly (224 -> 224)
        assert torch.equal(sd[f"blocks.{i}.attn.rel_pos.table"], src["shared_rel_pos.table"])
    for k in ("patch_embed.proj.weight", "cls_token", "blocks.1.mlp.fc2.weight", "blocks.0.gamma_1",
              "blocks.1.attn.q_bias"):
        assert torch.equal(sd[k], src[k]), k
    assert torch.equal(model.head.weight, fresh_head)
    assert any("copied into each of the 2 blocks" in n for n in rep.notes)


def test_init_at_higher_resolution(mim_file):
    path, src = mim_file
    model = build_model("beit_debug", task="classify", num_classes=10, img_size=384)
    rep = load_init_weights(model, path)
    table = model.state_dict()["blocks.0.attn.rel_pos.table"]
    assert table.shape == ((2 * 24 - 1) ** 2 + 3, 2)
    assert torch.equal(table[-3:], src["shared_rel_pos.table"][-3:])  # cls rows are copied
    assert any("resized" in n for n in rep.notes)
    out = model(torch.randn(1, 3, 384, 384))
    assert out.shape == (1, 10) and torch.isfinite(out).all()


def test_init_from_timm_files(tmp_path):
    """A timm Beit's weights (.pth and .safetensors) initialise our classifier: same outputs."""
    from timm.models.beit import Beit
    torch.manual_seed(0)
    timm_model = _rand_(Beit(img_size=224, patch_size=16, num_classes=10, embed_dim=64, depth=2, num_heads=2,
                             mlp_ratio=4.0, use_abs_pos_emb=False, use_rel_pos_bias=True, init_values=0.1), 1).eval()
    x = torch.randn(2, 3, 224, 224)
    want = timm_model(x)
    pth = tmp_path / "timm_beit.pth"
    torch.save({"model": timm_model.state_dict()}, pth)
    st = _save_st({k: v for k, v in timm_model.state_dict().items()}, tmp_path / "timm_beit.safetensors")
    for f in (pth, st):
        model = build_model("beit_debug", task="classify", num_classes=10).eval()
        rep = load_init_weights(model, f)
        assert rep.missing == [] and "timm" in rep.kind
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)
    # and our own classifier exported with to_timm round-trips as init
    from beit_scale.models.convert import to_timm
    ours = build_model("beit_debug", task="classify", num_classes=10).eval()
    _save_st(to_timm(ours.state_dict()), tmp_path / "ours_timm.safetensors")
    again = build_model("beit_debug", task="classify", num_classes=10).eval()
    load_init_weights(again, tmp_path / "ours_timm.safetensors")
    torch.testing.assert_close(again(x), ours(x), rtol=0, atol=0)


def test_bad_init_sources(tmp_path, mim_file):
    model = build_model("beit_debug", task="classify", num_classes=10)
    (tmp_path / "junk.safetensors").write_bytes(b"\x00garbage" * 50)
    good = mim_file[0].read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(good[: len(good) // 2])
    torch.save({"conv1.weight": torch.zeros(3, 3), "fc.weight": torch.zeros(2, 2)}, tmp_path / "resnet.pth")
    tiny = build_model("beit_tiny", task="mim", vocab_size=64)
    _save_st(tiny.state_dict(), tmp_path / "tiny.safetensors")
    cases = {"junk.safetensors": "cannot read", "cut.safetensors": "cannot read",
             "resnet.pth": "not a BEiT state dict", "tiny.safetensors": "does not fit",
             "missing.pth": "no such file", "notes.txt": "unknown file type"}
    (tmp_path / "notes.txt").write_text("hi")
    for name, msg in cases.items():
        with pytest.raises(ConfigError, match=msg):
            load_init_weights(model, tmp_path / name)
    # a source without a backbone part the model needs (here: a block) is refused, not half-loaded
    sd = dict(mim_file[1])
    for k in [k for k in sd if k.startswith("blocks.1.mlp.")]:
        del sd[k]
    _save_st(sd, tmp_path / "partial.safetensors")
    with pytest.raises(ConfigError, match="lacks backbone weights"):
        load_init_weights(model, tmp_path / "partial.safetensors")


def test_launcher_rejects_corrupt_init_before_starting(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a pickle")
    r = subprocess.run([sys.executable, "launch/finetune.py", "--run_dir", str(tmp_path / "run"),
                        "--set", "model.name=beit_debug", "--set", f"init.from={bad}"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "init.from=" in r.stderr and "cannot read" in r.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


# ----------------------------------------------------------------------------- real runs

FT = ["model.name=beit_debug", "data.num_workers=0", "train.log_every=1", "optim.warmup_steps=1",
      "optim.lr=1e-3", "checkpoint.resume=none", "train.micro_batch=4", "train.global_batch=8"]


def _small_dataset(root: Path, classes=3, train=6, val=5) -> Path:
    """Dataset B: the first `classes` classes of the embedded set, a few images each."""
    from beit_scale.data.synthetic import ensure_synthetic_imagefolder
    src = ensure_synthetic_imagefolder()
    for split, n in (("train", train), ("val", val)):
        for c in sorted(p.name for p in (src / split).iterdir())[:classes]:
            (root / split / c).mkdir(parents=True)
            for f in sorted((src / split / c).iterdir())[:n]:
                shutil.copy(f, root / split / c / f.name)
    return root


def _eval_run(run_dir, data, init, nproc):
    # lr 1e-20 and no weight decay: the single training step leaves the weights unchanged to fp32
    # precision, so the final evaluation measures the given weights.
    return {"stage": "classify", "deepspeed_config": "ds_configs/zero2.json", "run_dir": str(run_dir),
            "set": FT + [f"data.path={data}", "model.num_classes=3", f"init.from={init}", "train.max_steps=1",
                         "optim.lr=1e-20", "optim.min_lr=0", "optim.weight_decay=0", "optim.warmup_steps=0",
                         f"train.global_batch={4 * nproc}", "train.eval_batches=0"]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tokenizer_file):
    tmp = tmp_path_factory.mktemp("ft")
    data_b = _small_dataset(tmp / "data_b")
    mim = {"stage": "mim", "deepspeed_config": "ds_configs/zero2.json", "run_dir": str(tmp / "mim"),
           "set": ["model.name=beit_debug", "data.num_workers=0", "train.max_steps=2", "train.micro_batch=2",
                   "train.global_batch=4", "train.eval_batches=1", f"tokenizer.checkpoint={tokenizer_file}",
                   "tokenizer.vocab_size=64", "checkpoint.resume=none"]}
    runs = [mim]
    for z in (2, 3):
        runs.append({"stage": "classify", "deepspeed_config": f"ds_configs/zero{z}.json",
                     "run_dir": str(tmp / f"ft_z{z}"),
                     "set": FT + [f"init.from={tmp / 'mim'}", "train.max_steps=3", "train.eval_every=2",
                                  "train.eval_batches=1", "finetune.mixup=0.8", "finetune.cutmix=1.0",
                                  "finetune.label_smoothing=0.1"]})
    # intermediate fine-tuning: from the 10-class run onto the 3-class dataset B (new head)
    runs.append({"stage": "classify", "deepspeed_config": "ds_configs/zero2.json", "run_dir": str(tmp / "ft_b"),
                 "set": FT + [f"init.from={tmp / 'ft_z2'}", f"data.path={data_b}", "model.num_classes=3",
                              "train.max_steps=2", "train.eval_batches=0", "finetune.ema=true",
                              "finetune.ema_decay=0.5"]})
    runs.append(_eval_run(tmp / "eval2", data_b, tmp / "ft_b" / "best" / "model.safetensors", 2))
    spec = tmp / "spec2.json"
    spec.write_text(json.dumps({"runs": runs}))
    codes, logs2 = run_ranks(2, ["tests/drivers/multi_run.py", str(spec)], tmp / "logs2", timeout=600)
    assert codes == [0, 0], logs2[-5000:]
    spec1 = tmp / "spec1.json"
    spec1.write_text(json.dumps({"runs": [_eval_run(tmp / "eval1", data_b,
                                                    tmp / "ft_b" / "best" / "model.safetensors", 1)]}))
    codes, logs1 = run_ranks(1, ["tests/drivers/multi_run.py", str(spec1)], tmp / "logs1", timeout=300)
    assert codes == [0], logs1[-5000:]
    return tmp, logs2


@pytest.mark.parametrize("zero", [2, 3])
def test_finetune_from_mim_run_under_zero(runs, zero):
    tmp, logs = runs
    run = tmp / f"ft_z{zero}"
    train = read_metrics(run)
    assert [r["step"] for r in train] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in train)
    evals = read_metrics(run, "eval")
    assert [e["step"] for e in evals] == [2, 3]
    for e in evals:
        assert 0 <= e["val_top1"] <= e["val_top5"] <= 1 and e["val_loss"] > 0
    best = json.loads((run / "best" / "best.json").read_text())
    assert best["val_top1"] == max(e["val_top1"] for e in evals)
    from safetensors.torch import load_file
    sd = load_file(str(run / "best" / "model.safetensors"))
    assert sd["head.weight"].shape == (10, 64) and "blocks.1.attn.rel_pos.table" in sd
    assert "layer-wise lr decay groups" in logs
    assert f"init.from {tmp / 'mim'} [mim checkpoint step 2]" in logs
    assert "MIM head, final norm and [MASK] token dropped" in logs


def test_intermediate_finetuning_new_head(runs):
    tmp, logs = runs
    assert f"init.from {tmp / 'ft_z2'} [classify checkpoint step 3]" in logs
    assert "new classifier head: 10 -> 3 classes" in logs
    e = read_metrics(tmp / "ft_b", "eval")[-1]
    assert "val_top1_ema" in e and 0 <= e["val_top1_ema"] <= 1


def test_eval_same_on_one_and_two_ranks(runs):
    tmp, _ = runs
    one, two = read_metrics(tmp / "eval1", "eval")[-1], read_metrics(tmp / "eval2", "eval")[-1]
    assert one["val_top1"] == two["val_top1"] and one["val_top5"] == two["val_top5"]
    assert abs(one["val_loss"] - two["val_loss"]) < 1e-6
    # and both equal the accuracy of the saved weights evaluated here, outside the trainer
    from beit_scale.data.datasets import ClassifyDataset, SafeImageFolder
    from beit_scale.data.transforms import ClassifyTransform
    model = build_model("beit_debug", task="classify", num_classes=3).eval()
    load_init_weights(model, tmp / "ft_b" / "best" / "model.safetensors")
    ds = ClassifyDataset(SafeImageFolder(tmp / "data_b" / "val"), ClassifyTransform(train=False, size=224))
    from beit_scale.data.transforms import to_float_image
    xs, ys = zip(*[ds[i] for i in range(len(ds))])
    with torch.no_grad():  # the dataset ships uint8: normalise as the task does on the device
        logits = model(to_float_image(torch.stack(xs), normalize=True))
    y = torch.tensor(ys)
    assert len(ds) == 15
    assert one["val_top1"] == pytest.approx((logits.argmax(-1) == y).sum().item() / 15, abs=1e-12)
    assert one["val_loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, y).item(), abs=1e-5)


# ----------------------------------------------------------------------------- weight EMA

def _ema_run(run_dir, *extra):
    return {"stage": "classify", "deepspeed_config": "ds_configs/zero2.json", "run_dir": str(run_dir),
            "set": FT + ["init.from=scratch", "model.drop_path=0.1", "train.max_steps=6", "train.eval_every=2",
                         "train.eval_batches=2", "finetune.ema=true", "finetune.ema_decay=0.9",
                         "checkpoint.resume=auto", *extra]}


def test_ema_survives_resume_exactly(tmp_path):
    """A 2-rank EMA fine-tuning run stopped at step 3 (train.stop_at_step) and resumed in a new
    process group evaluates its EMA exactly like an uninterrupted run (val_top1_ema, val_loss_ema),
    and the best-weights record is carried over the resume."""
    ref, run = tmp_path / "ref", tmp_path / "run"
    spec = tmp_path / "first.json"
    spec.write_text(json.dumps({"runs": [_ema_run(ref), _ema_run(run, "train.stop_at_step=3")]}))
    codes, logs = run_ranks(2, ["tests/drivers/multi_run.py", str(spec)], tmp_path / "logs1", timeout=600)
    assert codes == [0, 0], logs[-5000:]
    ck = run / "checkpoints" / "step_00000003"
    manifest = json.loads((ck / "manifest.json").read_text())
    assert "task_state.safetensors" in manifest["files"] and manifest["extra"]["best"]["step"] == 2
    spec = tmp_path / "second.json"
    spec.write_text(json.dumps({"runs": [_ema_run(run)]}))
    codes, logs = run_ranks(2, ["tests/drivers/multi_run.py", str(spec)], tmp_path / "logs2", timeout=600)
    assert codes == [0, 0], logs[-5000:]
    want, got = read_metrics(ref, "eval"), read_metrics(run, "eval")
    assert [e["step"] for e in want] == [e["step"] for e in got] == [2, 4, 6]
    for w, g in zip(want, got):
        assert g["val_loss"] == w["val_loss"], (w, g)  # the model itself resumed exactly
        assert g["val_top1_ema"] == w["val_top1_ema"] and g["val_loss_ema"] == w["val_loss_ema"], (w, g)
    assert {r["step"]: r["loss"] for r in read_metrics(run)} == {r["step"]: r["loss"] for r in read_metrics(ref)}
    # the EMA really lags the weights here (decay 0.9), so a restart from the weights would show
    assert want[-1]["val_loss_ema"] != want[-1]["val_loss"]
    best = json.loads((run / "best" / "best.json").read_text())
    assert best["val_top1"] == max(e["val_top1"] for e in want)
    assert "resumed from" in logs and "restored from the checkpoint" in logs


def test_ema_model_does_not_run_the_live_weights_under_activation_checkpointing():
    from beit_scale.train.callbacks import WeightEMA
    from beit_scale.train.engine import apply_activation_checkpointing
    model = build_model("beit_debug", task="classify", num_classes=10).eval()
    assert apply_activation_checkpointing(model, "all") == [0, 1]
    ema = WeightEMA(model, 0.9)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        before = ema.model(x)
        for p in model.blocks.parameters():
            p.add_(1.0)
        assert torch.equal(ema.model(x), before)


def test_ema_with_zero3_is_refused_before_the_process_group(tmp_path):
    r = subprocess.run([sys.executable, "launch/finetune.py", "--deepspeed_config", "ds_configs/zero3.json",
                        "--run_dir", str(tmp_path / "run"), "--set", "model.name=beit_debug",
                        "--set", "init.from=scratch", "--set", "finetune.ema=true"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "finetune.ema=true" in r.stderr and "ZeRO 3" in r.stderr
    assert "[classify]" not in r.stdout and not (tmp_path / "run").exists()
