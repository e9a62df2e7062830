"""launch/export.py: consolidated fp32 weights -> safetensors (our names) and timm's Beit layout.

One real 1-process MIM run (debug model, ZeRO 2, 2 steps, a checkpoint each step) and one
hand-made ZeRO-0 classifier checkpoint folder (the manifest + model-states layout DeepSpeed and
CheckpointManager write), so the classifier path is covered without a fine-tuning run.
"""
import json
import shutil
import struct
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from beit_scale.config import build_config, from_dict, to_dict
from beit_scale.train.checkpoint import COMPLETE, MANIFEST, file_crc32
from beit_scale.train.export import (build_stage_model, consolidated_state_dict, create_timm_model,
                                     read_export_metadata, timm_kwargs, timm_model_name)
from launching import REPO

sys.path.insert(0, str(REPO / "launch"))
import export as export_cli  # noqa: E402  (launch/export.py)

timm = pytest.importorskip("timm")
from safetensors.torch import load_file  # noqa: E402


@pytest.fixture(scope="module")
def mim_run(tmp_path_factory, tokenizer_file):
    run_dir = tmp_path_factory.mktemp("mim") / "run"
    sets = ["model.name=beit_debug", "train.max_steps=2", "checkpoint.every_steps=1", "train.global_batch=4",
            "train.micro_batch=4", "train.eval_batches=1", "data.num_workers=0",
            f"tokenizer.checkpoint={tokenizer_file}", "tokenizer.vocab_size=64"]
    argv = [sys.executable, "launch/pretrain.py", "--deepspeed_config", "ds_configs/zero2.json",
            "--run_dir", str(run_dir)] + [a for s in sets for a in ("--set", s)]
    res = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return run_dir


def _fake_checkpoint(folder, stage_cfg, module_sd, step=7):
    """A checkpoint folder as CheckpointManager writes it for ZeRO 0 (model states + manifest + COMPLETE)."""
    folder.mkdir(parents=True)
    torch.save({"module": module_sd}, folder / "mp_rank_00_model_states.pt")
    files = {f.name: {"size": f.stat().st_size, "crc32": file_crc32(f)} for f in folder.iterdir()}
    manifest = {"format": "beit_scale-checkpoint-v1", "tag": folder.name, "step": step, "samples_seen": 0,
                "world_size": 1, "zero_stage": 0, "precision": "fp32", "stage": stage_cfg.stage,
                "model": stage_cfg.model.name, "config": to_dict(stage_cfg), "files": files}
    (folder / MANIFEST).write_text(json.dumps(manifest))
    (folder / COMPLETE).write_text(f"{step}\n")
    return folder


@pytest.fixture(scope="module")
def cls_ckpt(tmp_path_factory):
    cfg, _, _ = build_config("classify", None, ["model.name=beit_debug", "model.num_classes=10"],
                             defaults={"model": {"name": "beit_debug"}})
    model = build_stage_model(cfg)
    torch.manual_seed(1)
    with torch.no_grad():  # every parameter non-trivial (rel-pos tables start at zero, the head near zero)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    folder = tmp_path_factory.mktemp("cls") / "run" / "checkpoints" / "step_00000007"
    return _fake_checkpoint(folder, cfg, model.state_dict())


def _export(src, fmt, out, capsys=None):
    code = export_cli.main([str(src), "--format", fmt, "--out", str(out)])
    assert code == 0
    return out


def _reference(src):
    """Our model built from the checkpoint's own config, with the consolidated checkpoint weights."""
    sd, manifest = consolidated_state_dict(src)
    model = build_stage_model(from_dict(manifest["config"]))
    model.load_state_dict(sd, strict=True)
    return model.eval(), sd, manifest


def _images(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 224, 224, generator=g)


def test_mim_safetensors_round_trip_is_exact(mim_run, tmp_path):
    out = _export(mim_run, "safetensors", tmp_path / "mim.safetensors")
    ref, sd, manifest = _reference(mim_run)
    loaded = load_file(str(out))
    assert set(loaded) == set(sd) and all(torch.equal(loaded[k], sd[k]) for k in sd)
    assert all(v.dtype == torch.float32 for v in loaded.values())
    model = build_stage_model(from_dict(manifest["config"]))
    model.load_state_dict(loaded, strict=True)
    x = _images()
    mask = torch.zeros(2, 196, dtype=torch.bool)
    mask[:, ::3] = True
    with torch.no_grad():
        assert torch.equal(model.eval()(x, mask), ref(x, mask))
    meta = read_export_metadata(out)
    assert meta["format"] == "beit_scale.beit" and meta["stage"] == "mim" and meta["step"] == "2"
    assert meta["model"] == "beit_debug" and meta["vocab_size"] == "64" and meta["img_size"] == "224"
    assert json.loads(meta["model_config"])["rel_pos_bias"] == "shared"


def test_mim_timm_export_loads_strictly_and_matches_features(mim_run, tmp_path):
    out = _export(mim_run, "timm", tmp_path / "mim_timm.safetensors")
    ref, _, _ = _reference(mim_run)
    meta = read_export_metadata(out)
    assert meta["format"] == "timm.beit" and meta["num_classes"] == "0" and meta["timm_model"] == "Beit"
    c = ref.cfg
    # What a timm user writes for a backbone of this size (timm has no beit_debug: the class directly).
    tm = timm.models.beit.Beit(img_size=224, patch_size=c.patch_size, embed_dim=c.embed_dim, depth=c.depth,
                               num_heads=c.num_heads, mlp_ratio=c.mlp_dim / c.embed_dim,
                               init_values=c.layer_scale_init, use_abs_pos_emb=False, use_rel_pos_bias=True,
                               num_classes=0)
    tm.load_state_dict(load_file(str(out)), strict=True)
    x = _images()
    with torch.no_grad():
        ours = ref.forward_features(x)
        theirs = tm.eval().forward_features(x)
        assert (ours - theirs).abs().max() <= 1e-5
        pooled = F.layer_norm(ours[:, 1:].mean(1), (c.embed_dim,), eps=1e-6)  # fc_norm at its fresh init
        assert (tm(x) - pooled).abs().max() <= 1e-5
    # The metadata rebuilds the same timm model.
    create_timm_model(meta).load_state_dict(load_file(str(out)), strict=True)


def test_timm_mim_export_starts_a_finetune(mim_run, tmp_path):
    """init.from=<timm export>: adapt_state_dict_to leaves only the new classifier head missing."""
    from beit_scale.models.convert import adapt_state_dict_to
    from beit_scale.models.zoo import build_model, get_config
    out = _export(mim_run, "timm", tmp_path / "mim_timm.safetensors")
    cfg = get_config("beit_debug", num_classes=5)
    model = build_model(cfg, task="classify")
    missing, unexpected = model.load_state_dict(adapt_state_dict_to(cfg, load_file(str(out))), strict=False)
    assert sorted(missing) == ["head.bias", "head.weight"] and not unexpected


def test_classifier_safetensors_and_timm_exports(cls_ckpt, tmp_path):
    ref, sd, _ = _reference(cls_ckpt)
    x = _images(seed=1)
    with torch.no_grad():
        want = ref(x)
    ours_file = _export(cls_ckpt, "safetensors", tmp_path / "cls.safetensors")
    model = build_stage_model(from_dict(json.loads(read_export_metadata(ours_file)["experiment_config"])))
    model.load_state_dict(load_file(str(ours_file)), strict=True)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), want)

    timm_file = _export(cls_ckpt, "timm", tmp_path / "cls_timm.safetensors")
    meta = read_export_metadata(timm_file)
    assert meta["num_classes"] == "10" and meta["stage"] == "classify" and meta["step"] == "7"
    c = ref.cfg
    tm = timm.models.beit.Beit(img_size=224, patch_size=c.patch_size, embed_dim=c.embed_dim, depth=c.depth,
                               num_heads=c.num_heads, mlp_ratio=c.mlp_dim / c.embed_dim,
                               init_values=c.layer_scale_init, use_abs_pos_emb=False, use_rel_pos_bias=True,
                               num_classes=10)
    tm.load_state_dict(load_file(str(timm_file)), strict=True)
    with torch.no_grad():
        assert (tm.eval()(x) - want).abs().max() <= 1e-5


def test_exported_file_is_tensors_and_string_metadata_only(cls_ckpt, tmp_path):
    out = _export(cls_ckpt, "timm", tmp_path / "t.safetensors")
    raw = out.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    meta = header.pop("__metadata__")
    assert meta and all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    assert all(set(v) == {"dtype", "shape", "data_offsets"} and v["dtype"] == "F32" for v in header.values())
    from safetensors import safe_open
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata()["model"] == "beit_debug" and set(f.keys()) == set(header)
    assert set(meta) >= {"model", "stage", "step", "format", "num_classes", "img_size", "timm_kwargs"}


def test_timm_name_mapping_for_base():
    """beit_base_patch16_224 maps to timm's registered model, with identical parameter shapes."""
    from beit_scale.models.zoo import get_config, resolve_config
    base = resolve_config(get_config("beit_base_patch16_224"), "classify")
    assert timm_model_name(base) == "beit_base_patch16_224"
    assert timm_model_name(base.replace(img_size=384)) is None
    assert timm_model_name(resolve_config(get_config("beit_large_patch16_224"), "classify")) == "beit_large_patch16_224"
    with torch.device("meta"):
        named = timm.create_model("beit_base_patch16_224", pretrained=False, num_classes=0)
        direct = timm.models.beit.Beit(**timm_kwargs(base, 0))
    assert {k: v.shape for k, v in named.state_dict().items()} == {k: v.shape for k, v in direct.state_dict().items()}


def test_errors_are_clear(mim_run, cls_ckpt, tmp_path, capsys):
    def run(src, fmt="safetensors"):
        code = export_cli.main([str(src), "--format", fmt, "--out", str(tmp_path / "x.safetensors")])
        return code, capsys.readouterr().err

    code, err = run(tmp_path / "nothing_here")
    assert code == 2 and "no such file" in err
    (tmp_path / "empty").mkdir()
    code, err = run(tmp_path / "empty")
    assert code == 2 and "not a run dir or beit_scale checkpoint folder" in err

    half = tmp_path / "half" / "step_00000002"
    shutil.copytree(mim_run / "checkpoints" / "step_00000002", half)
    (half / COMPLETE).unlink()
    code, err = run(half)
    assert code == 2 and "COMPLETE" in err

    tok = tmp_path / "tok" / "step_00000007"
    shutil.copytree(cls_ckpt, tok)
    m = json.loads((tok / MANIFEST).read_text())
    m["stage"] = "tokenizer"
    (tok / MANIFEST).write_text(json.dumps(m))
    code, err = run(tok, "timm")
    assert code == 2 and "tokenizer" in err and "--format safetensors" in err

    bad = tmp_path / "bad" / "step_00000007"  # a corrupted file fails its CRC32
    shutil.copytree(cls_ckpt, bad)
    with open(bad / "mp_rank_00_model_states.pt", "r+b") as f:
        f.seek(200)
        f.write(b"\x00\x01\x02\x03")
    code, err = run(bad)
    assert code == 2 and "CRC32" in err
    assert not (tmp_path / "x.safetensors").exists()
