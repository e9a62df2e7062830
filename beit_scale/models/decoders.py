"""Semantic segmentation on the BEiT backbone: SETR-PUP and UperNet decoders, plain PyTorch.

* ``pup`` (the BEiT paper's task layer, after SETR-PUP): the last block's patch tokens as a
  [D, H/p, W/p] map, then log2(p) stages of conv3x3 -> norm -> ReLU -> 2x bilinear upsampling,
  then a 1x1 classifier at full resolution.
* ``upernet`` (what the official ADE20K numbers use): tokens after four evenly spaced blocks
  become a feature pyramid at strides p/4, p/2, p, 2p (two 2x deconvolutions / one / identity /
  2x max pool); a pyramid pooling module (PPM, bins 1, 2, 3, 6) on the coarsest level; a
  top-down FPN; all levels upsampled to the finest, concatenated, fused, classified; the logits
  are upsampled to the input size.
* optional auxiliary FCN head on the third pyramid level (stride p), trained with weight
  ``aux_weight`` as the reference recipe does (0.4), ignored at inference.

Normalisation: GroupNorm where the reference uses (Sync)BatchNorm. GroupNorm has no running
statistics, so a model evaluates identically on any number of ranks, with any per-GPU batch
(ADE20K recipes use 2 images per GPU, where BatchNorm needs cross-rank synchronisation), and
needs nothing from the distributed layer, which models/ must not import.

``BeitForSegmentation`` subclasses ``BeitBackbone`` so its backbone keys equal those of the MIM
and classification models: a pretraining or fine-tuning checkpoint adapted with
``convert.adapt_state_dict_to(cfg, sd, task="classify")`` (which resizes the relative-position
tables to the segmentation grid, the 384-px fine-tuning path) loads into it directly. Decoder
parameters get layer id depth+1 (full learning rate under layer decay), like any head.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .beit import BeitBackbone, LN_EPS
from .config import BeitConfig, resolve_config

__all__ = ["DECODERS", "SegHeadConfig", "BeitForSegmentation", "build_segmenter",
           "evenly_spaced_blocks", "backbone_weights_for", "pixel_cross_entropy",
           "segmentation_loss", "IGNORE_INDEX", "DECODER_PREFIXES"]

DECODERS = ("pup", "upernet")
DECODER_PREFIXES = ("neck.", "decode_head.", "aux_head.")  # state-dict keys that are not the backbone
IGNORE_INDEX = 255  # label value the loss and metrics skip (ADE20K "other" after reduce_zero_label)


@dataclass(frozen=True)
class SegHeadConfig:
    """The decoder side of a segmentation model (the backbone is a ``BeitConfig``)."""

    num_classes: int = 150
    decoder: str = "upernet"
    channels: int = 512          # decoder width (UperNet/FCN: 512 in the reference; PUP: 256)
    aux_head: bool = True        # auxiliary FCN head on the stride-p level (training only)
    aux_weight: float = 0.4
    aux_channels: int = 256
    dropout: float = 0.1         # before each classifier, as the reference heads do
    out_indices: Optional[tuple[int, ...]] = None  # UperNet blocks; None: evenly spaced
    groups: int = 32             # GroupNorm groups (clamped to divide the channel count)

    def __post_init__(self):
        problems = []
        if self.decoder not in DECODERS:
            problems.append(f"decoder={self.decoder!r} must be one of {DECODERS}")
        if self.num_classes < 1:
            problems.append(f"num_classes={self.num_classes} must be >= 1")
        if self.channels < 1 or self.aux_channels < 1 or self.groups < 1:
            problems.append("channels, aux_channels and groups must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout={self.dropout} must be in [0, 1)")
        if self.out_indices is not None and len(self.out_indices) != 4:
            problems.append(f"out_indices={self.out_indices} must name 4 blocks")
        if problems:
            raise ValueError("invalid SegHeadConfig: " + "; ".join(problems))


def evenly_spaced_blocks(depth: int, n: int = 4) -> tuple[int, ...]:
    """Indices of ``n`` blocks ending at the last one: depth 12 -> (2, 5, 8, 11)."""
    return tuple(max(0, (k + 1) * depth // n - 1) for k in range(n))


def norm_groups(channels: int, groups: int) -> int:
    """GroupNorm groups for ``channels``: a divisor of it, at most ``groups``, with at least 2
    channels per group (one channel on a 1x1 pooled map would normalise to nothing)."""
    return math.gcd(channels, max(1, min(groups, channels // 2)))


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(norm_groups(channels, groups), channels)


class ConvNormAct(nn.Sequential):
    """conv (no bias: the norm would cancel it) -> GroupNorm -> ReLU."""

    def __init__(self, cin: int, cout: int, k: int, groups: int):
        super().__init__(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), _norm(cout, groups),
                         nn.ReLU(inplace=True))


def tokens_to_map(tokens: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """[B, 1+N, D] tokens (cls first) -> [B, D, gh, gw] patch feature map."""
    B, _, D = tokens.shape
    return tokens[:, 1:].transpose(1, 2).reshape(B, D, *grid)


class PUPHead(nn.Module):
    """SETR progressive upsampling: [B, D, g, g] -> logits [B, K, g*2^s, g*2^s], s = log2(p)."""

    def __init__(self, dim: int, patch: int, cfg: SegHeadConfig):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)
        stages = max(1, round(math.log2(patch)))
        chans = [dim] + [cfg.channels] * stages
        self.stages = nn.ModuleList(ConvNormAct(chans[i], chans[i + 1], 3, cfg.groups)
                                    for i in range(stages))
        self.dropout = nn.Dropout2d(cfg.dropout)
        self.cls = nn.Conv2d(cfg.channels, cfg.num_classes, 1)

    def forward(self, tokens: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
        x = tokens_to_map(self.norm(tokens), grid)
        for stage in self.stages:
            x = F.interpolate(stage(x), scale_factor=2, mode="bilinear", align_corners=False)
        return self.cls(self.dropout(x))


class MultiLevelNeck(nn.Module):
    """Four [B, D, g, g] maps -> pyramid at 4x, 2x, 1x and 0.5x the patch grid (strides p/4,
    p/2, p, 2p): deconv-GN-GELU-deconv / deconv / identity / max pool, as BEiT's UperNet does."""

    def __init__(self, dim: int, groups: int):
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(dim, eps=LN_EPS) for _ in range(4))
        self.up4 = nn.Sequential(nn.ConvTranspose2d(dim, dim, 2, 2), _norm(dim, groups), nn.GELU(),
                                 nn.ConvTranspose2d(dim, dim, 2, 2))
        self.up2 = nn.ConvTranspose2d(dim, dim, 2, 2)
        self.down2 = nn.MaxPool2d(2, 2, ceil_mode=True)

    def forward(self, feats: Sequence[torch.Tensor], grid: Sequence[int]) -> list[torch.Tensor]:
        maps = [tokens_to_map(n(t), grid) for n, t in zip(self.norms, feats)]
        return [self.up4(maps[0]), self.up2(maps[1]), maps[2], self.down2(maps[3])]


class PPM(nn.Module):
    """Pyramid pooling: average-pool to b x b for each bin b, 1x1 conv, upsample, concatenate
    with the input, fuse with a 3x3 conv."""

    def __init__(self, cin: int, channels: int, groups: int, bins: Sequence[int] = (1, 2, 3, 6)):
        super().__init__()
        self.bins = tuple(bins)
        self.branches = nn.ModuleList(ConvNormAct(cin, channels, 1, groups) for _ in self.bins)
        self.fuse = ConvNormAct(cin + len(self.bins) * channels, channels, 3, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        outs = [x] + [F.interpolate(branch(F.adaptive_avg_pool2d(x, b)), size=size,
                                    mode="bilinear", align_corners=False)
                      for b, branch in zip(self.bins, self.branches)]
        return self.fuse(torch.cat(outs, dim=1))


class UperHead(nn.Module):
    """UperNet: PPM on the coarsest level, top-down FPN, all levels fused at the finest."""

    def __init__(self, dim: int, cfg: SegHeadConfig):
        super().__init__()
        c, g = cfg.channels, cfg.groups
        self.ppm = PPM(dim, c, g)
        self.lateral = nn.ModuleList(ConvNormAct(dim, c, 1, g) for _ in range(3))
        self.fpn = nn.ModuleList(ConvNormAct(c, c, 3, g) for _ in range(3))
        self.fuse = ConvNormAct(4 * c, c, 3, g)
        self.dropout = nn.Dropout2d(cfg.dropout)
        self.cls = nn.Conv2d(c, cfg.num_classes, 1)

    def forward(self, pyramid: Sequence[torch.Tensor]) -> torch.Tensor:
        laterals = [conv(x) for conv, x in zip(self.lateral, pyramid[:3])] + [self.ppm(pyramid[3])]
        for i in range(3, 0, -1):  # top-down: coarse context added into each finer level
            laterals[i - 1] = laterals[i - 1] + F.interpolate(
                laterals[i], size=laterals[i - 1].shape[-2:], mode="bilinear", align_corners=False)
        outs = [conv(x) for conv, x in zip(self.fpn, laterals[:3])] + [laterals[3]]
        size = outs[0].shape[-2:]
        outs = [outs[0]] + [F.interpolate(x, size=size, mode="bilinear", align_corners=False)
                            for x in outs[1:]]
        return self.cls(self.dropout(self.fuse(torch.cat(outs, dim=1))))


class FCNHead(nn.Module):
    """Auxiliary head: conv3x3-GN-ReLU, dropout, 1x1 classifier."""

    def __init__(self, dim: int, cfg: SegHeadConfig):
        super().__init__()
        self.conv = ConvNormAct(dim, cfg.aux_channels, 3, cfg.groups)
        self.dropout = nn.Dropout2d(cfg.dropout)
        self.cls = nn.Conv2d(cfg.aux_channels, cfg.num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cls(self.dropout(self.conv(x)))


class BeitForSegmentation(BeitBackbone):
    """BEiT backbone + decoder. ``forward(x)`` -> logits [B, K, H, W] at the input's size;
    in training mode with an auxiliary head, ``(logits, aux_logits)`` (both at input size);
    ``loss(x, labels)`` -> (total loss, {"loss_main", "loss_aux"}) with ``IGNORE_INDEX`` skipped."""

    task = "segment"

    def __init__(self, cfg: BeitConfig, head: SegHeadConfig):
        # Per-layer rel-pos tables (the fine-tuning layout), whatever pretraining used.
        super().__init__(resolve_config(cfg, "classify"))
        self.head_cfg = head
        D, p = cfg.embed_dim, cfg.patch_size
        if head.decoder == "upernet":
            self.out_indices = tuple(head.out_indices or evenly_spaced_blocks(cfg.depth))
            if max(self.out_indices) >= cfg.depth or min(self.out_indices) < 0:
                raise ValueError(f"out_indices {self.out_indices} outside the {cfg.depth} blocks")
            self.neck = MultiLevelNeck(D, head.groups)
            self.decode_head = UperHead(D, head)
        else:
            self.out_indices = (cfg.depth - 1,) if not head.aux_head else \
                (evenly_spaced_blocks(cfg.depth)[2], cfg.depth - 1)
            self.decode_head = PUPHead(D, p, head)
        self.aux_head = FCNHead(D, head) if head.aux_head else None
        self.init_weights()

    def _init_head(self) -> None:
        # Decoder convs keep PyTorch's default (kaiming-uniform) init, as mmseg's heads do;
        # init_weights' loop already gave the LayerNorms ones/zeros.
        for m in self.modules():
            if isinstance(m, nn.GroupNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.ConvTranspose2d):
                m.reset_parameters()
        for cls in (self.decode_head.cls, getattr(self.aux_head, "cls", None)):
            if cls is not None:
                nn.init.normal_(cls.weight, std=0.01)
                nn.init.zeros_(cls.bias)

    def forward(self, x: torch.Tensor):
        size, grid = x.shape[-2:], self.cfg.grid_size
        if tuple(size) != (self.cfg.img_size, self.cfg.img_size):
            raise ValueError(f"segmentation input {tuple(size)} != the model's "
                             f"{self.cfg.img_size}x{self.cfg.img_size} (crop or slide windows)")
        feats = self.forward_intermediates(x, self.out_indices)
        if self.head_cfg.decoder == "upernet":
            pyramid = self.neck(feats, grid)
            logits = self.decode_head(pyramid)
            aux_in = pyramid[2]
        else:
            logits = self.decode_head(feats[-1], grid)
            aux_in = tokens_to_map(feats[0], grid) if self.aux_head is not None else None
        logits = _resize(logits, size)
        if self.aux_head is None or not self.training:
            return logits
        return logits, _resize(self.aux_head(aux_in), size)

    def loss(self, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        return segmentation_loss(self(x), labels, self.head_cfg.aux_weight)


def segmentation_loss(out, labels: torch.Tensor, aux_weight: float) -> tuple[torch.Tensor, dict]:
    """The training objective on ``BeitForSegmentation``'s output (logits, or (logits, aux)):
    pixel cross-entropy + ``aux_weight`` x the auxiliary head's; metrics loss_main / loss_aux."""
    logits, aux = out if isinstance(out, tuple) else (out, None)
    labels = labels.long()
    main = pixel_cross_entropy(logits, labels)
    metrics = {"loss_main": main.detach()}
    total = main
    if aux is not None:
        aux_loss = pixel_cross_entropy(aux, labels)
        total = total + aux_weight * aux_loss
        metrics["loss_aux"] = aux_loss.detach()
    return total, metrics


def pixel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the labelled pixels; 0 (not NaN) for a batch with none, which
    random crops of sparsely labelled images do produce."""
    total = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (labels != IGNORE_INDEX).sum().clamp(min=1)


def _resize(x: torch.Tensor, size) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def build_segmenter(cfg: BeitConfig, head: SegHeadConfig) -> BeitForSegmentation:
    """``BeitForSegmentation`` on the current default device (``torch.device('meta')`` works)."""
    return BeitForSegmentation(cfg, head)


def backbone_weights_for(model: BeitForSegmentation, state_dict) -> tuple[dict, list[str]]:
    """A MIM / classification / timm state dict -> the entries ``model`` takes, and the names
    left out. Goes through ``convert.adapt_state_dict_to`` (task "classify": per-layer
    rel-pos tables, resized bicubically to the segmentation grid as for 384-px fine-tuning);
    heads of other tasks (``fc_norm``, ``head``) are left out. Load with ``strict=False``: the
    decoder's keys are the missing ones."""
    from .convert import adapt_state_dict_to  # convert imports the zoo; keep import-time light
    sd = adapt_state_dict_to(model.cfg, state_dict, task="classify")
    want = model.state_dict()
    keep = {k: v for k, v in sd.items() if k in want}
    return keep, sorted(set(sd) - set(keep))
