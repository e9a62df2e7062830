"""timm interop (same logits, lossless round trip, strict load) and checkpoint adaptation."""
import pytest
import torch

timm = pytest.importorskip("timm")
from timm.models.beit import Beit, gen_relative_position_index  # noqa: E402

from beit_scale.models import (adapt_state_dict_to, build_model, from_timm, get_config,  # noqa: E402
                               resize_rel_pos_bias_table, to_timm)


def _randomize(model):
    """Give zero-initialized tensors (rel-pos tables, q/v biases, tiny head) real values, so that
    parity checks cannot pass by accident."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "relative_position_bias_table" in n or n.endswith(("q_bias", "v_bias")):
                p.normal_(0, 0.5)
            elif n.startswith(("head.", "fc_norm.")) or "gamma" in n:
                p.normal_(0.5 if "gamma" in n or "fc_norm.weight" in n else 0.0, 0.1)


def _check_pair(timm_model, ours):
    timm_sd = timm_model.state_dict()
    ours.load_state_dict(from_timm(timm_sd), strict=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        a, b = timm_model(x), ours(x)
    assert (a - b).abs().max().item() <= 1e-5
    assert a.abs().max().item() > 1e-2  # the logits are not trivially tiny
    back = to_timm(ours.state_dict())
    assert set(back) == set(timm_sd)
    for k, v in timm_sd.items():
        assert torch.equal(back[k], v), k
    timm_model.load_state_dict(back, strict=True)


def test_timm_base_same_logits_and_lossless_round_trip():
    torch.manual_seed(0)
    t = timm.create_model("beit_base_patch16_224", pretrained=False).eval()
    _randomize(t)
    ours = build_model("beit_base_patch16_224").eval()
    _check_pair(t, ours)


def test_timm_shared_rel_pos_and_abs_pos_embed():
    # timm's Beit with one shared table and an absolute position embedding, debug size.
    torch.manual_seed(0)
    t = Beit(img_size=224, patch_size=16, embed_dim=64, depth=2, num_heads=2, mlp_ratio=4,
             use_abs_pos_emb=True, use_rel_pos_bias=False, use_shared_rel_pos_bias=True,
             init_values=0.1, num_classes=10).eval()
    _randomize(t)
    ours = build_model("beit_debug", rel_pos_bias="shared", abs_pos_emb=True, num_classes=10).eval()
    _check_pair(t, ours)


def test_index_layout_matches_timm():
    sd = to_timm(build_model("beit_debug").state_dict(), with_index=True)
    idx = sd["blocks.0.attn.relative_position_index"]
    assert torch.equal(idx, gen_relative_position_index((14, 14)))
    assert "relative_position_index" not in "".join(from_timm(sd))


def test_to_timm_refuses_mim_state_dict():
    with pytest.raises(ValueError, match="MIM-only"):
        to_timm(build_model("beit_debug", task="mim").state_dict())


def test_pretrain_to_finetune_at_384():
    """MIM checkpoint (shared table, 224) -> classifier with per-layer tables at 384."""
    torch.manual_seed(0)
    mim = build_model("beit_debug", task="mim", abs_pos_emb=True)
    with torch.no_grad():
        mim.shared_rel_pos.table.normal_()
    cfg = get_config("beit_debug", img_size=384, abs_pos_emb=True, num_classes=5)
    sd = adapt_state_dict_to(cfg, mim.state_dict(), task="classify")
    clf = build_model(cfg)
    missing, unexpected = clf.load_state_dict(sd, strict=False)
    assert sorted(missing) == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    assert unexpected == []
    expected_table = resize_rel_pos_bias_table(mim.shared_rel_pos.table.detach(), (14, 14), (24, 24))
    for blk in clf.blocks:
        assert blk.attn.rel_pos.table.shape == (47 * 47 + 3, 2)
        assert torch.equal(blk.attn.rel_pos.table, expected_table)
    assert clf.pos_embed.shape == (1, 24 * 24 + 1, 64)
    assert torch.equal(clf.pos_embed[:, 0], mim.pos_embed[:, 0])
    assert torch.equal(clf.blocks[1].mlp.fc2.weight, mim.blocks[1].mlp.fc2.weight)
    assert clf(torch.randn(1, 3, 384, 384)).shape == (1, 5)


def test_adapt_same_config_is_identity_and_drops_mismatched_head():
    torch.manual_seed(0)
    clf = build_model("beit_debug")
    sd = clf.state_dict()
    same = adapt_state_dict_to(clf.cfg, sd)
    assert set(same) == set(sd) and all(torch.equal(same[k], sd[k]) for k in sd)
    other = adapt_state_dict_to(get_config("beit_debug", num_classes=10), sd)
    assert "head.weight" not in other and "fc_norm.weight" in other
    with pytest.raises(ValueError, match="does not fit"):
        adapt_state_dict_to(get_config("beit_debug", mlp_dim=128), sd)
    with pytest.raises(ValueError, match="per-layer"):
        adapt_state_dict_to(get_config("beit_debug", rel_pos_bias="shared"), sd)
