"""The DALL-E discrete VAE (OpenAI's public BEiT tokenizer), plain PyTorch, for inference only.

BEiT v1 predicts the token ids of this dVAE: 8192 codes, one per 8x8 cell of a 112x112 input.
The published weights (``encoder.pkl``, ``decoder.pkl``) are whole pickled modules of OpenAI's
``dall-e`` package; ``beit_scale.models.tokenizers convert-dalle`` turns them once into a
safetensors file for ``DalleTokenizer`` so that training never unpickles anything.

Architecture (read from the ``dall-e`` package; module names kept so the weights map 1:1, with
``.w``/``.b`` renamed to ``.weight``/``.bias``):

    encoder: input 7x7 conv (3 -> h), four groups of residual blocks with widths h, 2h, 4h, 8h,
             a 2x2 max-pool after the first three, output ReLU + 1x1 conv (8h -> vocab)
    decoder: input 1x1 conv (vocab -> n_init), four groups with widths 8h, 4h, 2h, h, a 2x nearest
             upsample after the first three, output ReLU + 1x1 conv (h -> 2 * channels)

Each residual block is ``id_path(x) + res_path(x) / L**2`` (L = all blocks in the network,
4 * blocks per group); the residual path is four ReLU + conv pairs through width out/4
(encoder kernels 3, 3, 3, 1; decoder 1, 3, 3, 3); the identity path is a 1x1 conv when the
width changes. The encoder sees ``map_pixels(x)``, the decoder's first 3 output channels are the
logit-Laplace means, ``unmap_pixels(sigmoid(.))`` gives the image back.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["DalleConfig", "DalleTokenizer", "map_pixels", "unmap_pixels", "LOGIT_LAPLACE_EPS"]

LOGIT_LAPLACE_EPS = 0.1
GROUPS = 4  # fixed in the published model: three 2x resolution changes -> downsample 8


def map_pixels(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] images -> [eps, 1 - eps], the range the logit-Laplace dVAE was trained on."""
    return (1 - 2 * LOGIT_LAPLACE_EPS) * x + LOGIT_LAPLACE_EPS


def unmap_pixels(x: torch.Tensor) -> torch.Tensor:
    """Inverse of ``map_pixels``, clamped to [0, 1]."""
    return ((x - LOGIT_LAPLACE_EPS) / (1 - 2 * LOGIT_LAPLACE_EPS)).clamp(0, 1)


@dataclass(frozen=True)
class DalleConfig:
    """Shapes of a DALL-E dVAE. Defaults: the published weights (8192 codes, 112 px for BEiT)."""
    vocab_size: int = 8192
    image_size: int = 112     # the input size MIM feeds it; the convs accept any multiple of 8
    n_hid: int = 256
    n_blk_per_group: int = 2
    channels: int = 3
    n_init: int = 128         # decoder input width
    has_decoder: bool = True  # the encoder alone is enough to tokenize

    def __post_init__(self):
        if self.image_size % self.downsample:
            raise ValueError(f"DalleConfig.image_size {self.image_size} is not a multiple of "
                             f"{self.downsample}")
        for f in ("vocab_size", "n_hid", "n_blk_per_group", "channels", "n_init"):
            if getattr(self, f) < 1:
                raise ValueError(f"DalleConfig.{f} must be >= 1, got {getattr(self, f)}")

    @property
    def downsample(self) -> int:
        return 2 ** (GROUPS - 1)

    @property
    def grid_size(self) -> int:
        return self.image_size // self.downsample


def _conv(n_in: int, n_out: int, k: int) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, k, padding=(k - 1) // 2)


class _ResBlock(nn.Module):
    def __init__(self, n_in: int, n_out: int, kernels: tuple[int, ...], n_layers: int):
        super().__init__()
        hid = n_out // 4
        widths = [n_in, hid, hid, hid, n_out]
        self.id_path = _conv(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        layers = []
        for i, k in enumerate(kernels, start=1):
            layers += [(f"relu_{i}", nn.ReLU()), (f"conv_{i}", _conv(widths[i - 1], widths[i], k))]
        self.res_path = nn.Sequential(OrderedDict(layers))
        self.post_gain = 1.0 / n_layers ** 2

    def forward(self, x):
        return self.id_path(x) + self.post_gain * self.res_path(x)


def _groups(widths: list[int], n_in: int, cfg: DalleConfig, kernels, between) -> list:
    """The four (name, group) pairs; ``between()`` (pool / upsample) ends all groups but the last."""
    n_layers = GROUPS * cfg.n_blk_per_group
    out = []
    for g, w in enumerate(widths, start=1):
        items = []
        for i in range(cfg.n_blk_per_group):
            items.append((f"block_{i + 1}", _ResBlock(n_in, w, kernels, n_layers)))
            n_in = w
        if g < GROUPS:
            items.append(between())
        out.append((f"group_{g}", nn.Sequential(OrderedDict(items))))
    return out


class DalleEncoder(nn.Module):
    def __init__(self, cfg: DalleConfig):
        super().__init__()
        h = cfg.n_hid
        self.blocks = nn.Sequential(OrderedDict(
            [("input", _conv(cfg.channels, h, 7))]
            + _groups([h, 2 * h, 4 * h, 8 * h], h, cfg, (3, 3, 3, 1),
                      lambda: ("pool", nn.MaxPool2d(2)))
            + [("output", nn.Sequential(OrderedDict(
                [("relu", nn.ReLU()), ("conv", _conv(8 * h, cfg.vocab_size, 1))])))]))

    def forward(self, x):
        return self.blocks(x)


class DalleDecoder(nn.Module):
    def __init__(self, cfg: DalleConfig):
        super().__init__()
        h = cfg.n_hid
        self.blocks = nn.Sequential(OrderedDict(
            [("input", _conv(cfg.vocab_size, cfg.n_init, 1))]
            + _groups([8 * h, 4 * h, 2 * h, h], cfg.n_init, cfg, (1, 3, 3, 3),
                      lambda: ("upsample", nn.Upsample(scale_factor=2, mode="nearest")))
            + [("output", nn.Sequential(OrderedDict(
                [("relu", nn.ReLU()), ("conv", _conv(h, 2 * cfg.channels, 1))])))]))

    def forward(self, z):
        return self.blocks(z)


class DalleTokenizer(nn.Module):
    """The DALL-E dVAE behind the same interface as ``dvae.DVAE``: images in [0, 1] in.

    ``get_codebook_indices`` is what MIM calls (argmax of the encoder's logits, as BEiT does);
    ``decode_indices`` needs the decoder (``cfg.has_decoder``) and is for looking at tokens.
    """

    def __init__(self, cfg: DalleConfig | None = None):
        super().__init__()
        self.cfg = cfg or DalleConfig()
        self.encoder = DalleEncoder(self.cfg)
        self.decoder = DalleDecoder(self.cfg) if self.cfg.has_decoder else None

    def encode(self, img01: torch.Tensor) -> torch.Tensor:
        """img01 [B,C,H,W] in [0,1] -> logits [B,V,H/8,W/8]."""
        return self.encoder(map_pixels(img01))

    @torch.no_grad()
    def get_codebook_indices(self, img01: torch.Tensor) -> torch.Tensor:
        """img01 [B,C,H,W] in [0,1] -> LongTensor [B,H/8,W/8] of token ids."""
        return self.encode(img01).argmax(1)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(one-hot) z [B,V,h,w] -> the decoder's raw statistics [B,2C,8h,8w] (means, log-scales)."""
        if self.decoder is None:
            raise ValueError("this DALL-E tokenizer was converted without decoder.pkl; convert it "
                             "with the decoder to reconstruct images")
        return self.decoder(z)

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """LongTensor [B,h,w] of codes -> reconstruction [B,C,8h,8w] in [0,1]."""
        z = F.one_hot(indices, self.cfg.vocab_size).permute(0, 3, 1, 2)
        stats = self.decode(z.to(self.encoder.blocks.input.weight.dtype))
        return unmap_pixels(torch.sigmoid(stats[:, :self.cfg.channels]))
