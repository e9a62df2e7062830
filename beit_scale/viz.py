"""Pictures of what a model learned (CLI; nothing in the package imports this module).

    python -m beit_scale.viz attention RUN_OR_CHECKPOINT --images a.jpg b.jpg --out attn.png

Self-attention maps as in the BEiT paper's figure: for a few reference patches per image, the
last block's attention from that patch to every patch, as a heat map over the image. One row per
image (the image with the reference patches marked, then one map per reference patch, heads
averaged), or with ``--per-head`` one row per (image, reference patch) with one map per head.

The source is anything ``init.from`` accepts that describes its architecture: a run dir or
checkpoint folder of any BEiT stage (MIM with tokens or pixels, classification), or a
.safetensors file exported by ``beit_scale.train.export`` (our layout or timm's). Only the
backbone is loaded (a MIM head, [MASK] token or classifier head plays no part in the
attention), on CPU.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

DEFAULT_POINTS = ((0.3, 0.3), (0.5, 0.5), (0.7, 0.65))  # (y, x) fractions of the image
PAD = 4  # white pixels between and around the tiles


# ----------------------------------------------------------------------------- loading


def source_config(source: str | Path):
    """The BeitConfig of the backbone behind ``source`` (a run dir / checkpoint folder: from its
    manifest's resolved config; an exported .safetensors file: from its metadata)."""
    from beit_scale.models.config import BeitConfig
    p = Path(source).expanduser()
    if p.is_dir():
        from beit_scale.config import from_dict
        from beit_scale.train.checkpoint.layout import read_manifest
        from beit_scale.train.checkpoint.reader import resolve_checkpoint
        from beit_scale.train.export import build_stage_model
        manifest = read_manifest(resolve_checkpoint(p))
        if manifest.get("stage") == "tokenizer":
            raise SystemExit(f"{source} is a tokenizer (dVAE) checkpoint: it has no self-attention; "
                             f"give a MIM or classification run")
        cfg = from_dict(manifest["config"])
        cfg.init.from_ = None  # the architecture only: a classifier would read its init.from weights
        with torch.device("meta"):  # allocate nothing
            return build_stage_model(cfg).cfg
    if p.suffix == ".safetensors" and p.is_file():
        from beit_scale.train.export import read_export_metadata
        meta = read_export_metadata(p)
        if "model_config" in meta:
            return BeitConfig(**json.loads(meta["model_config"]))
    raise SystemExit(f"{source}: not a run dir, checkpoint folder or beit_scale export (.safetensors with "
                     f"a model_config in its metadata); export a checkpoint with `python -m "
                     f"beit_scale.train.export` first")


def load_backbone(source: str | Path) -> torch.nn.Module:
    """A BeitClassifier (no head, eval mode, CPU) holding the backbone weights of ``source``."""
    from beit_scale.models.zoo import build_model
    from beit_scale.train.checkpoint.reader import load_init_weights
    bcfg = source_config(source)
    # Per-layer tables: a shared pretraining table is copied into each block, which leaves every
    # attention unchanged and lets MIM, classifier and timm weights load the same way.
    rel = "layer" if bcfg.rel_pos_bias in ("layer", "shared") else bcfg.rel_pos_bias
    model = build_model(bcfg.replace(rel_pos_bias=rel, num_classes=0, drop_path_rate=0.0), task="classify")
    load_init_weights(model, source)
    return model.eval()


def load_images(paths: Sequence[str | Path], size: int) -> torch.Tensor:
    """Image files -> uint8 [B, 3, size, size]: short side resized to ``size``, centre crop."""
    from beit_scale.data.transforms import ClassifyTransform
    tf = ClassifyTransform(train=False, size=size, crop_pct=1.0)
    out = []
    for p in paths:
        try:
            with Image.open(p) as im:
                out.append(tf(im.convert("RGB")))
        except OSError as e:  # missing, truncated or not an image: say which
            raise SystemExit(f"--images {p}: cannot read this image ({e})") from None
    return torch.stack(out)


# ----------------------------------------------------------------------------- attention maps


def reference_patches(points: Sequence[tuple[float, float]], grid: tuple[int, int]) -> list[int]:
    """(y, x) fractions in [0, 1] -> row-major patch indices on ``grid``."""
    gh, gw = grid
    out = []
    for fy, fx in points:
        if not (0 <= fy <= 1 and 0 <= fx <= 1):
            raise SystemExit(f"--points {fy},{fx}: fractions of the image must lie in [0, 1]")
        out.append(min(int(fy * gh), gh - 1) * gw + min(int(fx * gw), gw - 1))
    return out


def attention_maps(model, images: torch.Tensor, patches: Sequence[int]) -> torch.Tensor:
    """[B, P, heads, gh, gw]: the last block's attention from each reference patch to every patch
    (probabilities over all 1+N keys; the cls key's share is left out of the map)."""
    from beit_scale.data.transforms import to_float_image
    gh, gw = model.cfg.grid_size
    attn = model.last_attention(to_float_image(images, normalize=True))  # [B, H, 1+N, 1+N]
    rows = attn[:, :, [1 + p for p in patches], 1:]  # queries: the reference patches; keys: patches
    return rows.permute(0, 2, 1, 3).reshape(images.shape[0], len(patches), -1, gh, gw)


def _heat_tile(img: np.ndarray, amap: torch.Tensor) -> np.ndarray:
    """An attention map [gh, gw] over an image [S, S, 3] uint8: jet colours, scaled to its max."""
    from matplotlib import colormaps
    S = img.shape[0]
    a = amap / amap.max().clamp_min(1e-12)
    a = torch.nn.functional.interpolate(a[None, None], size=(S, S), mode="bilinear", align_corners=False)[0, 0]
    heat = colormaps["jet"](a.clamp(0, 1).numpy())[..., :3] * 255
    return (0.45 * img + 0.55 * heat).astype(np.uint8)


def _mark(tile: np.ndarray, patch: int, grid: tuple[int, int], patch_px: float) -> Image.Image:
    im = Image.fromarray(tile)
    y, x = divmod(patch, grid[1])
    ImageDraw.Draw(im).rectangle([x * patch_px, y * patch_px, (x + 1) * patch_px - 1, (y + 1) * patch_px - 1],
                                 outline=(255, 255, 255), width=2)
    return im


def render_attention(images: torch.Tensor, maps: torch.Tensor, patches: Sequence[int],
                     grid: tuple[int, int], per_head: bool = False) -> Image.Image:
    """The figure: tiles of S x S pixels (S = the image size) with PAD pixels between and around.

    Averaged: one row per image, 1 + P columns. Per head: one row per (image, patch), 1 + heads
    columns. The first column is the image with the reference patch(es) outlined."""
    B, P, H = maps.shape[:3]
    S = images.shape[-1]
    patch_px = S / grid[1]
    rows = []
    for b in range(B):
        img = images[b].permute(1, 2, 0).numpy()
        if per_head:
            for j, p in enumerate(patches):
                rows.append([_mark(img, p, grid, patch_px)]
                            + [_mark(_heat_tile(img, maps[b, j, h]), p, grid, patch_px) for h in range(H)])
        else:
            src = Image.fromarray(img)
            for p in patches:
                src = _mark(np.asarray(src), p, grid, patch_px)
            rows.append([src] + [_mark(_heat_tile(img, maps[b, j].mean(0)), p, grid, patch_px)
                                 for j, p in enumerate(patches)])
    cols = len(rows[0])
    canvas = Image.new("RGB", (cols * S + (cols + 1) * PAD, len(rows) * S + (len(rows) + 1) * PAD), "white")
    for r, row in enumerate(rows):
        for c, tile in enumerate(row):
            canvas.paste(tile, (PAD + c * (S + PAD), PAD + r * (S + PAD)))
    return canvas


def attention_figure(source, image_paths: Sequence[str | Path], out: str | Path,
                     points: Sequence[tuple[float, float]] = DEFAULT_POINTS, per_head: bool = False) -> Path:
    """Load ``source``, compute the maps for ``image_paths`` and write the PNG ``out``."""
    from beit_scale.io import atomic_path
    model = load_backbone(source)
    grid = model.cfg.grid_size
    images = load_images(image_paths, model.cfg.img_size)
    patches = reference_patches(points, grid)
    fig = render_attention(images, attention_maps(model, images, patches), patches, grid, per_head)
    out = Path(out)
    with atomic_path(out) as tmp:
        fig.save(tmp, format="PNG")
    return out


# ----------------------------------------------------------------------------- CLI


def _point(text: str) -> tuple[float, float]:
    try:
        y, x = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected Y,X fractions of the image, e.g. 0.5,0.5") from None
    return y, x


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m beit_scale.viz", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    at = sub.add_parser("attention", help="last-layer self-attention maps for reference patches")
    at.add_argument("source", help="run dir, checkpoint folder or exported .safetensors file")
    at.add_argument("--images", nargs="+", required=True, help="image files (any size; centre-cropped)")
    at.add_argument("--out", required=True, help="the PNG to write")
    at.add_argument("--points", nargs="+", type=_point, default=list(DEFAULT_POINTS),
                    help="reference patches as Y,X fractions of the image (default: %(default)s)")
    at.add_argument("--per-head", action="store_true", help="one map per head instead of their mean")
    a = ap.parse_args(argv)
    out = attention_figure(a.source, a.images, a.out, a.points, a.per_head)
    with Image.open(out) as im:
        print(f"wrote {out} ({im.width}x{im.height} px, {len(a.images)} image(s), {len(a.points)} reference "
              f"patch(es){', per head' if a.per_head else ', heads averaged'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
