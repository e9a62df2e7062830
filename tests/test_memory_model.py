"""The analytic memory model: exact parameter counts, agreement with DeepSpeed's own model-state
estimators, activation counts checked against the tensors autograd really saves, monotonicity,
the CLI, and the GPU peak table."""
import json
import re
import subprocess
import sys
import time

import pytest
import torch

from beit_scale.models.zoo import build_model, get_config, list_models
from beit_scale.scaling import memory as mm
from beit_scale.scaling.peaks import GPUS, match_gpu, peak_flops
from beit_scale.train.engine import apply_activation_checkpointing
from beit_scale.train.tasks.base import masked_positions

ds_z2 = pytest.importorskip("deepspeed.runtime.zero.stage_1_and_2")
ds_z3 = pytest.importorskip("deepspeed.runtime.zero.stage3")

GPU_COUNTS = [1, 4, 8, 16, 64, 512]


@pytest.fixture(scope="module")
def meta_models():
    """Every zoo model and task built on the meta device: (total params, largest layer)."""
    out = {}
    for name in list_models():
        for task in ("mim", "classify"):
            with torch.device("meta"):
                m = build_model(name, task=task)
            params = list(m.parameters())
            assert len({id(p) for p in params}) == len(params)  # no shared parameters
            # DeepSpeed's own model_to_params deduplicates by data_ptr(), which is 0 for every
            # meta tensor, so its total is wrong on meta models; its largest-layer scan is fine.
            _, largest = ds_z3.model_to_params(m)
            out[name, task] = (sum(p.numel() for p in params), largest)
    return out


def test_param_counts_match_meta_models_exactly(meta_models):
    for (name, task), (total, largest) in meta_models.items():
        pc = mm.count_params(name, task)
        assert pc.total == total, (name, task)
        assert pc.largest_layer == largest, (name, task)
    # and the public reference (timm's beit_base/large with a 1000-class head)
    assert mm.count_params("beit_base_patch16_224", "classify").total == 86_530_984
    assert mm.count_params("beit_large_patch16_224", "classify").total == 304_430_568


def test_param_count_follows_overrides():
    cfg = get_config("beit_debug", img_size=112, abs_pos_emb=True, layer_scale_init=None,
                     rel_pos_bias="none")
    with torch.device("meta"):
        m = build_model(cfg, task="classify")
    assert mm.count_params(cfg, "classify").total == sum(p.numel() for p in m.parameters())


def _close(ours, theirs, rel=0.01):
    return abs(ours - theirs) <= rel * theirs


@pytest.mark.parametrize("task", ["mim", "classify"])
def test_zero2_model_states_agree_with_deepspeed(meta_models, task):
    for name in list_models():
        P, _ = meta_models[name, task]
        for gpus in GPU_COUNTS:
            per_node, nodes = min(gpus, 8), max(1, gpus // 8)
            for offload in (False, True):
                cpu, gpu = ds_z2.estimate_zero2_model_states_mem_needs(
                    P, num_gpus_per_node=per_node, num_nodes=nodes, cpu_offload=offload)
                est = mm.estimate(name, 2, gpus, 1, task=task,
                                  offload="optimizer" if offload else None)
                assert _close(est.model_states_bytes, gpu), (name, gpus, offload)
                if nodes == 1:  # DeepSpeed's ZeRO-2 host formula mixes node and world sizes
                    assert _close(est.host_peak_bytes_per_node, cpu), (name, gpus, offload)


@pytest.mark.parametrize("task", ["mim", "classify"])
def test_zero3_model_states_agree_with_deepspeed(meta_models, task):
    for name in list_models():
        P, L = meta_models[name, task]
        for gpus in GPU_COUNTS:
            per_node, nodes = min(gpus, 8), max(1, gpus // 8)
            for offload, (opt_off, param_off) in {None: (False, False),
                                                  "optimizer": (True, False),
                                                  "param": (True, True)}.items():
                for zero_init in (True, False):
                    cpu, gpu, _ = ds_z3.estimate_zero3_model_states_mem_needs(
                        P, L, num_gpus_per_node=per_node, num_nodes=nodes, cpu_offload=opt_off,
                        cpu_offload_params=param_off, zero_init=zero_init)
                    est = mm.estimate(name, 3, gpus, 1, task=task, offload=offload,
                                      zero_init=zero_init)
                    key = (name, gpus, offload, zero_init)
                    assert _close(est.model_states_bytes, gpu), key
                    if nodes == 1:
                        assert _close(est.host_peak_bytes_per_node, cpu), key


def test_deepspeed_all_live_printout_matches(capsys):
    """The documented entry points take a real model and only print; check one printout."""
    with torch.device("meta"):
        model = build_model("beit_base_patch16_224", task="classify")
    # real (uninitialised) CPU storage, so DeepSpeed's data_ptr() deduplication works; no init cost
    model = model.to_empty(device="cpu")
    est2 = mm.estimate("beit_base_patch16_224", 2, 8, 1, task="classify")
    est3 = mm.estimate("beit_base_patch16_224", 3, 8, 1, task="classify")
    ds_z2.estimate_zero2_model_states_mem_needs_all_live(model, num_gpus_per_node=8)
    ds_z3.estimate_zero3_model_states_mem_needs_all_live(model, num_gpus_per_node=8)
    text = capsys.readouterr().out
    rows = re.findall(r"\s*([\d.]+)GB \|\s*([\d.]+)GB \| (.*)", text)
    z2_none = [float(g) for c, g, o in rows if o.strip() == "offload_optimizer=none"]
    z3_none = [float(g) for c, g, o in rows
               if "offload_param=none" in o and "offload_optimizer=none" in o]
    assert z2_none and z3_none, text
    assert abs(z2_none[0] - est2.model_states_bytes / 2 ** 30) <= 0.01
    assert abs(z3_none[0] - est3.model_states_bytes / 2 ** 30) <= 0.01


def _saved_bytes(model, fn):
    """Bytes of the distinct non-parameter storages autograd saves while running ``fn``."""
    skip = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in skip:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


MASKED = 75


def _loss_fn(model, B, dtype, task="mim"):
    """One training forward as the tasks run it: MIM with the fixed-size ``masked_index``
    (MIMTask passes ``masked_positions``), logits upcast to fp32 for the cross-entropy."""
    cfg = model.cfg
    img = torch.randn(B, 3, cfg.img_size, cfg.img_size, dtype=dtype)
    if task == "mim":
        mask = torch.zeros(B, cfg.num_patches, dtype=torch.bool)
        mask[:, :MASKED] = True
        index = masked_positions(mask, MASKED)
        labels = torch.zeros(B * MASKED, dtype=torch.long)
        return lambda: torch.nn.functional.cross_entropy(model(img, mask, index).float(), labels)
    labels = torch.zeros(B, dtype=torch.long)
    return lambda: torch.nn.functional.cross_entropy(model(img).float(), labels)


@pytest.mark.parametrize("task", ["mim", "classify"])
def test_activation_counts_match_saved_tensors(task):
    """fp32 on CPU runs SDPA's math path (the bias needs a gradient): the model's per-block and
    whole-model saved bytes for attention='math' must equal what autograd keeps."""
    torch.manual_seed(0)
    model = build_model("beit_debug", task=task).train()
    cfg, B = model.cfg, 3
    br = mm.activation_breakdown(cfg, task, B, precision="fp32", attention="math",
                                 num_masked=MASKED)

    x = torch.randn(B, cfg.num_patches + 1, cfg.embed_dim, requires_grad=True)
    rel = model.shared_rel_pos() if model.shared_rel_pos is not None else None
    per_block = _saved_bytes(model, lambda: model.blocks[0](x, rel_pos_bias=rel))
    assert per_block == br["blocks_saved"] // cfg.depth

    whole = _saved_bytes(model, _loss_fn(model, B, torch.float32, task))
    predicted = br["blocks_saved"] + br["rel_pos_bias"] + br["embed_and_inputs"] + br["head_saved"]
    assert abs(whole - predicted) <= 1e-4 * whole, (whole, predicted)


HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}


def _cpu_stats_correction(num_values):
    """Bytes fewer on CPU: a half LayerNorm saves its mean/rstd values in half there (2 bytes),
    CUDA in fp32 (4 bytes, what the model counts)."""
    return num_values * (4 - 2)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.parametrize("layer_scale", [0.1, None])
def test_half_block_saved_tensors_match_model(precision, layer_scale):
    """A half model (DeepSpeed casts the whole model) carries a float32 residual stream between
    blocks; what one block saves for backward is still its branches' half activations (plus the
    fp32 gamma copies), whether its input is the half embedding (block 0) or the fp32 stream."""
    torch.manual_seed(0)
    dt = HALF[precision]
    cfg = get_config("beit_mini", layer_scale_init=layer_scale)
    model = build_model(cfg, task="mim").train().to(dt)
    cfg, B = model.cfg, 3
    S = cfg.num_patches + 1
    # CPU runs SDPA's math path (q, k, v, probabilities upcast to fp32) and keeps half
    # LayerNorm statistics: norm_stats_bytes=2.
    expected = mm.block_saved_bytes(cfg, B, precision, "math", norm_stats_bytes=2)
    rel = model.shared_rel_pos()
    for in_dtype in (dt, torch.float32):       # a half input (block 0) and the fp32 stream
        x = torch.randn(B, S, cfg.embed_dim, dtype=in_dtype, requires_grad=True)
        out = []
        measured = _saved_bytes(model, lambda: out.append(model.blocks[1](x, rel_pos_bias=rel)))
        assert out[0].dtype == torch.float32   # the stream leaves the block in fp32
        assert measured == expected, (in_dtype, measured, expected)
    # on CUDA (fp32 statistics) the model's default adds exactly the difference
    assert (mm.block_saved_bytes(cfg, B, precision, "math") - expected
            == _cpu_stats_correction(4 * B * S))


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.parametrize("act_ckpt", [False, True])
def test_half_model_saved_tensors_match_model(precision, act_ckpt):
    """Whole half MIM model + loss, with and without checkpointing every block (the project's
    non-reentrant torch checkpoint, which saves each block's input): checkpointed inputs are
    float32 except the first block's (half), so the fp16/bf16 count is a + 4 (depth - 1) bytes
    per token and channel, not 2 depth. Tight: the only unmodelled saved bytes are the loss's
    4-byte total weight."""
    torch.manual_seed(0)
    dt = HALF[precision]
    model = build_model("beit_mini", task="mim").train().to(dt)
    if act_ckpt:
        apply_activation_checkpointing(model, "all")
    cfg, B = model.cfg, 2
    S, D = cfg.num_patches + 1, cfg.embed_dim
    br = mm.activation_breakdown(cfg, "mim", B, act_ckpt, precision, "math", num_masked=MASKED)

    # the blocks alone, fed as forward_features feeds them (half embedding output)
    x = torch.randn(B, S, D, dtype=dt, requires_grad=True)
    rel = model.shared_rel_pos()

    def chain():
        h = x
        for blk in model.blocks:
            h = blk(h, rel_pos_bias=rel)
        return h

    blocks = _saved_bytes(model, chain)
    stats = 0 if act_ckpt else cfg.depth * _cpu_stats_correction(4 * B * S)
    assert blocks == br["blocks_saved"] - stats, (blocks, br["blocks_saved"] - stats)
    if act_ckpt:
        assert blocks == B * S * D * (2 + 4 * (cfg.depth - 1))

    whole = _saved_bytes(model, _loss_fn(model, B, dt))
    stats += _cpu_stats_correction(2 * B * MASKED)      # the MIM head's norm
    predicted = (br["blocks_saved"] + br["rel_pos_bias"] + br["embed_and_inputs"]
                 + br["head_saved"] - stats)
    assert abs(whole - predicted) <= 8, (whole, predicted)


def _all_half_block_forward(self, x, rel_pos_bias=None):
    """Block.forward as it was before the fp32 residual stream (everything in the model dtype)."""
    a = self.attn(self.norm1(x), rel_pos_bias=rel_pos_bias)
    x = x + self.drop_path(self.gamma_1 * a)
    return x + self.drop_path(self.gamma_2 * self.mlp(self.norm2(x)))


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_half_backward_working_set_grows_by_fp32_stream_gradient(precision, monkeypatch):
    """The model's backward transient counts the residual-stream gradient at
    RESIDUAL_STREAM_BYTES (fp32) and the branch gradients in the model dtype. Measured: the CPU
    tensor high-water mark of a half block chain's backward (frozen weights, so no parameter
    gradients) exceeds that of the all-half forward by exactly (4 - a) bytes per token and
    channel, i.e. one stream gradient in fp32 instead of half."""
    from beit_scale.models.beit import Block
    from beit_scale.train.mem_probe import CpuTensorHighWater

    torch.manual_seed(0)
    dt = HALF[precision]
    model = build_model("beit_mini", task="mim").train().to(dt).requires_grad_(False)
    cfg, B = model.cfg, 2
    S, D = cfg.num_patches + 1, cfg.embed_dim
    rel = model.shared_rel_pos()

    def backward_peak():
        x = torch.randn(B, S, D, dtype=dt, requires_grad=True)
        h = x
        for blk in model.blocks:
            h = blk(h, rel_pos_bias=rel)
        y = h.to(dt)
        del h
        g = torch.randn_like(y)
        probe = CpuTensorHighWater().start()
        y.backward(g)
        return probe.stop()

    fp32_stream = backward_peak()
    monkeypatch.setattr(Block, "forward", _all_half_block_forward)
    all_half = backward_peak()
    a = 2
    assert fp32_stream - all_half == B * S * D * (mm.RESIDUAL_STREAM_BYTES - a)
    br = mm.activation_breakdown(cfg, "mim", B, precision=precision)
    assert br["backward_transient"] >= B * S * (mm.RESIDUAL_STREAM_BYTES * D + a * D
                                                 + 2 * a * cfg.mlp_dim)


def test_monotonicity():
    base = dict(model="beit_large_patch16_224", zero=3, micro_batch=32)
    per_rank = [mm.estimate(gpus=g, **base).model_states_bytes for g in (1, 2, 8, 64, 512)]
    assert all(a > b for a, b in zip(per_rank, per_rank[1:]))
    totals = [mm.estimate(gpus=g, **base).total_bytes for g in (1, 8, 64)]
    assert totals[0] > totals[1] > totals[2]
    for zero in (0, 1, 2, 3):
        plain = mm.estimate("beit_base_patch16_224", zero, 16, 64)
        ckpt = mm.estimate("beit_base_patch16_224", zero, 16, 64, act_ckpt=True)
        assert ckpt.activations_bytes < plain.activations_bytes
        assert ckpt.model_states_bytes == plain.model_states_bytes
        acts = [mm.estimate("beit_base_patch16_224", zero, 16, b).activations_bytes
                for b in (1, 8, 64)]
        assert acts[0] < acts[1] < acts[2]
    # stages order by model states on many GPUs; offload moves states to the host
    states = [mm.estimate("beit_huge_patch16_224", z, 64, 8).model_states_bytes for z in range(4)]
    assert states[0] > states[1] > states[2] > states[3]
    on = mm.estimate("beit_huge_patch16_224", 2, 64, 8, offload="optimizer")
    off = mm.estimate("beit_huge_patch16_224", 2, 64, 8)
    assert on.model_states_bytes < off.model_states_bytes and on.host_bytes > 0 == off.host_bytes
    # the math path stores B*H*S*S probabilities in every block
    assert (mm.estimate("beit_base_patch16_224", 2, 16, 64, attention="math").activations_bytes
            > mm.estimate("beit_base_patch16_224", 2, 16, 64).activations_bytes)


def test_fp32_and_mixed_model_states():
    P = mm.count_params("beit_base_patch16_224").total
    fp32 = mm.estimate("beit_base_patch16_224", 0, 1, 1, precision="fp32")
    mixed = mm.estimate("beit_base_patch16_224", 0, 1, 1, precision="bf16")
    assert fp32.model_states_bytes == 16 * P          # 4 params + 4 grads + 8 Adam
    assert mixed.model_states_bytes == 20 * P         # 2 + 2 + 4 fp32 grads + 12


def test_bad_choices_are_explained():
    with pytest.raises(ValueError, match="ZeRO stage 1, 2 or 3"):
        mm.estimate("beit_debug", 0, 2, 1, offload="optimizer")
    with pytest.raises(ValueError, match="only in ZeRO-3"):
        mm.estimate("beit_debug", 2, 2, 1, offload="param")
    with pytest.raises(ValueError, match="unknown model"):
        mm.estimate("beit_nope", 2, 2, 1)


def test_max_micro_batch_is_the_boundary():
    mem = GPUS["V100-32GB"].memory_bytes
    b = mm.max_micro_batch(mem, "beit_large_patch16_224", 2, 16, act_ckpt=False)
    assert b > 0
    assert mm.estimate("beit_large_patch16_224", 2, 16, b).total_bytes <= mem
    assert mm.estimate("beit_large_patch16_224", 2, 16, b + 1).total_bytes > mem
    # 1B params, ZeRO-0, fp16: 20 bytes/param = 19 GiB of model states alone
    assert mm.max_micro_batch(GPUS["V100-16GB"].memory_bytes, "beit_giant_patch14_224", 0, 16) == 0


def test_cli_json_and_text(capsys):
    assert mm.main(["--model", "beit_large_patch16_224", "--zero", "2", "--gpus", "16",
                    "--micro-batch", "64", "--act-ckpt", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    for key in ("params_bytes", "grads_bytes", "optimizer_bytes", "activations_bytes",
                "total_bytes", "host_bytes", "tokenizer_bytes", "overhead_bytes"):
        assert isinstance(d[key], int) and d[key] >= 0, key
    assert d["zero"] == 2 and d["gpus"] == 16 and d["act_ckpt"] is True
    parts = ("params_bytes", "grads_bytes", "optimizer_bytes", "activations_bytes",
             "tokenizer_bytes", "buffers_bytes", "overhead_bytes")
    assert d["total_bytes"] == sum(d[k] for k in parts)
    assert mm.main(["--model", "beit_base_patch16_224", "--zero", "3", "--offload", "param"]) == 0
    assert "TOTAL per GPU" in capsys.readouterr().out
    assert mm.main(["--zero", "0", "--offload", "optimizer"]) == 2


def test_cli_fit_table_is_fast_and_complete():
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "beit_scale.scaling.memory", "--fit", "--gpus", "16"],
                         capture_output=True, text=True, check=True).stdout
    assert time.perf_counter() - t0 < 30  # generous for a shared 2-core box; ~1-2 s normally
    rows = [r for r in out.splitlines() if r.startswith("| beit")]
    assert len(rows) == len(list_models()) * 4 * 2
    assert all(len(r.split("|")) == 11 for r in rows)


def test_gpu_name_matching():
    assert match_gpu("NVIDIA A100-SXM4-80GB").name == "A100-80GB"
    assert match_gpu("NVIDIA A100-SXM4-40GB").name == "A100-40GB"
    assert match_gpu("Tesla V100-SXM2-32GB").name == "V100-32GB"
    assert match_gpu("Tesla V100-SXM2-16GB").name == "V100-16GB"
    assert match_gpu("NVIDIA H100 80GB HBM3").name == "H100-80GB"
    assert match_gpu("NVIDIA A100 80GB PCIe").name == "A100-80GB"
    assert match_gpu("Tesla V100", total_memory_bytes=32 * 2 ** 30).name == "V100-32GB"
    assert match_gpu("NVIDIA GeForce RTX 3090") is None
    assert peak_flops("NVIDIA A100-SXM4-80GB", "bf16") == 312e12
    assert peak_flops("Tesla V100-SXM2-32GB", "fp16") == 125e12
    with pytest.raises(ValueError, match="no bf16"):
        peak_flops("Tesla V100-SXM2-32GB", "bf16")
