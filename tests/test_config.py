"""Typed config, the DeepSpeed-JSON merge, and clear errors before any process group starts."""
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from beit_scale.config import (ConfigError, build_config, dump_yaml, from_dict, load_deepspeed_json,
                               merge_deepspeed_config, to_dict, validate)
from beit_scale.train import run
from beit_scale.train.optim import lr_factor, param_groups
from launching import REPO


def _merge(stage="mim", yaml_path=None, sets=(), ds="ds_configs/zero2.json", world=1):
    cfg, y, s = build_config(stage, yaml_path, list(sets), defaults=run.EMBEDDED[stage])
    return cfg, merge_deepspeed_config(cfg, load_deepspeed_json(REPO / ds), world, y, s)


def test_batch_fields_filled_from_experiment():
    cfg, ds = _merge(sets=["train.global_batch=64", "train.micro_batch=8"], world=2)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (64, 8, 4)


def test_unknown_key_and_wrong_type():
    with pytest.raises(ConfigError, match="unknown config key 'train.max_stepz'"):
        _merge(sets=["train.max_stepz=3"])
    with pytest.raises(ConfigError, match="train.max_steps: expected an integer"):
        _merge(sets=["train.max_steps=ten"])



@pytest.mark.parametrize("sets,message", [
    # a wrong type (true/false is not a number, although pydantic's lax mode would read it as 1)
    (["finetune.ema=maybe"], "finetune.ema: expected true/false, got 'maybe'"),
    (["train.max_steps=true"], "train.max_steps: expected an integer, got True"),
    (["optim.betas=[0.9]"], "optim.betas: expected a list of 2 values"),
    # a bad choice
    (["precision=fp8"], "precision='fp8': must be 'fp32', 'fp16' or 'bf16'"),
    (["train.act_ckpt_impl=jax"], "train.act_ckpt_impl='jax': must be 'torch' or 'deepspeed'"),
    (["model.rel_pos_bias=global"], "model.rel_pos_bias='global': must be 'layer', 'shared' or 'none'"),
    (["train.act_ckpt=every_0"], "train.act_ckpt='every_0': use none, all, or every_N (e.g. every_2)"),
    # a bound (the message says the allowed range and what the key means)
    (["optim.layer_decay=1.5"], "optim.layer_decay=1.5: must be in (0, 1]"),
    (["checkpoint.keep_last=1"], "checkpoint.keep_last=1: must be >= 2 (keep at least 2 so a crash"),
    (["finetune.label_smoothing=1"], "finetune.label_smoothing=1: must be in [0, 1)"),
    # a rule across fields
    (["train.global_batch=30", "train.micro_batch=16"],
     "train.global_batch=30 is not a multiple of train.micro_batch=16"),
    # an unknown key in a section; init.from is a Python keyword, spelled `from` in YAML and in messages
    (["finetune.mixupp=0.8"], "unknown config key 'finetune.mixupp'. Valid keys here: cutmix, ema,"),
    (["init.form=x"], "unknown config key 'init.form'. Valid keys here: from"),
])
def test_config_error_names_the_dotted_key(sets, message):
    with pytest.raises(ConfigError) as e:
        build_config("classify", None, sets, defaults=run.EMBEDDED["classify"])
    assert message in str(e.value)


def test_mixup_needs_an_even_micro_batch_before_the_process_group():
    with pytest.raises(ConfigError, match=r"need an even train.micro_batch \(got 3\)"):
        _merge("classify", sets=["finetune.mixup=0.8", "train.global_batch=6", "train.micro_batch=3"])
    _merge("mim", sets=["finetune.mixup=0.8", "train.global_batch=6", "train.micro_batch=3"])  # mixup is classify-only


def test_every_problem_is_one_line_of_one_error():
    with pytest.raises(ConfigError) as e:
        build_config("mim", None, ["train.max_steps=0", "train.nonsense=1", "stage=pretrain"])
    lines = str(e.value).splitlines()
    assert lines[0] == "3 config problems:" and len(lines) == 4
    assert any("train.max_steps=0: must be positive" in x for x in lines)
    assert any("unknown config key 'train.nonsense'" in x for x in lines)
    assert any("stage='pretrain'" in x for x in lines)


def test_assignments_are_checked_and_name_the_key():
    cfg, _, _ = build_config("mim")
    cfg.precision = "bf16"
    cfg.train.global_batch, cfg.train.micro_batch = 33, 11  # run.fit_embedded_batch does this
    assert (cfg.train.global_batch, cfg.train.micro_batch) == (33, 11)
    with pytest.raises(ConfigError, match="train.max_steps=0: must be positive"):
        cfg.train.max_steps = 0
    with pytest.raises(ConfigError, match="precision='fp8'"):
        cfg.precision = "fp8"
    cfg.train.micro_batch = 4  # a rule across fields is checked by validate (and merge_deepspeed_config)
    with pytest.raises(ConfigError, match="not a multiple of train.micro_batch=4"):
        validate(cfg)


# The config.yaml of a MIM run written before the config moved to pydantic (manifests hold the same dict).
RUN_CONFIG_YAML = """\
stage: mim
precision: fp32
model: {name: beit_debug, drop_path: 0.0, layer_scale_init: null, rel_pos_bias: null, img_size: 224, num_classes: 10}
data: {path: null, num_workers: 2, input_size: 224, second_input_size: 112, num_mask_patches: 75, min_mask_patches: 16,
       crop_min_scale: 0.08, color_jitter: 0.4, train_split: train, val_split: val}
tokenizer: {checkpoint: /tmp/t/tok.safetensors, vocab_size: 64, hidden_dim: 64, temperature_start: 1.0,
            temperature_end: 0.0625, kl_weight: 0.001}
train: {max_steps: 12, global_batch: 8, micro_batch: 4, seed: 0, log_every: 4, eval_every: 0, eval_batches: 8,
        act_ckpt: none, act_ckpt_impl: torch, image_log_every: 100, stop_at_step: 0, cpu_mem_profile_steps: 0,
        sync_every: 3, dist_timeout_min: 60.0}
optim: {lr: 0.0015, min_lr: 1.0e-05, weight_decay: 0.05, warmup_steps: 20, betas: [0.9, 0.999], eps: 1.0e-08,
        layer_decay: 1.0, clip_grad: null}
checkpoint: {every_steps: 0, every_minutes: 0.001, keep_last: 2, keep_every: 0, resume: auto, overwrite: false,
             background_finalize: true}
init: {from: null}
finetune: {mixup: 0.0, cutmix: 0.0, mixup_prob: 1.0, mixup_switch_prob: 0.5, label_smoothing: 0.0, ema: false,
           ema_decay: 0.9999, linear_probe: false, rand_augment: null}
"""


def _types(d):
    return {k: _types(v) if isinstance(v, dict) else type(v).__name__ for k, v in d.items()}


def _restrict(d: dict, like: dict) -> dict:
    """`d` cut down to the keys of `like`, recursively."""
    return {k: _restrict(d[k], v) if isinstance(v, dict) and isinstance(d.get(k), dict) else d.get(k)
            for k, v in like.items()}


def test_an_existing_run_config_round_trips():
    old = yaml.safe_load(RUN_CONFIG_YAML)
    cfg = from_dict(old)
    assert cfg.init.from_ is None and cfg.optim.betas == (0.9, 0.999) and cfg.tokenizer.vocab_size == 64
    # Sections and keys added since (guard, mim, segment, new data/optim keys) come with their
    # defaults; everything the old file says comes back unchanged, in value, order and type.
    again = to_dict(cfg)
    assert _restrict(again, old) == old and list(_restrict(again, old)) == list(old)
    assert _types(_restrict(again, old)) == _types(old)
    assert _restrict(yaml.safe_load(dump_yaml(cfg)), old) == old
    for stage in ("tokenizer", "mim", "classify"):  # and what a run writes now loads back the same
        cfg, _, _ = build_config(stage, None, ["init.from=/runs/mim", "optim.betas=[0.9, 0.98]"],
                                 defaults=run.EMBEDDED[stage])
        d = to_dict(cfg)
        assert d["init"] == {"from": "/runs/mim"} and d["optim"]["betas"] == [0.9, 0.98]
        assert to_dict(from_dict(yaml.safe_load(dump_yaml(cfg)))) == d

def test_indivisible_global_batch():
    with pytest.raises(ConfigError, match="not divisible by train.micro_batch x world size"):
        _merge(sets=["train.global_batch=12", "train.micro_batch=4"], world=2)


def test_value_set_in_both_places_is_an_error(tmp_path):
    ds = json.loads((REPO / "ds_configs/zero2.json").read_text())
    ds["train_batch_size"] = 999
    p = tmp_path / "ds.json"
    p.write_text(json.dumps(ds))
    with pytest.raises(ConfigError, match="train_batch_size=999"):
        _merge(ds=str(p))
    with pytest.raises(ConfigError, match="gradient_clipping"):
        _merge(sets=["optim.clip_grad=1.0"])  # the file says 3.0


def test_precision_provenance(tmp_path):
    y = tmp_path / "exp.yaml"
    y.write_text("precision: fp32\n")
    with pytest.raises(ConfigError, match="DeepSpeed file says fp16"):
        _merge(yaml_path=y)
    _, ds = _merge(yaml_path=y, sets=["precision=bf16"])  # the command line wins
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    _, ds = _merge()
    assert ds["fp16"]["enabled"]


def test_yaml_base_delta(tmp_path):
    (tmp_path / "base.yaml").write_text("train:\n  max_steps: 50\n  seed: 3\n")
    (tmp_path / "delta.yaml").write_text("base: base.yaml\ntrain:\n  max_steps: 7\n")
    cfg, _ = _merge(yaml_path=tmp_path / "delta.yaml")
    assert cfg.train.max_steps == 7 and cfg.train.seed == 3


def test_shipped_configs_parse():
    paths = [p for sub in ("pretrain", "tokenizer", "finetune") for p in sorted((REPO / "configs" / sub).glob("*.yaml"))]
    assert len(paths) >= 5
    for path in paths:
        stage = "classify" if "finetune" in str(path) else "tokenizer" if "tokenizer" in path.name else "mim"
        build_config(stage, path, [], defaults=run.EMBEDDED[stage])


def _main_rc(capsys, stage, *argv):
    rc = run.main(stage, ["--run_dir", "/nonexistent/should_not_be_created", *argv])
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["--set", "data.path=/no/such/dir"], "data.path=/no/such/dir: no such directory"),
    (["--set", "data.num_mask_patches=197"], "larger than the 14x14 = 196 patch grid"),
    (["--set", "tokenizer.vocab_size=8192"], "has a vocabulary of 64 tokens but the MIM head predicts 8192"),
    (["--deepspeed_config", "ds_configs/nope.json"], "DeepSpeed config ds_configs/nope.json does not exist"),
])
def test_bad_input_is_a_clear_error(capsys, tokenizer_file, argv, message):
    rc, err = _main_rc(capsys, "mim", "--set", f"tokenizer.checkpoint={tokenizer_file}", "--set",
                       "tokenizer.vocab_size=64", *argv)
    assert rc == run.CONFIG_ERROR_EXIT
    assert message in err
    assert not os.path.exists("/nonexistent/should_not_be_created")


def test_empty_dataset_is_a_clear_error(capsys, tmp_path, tokenizer_file):
    (tmp_path / "train" / "cls0").mkdir(parents=True)
    rc, err = _main_rc(capsys, "mim", "--set", f"data.path={tmp_path}", "--set", f"tokenizer.checkpoint={tokenizer_file}",
                       "--set", "tokenizer.vocab_size=64")
    assert rc == run.CONFIG_ERROR_EXIT and "empty" in err.lower()


def test_error_exits_nonzero_before_process_group(tmp_path):
    """A real process with WORLD_SIZE=2 but no peer: it must fail on the config, not hang in rendezvous."""
    env = dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT="1")
    res = subprocess.run([sys.executable, "launch/pretrain.py", "--run_dir", str(tmp_path / "r"),
                          "--set", "train.global_batch=6", "--set", "train.micro_batch=2"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == run.CONFIG_ERROR_EXIT, res.stderr[-2000:]
    assert "not divisible by train.micro_batch x world size" in res.stderr


def test_weight_decay_groups_and_schedule():
    from beit_scale.models.zoo import build_model
    model = build_model("beit_debug", task="mim")
    groups = param_groups(model, 0.05)
    no_wd = {n for g in groups if g["weight_decay"] == 0 for n in g["param_names"]}
    wd = {n for g in groups if g["weight_decay"] > 0 for n in g["param_names"]}
    assert "mask_token" in no_wd and "cls_token" in no_wd
    assert any("rel_pos" in n for n in no_wd) and any("gamma" in n for n in no_wd)
    assert all(n.endswith("weight") for n in wd) and "blocks.0.attn.qkv.weight" in wd
    assert not any(n.endswith("bias") for n in wd)
    # warmup then cosine to min_lr
    assert lr_factor(0, 10, 100, 1.0, 0.0) == pytest.approx(0.1)
    assert lr_factor(9, 10, 100, 1.0, 0.0) == pytest.approx(1.0)
    assert lr_factor(100, 10, 100, 1.0, 0.01) == pytest.approx(0.01)
    assert lr_factor(55, 10, 100, 1.0, 0.0) == pytest.approx(0.5)


def test_activation_checkpointing_recomputes_exactly_the_chosen_blocks():
    """Same loss and gradients with and without checkpointing; recomputed forwards counted by hooks."""
    from beit_scale.models.zoo import build_model
    from beit_scale.train.engine import apply_activation_checkpointing

    def run_once(policy, impl="torch"):
        torch.manual_seed(0)
        model = build_model("beit_debug", task="mim", depth=4, drop_path_rate=0.0)
        calls = [0] * len(model.blocks)
        for i, blk in enumerate(model.blocks):
            blk.attn.register_forward_hook(lambda *a, i=i: calls.__setitem__(i, calls[i] + 1))
        apply_activation_checkpointing(model, policy, impl)
        x = torch.randn(2, 3, 224, 224)
        mask = torch.zeros(2, 196, dtype=torch.bool)
        mask[:, ::3] = True
        logits = model(x, mask)
        loss = logits.logsumexp(-1).mean()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        return loss.item(), grads, calls

    ref_loss, ref_grads, ref_calls = run_once("none")
    assert ref_calls == [1, 1, 1, 1]
    for policy, impl, expected in (("all", "torch", [2, 2, 2, 2]), ("every_2", "torch", [2, 1, 2, 1]),
                                   ("all", "deepspeed", [2, 2, 2, 2])):
        loss, grads, calls = run_once(policy, impl)
        assert calls == expected, (policy, impl, calls)
        assert abs(loss - ref_loss) < 1e-6
        for n in ref_grads:
            assert torch.allclose(grads[n], ref_grads[n], atol=1e-6, rtol=0), n
