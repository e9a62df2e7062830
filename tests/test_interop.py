"""Interop (issue 16): OpenAI's DALL-E tokenizer in, Hugging Face transformers BEiT out and in.

Needs the test requirements (requirements-test.txt: dall-e, transformers). Everything is built
locally with random weights; nothing is downloaded."""
import json
import os
import pickle
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import transformers
from dall_e import Decoder, Encoder
from dall_e.utils import map_pixels, unmap_pixels
from transformers import BeitConfig as HFBeitConfig
from transformers import BeitForImageClassification, BeitForMaskedImageModeling, BeitModel

from beit_scale.config import ConfigError, build_config, from_dict
from beit_scale.io import atomic_write_text, save_safetensors
from beit_scale.models import build_model
from beit_scale.models.hf import config_from_hf, from_hf, hf_config, read_hf_dir, to_hf
from beit_scale.models.tokenizers import load_tokenizer, main as tokenizers_main, read_tokenizer_header
from beit_scale.train.checkpoint import MANIFEST
from beit_scale.train.checkpoint.reader import consolidated_state_dict, load_init_weights, resolve_checkpoint
from beit_scale.train.export import build_stage_model
from beit_scale.train.tasks.mim import MIMTask
from launching import REPO
from test_export import _fake_checkpoint

sys.path.insert(0, str(REPO / "launch"))
import export as export_cli  # noqa: E402  (launch/export.py)

transformers.logging.set_verbosity_error()
VOCAB = 512  # the smallest vocabulary the dall-e package accepts


# ----------------------------------------------------------------------------- DALL-E

@pytest.fixture(scope="module")
def dalle(tmp_path_factory):
    """The package's encoder and decoder, debug width, random weights, saved the way the published
    encoder.pkl / decoder.pkl are (torch.save of the whole module), and our conversion of them."""
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("dalle")
    enc = Encoder(n_hid=64, n_blk_per_group=1, vocab_size=VOCAB)
    dec = Decoder(n_init=32, n_hid=64, n_blk_per_group=1, vocab_size=VOCAB)
    with torch.no_grad():  # the package zero-initializes biases: give them values too
        for p in list(enc.parameters()) + list(dec.parameters()):
            if p.ndim == 1:
                p.normal_(0, 0.1)
    torch.save(enc, d / "encoder.pkl")
    torch.save(dec, d / "decoder.pkl")
    out = d / "dalle.safetensors"
    assert tokenizers_main(["convert-dalle", str(d / "encoder.pkl"), str(d / "decoder.pkl"),
                            "--out", str(out), "--trust-pickle"]) == 0
    return enc.eval(), dec.eval(), out, d


def test_convert_dalle_refuses_without_trust_pickle(dalle, capsys, tmp_path):
    _, _, _, d = dalle
    out = tmp_path / "x.safetensors"
    assert tokenizers_main(["convert-dalle", str(d / "encoder.pkl"), "--out", str(out)]) == 2
    assert "pickled Python modules" in capsys.readouterr().err and not out.exists()
    # With the flag, a pickle that names anything but torch / container globals is still refused.
    class Evil:
        def __reduce__(self):
            import os
            return (os.getcwd, ())
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps(Evil(), protocol=2))
    assert tokenizers_main(["convert-dalle", str(tmp_path / "evil.pkl"), "--out", str(out),
                            "--trust-pickle"]) == 1
    assert "getcwd" in capsys.readouterr().err and not out.exists()


def test_dalle_same_tokens_and_reconstruction_as_the_package(dalle):
    enc, dec, out, _ = dalle
    h = read_tokenizer_header(out)
    assert (h.kind, h.vocab_size, h.image_size, h.downsample) == ("dalle", VOCAB, 112, 8)
    tok = load_tokenizer(out)
    assert not any(p.requires_grad for p in tok.parameters()) and not tok.training
    x = torch.rand(4, 3, 112, 112)
    with torch.no_grad():
        ref_logits = enc(map_pixels(x))
        ids = tok.get_codebook_indices(x)
        assert ids.shape == (4, 14, 14)
        assert torch.equal(ids, ref_logits.argmax(1))
        assert ids.unique().numel() > 4  # not one code everywhere: the comparison means something
        z = F.one_hot(ids, VOCAB).permute(0, 3, 1, 2).float()
        torch.testing.assert_close(tok.decode(z), dec(z), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(tok.decode_indices(ids),
                                   unmap_pixels(torch.sigmoid(dec(z)[:, :3])), rtol=1e-5, atol=1e-5)


def test_dalle_encoder_only_and_header_dispatch(dalle, tokenizer_file, tmp_path):
    _, _, _, d = dalle
    out = tmp_path / "enc_only.safetensors"
    assert tokenizers_main(["convert-dalle", str(d / "encoder.pkl"), "--out", str(out),
                            "--image-size", "224", "--trust-pickle"]) == 0
    tok = load_tokenizer(out)
    assert read_tokenizer_header(out).image_size == 224 and tok.decoder is None
    with pytest.raises(ValueError, match="without decoder"):
        tok.decode_indices(torch.zeros(1, 2, 2, dtype=torch.long))
    # MIM checks the header's input size against its tokenizer view before anything starts
    cfg, _, _ = build_config("mim", None, ["model.name=beit_debug", f"tokenizer.checkpoint={out}",
                                           f"tokenizer.vocab_size={VOCAB}"],
                             defaults={"model": {"name": "beit_debug"}})
    with pytest.raises(ConfigError, match="expects 224px inputs but data.second_input_size=112"):
        MIMTask(cfg).preflight()
    ours = read_tokenizer_header(tokenizer_file)  # our own dVAE file goes through the same front
    assert (ours.kind, ours.vocab_size, ours.image_size) == ("ours", 64, 112)
    assert type(load_tokenizer(tokenizer_file)).__name__ == "DVAE"
    (tmp_path / "foreign.safetensors").write_bytes(b"not a tokenizer")
    with pytest.raises(ValueError, match="convert-dalle"):
        read_tokenizer_header(tmp_path / "foreign.safetensors")


# ----------------------------------------------------------------------------- Hugging Face

def _randomize(model):
    """Values everywhere (rel-pos tables, biases and the head start at zero or tiny)."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def _write_hf_dir(model, d):
    save_safetensors(to_hf(model.state_dict()), d / "model.safetensors", {"format": "pt"})
    atomic_write_text(d / "config.json", json.dumps(hf_config(model.cfg, model.task), indent=2))
    return d


def _loaded(cls, d):
    model, info = cls.from_pretrained(d, output_loading_info=True)
    return model.eval(), {k: set(v) for k, v in info.items() if v}


@pytest.mark.parametrize("task,overrides", [
    ("classify", dict(rel_pos_bias="layer", num_classes=5)),
    ("classify", dict(rel_pos_bias="shared", layer_scale_init=None, num_classes=3)),
    ("mim", dict(rel_pos_bias="shared", vocab_size=64, abs_pos_emb=True)),
])
def test_ours_to_hf_same_logits_and_back(task, overrides, tmp_path):
    torch.manual_seed(0)
    ours = _randomize(build_model("beit_debug", task=task, img_size=64, **overrides)).eval()
    d = _write_hf_dir(ours, tmp_path)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        if task == "mim":
            hf, info = _loaded(BeitForMaskedImageModeling, d)
            mask = torch.rand(2, 16) < 0.5
            a, b = ours(x, mask), hf(x, bool_masked_pos=mask).logits[mask]
        else:
            hf, info = _loaded(BeitForImageClassification, d)
            a, b = ours(x), hf(x).logits
    assert info == {}  # no missing, unexpected or mismatched keys
    assert (a - b).abs().max().item() <= 1e-5 and a.abs().max().item() > 0.1
    # ... and back: the directory imports losslessly, config included
    hf_cfg, hf_sd = read_hf_dir(d)
    back, unused = from_hf(hf_sd)
    assert unused == {} and set(back) == set(ours.state_dict())
    assert all(torch.equal(back[k], v) for k, v in ours.state_dict().items())
    assert config_from_hf(hf_cfg).replace(name=ours.cfg.name, num_classes=ours.cfg.num_classes) == ours.cfg
    if task == "mim":  # the backbone class takes the MIM file; the only differences are the heads
        _, info = _loaded(BeitModel, d)
        assert info == {"missing_keys": {"pooler.layernorm.weight", "pooler.layernorm.bias"},
                        "unexpected_keys": {"layernorm.weight", "layernorm.bias",
                                            "lm_head.weight", "lm_head.bias"}}


def test_dir_saved_by_transformers_into_ours(tmp_path):
    torch.manual_seed(0)
    cfg = HFBeitConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                       image_size=64, patch_size=16, use_relative_position_bias=True,
                       use_mean_pooling=True, num_labels=4, layer_scale_init_value=0.1,
                       layer_norm_eps=1e-6)
    hf = _randomize(BeitForImageClassification(cfg)).eval()
    hf.save_pretrained(tmp_path)
    hf_cfg, hf_sd = read_hf_dir(tmp_path)
    sd, unused = from_hf(hf_sd)
    ours = build_model(config_from_hf(hf_cfg), task="classify").eval()
    ours.load_state_dict(sd, strict=True)
    assert unused == {} and ours.cfg.num_classes == 4 and ours.cfg.rel_pos_bias == "layer"
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a, b = ours(x), hf(x).logits
    assert (a - b).abs().max().item() <= 1e-5 and a.abs().max().item() > 0.1


# ----------------------------------------------------------------------------- in the trainer

@pytest.fixture(scope="module")
def dalle_mim_run(dalle, tmp_path_factory):
    """One real MIM run (1 process, debug model, shared rel-pos bias: the MIM default) whose
    targets come from the converted DALL-E file, loaded through tokenizer.checkpoint."""
    run_dir = tmp_path_factory.mktemp("mim_dalle") / "run"
    sets = ["model.name=beit_debug", "train.max_steps=2", "train.global_batch=4", "train.micro_batch=4",
            "train.eval_batches=1", "data.num_workers=0", f"tokenizer.checkpoint={dalle[2]}",
            f"tokenizer.vocab_size={VOCAB}", "data.second_input_size=112"]
    argv = [sys.executable, "launch/pretrain.py", "--deepspeed_config", "ds_configs/zero2.json",
            "--run_dir", str(run_dir)] + [a for x in sets for a in ("--set", x)]
    res = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return run_dir


def _from_checkpoint(src):
    sd, manifest = consolidated_state_dict(src)
    model = build_stage_model(from_dict(manifest["config"]))
    model.load_state_dict(sd, strict=True)
    return model.eval(), manifest


def test_mim_with_dalle_tokenizer_then_export_hf(dalle_mim_run, tmp_path):
    manifest = json.loads((resolve_checkpoint(dalle_mim_run) / MANIFEST).read_text())
    assert manifest["extra"]["task"]["tokenizer_kind"] == "dalle"
    ours, _ = _from_checkpoint(dalle_mim_run)
    assert ours.cfg.rel_pos_bias == "shared" and ours.cfg.vocab_size == VOCAB
    out = tmp_path / "hf_mim"
    assert export_cli.main([str(dalle_mim_run), "--format", "hf", "--out", str(out)]) == 0
    hf, info = _loaded(BeitForMaskedImageModeling, out)
    assert info == {}
    torch.manual_seed(0)
    x, mask = torch.randn(2, 3, 224, 224), torch.rand(2, 196) < 0.4
    with torch.no_grad():
        a, b = ours(x, mask), hf(x, bool_masked_pos=mask).logits[mask]
    assert (a - b).abs().max().item() <= 1e-5


def test_classifier_checkpoint_export_hf_and_init_from_hf_dirs(tmp_path):
    cfg, _, _ = build_config("classify", None, ["model.name=beit_debug", "model.num_classes=10"],
                             defaults={"model": {"name": "beit_debug"}})
    torch.manual_seed(1)
    ours = _randomize(build_stage_model(cfg)).eval()
    ckpt = _fake_checkpoint(tmp_path / "run" / "checkpoints" / "step_00000007", cfg, ours.state_dict())
    out = tmp_path / "hf_cls"
    assert export_cli.main([str(ckpt), "--format", "hf", "--out", str(out)]) == 0
    hf, info = _loaded(BeitForImageClassification, out)
    assert info == {} and hf.config.num_labels == 10 and hf.config.use_relative_position_bias
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ref = ours(x)
        assert (ref - hf(x).logits).abs().max().item() <= 1e-5
    # init.from the exported directory: every tensor placed, same logits
    fresh = build_stage_model(cfg).eval()
    report = load_init_weights(fresh, out)
    assert report.kind == "transformers BeitForImageClassification directory"
    assert report.missing == [] and report.unexpected == [] and len(report.loaded) == len(ours.state_dict())
    with torch.no_grad():
        assert (fresh(x) - ref).abs().max().item() <= 1e-5
    # init.from a MIM directory saved by transformers itself (cls-pooling final norm, shared
    # rel-pos bias): the backbone loads, the MIM parts are reported as dropped
    hcfg = HFBeitConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256,
                        image_size=224, patch_size=16, use_shared_relative_position_bias=True,
                        use_mask_token=True, use_mean_pooling=False, vocab_size=VOCAB)
    _randomize(BeitForMaskedImageModeling(hcfg)).save_pretrained(tmp_path / "hf_saved")
    fresh = build_stage_model(cfg)
    report = load_init_weights(fresh, tmp_path / "hf_saved")
    assert report.unexpected == ["beit.layernorm.bias", "beit.layernorm.weight", "lm_head.bias",
                                 "lm_head.weight", "mask_token", "norm.bias", "norm.weight"]
    assert report.missing == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    assert any("shared relative position bias copied" in n for n in report.notes)
    hf_table = read_hf_dir(tmp_path / "hf_saved")[1][
        "beit.encoder.relative_position_bias.relative_position_bias_table"]
    assert torch.equal(fresh.blocks[1].attn.rel_pos.table, hf_table)


def test_export_hf_refuses_what_transformers_cannot_hold(tmp_path, capsys):
    cfg, _, _ = build_config("mim", None, ["model.name=beit_debug", "mim.target=pixels"],
                             defaults={"model": {"name": "beit_debug"}})
    ckpt = _fake_checkpoint(tmp_path / "run" / "checkpoints" / "step_00000001", cfg,
                            build_stage_model(cfg).state_dict(), step=1)
    assert export_cli.main([str(ckpt), "--format", "hf", "--out", str(tmp_path / "hf")]) == 2
    assert "mim.target=pixels" in capsys.readouterr().err and not (tmp_path / "hf").exists()
