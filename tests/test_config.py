"""Typed config, the DeepSpeed-JSON merge, and clear errors before any process group starts."""
import json
import os
import subprocess
import sys

import pytest
import torch

from beit_scale.config import ConfigError, build_config, load_deepspeed_json, merge_deepspeed_config
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
    from beit_scale.train.parallelize import apply_activation_checkpointing

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
