"""One MIM training step of the same BEiT configuration: ours vs transformers vs timm, one process.

    python benchmarks/bench_vs_peers.py [--model beit_base_patch16_224] [--batch 8] [--repeats 3]
        [--threads N] [--drop-path 0.1] [--masked 75]

A step is forward + cross-entropy at the masked patches + backward (fp32, train mode, the zoo
config of --model with its MIM defaults: shared relative position bias, layer scale, 8192 codes),
the same images, masks (--masked of 196 patches per image, random positions, the same for every
model) and labels for all three:

  ours          beit_scale BeitForMIM; the head sees only the masked rows (gathered, as MIMTask)
  transformers  BeitForMaskedImageModeling loaded from our model exported in its layout
                (models/hf.py), so it holds the same weights (losses agree at --drop-path 0);
                its head runs on every patch, the loss takes the masked rows of the logits
  timm          timm's Beit (shared rel-pos bias, layer scale, final norm, no classifier) with a
                [MASK] token and a linear head added here, head on the masked rows

The three alternate, the order rotating every repeat so a slow phase of a shared machine hits
all of them, after one warm-up step each. Prints per-model median and min of wall-clock and
process CPU time, and the ratios ours/peer of medians (and of mins). Where ours is slower,
benchmarks/bench_step_breakdown.py splits our step into its phases.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from beit_scale.io import atomic_write_text, save_safetensors  # noqa: E402
from beit_scale.models import build_model  # noqa: E402
from beit_scale.models.hf import hf_config, to_hf  # noqa: E402


class TimmMIM(nn.Module):
    """timm's Beit with the two things BEiT pretraining adds: a [MASK] embedding swapped in at the
    masked patches and a linear vocabulary head on their final (normed) tokens."""

    def __init__(self, cfg, drop_path: float):
        super().__init__()
        from timm.models.beit import Beit
        self.beit = Beit(img_size=cfg.img_size, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim,
                         depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_dim / cfg.embed_dim,
                         init_values=cfg.layer_scale_init, use_abs_pos_emb=cfg.abs_pos_emb,
                         use_rel_pos_bias=False, use_shared_rel_pos_bias=True, num_classes=0,
                         global_pool="token", drop_path_rate=drop_path)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.lm_head = nn.Linear(cfg.embed_dim, cfg.vocab_size)

    def forward(self, x, mask):
        b = self.beit
        x = b.patch_embed(x)
        x = torch.where(mask[..., None], self.mask_token.to(x.dtype), x)
        x = torch.cat((b.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        if b.pos_embed is not None:
            x = x + b.pos_embed
        rel = b.rel_pos_bias()
        for blk in b.blocks:
            x = blk(x, shared_rel_pos_bias=rel)
        return self.lm_head(b.norm(x)[:, 1:][mask])


def build(args):
    """The three models; transformers' loads our weights the way users do: from a directory
    written in its file layout (what launch/export.py --format hf writes)."""
    import tempfile
    import transformers
    ours = build_model(args.model, task="mim", drop_path_rate=args.drop_path).train()
    with tempfile.TemporaryDirectory() as d:
        save_safetensors(to_hf(ours.state_dict()), Path(d) / "model.safetensors", {"format": "pt"})
        atomic_write_text(Path(d) / "config.json", json.dumps(hf_config(ours.cfg, "mim")))
        hf = transformers.BeitForMaskedImageModeling.from_pretrained(d)
    return {"ours": ours, "transformers": hf.train(), "timm": TimmMIM(ours.cfg, args.drop_path).train()}


def make_step(name, model, x, mask):
    """The forward each model is trained with, returning the logits of the masked patches in
    row-major order (so one label tensor fits all three)."""
    k = int(mask[0].sum())
    pos = mask.nonzero()[:, 1].view(mask.shape[0], k)  # each row's masked positions, ascending
    if name == "ours":
        return lambda: model(x, mask, masked_index=pos)
    if name == "transformers":
        return lambda: model(pixel_values=x, bool_masked_pos=mask).logits[mask]
    return lambda: model(x, mask)


def timed(forward, model, labels):
    """-> (wall s, process CPU s, loss) of zero_grad + forward + cross-entropy + backward."""
    model.zero_grad(set_to_none=True)
    t, c = time.perf_counter(), time.process_time()
    loss = F.cross_entropy(forward(), labels)
    loss.backward()
    return time.perf_counter() - t, time.process_time() - c, loss.item()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="beit_base_patch16_224")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--drop-path", type=float, default=0.1)
    ap.add_argument("--masked", type=int, default=75, help="masked patches per image")
    args = ap.parse_args(argv)
    import timm
    import transformers
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    models = build(args)
    cfg = models["ours"].cfg
    n = cfg.num_patches
    x = torch.randn(args.batch, 3, cfg.img_size, cfg.img_size)
    order = torch.rand(args.batch, n).argsort(1)[:, :args.masked]
    mask = torch.zeros(args.batch, n, dtype=torch.bool).scatter_(1, order, True)
    labels = torch.randint(0, cfg.vocab_size, (args.batch * args.masked,))
    steps = {k: make_step(k, m, x, mask) for k, m in models.items()}

    names = list(models)
    loss = {}
    for k in names:  # warm-up: allocator, lazy init, first-call dispatch
        loss[k] = timed(steps[k], models[k], labels)[2]
    wall, cpu = {k: [] for k in names}, {k: [] for k in names}
    for r in range(args.repeats):
        for k in names[r % 3:] + names[:r % 3]:
            w, c, _ = timed(steps[k], models[k], labels)
            wall[k].append(w)
            cpu[k].append(c)

    cmd = "python benchmarks/bench_vs_peers.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(f"command: {cmd.strip()}")
    params = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, timm {timm.__version__}, "
          f"threads {torch.get_num_threads()}; {args.model} MIM, batch {args.batch}, {args.masked}/{n} "
          f"patches masked, vocab {cfg.vocab_size}, fp32, drop_path {args.drop_path}; 1 warm-up + "
          f"{args.repeats} interleaved repeats")
    print("params: " + ", ".join(f"{k} {v:,}" for k, v in params.items())
          + "; warm-up losses: " + ", ".join(f"{k} {v:.4f}" for k, v in loss.items()))
    for clock, times in (("wall", wall), ("cpu", cpu)):
        med = {k: statistics.median(v) for k, v in times.items()}
        mins = {k: min(v) for k, v in times.items()}
        for k in names:
            print(f"{clock:>4} {k:>12}: median {med[k]:7.3f} s  min {mins[k]:7.3f} s   all: "
                  + " ".join(f"{t:.3f}" for t in times[k]))
        for peer in names[1:]:
            print(f"{clock:>4} ours/{peer}: median {med['ours'] / med[peer]:.3f}  min {mins['ours'] / mins[peer]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
