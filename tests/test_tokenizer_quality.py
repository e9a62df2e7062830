"""experiments/tokenizer_quality.py: the references, the token-reconstruction measurement and the
choice of the demo's tokenizer (the launches themselves are the launchers' own tests)."""
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import tokenizer_quality as tq  # noqa: E402


def test_references_thumbnail_is_exact_on_cell_constant_images_and_mean_colour_is_the_mean():
    cells = torch.rand(2, 3, 4, 4)
    imgs = F.interpolate(cells, scale_factor=8, mode="nearest")  # 32 px, constant on 8x8 cells
    refs = tq.references(imgs)
    assert set(refs) == {"mean colour", "4x4 thumbnail"}
    assert torch.allclose(refs["4x4 thumbnail"], imgs, atol=1e-6)
    assert torch.allclose(refs["mean colour"][:, :, 0, 0], cells.mean((2, 3)))
    assert tq.mse(refs["mean colour"], imgs) == pytest.approx(float(cells.var((2, 3), unbiased=False).mean()),
                                                               rel=1e-5)


def test_token_reconstruction_mse_and_code_use(tmp_path):
    from beit_scale.models.dvae import DVAE, DVAEConfig, save_tokenizer
    torch.manual_seed(0)
    model = DVAE(DVAEConfig(vocab_size=16, image_size=32, hidden_dim=8, codebook_dim=8))
    path = save_tokenizer(model, tmp_path / "tok.safetensors")
    imgs = torch.rand(3, 3, 32, 32)
    q, recon = tq.tokenizer_quality(path, imgs)
    model.eval()
    with torch.no_grad():
        ids = model.get_codebook_indices(imgs)
        expect = model.decode_indices(ids)
    assert recon.shape == imgs.shape and torch.allclose(recon, expect, atol=1e-6)
    assert q["recon_mse"] == pytest.approx(float(F.mse_loss(expect, imgs)), rel=1e-5)
    assert q["codes_used"] == len(ids.unique())


def test_pick_takes_the_lowest_mse_that_fits_the_limit_with_headroom_and_beats_the_majority():
    rows = [dict(variant="fast", recon_mse=0.009, demo_s=300, mim_acc=0.30, majority_acc=0.10),
            dict(variant="slow", recon_mse=0.004, demo_s=700, mim_acc=0.30, majority_acc=0.10),
            dict(variant="unpredictable", recon_mse=0.005, demo_s=400, mim_acc=0.12, majority_acc=0.10),
            dict(variant="good", recon_mse=0.006, demo_s=500, mim_acc=0.20, majority_acc=0.10)]
    assert tq.pick(rows, 600, headroom=1.0)["variant"] == "good"
    assert tq.pick(rows, 800, headroom=1.0)["variant"] == "slow"
    assert tq.pick(rows, 800)["variant"] == "good"  # 700 s is over 80% of 800 s
    assert tq.pick(rows[2:3], 600) is None


def test_variant_names():
    assert tq.parse_variant("h32_v512_s150") == {"hidden_dim": 32, "vocab_size": 512, "steps": 150}
    with pytest.raises(SystemExit, match="h<hidden_dim>_v<vocab_size>_s<steps>"):
        tq.parse_variant("v512")
