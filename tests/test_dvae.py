"""dVAE tokenizer: shapes, loss, schedules, usage stats, save/load, and that it learns."""
import math

import pytest
import torch
from safetensors.torch import save_file

from beit_scale.data import TokenizerDataset, TokenizerTransform, ensure_synthetic_imagefolder, to_float_image
from beit_scale.models.dvae import (DVAE, DVAEConfig, codebook_usage, dvae_loss, kl_weight_at,
                                    load_tokenizer, read_tokenizer_config, save_tokenizer,
                                    temperature_at)

SMALL = DVAEConfig(vocab_size=64, hidden_dim=16, codebook_dim=16)


def test_shapes_and_eval_is_deterministic():
    torch.manual_seed(0)
    m = DVAE(SMALL)
    x = torch.rand(2, 3, 112, 112)
    recon, logits = m(x, temperature=0.5)
    assert recon.shape == x.shape and logits.shape == (2, 64, 14, 14)
    assert 0 <= recon.min() and recon.max() <= 1
    recon.mean().backward()
    assert all(p.grad is not None for p in m.parameters())
    idx = m.get_codebook_indices(x)
    assert idx.shape == (2, 14, 14) and idx.dtype == torch.long and idx.max() < 64
    m.eval()
    assert torch.equal(m(x)[0], m(x)[0])
    assert torch.allclose(m(x)[0], m.decode_indices(idx))


def test_config_validation():
    with pytest.raises(ValueError, match="power of two"):
        DVAEConfig(downsample=6)
    with pytest.raises(ValueError, match="divisible"):
        DVAEConfig(image_size=100)
    assert DVAEConfig().grid_size == 14


def test_loss_kl_to_uniform():
    target = torch.rand(1, 3, 8, 8)
    flat = torch.zeros(1, 16, 2, 2)
    loss, st = dvae_loss(target, target, flat, kl_weight=1.0)
    assert st["recon"] == 0 and abs(float(st["kl"])) < 1e-6 and abs(float(loss)) < 1e-6
    peaked = torch.full((1, 16, 2, 2), -1e4)
    peaked[:, 3] = 0
    _, st = dvae_loss(target * 0, target, peaked, kl_weight=0.0)
    assert math.isclose(float(st["kl"]), math.log(16), rel_tol=1e-5)
    assert math.isclose(float(st["recon"]), float((target ** 2).mean()), rel_tol=1e-5)


def test_schedules():
    assert temperature_at(0, 1.0, 1 / 16, 100) == 1.0
    assert math.isclose(temperature_at(100, 1.0, 1 / 16, 100), 1 / 16)
    assert math.isclose(temperature_at(50, 1.0, 1 / 16, 100), 0.25)  # exponential: geometric mean
    assert temperature_at(10 ** 6, 1.0, 1 / 16, 100) == temperature_at(100, 1.0, 1 / 16, 100)
    assert kl_weight_at(0, end=0.1, warmup_steps=10) == 0.0
    assert math.isclose(kl_weight_at(5, end=0.1, warmup_steps=10), 0.05)
    assert kl_weight_at(99, end=0.1, warmup_steps=10) == 0.1


def test_codebook_usage():
    u = codebook_usage([torch.tensor([[0, 1], [2, 3]]), torch.tensor([0, 1, 2, 3])])
    assert u["codes_used"] == 4 and math.isclose(u["perplexity"], 4.0)
    assert codebook_usage(torch.zeros(5, dtype=torch.long)) == {"perplexity": 1.0,
                                                                 "codes_used": 1}


def test_save_load_roundtrip_and_errors(tmp_path):
    torch.manual_seed(0)
    m = DVAE(SMALL)
    path = save_tokenizer(m, tmp_path / "tok" / "dvae.safetensors")
    assert read_tokenizer_config(path) == SMALL
    loaded = load_tokenizer(path)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    x = torch.rand(3, 3, 112, 112)
    assert torch.equal(loaded.get_codebook_indices(x), m.get_codebook_indices(x))

    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_tokenizer(tmp_path / "missing.safetensors")
    bad = tmp_path / "corrupt.safetensors"
    bad.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match="corrupt.safetensors"):
        load_tokenizer(bad)
    bare = tmp_path / "bare.safetensors"
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(bare))
    with pytest.raises(ValueError, match="metadata"):
        load_tokenizer(bare)
    truncated = tmp_path / "trunc.safetensors"
    truncated.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(ValueError, match="trunc.safetensors"):
        load_tokenizer(truncated)


def test_training_halves_reconstruction_loss(tmp_path):
    """A plain loop on synthetic images: Adam 1e-3, batch 16, 80 steps, vocab 512.

    The images are a fixed pool of 32 (two batches): 80 steps over fresh images only reach
    the per-image-mean level on this model (~0.6x), so the pool makes 'it learns codes that
    carry spatial content' checkable within the test budget. Measured: 0.036 -> 0.016.
    """
    torch.manual_seed(0)
    root = ensure_synthetic_imagefolder(tmp_path / "syn", num_classes=10, train_per_class=4,
                                        val_per_class=1, image_size=128, verbose=False)
    ds = TokenizerDataset(root / "train", TokenizerTransform(112))
    # the dataset ships uint8; the tokenizer task converts to [0,1] floats on the device the same way
    pool = to_float_image(torch.stack([ds[(i, i)][0] for i in range(32)]), normalize=False)
    m = DVAE(DVAEConfig(vocab_size=512, hidden_dim=16, codebook_dim=16))
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    steps, hist = 80, []
    for s in range(steps):
        x = pool[(s % 2) * 16:(s % 2) * 16 + 16]
        recon, logits = m(x, temperature=temperature_at(s, 1.0, 1 / 16, steps))
        loss, st = dvae_loss(recon, x, logits, kl_weight_at(s, warmup_steps=steps))
        opt.zero_grad()
        loss.backward()
        opt.step()
        hist.append(float(st["recon"]))
    first, last = sum(hist[:4]) / 4, sum(hist[-4:]) / 4
    print("recon first %.4f last %.4f" % (first, last))
    assert last <= 0.5 * first, (first, last)
    m.eval()
    idx = m.get_codebook_indices(pool)
    usage = codebook_usage(idx)
    assert usage["codes_used"] >= 2 and usage["perplexity"] > 1.0
    with torch.no_grad():  # the deterministic (argmax) reconstruction improved as well
        assert torch.nn.functional.mse_loss(m(pool)[0], pool) <= 0.6 * first
