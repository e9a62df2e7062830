"""Analytic per-GPU memory model for BEiT training under DeepSpeed ZeRO: what fits, before you queue.

Everything here is arithmetic on the model config (no GPU, no model build), so the whole
``--fit`` table is computed in well under a second. The parameter counts are exact (tests check them
against models built on the meta device); the rest is a model of what PyTorch and DeepSpeed keep
alive at the memory peak, which is the start of the backward pass (every saved activation is
still alive and the loss gradient has just been created).

Model states (per rank, bytes per parameter P; N = data-parallel ranks; L = largest layer's
parameters, i.e. the most parameters any single module owns directly). Mixed precision
(fp16 or bf16) follows DeepSpeed's own accounting, so that these figures agree with its
``estimate_zero2/3_model_states_mem_needs`` (tests hold us to 1 %):

    stage  half params   gradients                        optimizer (fp32 master + Adam m, v)
    0      2             2 (half) + 4 (fp32 copy)          12
    1      2             2 (half, full) + 4/N (fp32 part)  12/N
    2      2             (2 + 4)/N                         12/N        = 2 + 18/N   (DeepSpeed)
    3      2/N + 2L      4/N + 2L                          12/N        = 18/N + 4L  (DeepSpeed)

The ZeRO paper counts 16 bytes/param (2 + 2 + 12); DeepSpeed's ZeRO-1/2 optimizer also keeps the
fp32 gradient of its own partition for the step (the extra 4/N). Under ZeRO-3 each layer's half
gradient is reduce-scattered as soon as it exists (2L transient), and one layer's parameters are
gathered at a time (2L). fp32 training keeps no master copy: 4 params + 4 grads + 8 Adam.

CPU offload (``offload='optimizer'``, ZeRO 1-3): the fp32 master, Adam moments and fp32 gradients
(16/N bytes/param) live in host memory, the GPU keeps only the half parameters (ZeRO 1/2: full,
ZeRO-3: its partition + one gathered layer). ``offload='param'`` (ZeRO-3 only) also moves the
half-parameter partition to the host (18/N on the host, 4L on the GPU). ``host_bytes`` is the
steady-state host memory per rank; ``host_peak_bytes_per_node`` is DeepSpeed's estimate of peak
CPU RAM per node (it includes every rank building the model in fp32 on the host before
partitioning, or only its largest layer under ``zero.Init``, times DeepSpeed's 1.5 buffer factor).

Activations (bytes at the start of backward, per rank, micro batch B, S = patches + 1 tokens,
D = embed dim, M = MLP dim, H = heads, a = 2 bytes in fp16/bf16, 4 in fp32; DeepSpeed casts the
whole model to half, so the branches' activations are half too). In a half model each Block
carries the residual stream in float32 between blocks (models/beit.py
``Block._forward_fp32_residual``: ``x.float()``, fp32 layer-scale multiply and residual add, the
branches run on ``x.to(half)``), so the stream itself is 4 bytes in every precision (r = 4).
Saved tensors of one pre-LN block, per token (the same bytes as an all-half block: the fp32 stream
is never saved, because ``.float()`` / ``.to()`` and the add save nothing; the norms save the
half copies ``x.to(half)``, and ``gamma.float() * f`` saves the half ``f``):
    norm1 input D, norm1 output D (qkv's input), q/k/v 3D, attention output D (kept by SDPA),
    proj input D (the head-merge copy), proj output D (for layer-scale's gamma gradient),
    norm2 input D, norm2 output D, fc1 output M (GELU input), GELU output M (fc2 input),
    fc2 output D (gamma_2's gradient) -> 11 D + 2 M elements (9 D + 2 M without layer scale),
    plus fp32 LayerNorm mean/rstd (16 bytes; CUDA keeps them in fp32 for half inputs, CPU in the
    input dtype: ``norm_stats_bytes``) and the attention log-sum-exp (4 H bytes). Per block, not
    per token: a half model with layer scale also saves the two fp32 copies ``gamma.float()``
    (8 D bytes).
Attention: ``attention='sdpa'`` (default) assumes PyTorch's memory-efficient SDPA kernel (the one
that accepts BEiT's additive relative-position bias; flash attention does not take a bias): it
stores no B*H*S*S probabilities, only the bias H*S*S once per table. Its backward materialises a
bias gradient of B*H*S*S for the one block being differentiated (counted as a transient).
``attention='math'`` (the eager softmax path, which is what PyTorch runs on CPU when the bias
needs a gradient) saves the B*H*S*S probabilities in every block instead of the SDPA output and
the bias; for half inputs it computes q, k, v and the probabilities in fp32 (PyTorch's default,
``torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(False)``, which governs CPU and CUDA
alike), so those are 4 bytes in every precision. The per-block count is then exactly what the
tests measure with saved-tensor hooks (fp32, fp16 and bf16).
Dropout: none in BEiT; drop-path masks are B scalars (ignored).

With activation checkpointing (every block): each block keeps only its input (S*D): the first
block's in the model dtype (a bytes), every later one float32 (the residual stream, r = 4 bytes;
so 4 instead of 2 bytes for depth-1 of the inputs in fp16/bf16). During backward one block at a
time is recomputed in full. Either way a backward working set of one block is added
(``backward_transient``): the gradient of the residual stream (r = 4 bytes, float32 along the
stream) and of one branch input (a), and of the MLP hidden (2 M a), i.e. (r + a) D + 2 a M bytes
per token (measured on CPU: the backward peak of a half block chain grows by exactly
(4 - a) D bytes per token over the all-half forward), plus the attention transient above and the
head's logit gradients.

Outside the blocks: the input image (kept by the patch-embedding conv for its weight gradient),
the MIM mask; MIM head: the fixed-size gather of the masked rows (``masked_index``, which MIMTask
always passes) keeps its whole input, the last block's output [B, S, D] in the model dtype, and
its int64 index (``masked_positions`` slices a sorted [B, N] tensor, so B N x 8 bytes); norm
input/output for the masked rows, and the logits for masked positions x vocab: the task upcasts
them to fp32 and cross-entropy saves an fp32 log-softmax (4 bytes per logit) and its int64 targets
(``head_saved``); at the start of backward two fp32 gradient buffers of the same size and,
in half precision, the downcast gradient exist too (counted in ``backward_transient``).
The classifier head is tiny (B x classes).

Frozen tokenizer (MIM only): a DALL-E-style dVAE encoder (``TokenizerSpec``; the paper used
DALL-E's, hidden 256, ~54 M params) kept in half precision on the GPU (``tokenizer_bytes``). It runs
under ``no_grad`` before the backbone's forward, so its activation peak (two full-resolution
feature maps of the first group plus the bottleneck branch at 112 px) does not add to the
backbone's: ``activations_bytes`` is the larger of the two (the breakdown shows both).

DeepSpeed buffers (``buffers_bytes``): gradient-reduction buckets, ``reduce_bucket_size``
elements each, two of them with ``overlap_comm`` (allocated in full, whatever the model size; the
project's ds_configs use 2e8 and overlap_comm=true, DeepSpeed's own default is 5e8); ZeRO-3 adds
the prefetch bucket and the parameters below ``stage3_param_persistence_threshold`` that every
rank keeps whole; ZeRO-0 flattens gradients for all-reduce in chunks of up to the bucket size.

Peak: ZeRO 1-3 keep gradient partitions and buckets allocated across steps, so the peak is
params + grads + optimizer + activations + tokenizer + buffers.  ZeRO-0 frees its gradients every
step and backward creates them while it frees activations, so there the peak is params +
optimizer + tokenizer + max(activations, grads + buffers).  Both were checked against the CPU
tensor high-water mark of real runs (docs/scaling_study.md).

Segmentation (``task='segment'``, CLI ``--task seg``): the fine-tuning backbone (per-layer tables, no
classifier) plus a decoder (``SegHeadConfig``: UperNet or SETR-PUP, optional auxiliary FCN head).
Its parameters are counted exactly (``decoder_params``, tested against the built model); its
activations by an op-by-op walk of models/decoders.py (``decoder_activation_bytes``: what
autograd keeps, within 0.2 % of the saved tensors; the fp32 log-softmax of each head at full
resolution; and, as the transient, what is alive at the end of the forward), checked against the
CPU tensor high-water mark of a forward + backward within 4 % (tests/test_segmentation.py).

Overhead (``overhead_bytes``), our stated allowance: 1 GiB fixed for the CUDA context, cuBLAS
workspaces and NCCL's internal buffers, plus 10 % of everything the caching allocator holds, for
fragmentation. Both are parameters. The fit check compares ``total_bytes`` with the card's nominal
memory.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Optional, Union

from beit_scale.models.decoders import SegHeadConfig, evenly_spaced_blocks, norm_groups
from beit_scale.models.zoo import BeitConfig, get_config, list_models, resolve_config
from beit_scale.scaling.peaks import FIT_GPUS, GPUS

__all__ = [
    "ParamCount", "count_params", "TokenizerSpec", "DALLE_TOKENIZER", "MemoryEstimate",
    "model_state_bytes", "block_saved_bytes", "activation_breakdown", "estimate", "max_micro_batch",
    "fit_table", "main", "decoder_params", "decoder_activation_bytes", "SEG_DEFAULT_HEAD",
]

GiB = 2 ** 30
PRECISIONS = ("fp32", "fp16", "bf16")
OFFLOADS = (None, "optimizer", "param")
ATTENTIONS = ("sdpa", "math")
# The project's ds_configs/zero{1,2,3}.json values (DeepSpeed's defaults are 5e8 / overlap off
# for stage 1-2): pass reduce_bucket_size / overlap_comm to model another config.
DEFAULT_REDUCE_BUCKET = int(2e8)
DEFAULT_PREFETCH_BUCKET = int(5e7)
DEFAULT_PERSISTENCE_THRESHOLD = int(1e5)
# Bytes per element of the residual stream between blocks: float32 in every precision (a half
# model's Block adds its branches into a float32 stream, models/beit.py).
RESIDUAL_STREAM_BYTES = 4
# BEiT masks 75 of 196 patches (~40 %); other grids keep the same fraction.
MASK_FRACTION = 75 / 196
TASK_CHOICES = ("mim", "classify", "segment")
SEG_DEFAULT_HEAD = SegHeadConfig()  # ADE20K: 150 classes, UperNet 512, aux FCN 256


# ----------------------------------------------------------------------------------------------
# parameter counts
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ParamCount:
    total: int
    largest_layer: int          # most parameters owned directly by one module (DeepSpeed's L)
    small_params: int           # parameters in tensors below ZeRO-3's persistence threshold
    components: dict = field(default_factory=dict)


def _as_config(model: Union[str, BeitConfig], task: str, img_size: Optional[int]) -> BeitConfig:
    cfg = get_config(model) if isinstance(model, str) else model
    if not isinstance(cfg, BeitConfig):
        raise TypeError(f"model must be a zoo name or a BeitConfig, got {type(model).__name__}")
    if img_size is not None and img_size != cfg.img_size:
        cfg = cfg.replace(img_size=img_size)
    if task not in TASK_CHOICES:
        raise ValueError(f"task={task!r}: expected one of {TASK_CHOICES}")
    # the segmenter's backbone is the fine-tuning one (per-layer rel-pos tables)
    return resolve_config(cfg, "classify" if task == "segment" else task)


def decoder_params(cfg: BeitConfig, head: SegHeadConfig) -> list[tuple[str, list[int]]]:
    """(owner module, [tensor sizes]) of a segmentation decoder; mirrors models/decoders.py
    (convs before a GroupNorm have no bias)."""
    D, C, A, K = cfg.embed_dim, head.channels, head.aux_channels, head.num_classes

    def cna(cin, cout, k):                      # conv (no bias) + GroupNorm
        return [("conv", [cin * cout * k * k]), ("norm", [cout, cout])]

    mods: list[tuple[str, list[int]]] = []
    if head.decoder == "upernet":
        mods += [("norm", [D, D])] * 4                                  # neck LayerNorms
        deconv = ("deconv", [D * D * 4, D])
        mods += [deconv, ("norm", [D, D]), deconv, deconv]              # up4 (2 + GN), up2
        for _ in range(4):                                              # PPM branches
            mods += cna(D, C, 1)
        mods += cna(D + 4 * C, C, 3)                                    # PPM fuse
        for _ in range(3):
            mods += cna(D, C, 1)                                        # laterals
        for _ in range(3):
            mods += cna(C, C, 3)                                        # FPN convs
        mods += cna(4 * C, C, 3)                                        # fuse
    else:
        mods.append(("norm", [D, D]))
        stages = max(1, round(math.log2(cfg.patch_size)))
        for i in range(stages):
            mods += cna(D if i == 0 else C, C, 3)
    mods.append(("cls", [C * K, K]))
    if head.aux_head:
        mods += cna(D, A, 3) + [("cls", [A * K, K])]
    return mods


@functools.lru_cache(maxsize=None)
def _count(cfg: BeitConfig, task: str, threshold: int,
           head: Optional[SegHeadConfig] = None) -> ParamCount:
    D, M, H, depth = cfg.embed_dim, cfg.mlp_dim, cfg.num_heads, cfg.depth
    gh, gw = cfg.grid_size
    rel_rows = (2 * gh - 1) * (2 * gw - 1) + 3
    # (owner module, [tensor sizes]) for every parameter-owning module; mirrors models/beit.py.
    modules: list[tuple[str, list[int]]] = []
    root = [D]                                                  # cls_token
    if cfg.abs_pos_emb:
        root.append((cfg.num_patches + 1) * D)
    if task == "mim":
        root.append(D)                                          # mask_token
    modules.append(("root", root))
    modules.append(("patch_embed", [cfg.in_chans * cfg.patch_size ** 2 * D, D]))
    if cfg.rel_pos_bias == "shared":
        modules.append(("shared_rel_pos", [rel_rows * H]))
    for _ in range(depth):
        modules += [("norm", [D, D]), ("norm", [D, D]),
                    ("attn", [D, D]),                           # q_bias, v_bias (no k bias)
                    ("qkv", [3 * D * D]), ("proj", [D * D, D]),
                    ("fc1", [D * M, M]), ("fc2", [M * D, D])]
        if cfg.rel_pos_bias == "layer":
            modules.append(("rel_pos", [rel_rows * H]))
        if cfg.layer_scale_init:
            modules.append(("gamma", [D, D]))
    if task == "mim":
        modules += [("norm", [D, D]), ("lm_head", [D * cfg.vocab_size, cfg.vocab_size])]
    elif task == "segment":
        modules += [("decoder", sizes) for _, sizes in decoder_params(cfg, head or SEG_DEFAULT_HEAD)]
    else:
        modules.append(("norm", [D, D]))                        # fc_norm
        if cfg.num_classes > 0:
            modules.append(("head", [D * cfg.num_classes, cfg.num_classes]))
    comps: dict[str, int] = {}
    for name, sizes in modules:
        key = "blocks" if name in ("attn", "qkv", "proj", "fc1", "fc2", "rel_pos", "gamma") else name
        comps[key] = comps.get(key, 0) + sum(sizes)
    total = sum(sum(s) for _, s in modules)
    largest = max(sum(s) for _, s in modules)
    small = sum(n for _, s in modules for n in s if n < threshold)
    return ParamCount(total, largest, small, comps)


def count_params(model: Union[str, BeitConfig], task: str = "mim", img_size: Optional[int] = None,
                 persistence_threshold: int = DEFAULT_PERSISTENCE_THRESHOLD,
                 head: Optional[SegHeadConfig] = None) -> ParamCount:
    """Exact parameter count of ``build_model(model, task)`` (task "segment":
    ``build_segmenter(cfg, head)``, default ``SEG_DEFAULT_HEAD``) without building it."""
    return _count(_as_config(model, task, img_size), task, persistence_threshold,
                  (head or SEG_DEFAULT_HEAD) if task == "segment" else None)


# ----------------------------------------------------------------------------------------------
# tokenizer
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenizerSpec:
    """A DALL-E-style dVAE encoder: 7x7 stem, ``groups`` groups of ``blocks_per_group`` residual
    blocks (3x3, 3x3, 3x3, 1x1 bottleneck at width/4), width doubling and 2x max-pool between
    groups, 1x1 to ``vocab_size`` logits. Only the encoder is needed to make MIM targets."""
    hidden: int = 256
    groups: int = 4
    blocks_per_group: int = 2
    vocab_size: int = 8192
    in_chans: int = 3
    img_size: int = 112

    def params(self) -> int:
        def conv(cin, cout, k):
            return cin * cout * k * k + cout
        n = conv(self.in_chans, self.hidden, 7)
        cin = self.hidden
        for g in range(self.groups):
            cout = self.hidden * 2 ** g
            for _ in range(self.blocks_per_group):
                h = cout // 4
                n += conv(cin, h, 3) + conv(h, h, 3) + conv(h, h, 3) + conv(h, cout, 1)
                if cin != cout:
                    n += conv(cin, cout, 1)
                cin = cout
        return n + conv(cin, self.vocab_size, 1)

    def forward_peak_bytes(self, batch: int, act_bytes: int) -> int:
        """Peak of a no_grad forward: a first-group block's input and output maps (width ``hidden``
        at full resolution) and two bottleneck maps alive at once; later groups are smaller
        (width x2, area /4); the final logits map is vocab x (img/2^(groups-1))^2."""
        area = self.img_size ** 2
        first = (2 * self.hidden + 2 * (self.hidden // 4)) * area
        out_side = self.img_size // 2 ** (self.groups - 1)
        logits = (self.vocab_size + self.hidden * 2 ** (self.groups - 1)) * out_side ** 2
        return batch * max(first, logits) * act_bytes


DALLE_TOKENIZER = TokenizerSpec()


# ----------------------------------------------------------------------------------------------
# the estimate
# ----------------------------------------------------------------------------------------------
@dataclass
class MemoryEstimate:
    """Per-rank GPU bytes (and host bytes) for one training configuration."""
    model: str
    task: str
    zero: int
    gpus: int
    micro_batch: int
    act_ckpt: bool
    precision: str
    offload: Optional[str]
    img_size: int
    attention: str
    num_params: int
    largest_layer_params: int
    params_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    activations_bytes: int
    tokenizer_bytes: int
    buffers_bytes: int
    overhead_bytes: int
    total_bytes: int
    host_bytes: int
    host_peak_bytes_per_node: int
    breakdown: dict = field(default_factory=dict)

    @property
    def model_states_bytes(self) -> int:
        return self.params_bytes + self.grads_bytes + self.optimizer_bytes

    def fits(self, memory_bytes: int) -> bool:
        return self.total_bytes <= memory_bytes

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["model_states_bytes"] = self.model_states_bytes
        return d

    def summary(self) -> str:
        g = lambda b: f"{b / GiB:9.3f} GiB"  # noqa: E731
        off = self.offload or "none"
        lines = [
            f"{self.model} ({self.task}, {self.num_params / 1e6:.1f} M params, img {self.img_size}) | "
            f"ZeRO-{self.zero} on {self.gpus} GPUs | micro batch {self.micro_batch} | "
            f"{self.precision} | act ckpt {'on' if self.act_ckpt else 'off'} | offload {off} | "
            f"attention {self.attention}",
            f"  parameters        {g(self.params_bytes)}",
            f"  gradients         {g(self.grads_bytes)}",
            f"  optimizer states  {g(self.optimizer_bytes)}",
            f"  = model states    {g(self.model_states_bytes)}",
            f"  activations       {g(self.activations_bytes)}",
        ]
        for k, v in self.breakdown.items():
            if k.startswith("act_"):
                lines.append(f"    {k[4:]:<22}{v / GiB:9.3f} GiB")
        lines += [
            f"  tokenizer weights {g(self.tokenizer_bytes)}",
            f"  DeepSpeed buffers {g(self.buffers_bytes)}",
            *([f"  (ZeRO-0: gradients + buffers and activations peak at different times; the total counts "
                f"the larger)"] if self.zero == 0 else []),
            f"  overhead          {g(self.overhead_bytes)}  (CUDA context etc. + fragmentation)",
            f"  TOTAL per GPU     {g(self.total_bytes)}",
            f"  host RAM per rank {g(self.host_bytes)}  (offloaded states; peak per node "
            f"{self.host_peak_bytes_per_node / GiB:.2f} GiB incl. model init)",
        ]
        fits = [name for name in FIT_GPUS if self.fits(GPUS[name].memory_bytes)]
        lines.append("  fits on: " + (", ".join(fits) if fits else "none of " + ", ".join(FIT_GPUS)))
        return "\n".join(lines)


def model_state_bytes(num_params: int, largest_layer: int, zero: int, gpus: int,
                      precision: str = "fp16", offload: Optional[str] = None) -> dict:
    """Per-rank model-state bytes: dict with gpu params/grads/optimizer and host bytes."""
    _check_choices(zero=zero, gpus=gpus, precision=precision, offload=offload)
    P, L, N = num_params, largest_layer, gpus
    half = precision in ("fp16", "bf16")
    w = 2 if half else 4                      # bytes of a working (model-dtype) param or grad
    fp32_grad = 4 if half else 0              # DeepSpeed's fp32 gradient partition for the step
    opt = 12 if half else 8                   # fp32 master (mixed only) + Adam m and v
    if zero == 0:
        params, grads, optim, host = w * P, (w + fp32_grad) * P, opt * P, 0
    elif zero in (1, 2):
        grads_full = w * P if zero == 1 else w * P / N
        if offload is None:
            params, grads, optim, host = w * P, grads_full + fp32_grad * P / N, opt * P / N, 0
        else:
            # ZeRO-1 keeps the full half gradients until the step; ZeRO-2 streams bucket by
            # bucket to the host, so no gradient stays on the GPU.
            params, grads, optim = w * P, (w * P if zero == 1 else 0), 0
            host = (opt + fp32_grad + (0 if half else w)) * P / N
    else:
        if offload is None:
            params = w * P / N + w * L
            grads = (fp32_grad or w) * P / N + w * L
            optim, host = opt * P / N, 0
        else:
            grads, optim = w * L, 0
            host = (opt + (fp32_grad or w)) * P / N
            if offload == "param":
                params = w * L
                host += w * P / N
            else:
                params = w * P / N + w * L
    return {"params": int(params), "grads": int(grads), "optimizer": int(optim), "host": int(host)}


def block_saved_bytes(cfg: BeitConfig, micro_batch: int, precision: str = "fp16",
                      attention: str = "sdpa", *, norm_stats_bytes: int = 4) -> int:
    """Bytes autograd saves for one block (no checkpointing) at micro batch ``micro_batch``.

    ``norm_stats_bytes``: bytes of each LayerNorm mean/rstd value; 4 on CUDA (fp32 for half
    inputs too), the input's dtype on CPU (2 for a half model there)."""
    if attention not in ATTENTIONS:
        raise ValueError(f"attention={attention!r}: expected one of {ATTENTIONS}")
    B, D, M, H = micro_batch, cfg.embed_dim, cfg.mlp_dim, cfg.num_heads
    half = precision in ("fp16", "bf16")
    a = 2 if half else 4
    S = cfg.num_patches + 1
    ls = 2 if cfg.layer_scale_init else 0
    sdpa = attention == "sdpa"
    qkv = a if sdpa else 4                     # the math path upcasts half q/k/v/probs to fp32
    # norm1 in/out, proj in, norm2 in/out (+ proj/fc2 outputs with layer scale, + the SDPA
    # output), fc1 out and GELU out in the model dtype; q, k, v; two norms' mean and rstd.
    per_token = (((5 + ls + (1 if sdpa else 0)) * D + 2 * M) * a + 3 * D * qkv
                 + 4 * norm_stats_bytes + (4 * H if sdpa else 0))
    probs = B * H * S * S * qkv if not sdpa else 0
    gamma_copies = 2 * D * 4 if (half and ls) else 0   # gamma.float(), saved by the fp32 multiply
    return B * S * per_token + probs + gamma_copies


def decoder_activation_bytes(cfg: BeitConfig, head: SegHeadConfig, micro_batch: int,
                             precision: str = "fp16", norm_stats_bytes: int = 4) -> dict:
    """Bytes a segmentation decoder and its loss keep for backward, and its backward transient.

    Walks models/decoders.py op by op: a conv keeps its input, GroupNorm its input and per-group
    mean/rstd, (in-place) ReLU its output, GELU its input, max pooling its int64 indices,
    Dropout2d its [B, C] mask (its output is kept by the classifier conv); bilinear resizes, adds
    and concatenations keep nothing (their outputs are kept by the next conv). The block outputs
    the decoder reads are new tensors only where nothing else keeps them (the last block's, in
    fp32; each one's half copy in fp16/bf16). Loss: an fp32 log-softmax at the input resolution
    per head, and the int64 labels once. Transient: see below (what is alive at the forward's
    end, which is above the start of backward's fp32 logit gradients)."""
    B, D, C, A, K = micro_batch, cfg.embed_dim, head.channels, head.aux_channels, head.num_classes
    a = 2 if precision in ("fp16", "bf16") else 4
    g = cfg.grid_size[0]
    S, HW = cfg.num_patches + 1, cfg.img_size ** 2
    G = lambda c: norm_groups(c, head.groups)  # noqa: E731 - as the model clamps them

    def cna(c, area):        # GroupNorm input + ReLU output + the norm's mean/rstd
        return B * (2 * c * area * a + 2 * G(c) * norm_stats_bytes)

    ln_stats = B * S * 2 * norm_stats_bytes
    if head.decoder == "upernet":
        idx = head.out_indices or evenly_spaced_blocks(cfg.depth)
        new_tokens = (1 if a == 4 else len(set(idx))) * B * S * D * a
        s0, s1, s3 = 4 * g, 2 * g, -(-g // 2)
        saved = new_tokens + 4 * ln_stats + 4 * B * D * g * g * a              # LN, maps
        saved += B * D * s1 * s1 * a * 3 + B * 2 * G(D) * norm_stats_bytes     # up4: GN in, GELU in, deconv in
        saved += B * D * (s0 * s0 + s1 * s1 + s3 * s3) * a                     # levels 0, 1, 3
        saved += B * D * s3 * s3 * 8                                           # max-pool indices
        for b in (1, 2, 3, 6):                                                 # PPM branches
            saved += B * D * b * b * a + cna(C, b * b)
        saved += B * (D + 4 * C) * s3 * s3 * a + cna(C, s3 * s3)               # PPM fuse
        for side in (s0, s1, g):                                               # lateral, FPN conv
            saved += cna(C, side * side) + B * C * side * side * a + cna(C, side * side)
        saved += B * 4 * C * s0 * s0 * a + cna(C, s0 * s0)                     # fuse
        final_side = s0
    else:
        stages = max(1, round(math.log2(cfg.patch_size)))
        saved = B * S * D * a + ln_stats + B * D * g * g * a                   # LN, map
        for i in range(stages):
            side = g * 2 ** i
            saved += cna(C, side * side) + (B * C * side * side * a if i else 0)
        final_side = g * 2 ** stages
    saved += B * C * a + B * C * final_side ** 2 * a                           # dropout mask, cls in
    heads = 1
    if head.aux_head:
        heads = 2
        if head.decoder == "pup":
            saved += B * D * g * g * a                                         # the aux map copy
        saved += cna(A, g * g) + B * A * a + B * A * g * g * a
    loss = heads * B * K * HW * 4 + B * HW * 8
    # Largest tensors alive but not kept (measured with the CPU tensor probe): at the end of the
    # forward every head's logits (model dtype), the fp32 copy the last loss upcasts in half
    # precision, and one logit-sized working copy inside cross-entropy; PUP, mid-forward, its
    # full-resolution upsampled map (alive beside the dropout output it is turned into).
    tail = B * K * HW * (heads * a + 4 + (4 if a == 2 else 0))
    mid = B * C * final_side ** 2 * a if head.decoder == "pup" else 0
    transient = max(tail, mid)
    return {"decoder_saved": int(saved), "seg_loss_saved": int(loss),
            "decoder_backward_transient": int(transient)}


def activation_breakdown(cfg: BeitConfig, task: str, micro_batch: int, act_ckpt: bool = False,
                         precision: str = "fp16", attention: str = "sdpa",
                         num_masked: Optional[int] = None,
                         head: Optional[SegHeadConfig] = None) -> dict:
    """Activation bytes at the backward peak, by part (see the module docstring for what is
    counted). ``cfg`` must be resolved for ``task`` (rel_pos_bias not 'auto'). Task "segment":
    the backbone without a classifier plus ``decoder_activation_bytes`` (``head``, default
    ``SEG_DEFAULT_HEAD``); its backward transient is the larger of the decoder's and a block's,
    which come at different times."""
    block_full = block_saved_bytes(cfg, micro_batch, precision, attention)
    B, D, M, H = micro_batch, cfg.embed_dim, cfg.mlp_dim, cfg.num_heads
    a = 2 if precision in ("fp16", "bf16") else 4
    r = RESIDUAL_STREAM_BYTES                  # float32 stream, whatever the precision
    S = cfg.num_patches + 1
    S_pad = -(-S // 8) * 8                     # the mem-efficient kernel pads the bias rows to 8
    bias_table = H * S * S_pad * a if cfg.rel_pos_bias != "none" else 0

    # The memory-efficient kernel keeps the bias it was given; the math path only adds it.
    if attention == "math":
        bias_table = 0
    out: dict[str, int] = {}
    if act_ckpt:
        # The first block's input is the embedding output (model dtype), the others float32.
        out["blocks_saved"] = B * S * D * (a + r * (cfg.depth - 1))
        out["block_recompute"] = block_full
        out["rel_pos_bias"] = bias_table       # the shared table, or the recomputed block's
    else:
        out["blocks_saved"] = cfg.depth * block_full
        out["rel_pos_bias"] = bias_table * (cfg.depth if cfg.rel_pos_bias == "layer" else 1)
    img = cfg.in_chans * cfg.img_size ** 2
    mask_bytes = B * cfg.num_patches if task == "mim" else 0
    out["embed_and_inputs"] = B * img * a + mask_bytes          # conv input + bool mask
    # Head: the task upcasts logits to fp32 and cross-entropy saves an fp32 log-softmax; at the
    # start of backward its output gradient and input gradient (fp32) and, in half precision,
    # the downcast gradient exist together.
    logit_transient = 8 + (2 if a == 2 else 0)
    if task == "mim":
        masked = num_masked if num_masked is not None else round(cfg.num_patches * MASK_FRACTION)
        rows, width = B * masked, cfg.vocab_size
    elif task == "segment":
        rows, width = 0, 0
    else:
        rows, width = B, cfg.num_classes
    # norm input/output and its fp32 mean/rstd per row, the fp32 log-softmax, int64 targets;
    # MIM: the gather's input (the whole last-block output) and its [B, N] int64 index.
    gather = B * S * D * a + B * cfg.num_patches * 8 if task == "mim" else 0
    out["head_saved"] = rows * (2 * D * a + 8) + rows * width * 4 + rows * 8 + gather
    # Backward working set: one block's residual-stream gradient (float32, r bytes), the
    # gradient of one branch input and of the MLP hidden (model dtype), the attention transient
    # (bias gradient B*H*S*S of the efficient kernel, or the probabilities' gradient on the math
    # path), and the head's logit gradients.
    if attention == "math":
        attn_grad = B * H * S * S * 4          # fp32 probabilities' gradient (half is upcast)
    else:
        attn_grad = B * H * S * S_pad * a if cfg.rel_pos_bias != "none" else 0
    out["backward_transient"] = (B * S * (r * D + a * D + 2 * M * a) + attn_grad
                                 + rows * width * logit_transient)
    if task == "segment":
        dec = decoder_activation_bytes(cfg, head or SEG_DEFAULT_HEAD, B, precision)
        out["decoder_saved"], out["seg_loss_saved"] = dec["decoder_saved"], dec["seg_loss_saved"]
        out["backward_transient"] = max(out["backward_transient"], dec["decoder_backward_transient"])
    return out


def _check_choices(zero=0, gpus=1, precision="fp16", offload=None):
    if zero not in (0, 1, 2, 3):
        raise ValueError(f"zero={zero!r}: ZeRO stage must be 0, 1, 2 or 3")
    if not isinstance(gpus, int) or gpus < 1:
        raise ValueError(f"gpus={gpus!r} must be a positive integer (total data-parallel ranks)")
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: expected one of {PRECISIONS}")
    if offload not in OFFLOADS:
        raise ValueError(f"offload={offload!r}: expected None, 'optimizer' or 'param'")
    if offload is not None and zero == 0:
        raise ValueError("CPU offload needs ZeRO stage 1, 2 or 3 (DeepSpeed offloads the "
                         "partitioned optimizer); use --zero 2 --offload optimizer")
    if offload == "param" and zero != 3:
        raise ValueError("parameter offload exists only in ZeRO-3; use --zero 3 --offload param, "
                         "or --offload optimizer with ZeRO 1/2")


def estimate(model: Union[str, BeitConfig], zero: int, gpus: int, micro_batch: int,
             act_ckpt: bool = False, precision: str = "fp16", offload: Optional[str] = None,
             img_size: Optional[int] = None, task: str = "mim", *,
             attention: str = "sdpa", gpus_per_node: Optional[int] = None,
             tokenizer: Optional[TokenizerSpec] = DALLE_TOKENIZER,
             num_masked: Optional[int] = None,
             head: Optional[SegHeadConfig] = None,
             reduce_bucket_size: int = DEFAULT_REDUCE_BUCKET, overlap_comm: bool = True,
             prefetch_bucket_size: int = DEFAULT_PREFETCH_BUCKET,
             persistence_threshold: int = DEFAULT_PERSISTENCE_THRESHOLD,
             zero_init: bool = True, fixed_overhead_bytes: int = GiB,
             fragmentation: float = 0.10, host_buffer_factor: float = 1.5) -> MemoryEstimate:
    """Per-rank memory of training ``model`` with ZeRO ``zero`` on ``gpus`` data-parallel ranks.

    ``model``: zoo name or BeitConfig. ``tokenizer=None`` for MIM from precomputed targets.
    ``gpus_per_node`` (default ``min(gpus, 8)``) only affects the host-memory peak per node.
    ``head``: the decoder of task "segment" (default ``SEG_DEFAULT_HEAD``: UperNet, 150 classes).
    """
    _check_choices(zero, gpus, precision, offload)
    if micro_batch < 0:
        raise ValueError(f"micro_batch={micro_batch} must be >= 0")
    cfg = _as_config(model, task, img_size)
    head = (head or SEG_DEFAULT_HEAD) if task == "segment" else None
    pc = _count(cfg, task, persistence_threshold, head)
    P, L = pc.total, pc.largest_layer
    a = 2 if precision in ("fp16", "bf16") else 4

    ms = model_state_bytes(P, L, zero, gpus, precision, offload)
    acts = activation_breakdown(cfg, task, micro_batch, act_ckpt, precision, attention, num_masked,
                                head)
    backbone = sum(acts.values())
    tok_weights = tok_peak = 0
    if task == "mim" and tokenizer is not None:
        tok_weights = tokenizer.params() * a
        tok_peak = tokenizer.forward_peak_bytes(micro_batch, a)
    activations = max(backbone, tok_peak)

    if zero == 0:
        buffers = min(P, reduce_bucket_size) * a
    elif zero in (1, 2):
        buffers = reduce_bucket_size * a * (2 if overlap_comm else 1)
    else:
        # persistent small params are whole on every rank (param + grad), minus the partition
        # already counted for them
        buffers = (reduce_bucket_size + prefetch_bucket_size) * a + 2 * a * pc.small_params

    if zero == 0:
        # Without ZeRO the engine frees the gradients every step (set_to_none) and backward
        # creates them as it frees the activations, block by block; both grow or shrink linearly,
        # so the peak is at one end: the forward activations, or every gradient plus the
        # flattened all-reduce copy.  (Measured on CPU with the tensor probe: the sum of the
        # two over-predicts ZeRO-0 by 25-35 %.)
        working = max(activations, ms["grads"] + buffers)
    else:
        # ZeRO 1-3 keep their gradient partitions and bucket buffers allocated across steps.
        working = ms["grads"] + activations + buffers
    allocated = ms["params"] + ms["optimizer"] + tok_weights + working
    overhead = fixed_overhead_bytes + int(fragmentation * allocated)
    total = int(allocated + overhead)

    gpn = gpus_per_node or min(gpus, 8)
    # Without zero.Init every rank first builds the whole model in fp32 on the host; with it
    # (ZeRO-3) only the layer being built, and nothing extra when it goes straight to offload.
    if zero == 3 and zero_init:
        init_copy = 0 if offload else 4 * L * gpn
    else:
        init_copy = 4 * P * gpn
    host_peak = int(host_buffer_factor * max(init_copy, ms["host"] * gpn))

    breakdown = {f"act_{k}": int(v) for k, v in acts.items()}
    breakdown["act_backbone_total"] = int(backbone)
    breakdown["tokenizer_forward_peak"] = int(tok_peak)
    breakdown["activation_peak_from"] = "tokenizer" if tok_peak > backbone else "backbone"
    breakdown["param_components"] = dict(pc.components)
    return MemoryEstimate(
        model=cfg.name, task=task, zero=zero, gpus=gpus, micro_batch=micro_batch,
        act_ckpt=act_ckpt, precision=precision, offload=offload, img_size=cfg.img_size,
        attention=attention, num_params=P, largest_layer_params=L,
        params_bytes=ms["params"], grads_bytes=ms["grads"], optimizer_bytes=ms["optimizer"],
        activations_bytes=int(activations), tokenizer_bytes=int(tok_weights),
        buffers_bytes=int(buffers), overhead_bytes=int(overhead), total_bytes=total,
        host_bytes=ms["host"], host_peak_bytes_per_node=host_peak, breakdown=breakdown)


def max_micro_batch(memory_bytes: int, model: Union[str, BeitConfig], zero: int, gpus: int,
                    act_ckpt: bool = False, limit: int = 1 << 16, **kw) -> int:
    """Largest micro batch whose estimate fits in ``memory_bytes`` (0 if not even 1 fits)."""
    fits = lambda b: estimate(model, zero, gpus, b, act_ckpt, **kw).total_bytes <= memory_bytes  # noqa
    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:                         # invariant: fits(lo), not fits(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def fit_table(gpus: int = 16, models: Optional[list] = None, gpu_names=FIT_GPUS, **kw) -> str:
    """Markdown table: largest micro batch per (model, ZeRO stage, act ckpt) and GPU."""
    models = models or list_models()
    shown = {k: kw[k] for k in ("task", "precision", "offload", "img_size", "attention") if k in kw}
    opts = ", ".join(f"{k}={v}" for k, v in shown.items() if v is not None)
    if kw.get("task", "mim") == "mim" and "tokenizer" in kw and kw["tokenizer"] is None:
        opts += ", no tokenizer on GPU"
    head = ["model", "params", "ZeRO", "act ckpt"] + list(gpu_names)
    rows = [f"Largest micro batch per GPU ({gpus} GPUs{', ' + opts if opts else ''}; "
            "'-' = not even 1 fits)", "",
            "| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for name in models:
        n = count_params(name, kw.get("task", "mim"), kw.get("img_size"), head=kw.get("head")).total
        for zero in (0, 1, 2, 3):
            for ckpt in (False, True):
                cells = []
                for g in gpu_names:
                    b = max_micro_batch(GPUS[g].memory_bytes, name, zero, gpus, ckpt, **kw)
                    cells.append(str(b) if b else "-")
                rows.append(f"| {name} | {n / 1e6:.0f}M | {zero} | {'yes' if ckpt else 'no'} | "
                            + " | ".join(cells) + " |")
    return "\n".join(rows)


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m beit_scale.scaling.memory",
        description="Analytic per-GPU memory of BEiT training under DeepSpeed ZeRO.")
    p.add_argument("--model", default="beit_base_patch16_224", help="zoo name")
    p.add_argument("--task", default="mim", choices=("mim", "classify", "seg", "segment"),
                   help="seg = segment: backbone + decoder (--decoder, --num-classes)")
    p.add_argument("--decoder", default="upernet", choices=("upernet", "pup"))
    p.add_argument("--num-classes", type=int, default=150, help="segmentation classes (ADE20K: 150)")
    p.add_argument("--decoder-channels", type=int, default=512)
    p.add_argument("--no-aux-head", action="store_true", help="segmentation without the FCN aux head")
    p.add_argument("--zero", type=int, default=2, choices=(0, 1, 2, 3))
    p.add_argument("--gpus", type=int, default=16, help="total data-parallel ranks")
    p.add_argument("--gpus-per-node", type=int, default=None)
    p.add_argument("--micro-batch", type=int, default=64)
    p.add_argument("--act-ckpt", action="store_true", help="checkpoint every block")
    p.add_argument("--precision", default="fp16", choices=PRECISIONS)
    p.add_argument("--offload", default=None, choices=("none", "optimizer", "param"))
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--attention", default="sdpa", choices=ATTENTIONS)
    p.add_argument("--no-tokenizer", action="store_true", help="MIM targets precomputed")
    p.add_argument("--reduce-bucket-size", type=float, default=DEFAULT_REDUCE_BUCKET)
    p.add_argument("--no-overlap-comm", action="store_true")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--fit", action="store_true",
                   help="markdown table of the largest micro batch per model/stage/GPU")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    task = "segment" if args.task == "seg" else args.task
    head = SegHeadConfig(num_classes=args.num_classes, decoder=args.decoder,
                         channels=args.decoder_channels, aux_head=not args.no_aux_head)
    kw = dict(precision=args.precision, img_size=args.img_size, task=task,
              attention=args.attention, gpus_per_node=args.gpus_per_node,
              tokenizer=None if args.no_tokenizer else DALLE_TOKENIZER,
              reduce_bucket_size=int(args.reduce_bucket_size),
              overlap_comm=not args.no_overlap_comm)
    if task == "segment":
        kw["head"] = head
    offload = None if args.offload in (None, "none") else args.offload
    try:
        if args.fit:
            t0 = time.perf_counter()
            print(fit_table(args.gpus, offload=offload, **{k: v for k, v in kw.items()
                                                            if k != "gpus_per_node"}))
            print(f"\n(computed in {time.perf_counter() - t0:.2f} s)", file=sys.stderr)
            return 0
        est = estimate(args.model, args.zero, args.gpus, args.micro_batch, args.act_ckpt,
                       offload=offload, **kw)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(est.to_dict(), indent=2) if args.json else est.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
