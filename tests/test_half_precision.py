"""Half precision and layer scale: a model cast to fp16/bf16 (what DeepSpeed's fp16/bf16 modes do)
must still let every block change the residual stream when layer scale is 1e-5 (Large and up).

All-half, ``x + gamma * f(x)`` with gamma = 1e-5 and x = O(1) rounds to x (fp16 resolution at 1.0
is ~1e-3, bf16's ~8e-3); the model keeps the stream in float32 between blocks instead
(beit.py ``Block._forward_fp32_residual``). fp32 models take the old code path, bit for bit.
The measurement behind this: benchmarks/bench_half_residual.py, docs/gpu.md.
"""
import copy
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from beit_scale.models import beit as beit_mod
from beit_scale.models.zoo import build_model

REPO = Path(__file__).resolve().parents[1]
HALF = [torch.float16, torch.bfloat16]


def _legacy_block_forward(self, x, rel_pos_bias=None):
    """Block.forward as it was before the float32 residual stream (the fp32 path must equal it)."""
    a = self.attn(self.norm1(x), rel_pos_bias=rel_pos_bias)
    if self.gamma_1 is not None:
        a = self.gamma_1 * a
    x = x + self.drop_path(a)
    m = self.mlp(self.norm2(x))
    if self.gamma_2 is not None:
        m = self.gamma_2 * m
    return x + self.drop_path(m)


def _tiny(task="mim", **kw):
    torch.manual_seed(0)
    kw = {"layer_scale_init": 1e-5, "img_size": 32, "patch_size": 8, "depth": 3, "vocab_size": 64, **kw}
    return build_model("beit_debug", task=task, **kw)


def _inputs(B=2):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, 3, 32, 32, generator=g)
    mask = torch.zeros(B, 16, dtype=torch.bool)
    mask[:, :6] = True
    return x, mask


def _block_io(model, *args, blocks=None):
    """(input, output) of every block during one no-grad forward of ``model(*args)``."""
    rows = []
    hooks = [b.register_forward_hook(lambda m, a, o: rows.append((a[0].detach(), o.detach())))
             for b in (model.blocks if blocks is None else blocks)]
    try:
        with torch.no_grad():
            model(*args)
    finally:
        for h in hooks:
            h.remove()
    return rows


def check_blocks_change_stream(ref, half_model, block_io, tol=0.1):
    """Each half block's change of the stream matches the fp32 block's on the same input.

    Returns (fraction of elements changed, relative error of the change) per block. With the
    old all-half block the change is 0 (or a few rounding steps): relative error ~1.
    """
    rel = ref.shared_rel_pos() if ref.shared_rel_pos is not None else None
    out = []
    for i, (a, o) in enumerate(block_io):
        with torch.no_grad():
            want = (ref.blocks[i](a.float(), rel_pos_bias=rel) - a.float()).double()
        got = o.double() - a.double()
        frac = (got != 0).double().mean().item()
        err = ((got - want).norm() / want.norm()).item()
        out.append((frac, err))
        assert err < tol and frac > 0.5, (
            f"block {i} of the {half_model.blocks[0].norm1.weight.dtype} model: it changes "
            f"{frac:.1%} of the residual stream, relative error of its change vs fp32 {err:.3f}: "
            "the block's contribution (layer scale 1e-5) is rounded away in half precision")
    return out


@pytest.mark.parametrize("dtype", HALF, ids=["fp16", "bf16"])
def test_half_model_blocks_change_residual_stream(dtype):
    """A model cast with .to(half), as DeepSpeed casts it: with layer scale 1e-5 every block's
    contribution survives in the residual stream (it was rounded away before)."""
    ref = _tiny().eval()
    half = copy.deepcopy(ref).to(dtype)
    x, mask = _inputs()
    io = _block_io(half, x.to(dtype), mask)
    assert len(io) == 3 and all(o.dtype == torch.float32 for _, o in io)  # the stream is float32
    check_blocks_change_stream(ref, half, io)
    # and the whole stack: the sum of the blocks' contributions matches fp32's
    ref_io = _block_io(ref, x, mask)
    got = io[-1][1].double() - io[0][0].double()
    want = ref_io[-1][1].double() - ref_io[0][0].double()
    assert ((got - want).norm() / want.norm()).item() < 0.1


def test_old_all_half_block_loses_the_contribution(monkeypatch):
    """The failure this guards against, kept visible: the old block in fp16 changes (almost)
    nothing."""
    monkeypatch.setattr(beit_mod.Block, "forward", _legacy_block_forward)
    ref = _tiny().eval()
    half = copy.deepcopy(ref).half()
    x, mask = _inputs()
    with pytest.raises(AssertionError, match="rounded away"):
        check_blocks_change_stream(ref, half, _block_io(half, x.half(), mask))


@pytest.mark.parametrize("layer_scale", [1e-5, None], ids=["ls1e-5", "no_ls"])
@pytest.mark.parametrize("task", ["mim", "classify"])
def test_fp32_unchanged_bit_for_bit(task, layer_scale):
    """fp32 takes the old code path: outputs and every gradient equal the old block's exactly,
    stochastic depth included."""
    torch.manual_seed(0)
    model = _tiny(task=task, layer_scale_init=layer_scale, drop_path_rate=0.2).train()
    x, mask = _inputs(4)
    args = (x, mask) if task == "mim" else (x,)

    def step(fwd):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(beit_mod.Block, "forward", fwd)
            model.zero_grad(set_to_none=True)
            torch.manual_seed(123)  # the same drop-path draws
            out = model(*args)
            out.float().square().mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    new_out, new_grads = step(beit_mod.Block.forward)
    old_out, old_grads = step(_legacy_block_forward)
    assert torch.equal(new_out, old_out)
    assert new_grads.keys() == old_grads.keys()
    assert all(torch.equal(new_grads[n], old_grads[n]) for n in new_grads)


@pytest.mark.parametrize("dtype", HALF, ids=["fp16", "bf16"])
@pytest.mark.parametrize("task", ["mim", "classify"])
def test_half_model_dtypes_and_gradients(task, dtype):
    """Heads see the params' dtype; every parameter gets a finite gradient of its own dtype;
    activation checkpointing (applied from outside) gives the same result."""
    from beit_scale.train.engine import apply_activation_checkpointing

    model = _tiny(task=task, drop_path_rate=0.0).to(dtype).train()
    x, mask = _inputs()
    args = (x.to(dtype), mask) if task == "mim" else (x.to(dtype),)
    feats = model.forward_features(*args)
    assert feats.dtype == dtype

    def step():
        model.zero_grad(set_to_none=True)
        out = model(*args)
        assert out.dtype == dtype
        (out.float().square().mean() * 2.0 ** 16).backward()  # loss-scaled, as DeepSpeed's fp16
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    grads = step()
    for n, p in model.named_parameters():
        g = grads[n]
        assert g.dtype == dtype and torch.isfinite(g).all(), n
    assert all(grads[f"blocks.{i}.gamma_{j}"].abs().sum() > 0 for i in range(3) for j in (1, 2))
    apply_activation_checkpointing(model, "all")
    again = step()
    assert all(torch.equal(grads[n], again[n]) for n in grads)


def test_autocast_with_fp32_weights_unchanged():
    """torch autocast with fp32 weights (the BEiT reference's AMP) keeps the stream in float32 by
    type promotion; forward_features still returns float32 there."""
    model = _tiny().eval()
    x, mask = _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        io = _block_io(model, x, mask)
        feats = model.forward_features(x, mask)
    assert all(o.dtype == torch.float32 for _, o in io)
    assert feats.dtype == torch.float32


def test_ds_configs_avoid_autocast_fp16_with_zero():
    """DeepSpeed 0.19.8's ``torch_autocast`` fp16 under ZeRO 1/2/3 scales the loss with a torch
    GradScaler the ZeRO optimizer does not know about: it clips the *loss-scaled* gradient norm,
    reports it x65536 and skips steps (benchmarks/bench_half_residual.py, docs/gpu.md). No
    shipped DeepSpeed file may combine them (the float32 residual stream is the fix we use)."""
    for path in sorted((REPO / "ds_configs").glob("*.json")):
        ds = json.loads(path.read_text())
        ac = ds.get("torch_autocast", {})
        if ac.get("enabled") and str(ac.get("dtype", "bfloat16")) in ("float16", "fp16", "half", "torch.float16"):
            assert ds.get("zero_optimization", {}).get("stage", 0) == 0, path.name


# ----------------------------------------------------------------------------------------------
# a real DeepSpeed fp16 engine (one CPU rank, the test-only fp16 switch of ENVIRONMENT.md)
# ----------------------------------------------------------------------------------------------
def test_deepspeed_fp16_engine_blocks_change_residual_stream(tmp_path):
    from launching import run_ranks
    out = tmp_path / "result.json"
    codes, logs = run_ranks(1, [str(Path(__file__).relative_to(REPO)), "ds-fp16", str(out)], tmp_path / "logs",
                            timeout=300)
    assert codes == [0], logs[-4000:]
    res = json.loads(out.read_text())
    assert res["param_dtype"] == "torch.float16"
    assert res["stream_dtypes"] == ["torch.float32"] * 3
    assert all(frac > 0.5 and err < 0.1 for frac, err in res["blocks"]), res["blocks"]
    assert all(map(lambda v: v == v and abs(v) < 1e4, res["losses"])), res["losses"]  # finite


def _ds_fp16_driver(out_path: str) -> None:
    """Build a DeepSpeed fp16 engine (ds_configs/zero2.json) around the tiny model; check the
    blocks inside it and take two steps."""
    sys.path.insert(0, str(REPO))
    from deepspeed.accelerator import get_accelerator
    type(get_accelerator()).is_fp16_supported = lambda self: True  # TEST-ONLY (ENVIRONMENT.md)
    from beit_scale.train import engine as engine_mod

    engine_mod.init_distributed()
    ref = _tiny().eval()
    model = copy.deepcopy(ref)
    ds = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    ds.update(train_batch_size=2, train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=1)
    ds["zero_optimization"].update(reduce_bucket_size=10 ** 6, allgather_bucket_size=10 ** 6)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    engine = engine_mod.build_engine(model, opt, None, ds)
    x, mask = _inputs()
    engine.eval()
    io = _block_io(engine, x.half(), mask, blocks=engine.module.blocks)
    blocks = check_blocks_change_stream(ref, engine.module, io)
    engine.train()
    losses = []
    for _ in range(2):
        logits = engine(x.half(), mask)
        loss = F.cross_entropy(logits.float(), torch.zeros(logits.shape[0], dtype=torch.long))
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    Path(out_path).write_text(json.dumps({
        "param_dtype": str(next(engine.module.parameters()).dtype),
        "stream_dtypes": [str(o.dtype) for _, o in io], "blocks": blocks, "losses": losses}))
    engine_mod.shutdown_distributed()


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "ds-fp16":
    _ds_fp16_driver(sys.argv[2])
