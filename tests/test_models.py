"""The BEiT zoo: every size builds, small ones train a step, big ones are counted on meta."""
import json
import math

import pytest
import torch

from beit_scale.models import (BeitClassifier, BeitForMIM, build_model, get_config, list_models,
                               resize_rel_pos_bias_table)
from beit_scale.models.beit import num_relative_distances, relative_position_index

SMALL = ["beit_debug", "beit_mini", "beit_tiny", "beit_small"]
BIG = [n for n in list_models() if n not in SMALL]

# timm 1.0.31, pretrained=False, 1000 classes (docs: /work/shared/ENVIRONMENT.md).
TIMM_PARAMS = {"beit_base_patch16_224": 86_530_984, "beit_large_patch16_224": 304_430_568}
# ViTs of similar width/depth, not BEiTs: only a sanity range for our huge and giant.
VIT_PARAMS = {"beit_huge_patch16_224": 630_764_800, "beit_giant_patch14_224": 1_012_611_432}


def expected_params(cfg, task):
    """Parameter count from the architecture description, independent of the model code."""
    D, M, H, depth = cfg.embed_dim, cfg.mlp_dim, cfg.num_heads, cfg.depth
    table = num_relative_distances(cfg.grid_size) * H
    rel = cfg.rel_pos_bias if cfg.rel_pos_bias != "auto" else ("shared" if task == "mim" else "layer")
    block = (4 * D                    # norm1, norm2
             + 3 * D * D + 2 * D      # qkv weight, q and v biases (no k bias)
             + D * D + D              # proj
             + D * M + M + M * D + D  # mlp
             + (2 * D if cfg.layer_scale_init else 0)
             + (table if rel == "layer" else 0))
    n = (cfg.patch_size ** 2 * cfg.in_chans * D + D  # patch embedding conv
         + D                                         # cls token
         + ((cfg.num_patches + 1) * D if cfg.abs_pos_emb else 0)
         + (table if rel == "shared" else 0)
         + depth * block)
    if task == "classify":
        n += 2 * D + D * cfg.num_classes + cfg.num_classes
    else:
        n += D + 2 * D + D * cfg.vocab_size + cfg.vocab_size
    return n


def test_zoo_lists_the_sizes():
    names = list_models()
    for n in ["beit_debug", "beit_mini", "beit_tiny", "beit_small", "beit_base_patch16_224", "beit_large_patch16_224",
              "beit_huge_patch16_224", "beit_giant_patch14_224"]:
        assert n in names
    assert get_config("beit_giant_patch14_224").patch_size == 14
    assert get_config("beit_base_patch16_224").layer_scale_init == 0.1
    assert get_config("beit_large_patch16_224").layer_scale_init == 1e-5


def test_get_config_overrides_and_errors():
    cfg = get_config("beit_debug", drop_path_rate=0.2, num_classes=10)
    assert cfg.drop_path_rate == 0.2 and cfg.num_classes == 10
    with pytest.raises(ValueError, match="valid fields.*embed_dim"):
        get_config("beit_debug", embeddim=3)
    with pytest.raises(ValueError, match="unknown model"):
        get_config("beit_nonexistent")
    with pytest.raises(ValueError, match="divisible"):
        get_config("beit_debug", num_heads=3)
    with pytest.raises(dataclasses_frozen_error()):
        cfg.depth = 3


def dataclasses_frozen_error():
    import dataclasses
    return dataclasses.FrozenInstanceError


@pytest.mark.parametrize("task", ["classify", "mim"])
@pytest.mark.parametrize("name", SMALL)
def test_small_models_train_step(name, task):
    torch.manual_seed(0)
    # Full width and depth; tiny and small at 112 px (7x7 patches) to keep the suite fast on 2 cores.
    img = 224 if name == "beit_debug" else 112
    model = build_model(name, task=task, num_classes=10, img_size=img)
    model.train()
    x = torch.randn(2, 3, img, img)
    if task == "classify":
        out = model(x)
        assert out.shape == (2, 10)
        loss = torch.nn.functional.cross_entropy(out, torch.tensor([1, 2]))
    else:
        mask = torch.zeros(2, model.cfg.num_patches, dtype=torch.bool)
        mask[0, :20] = True
        mask[1, 30:40] = True
        out = model(x, mask)
        assert out.shape == (30, model.cfg.vocab_size)
        loss = torch.nn.functional.cross_entropy(out, torch.randint(0, model.cfg.vocab_size, (30,)))
    assert torch.isfinite(loss)
    loss.backward()
    for n, p in model.named_parameters():
        assert p.grad is not None, f"{name}/{task}: no gradient for {n}"
        assert torch.isfinite(p.grad).all(), f"{name}/{task}: non-finite gradient for {n}"
    assert sum(p.numel() for p in model.parameters()) == expected_params(model.cfg, task)


@pytest.mark.parametrize("name", BIG)
def test_big_models_on_meta(name):
    with torch.device("meta"):
        clf = build_model(name)
        mim = build_model(name, task="mim")
    for model, task in ((clf, "classify"), (mim, "mim")):
        tensors = list(model.parameters()) + list(model.buffers())
        assert all(t.is_meta for t in tensors), "building under torch.device('meta') must allocate nothing"
        assert sum(p.numel() for p in model.parameters()) == expected_params(model.cfg, task)
    n = sum(p.numel() for p in clf.parameters())
    if name in TIMM_PARAMS:
        assert n == TIMM_PARAMS[name]
    if name in VIT_PARAMS:
        assert abs(n - VIT_PARAMS[name]) / VIT_PARAMS[name] < 0.01
    assert mim.cfg.rel_pos_bias == "shared" and clf.cfg.rel_pos_bias == "layer"


def test_meta_model_materializes_with_init_weights():
    with torch.device("meta"):
        model = build_model("beit_debug", task="mim")
    model.to_empty(device="cpu")
    model.init_weights()
    assert torch.equal(model.shared_rel_pos.index, relative_position_index((14, 14)))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert torch.all(model.blocks[0].gamma_1 == 0.1)


def test_beit_init_rescale():
    torch.manual_seed(0)
    model = build_model("beit_tiny")  # depth 12
    std = [blk.mlp.fc2.weight.std().item() for blk in model.blocks]
    proj = [blk.attn.proj.weight.std().item() for blk in model.blocks]
    base = 0.02 * 0.8796  # std of a normal truncated at +-2 sigma
    for layer_id, (s, p) in enumerate(zip(std, proj), start=1):
        assert s == pytest.approx(base / math.sqrt(2 * layer_id), rel=0.05)
        assert p == pytest.approx(base / math.sqrt(2 * layer_id), rel=0.05)
    assert std[-1] / std[0] == pytest.approx(1 / math.sqrt(12), rel=0.05)
    # fc1 is not rescaled
    assert model.blocks[-1].mlp.fc1.weight.std().item() == pytest.approx(base, rel=0.05)
    # small head (init_scale 0.001), zero rel-pos tables, layer scale 0.1
    assert model.head.weight.std().item() == pytest.approx(base * 1e-3, rel=0.05)
    assert all(torch.all(b.attn.rel_pos.table == 0) for b in model.blocks)
    assert all(torch.all(b.gamma_2 == 0.1) for b in model.blocks)


def test_mim_mask_token_replaces_masked_patches_and_row_order():
    torch.manual_seed(0)
    model = build_model("beit_debug", task="mim").eval()
    x = torch.randn(2, 3, 224, 224)
    mask = torch.zeros(2, 14, 14, dtype=torch.bool)
    mask[0, 2:5, 3:9] = True
    mask[1, 10:, :4] = True
    with torch.no_grad():
        out = model(x, mask)
        # The content of a masked patch must not matter: patch (row 2, col 3) of image 0.
        x2 = x.clone()
        x2[0, :, 32:48, 48:64] += 5.0
        assert torch.equal(model(x2, mask), out)
        # ...but an unmasked patch does.
        x3 = x.clone()
        x3[0, :, 0:16, 0:16] += 5.0
        assert not torch.allclose(model(x3, mask), out)
        # Rows are the masked positions in row-major order of mask[B, N].
        tokens = model.forward_features(x, mask.flatten(1))
        ref = model.lm_head(model.norm(tokens[:, 1:]))
        assert torch.allclose(out, ref[mask.flatten(1)], atol=1e-6)
    assert out.shape == (int(mask.sum()), 8192)


def test_no_weight_decay_and_layer_id():
    clf = build_model("beit_debug")
    mim = build_model("beit_debug", task="mim", abs_pos_emb=True)
    assert clf.no_weight_decay() == {"cls_token", "blocks.0.attn.rel_pos.table", "blocks.1.attn.rel_pos.table"}
    assert mim.no_weight_decay() == {"cls_token", "pos_embed", "mask_token", "shared_rel_pos.table"}
    depth = clf.cfg.depth
    for model in (clf, mim):
        for n, _ in model.named_parameters():
            lid = model.layer_id(n)
            if n.startswith("blocks."):
                assert lid == int(n.split(".")[1]) + 1
            elif n.startswith(("patch_embed", "cls_token", "pos_embed", "mask_token", "shared_rel_pos")):
                assert lid == 0
            else:
                assert lid == depth + 1, n
    assert clf.layer_id("module.blocks.1.mlp.fc1.weight") == 2
    assert clf.layer_id("head.weight") == depth + 1


def test_eval_is_deterministic_and_drop_path_trains_stochastically():
    torch.manual_seed(0)
    model = build_model("beit_debug", drop_path_rate=0.5)
    x = torch.randn(4, 3, 224, 224)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
    model.train()
    with torch.no_grad():
        outs = [model(x) for _ in range(4)]
    assert any(not torch.equal(outs[0], o) for o in outs[1:])


def test_bf16_autocast_forward():
    model = build_model("beit_debug", task="mim")
    mask = torch.zeros(1, 196, dtype=torch.bool)
    mask[0, :20] = True
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(1, 3, 224, 224), mask)
    assert out.shape == (20, 8192) and torch.isfinite(out.float()).all()


def test_resize_rel_pos_bias_table():
    table = torch.randn(num_relative_distances((14, 14)), 12)
    assert torch.equal(resize_rel_pos_bias_table(table, (14, 14), (14, 14)), table)  # exact identity
    big = resize_rel_pos_bias_table(table, (14, 14), (24, 24))
    assert big.shape == (47 * 47 + 3, 12)
    assert torch.equal(big[-3:], table[-3:])  # cls entries copied
    # the zero-offset entry sits at the centre in both layouts and is preserved by bicubic
    # interpolation of a smooth table
    smooth = torch.ones(num_relative_distances((14, 14)), 2)
    assert torch.allclose(resize_rel_pos_bias_table(smooth, (14, 14), (24, 24)), torch.ones(47 * 47 + 3, 2))
    # a 384 model runs with the resized table
    model = build_model("beit_debug", img_size=384)
    model.blocks[0].attn.rel_pos.table.data.copy_(big[:, :2])
    assert model(torch.randn(1, 3, 384, 384)).shape == (1, 1000)


def test_zoo_cli_json(capsys):
    # In-process (saves a torch import); `python -m beit_scale.models --json` calls the same main().
    from beit_scale.models.__main__ import main
    main(["--json"])
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == list_models()
    for r in rows:
        for key in ("name", "params", "params_pretrain", "depth", "dim", "heads", "patch_size", "gflops_fwd"):
            assert key in r
        cfg = get_config(r["name"])
        assert r["params"] == expected_params(cfg, "classify")
        assert r["params_pretrain"] == expected_params(cfg, "mim")
        assert r["gflops_fwd"] > 0
    by = {r["name"]: r for r in rows}
    assert by["beit_base_patch16_224"]["params"] == 86_530_984
    # ViT-B/16 at 224: ~17.6 GMACs = ~35 GFLOPs counted as 2 per multiply-add
    assert 34 < by["beit_base_patch16_224"]["gflops_fwd"] < 37
    assert by["beit_giant_patch14_224"]["gflops_fwd"] > by["beit_huge_patch16_224"]["gflops_fwd"]


def test_build_model_types():
    assert isinstance(build_model("beit_debug"), BeitClassifier)
    assert isinstance(build_model("beit_debug", task="mim"), BeitForMIM)
    with pytest.raises(ValueError, match="task"):
        build_model("beit_debug", task="segment")
    model = build_model(get_config("beit_debug", rel_pos_bias="none"), task="mim")
    assert model.shared_rel_pos is None and model.blocks[0].attn.rel_pos is None


def test_mim_masked_index_gather_equals_boolean_indexing():
    """The sync-free path (a fixed-size gather of each row's masked positions) gives the same
    logits, in the same order, as boolean indexing; and the same gradients."""
    import torch
    from beit_scale.models.zoo import build_model
    from beit_scale.train.tasks.base import masked_positions
    torch.manual_seed(0)
    m = build_model("beit_debug", task="mim", vocab_size=64)
    x = torch.randn(3, 3, 224, 224)
    mask = torch.zeros(3, 196, dtype=torch.bool)
    for i in range(3):
        mask[i, torch.randperm(196)[:75]] = True
    a = m(x, mask)
    a.sum().backward()
    ga = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    b = m(x, mask, masked_index=masked_positions(mask, 75))
    b.sum().backward()
    assert torch.equal(a, b)
    assert all(torch.allclose(g, p.grad, atol=1e-6) for g, p in zip(ga, m.parameters()))
