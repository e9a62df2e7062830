"""Plain-PyTorch BEiT: backbone, image classifier and masked-image-modeling (MIM) model.

Architecture (BEiT paper + the official code's choices that matter for reproducing it):
pre-LN transformer blocks; q and v biases but no k bias (a k bias would cancel in the softmax
anyway); relative position bias, either one table per block or one table shared by all blocks
(pretraining); layer scale; stochastic depth; truncated-normal init followed by the
1/sqrt(2 * layer_id) rescale of each block's output projections, which keeps the residual stream
from growing with depth at init.

Parameter names follow timm where the concept is the same (``blocks.3.attn.qkv.weight``,
``fc_norm``, ``head`` ...), so conversion (convert.py) only renames the relative-position tables.
This module imports nothing distributed; parallelism and activation checkpointing are applied
from outside (train/engine.py wraps ``model.blocks``).
"""
from __future__ import annotations

import functools
import math
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import BeitConfig, resolve_config

__all__ = [
    "BeitBackbone", "BeitClassifier", "BeitForMIM", "Block", "Attention", "RelativePositionBias",
    "relative_position_index", "resize_rel_pos_bias_table", "resize_abs_pos_embed", "drop_path",
    "MIM_TARGETS",
]

LN_EPS = 1e-6  # BEiT / timm use 1e-6, not PyTorch's 1e-5: matters for exact timm parity
# Parameter dtypes for which a Block carries the residual stream in float32 (see Block).
HALF_DTYPES = (torch.float16, torch.bfloat16)
MIM_TARGETS = ("tokens", "pixels")  # what BeitForMIM's head predicts at masked patches


def trunc_normal_(t: torch.Tensor, std: float, bound: float = 2.0) -> torch.Tensor:
    """Normal(0, std) truncated at +-bound*std, by inverse-CDF sampling, in place.

    The trunc_normal_ of recent PyTorch releases uses rejection sampling, ~10x slower on CPU
    (seconds for a 20M-parameter model); this is the classic one-pass method, meta-safe too.
    """
    with torch.no_grad():
        cdf = 0.5 * (1.0 + math.erf(bound / math.sqrt(2.0)))  # Phi(bound)
        t.uniform_(1.0 - 2.0 * cdf, 2.0 * cdf - 1.0)  # = 2*Phi(x)-1 for x in [-bound, bound]
        t.erfinv_()
        t.mul_(std * math.sqrt(2.0))
        return t.clamp_(min=-bound * std, max=bound * std)


# ----------------------------------------------------------------------------------------------
# relative position bias
# ----------------------------------------------------------------------------------------------
def num_relative_distances(grid: Sequence[int]) -> int:
    gh, gw = grid
    # every (dy, dx) offset between two patches, plus 3 entries for cls->patch, patch->cls, cls->cls
    return (2 * gh - 1) * (2 * gw - 1) + 3


def relative_position_index(grid: Sequence[int], device=None) -> torch.Tensor:
    """Long tensor [N+1, N+1]: which table row biases attention from token i (query) to token j.

    Token 0 is cls. For two patches at (yi, xi), (yj, xj) the row is
    (yi - yj + gh - 1) * (2 gw - 1) + (xi - xj + gw - 1); the last three rows are
    cls->patch, patch->cls and cls->cls. This layout is the one used by the official BEiT code and
    timm, so tables are interchangeable.
    """
    gh, gw = grid
    ys = torch.arange(gh, device=device).repeat_interleave(gw)  # row-major patch order
    xs = torch.arange(gw, device=device).repeat(gh)
    dy = ys[:, None] - ys[None, :] + (gh - 1)
    dx = xs[:, None] - xs[None, :] + (gw - 1)
    n = gh * gw
    num = num_relative_distances(grid)
    index = torch.empty((n + 1, n + 1), dtype=torch.long, device=device)
    index[1:, 1:] = dy * (2 * gw - 1) + dx
    index[0, :] = num - 3
    index[:, 0] = num - 2
    index[0, 0] = num - 1
    return index


@functools.lru_cache(maxsize=16)
def _cpu_index(grid: tuple[int, int]) -> torch.Tensor:
    # Computed once per grid on the CPU and copied into each module's buffer: building the index
    # op by op on the meta device costs ~5 ms a block (slow zoo listing for the 40-block model).
    with torch.device("cpu"):
        return relative_position_index(grid, device="cpu")


class RelativePositionBias(nn.Module):
    """A learned table [num_relative_distances, heads] expanded to a bias [heads, N+1, N+1]."""

    def __init__(self, grid: Sequence[int], num_heads: int):
        super().__init__()
        self.grid = tuple(grid)
        self.num_heads = num_heads
        self.table = nn.Parameter(torch.empty(num_relative_distances(self.grid), num_heads))
        # Derived from the grid, so not saved: checkpoints stay valid if the layout code changes.
        n1 = self.grid[0] * self.grid[1] + 1
        self.register_buffer("index", torch.empty((n1, n1), dtype=torch.long), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.table)
        if not self.index.is_meta:  # on meta there is nothing to fill (and nothing to allocate)
            with torch.no_grad():
                self.index.copy_(_cpu_index(self.grid))

    def forward(self) -> torch.Tensor:
        n1 = self.index.shape[0]
        # index_select along dim 1 of the transposed table yields [heads, (N+1)^2] contiguous in
        # one copy, and its backward (index_add) is ~5x faster on CPU than that of advanced
        # indexing + permute (25 ms -> 5 ms per block and step for Base at 224).
        return torch.index_select(self.table.t(), 1, self.index.view(-1)).view(self.num_heads, n1, n1)


def resize_rel_pos_bias_table(table: torch.Tensor, old_grid: Sequence[int],
                              new_grid: Sequence[int]) -> torch.Tensor:
    """Resize a relative-position table [(2*gh-1)*(2*gw-1)+3, heads] to another patch grid.

    The offset part is treated as a [heads, 2*gh-1, 2*gw-1] image and bicubically interpolated;
    the three cls entries are copied. Same grid -> the table itself (exact identity).
    """
    old_grid, new_grid = tuple(old_grid), tuple(new_grid)
    expected = num_relative_distances(old_grid)
    if table.ndim != 2 or table.shape[0] != expected:
        raise ValueError(f"rel-pos table of shape {tuple(table.shape)} does not match grid {old_grid}: "
                         f"expected [{expected}, heads]")
    if old_grid == new_grid:
        return table
    heads = table.shape[1]
    (oh, ow), (nh, nw) = old_grid, new_grid
    offsets, cls_rows = table[:-3], table[-3:]
    img = offsets.t().reshape(1, heads, 2 * oh - 1, 2 * ow - 1).float()
    img = F.interpolate(img, size=(2 * nh - 1, 2 * nw - 1), mode="bicubic", align_corners=False)
    offsets = img.reshape(heads, -1).t().to(table.dtype)
    return torch.cat([offsets, cls_rows], dim=0)


def resize_abs_pos_embed(pos_embed: torch.Tensor, old_grid: Sequence[int],
                         new_grid: Sequence[int]) -> torch.Tensor:
    """Bicubically resize an absolute position embedding [1, 1+N, D]; the cls entry is copied."""
    old_grid, new_grid = tuple(old_grid), tuple(new_grid)
    if old_grid == new_grid:
        return pos_embed
    cls, grid = pos_embed[:, :1], pos_embed[:, 1:]
    dim = grid.shape[-1]
    img = grid.reshape(1, *old_grid, dim).permute(0, 3, 1, 2).float()
    img = F.interpolate(img, size=new_grid, mode="bicubic", align_corners=False)
    grid = img.permute(0, 2, 3, 1).reshape(1, -1, dim).to(pos_embed.dtype)
    return torch.cat([cls, grid], dim=1)


# ----------------------------------------------------------------------------------------------
# blocks
# ----------------------------------------------------------------------------------------------
def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop the whole residual branch per sample, rescale the survivors."""
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep).div_(keep)
    return x * mask


class DropPath(nn.Module):
    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x):
        return drop_path(x, self.p, self.training)

    def extra_repr(self):
        return f"p={self.p:.3f}"


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, grid: Optional[Sequence[int]] = None):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        # BEiT has biases for q and v only; k gets a constant zero bias in forward.
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.rel_pos = RelativePositionBias(grid, num_heads) if grid is not None else None
        self.proj = nn.Linear(dim, dim)
        # keep_probs=True (BeitBackbone.last_attention, for attention maps): softmax computed
        # explicitly, since SDPA never materializes the probabilities, and kept in `probs`.
        self.keep_probs = False
        self.probs: Optional[torch.Tensor] = None

    def forward(self, x: torch.Tensor, rel_pos_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, N, C = x.shape
        bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias)
        q, k, v = qkv.view(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        mask = rel_pos_bias
        if self.rel_pos is not None:
            mask = self.rel_pos() if mask is None else mask + self.rel_pos()
        if mask is not None:
            mask = mask.to(q.dtype)  # under autocast q is half precision, SDPA wants equal dtypes
        if self.keep_probs:
            scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
            self.probs = (scores if mask is None else scores + mask).softmax(dim=-1)
            x = self.probs @ v
        else:
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-LN transformer block with optional layer scale and stochastic depth."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, drop_path_p: float = 0.0,
                 layer_scale_init: Optional[float] = None, grid: Optional[Sequence[int]] = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, num_heads, grid)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, mlp_dim)
        self.drop_path = DropPath(drop_path_p)
        self.layer_scale_init = layer_scale_init
        if layer_scale_init:
            self.gamma_1 = nn.Parameter(torch.full((dim,), float(layer_scale_init)))
            self.gamma_2 = nn.Parameter(torch.full((dim,), float(layer_scale_init)))
        else:
            self.gamma_1 = self.gamma_2 = None

    def forward(self, x: torch.Tensor, rel_pos_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.norm1.weight.dtype in HALF_DTYPES:
            return self._forward_fp32_residual(x, rel_pos_bias)
        return self._forward_same_dtype(x, rel_pos_bias)

    def _forward_same_dtype(self, x: torch.Tensor, rel_pos_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Everything in the parameters' dtype: the fp32 block (and, for a half model, the block
        as it was before the float32 residual stream; benchmarks/bench_half_residual.py compares)."""
        a = self.attn(self.norm1(x), rel_pos_bias=rel_pos_bias)
        if self.gamma_1 is not None:
            a = self.gamma_1 * a
        x = x + self.drop_path(a)
        m = self.mlp(self.norm2(x))
        if self.gamma_2 is not None:
            m = self.gamma_2 * m
        return x + self.drop_path(m)

    def _forward_fp32_residual(self, x: torch.Tensor, rel_pos_bias: Optional[torch.Tensor]) -> torch.Tensor:
        """The block of a model cast to fp16/bf16 (DeepSpeed's fp16/bf16 modes cast everything).

        The residual stream stays float32 and ``gamma * f(x)`` is computed in float32: with layer
        scale 1e-5 (Large and up) the branch adds ~1e-5 relative to x, below half precision's
        resolution (fp16 ulp at 1.0 is ~1e-3, bf16's ~8e-3), and 1e-5 itself is subnormal in fp16,
        so an all-half block returns its input (almost) unchanged. The branches themselves (norm,
        attention, MLP) run in the parameters' dtype as before. ``gamma.float() * a`` with ``a``
        half is one mixed-dtype multiply computed in float32 that saves ``a`` in half for backward,
        so the saved activations are as before (with activation checkpointing the saved block
        inputs are float32). Output: float32; forward_features casts back after the last block.
        Same idea as Megatron's fp32 residual connection, and what torch autocast (the BEiT
        reference's AMP) does implicitly with fp32 weights. Measured: docs/gpu.md.
        """
        dt = self.norm1.weight.dtype
        x = x.float()
        a = self.attn(self.norm1(x.to(dt)), rel_pos_bias=rel_pos_bias)
        a = self.gamma_1.float() * a if self.gamma_1 is not None else a.float()
        x = x + self.drop_path(a)
        m = self.mlp(self.norm2(x.to(dt)))
        m = self.gamma_2.float() * m if self.gamma_2 is not None else m.float()
        return x + self.drop_path(m)


# ----------------------------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------------------------
class BeitBackbone(nn.Module):
    """Patch embedding + cls token + transformer blocks. Subclasses add the task head.

    Subclassing (rather than wrapping) keeps the backbone's state-dict keys identical across the
    MIM model and the classifier, so a pretraining checkpoint loads into a classifier directly.
    """

    task = "backbone"

    def __init__(self, cfg: BeitConfig):
        super().__init__()
        if cfg.rel_pos_bias == "auto":
            raise ValueError("rel_pos_bias='auto' must be resolved first: use build_model() or "
                             "zoo.resolve_config(cfg, task)")
        self.cfg = cfg
        D, grid = cfg.embed_dim, cfg.grid_size
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(cfg.in_chans, D, kernel_size=cfg.patch_size,
                                          stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.empty(1, 1, D))
        self.pos_embed = nn.Parameter(torch.empty(1, cfg.num_patches + 1, D)) if cfg.abs_pos_emb else None
        self.shared_rel_pos = (RelativePositionBias(grid, cfg.num_heads)
                               if cfg.rel_pos_bias == "shared" else None)
        block_grid = grid if cfg.rel_pos_bias == "layer" else None
        # Linear stochastic-depth schedule from 0 (first block) to drop_path_rate (last). Pure
        # Python so that building under the meta device never needs a real tensor value.
        n = cfg.depth
        dpr = [cfg.drop_path_rate * i / (n - 1) if n > 1 else 0.0 for i in range(n)]
        self.blocks = nn.ModuleList([
            Block(D, cfg.num_heads, cfg.mlp_dim, dpr[i], cfg.layer_scale_init, block_grid)
            for i in range(n)])

    # -- init --------------------------------------------------------------------------------
    def init_weights(self) -> None:
        """(Re)initialize every parameter and derived buffer, BEiT style.

        Called by the constructor; call it again after ``model.to_empty(device=...)`` to
        materialize a model that was built on the meta device.
        """
        std = self.cfg.init_std
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Conv2d):
                m.reset_parameters()  # the reference code keeps PyTorch's default for the stem
            elif isinstance(m, RelativePositionBias):
                m.reset_parameters()
            elif isinstance(m, Attention):
                nn.init.zeros_(m.q_bias)
                nn.init.zeros_(m.v_bias)
            elif isinstance(m, Block) and m.gamma_1 is not None:
                nn.init.constant_(m.gamma_1, m.layer_scale_init)
                nn.init.constant_(m.gamma_2, m.layer_scale_init)
        for p in (self.cls_token, self.pos_embed, getattr(self, "mask_token", None)):
            if p is not None:
                trunc_normal_(p, std)
        # Rescale the two projections that write into the residual stream by 1/sqrt(2*layer_id).
        with torch.no_grad():
            for layer_id, blk in enumerate(self.blocks, start=1):
                scale = math.sqrt(2.0 * layer_id)
                blk.attn.proj.weight.div_(scale)
                blk.mlp.fc2.weight.div_(scale)
        self._init_head()

    def _init_head(self) -> None:
        pass

    # -- forward -----------------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor,
                         bool_masked_pos: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Images [B, C, H, W] -> tokens [B, 1+N, D] after the last block (no final norm).

        Returned in the parameters' dtype; in a half-precision model the residual stream between
        the blocks is float32 (see ``Block._forward_fp32_residual``).
        """
        x, rel = self._embed(x, bool_masked_pos)
        for blk in self.blocks:
            x = blk(x, rel_pos_bias=rel)  # float32 between blocks when the model is half
        # Back to the parameters' dtype for the heads (a no-op in float32, and under autocast,
        # whose fp32 weights keep the stream in float32 by type promotion anyway).
        return x.to(self.cls_token.dtype)

    def forward_intermediates(self, x: torch.Tensor, indices: Sequence[int]) -> list[torch.Tensor]:
        """Images -> tokens [B, 1+N, D] after each block in ``indices`` (0-based, repeats
        allowed), in the parameters' dtype; blocks after the last one asked for are not run.
        Dense-prediction decoders (models/decoders.py) read several depths of the backbone."""
        if not indices or min(indices) < 0 or max(indices) >= len(self.blocks):
            raise ValueError(f"block indices {list(indices)} must lie in [0, {len(self.blocks)})")
        x, rel = self._embed(x)
        outs = {}
        for i, blk in enumerate(self.blocks[: max(indices) + 1]):
            x = blk(x, rel_pos_bias=rel)
            if i in indices:
                outs[i] = x.to(self.cls_token.dtype)
        return [outs[i] for i in indices]

    @torch.no_grad()
    def last_attention(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> the last block's attention probabilities [B, heads, 1+N, 1+N] (float32 rows
        that sum to 1; query/key 0 is the cls token, then the patches in row-major order)."""
        attn = self.blocks[-1].attn
        attn.keep_probs = True
        try:
            self.forward_features(x)
            return attn.probs.float()
        finally:
            attn.keep_probs, attn.probs = False, None

    def _embed(self, x: torch.Tensor, bool_masked_pos: Optional[torch.Tensor] = None):
        """Patch embedding, [MASK] substitution, cls token, absolute position: the tokens the
        first block sees, and the shared relative-position bias (or None)."""
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)  # [B, N, D]
        if bool_masked_pos is not None:
            if getattr(self, "mask_token", None) is None:
                raise ValueError(f"{type(self).__name__} has no [MASK] embedding; masking needs "
                                 "BeitForMIM (build_model(..., task='mim'))")
            m = bool_masked_pos.reshape(x.shape[0], -1, 1)
            x = torch.where(m, self.mask_token.to(x.dtype), x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x), dim=1)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        rel = self.shared_rel_pos() if self.shared_rel_pos is not None else None
        return x, rel

    # -- optimizer helpers -------------------------------------------------------------------
    def no_weight_decay(self) -> set[str]:
        """Parameter names to exclude from weight decay, besides the 1-D ones."""
        names = set()
        for n, _ in self.named_parameters():
            if n in ("cls_token", "pos_embed", "mask_token") or n.endswith("rel_pos.table"):
                names.add(n)
        return names

    _EMBEDDING_PREFIXES = ("patch_embed.", "cls_token", "pos_embed", "mask_token", "shared_rel_pos.")

    def layer_id(self, param_name: str) -> int:
        """0 for embeddings, i+1 for block i, depth+1 for the norms and heads after the blocks."""
        name = param_name
        for prefix in ("module.", "_orig_mod."):  # DDP / DeepSpeed / torch.compile wrappers
            while name.startswith(prefix):
                name = name[len(prefix):]
        if name.startswith(self._EMBEDDING_PREFIXES):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return self.cfg.depth + 1

    @property
    def num_layers(self) -> int:
        """Number of distinct layer ids (depth + 2), for building layer-decay tables."""
        return self.cfg.depth + 2


class BeitClassifier(BeitBackbone):
    """BEiT for image classification: mean of patch tokens -> LayerNorm (fc_norm) -> linear."""

    task = "classify"

    def __init__(self, cfg: BeitConfig, head_init_scale: float = 0.001):
        super().__init__(resolve_config(cfg, "classify"))
        D = cfg.embed_dim
        self.head_init_scale = head_init_scale
        self.fc_norm = nn.LayerNorm(D, eps=LN_EPS)
        self.head = nn.Linear(D, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self.init_weights()

    def _init_head(self) -> None:
        # A near-zero head starts fine-tuning from near-uniform predictions (BEiT's init_scale).
        if isinstance(self.head, nn.Linear):
            with torch.no_grad():
                self.head.weight.mul_(self.head_init_scale)
                self.head.bias.mul_(self.head_init_scale)

    def forward_head(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc_norm(tokens[:, 1:].mean(dim=1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class BeitForMIM(BeitBackbone):
    """BEiT masked image modeling: masked patches -> [MASK]; predict visual tokens there.

    ``forward(x, bool_masked_pos)`` returns logits [num_masked_total, vocab_size] for the masked
    positions only, in row-major order of ``bool_masked_pos`` [B, N] (also accepts [B, gh, gw]),
    i.e. aligned with ``tokens[bool_masked_pos]``.

    ``target="pixels"`` (the paper's pixel-regression ablation): the same linear head, named
    ``lm_head`` too so that checkpoint tools treat both alike, with patch_size^2 * in_chans
    outputs, the masked patches' pixels (loss: models/mim_pixels.py).
    """

    task = "mim"

    def __init__(self, cfg: BeitConfig, target: str = "tokens"):
        super().__init__(resolve_config(cfg, "mim"))
        if target not in MIM_TARGETS:
            raise ValueError(f"unknown MIM target {target!r}; choose one of {MIM_TARGETS}")
        D = cfg.embed_dim
        self.target = target
        self.mask_token = nn.Parameter(torch.empty(1, 1, D))
        self.norm = nn.LayerNorm(D, eps=LN_EPS)
        out = cfg.vocab_size if target == "tokens" else cfg.patch_size ** 2 * cfg.in_chans
        self.lm_head = nn.Linear(D, out)
        self.init_weights()

    def forward(self, x: torch.Tensor, bool_masked_pos: torch.Tensor,
                masked_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits (or pixels) of the masked patches, [num_masked_total, vocab (or patch^2*C)],
        row-major over (image, patch).

        `masked_index` [B, K] (each row's masked positions, ascending), when every image has the
        same K masked patches, selects them with a gather of known size; boolean indexing has to
        read the count back from the device first (a host sync every step)."""
        B = x.shape[0]
        mask = bool_masked_pos.reshape(B, -1).bool()
        if mask.shape[1] != self.cfg.num_patches:
            raise ValueError(f"bool_masked_pos has {mask.shape[1]} positions per image, the model "
                             f"has {self.cfg.num_patches} patches ({self.cfg.grid_size} grid)")
        tokens = self.forward_features(x, mask)[:, 1:]
        # Project only the masked rows: the vocab head is the largest matmul of the model's output
        # side, and ~60% of its rows would be thrown away by the loss anyway.
        if masked_index is not None:
            D = tokens.shape[-1]
            rows = tokens.gather(1, masked_index[..., None].expand(-1, -1, D)).reshape(-1, D)
        else:
            rows = tokens[mask]
        return self.lm_head(self.norm(rows))
