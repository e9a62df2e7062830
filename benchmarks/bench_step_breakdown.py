"""Where the time of one MIM training step goes: tokenizer forward, backbone forward (incl. MIM
head and loss), backward, optimizer step.

    python benchmarks/bench_step_breakdown.py [--model beit_base_patch16_224] [--batch 2] [--repeats 3]
        [--vocab 8192] [--tok-hidden 64] [--act-ckpt] [--threads N]

Plain PyTorch, one process, fp32 on CPU (or the GPU if there is one, in bf16 autocast), the same
computation as MIMTask.step: the frozen dVAE tokenizer makes the targets under no_grad, the
backbone sees 75 of 196 patches masked (blockwise, data/masking.py), cross-entropy on the masked
positions, AdamW with the recipe's weight decay. DeepSpeed's own bookkeeping (flat buffers,
reductions) is not in these phases; benchmarks/bench_vs_alternatives.py and the scaling study
measure it. Each phase is timed alone (on GPU with synchronize); the table shows the median over
the repeats after one warm-up step, and the share of the summed step.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from beit_scale.data.masking import MaskingGenerator  # noqa: E402
from beit_scale.models import build_model  # noqa: E402
from beit_scale.models.dvae import DVAE, DVAEConfig  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="beit_base_patch16_224")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--tok-hidden", type=int, default=64, help="dVAE hidden_dim (the project's default)")
    ap.add_argument("--act-ckpt", action="store_true", help="torch checkpoint around every block")
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)

    model = build_model(a.model, task="mim", vocab_size=a.vocab).to(dev).train()
    if a.act_ckpt:
        from torch.utils.checkpoint import checkpoint
        for blk in model.blocks:
            fwd = blk.forward
            blk.forward = lambda *args, _f=fwd, **kw: checkpoint(_f, *args, use_reentrant=False, **kw)
    tok = DVAE(DVAEConfig(vocab_size=a.vocab, image_size=112, hidden_dim=a.tok_hidden)).to(dev).eval()
    tok.requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=1.5e-3, weight_decay=0.05)
    grid = model.cfg.img_size // model.cfg.patch_size
    masker = MaskingGenerator(input_size=(grid, grid), num_masking_patches=round(75 / 196 * grid * grid),
                              min_num_patches=16)
    img = torch.randn(a.batch, 3, model.cfg.img_size, model.cfg.img_size, device=dev)
    img_tok = torch.rand(a.batch, 3, 112, 112, device=dev)
    mask = torch.stack([torch.as_tensor(masker(np.random.default_rng(i))) for i in range(a.batch)]).flatten(1).bool().to(dev)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else torch.autocast("cpu", enabled=False)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def timed(fn):
        sync()
        t = time.perf_counter()
        out = fn()
        sync()
        return out, time.perf_counter() - t

    phases = ["tokenizer forward", "backbone forward + head + loss", "backward", "optimizer step"]
    times = {p: [] for p in phases}
    for r in range(a.repeats + 1):
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            ids, t_tok = timed(lambda: tok.get_codebook_indices(img_tok).flatten(1))
        labels = ids[mask]

        def fwd():
            with amp:
                return F.cross_entropy(model(img, mask).float(), labels)
        loss, t_fwd = timed(fwd)
        _, t_bwd = timed(loss.backward)
        _, t_opt = timed(opt.step)
        if r == 0:
            continue            # warm-up: allocator, lazy init, first-call dispatch
        for p, t in zip(phases, (t_tok, t_fwd, t_bwd, t_opt)):
            times[p].append(t)

    med = {p: statistics.median(v) for p, v in times.items()}
    total = sum(med.values())
    n_params = sum(p.numel() for p in model.parameters())
    cmd = "python " + " ".join([Path(sys.argv[0]).as_posix() if argv is None else "benchmarks/bench_step_breakdown.py",
                               *(sys.argv[1:] if argv is None else argv)])
    print(f"command: {cmd}")
    print(f"{a.model} MIM ({n_params / 1e6:.1f} M params), batch {a.batch}, vocab {a.vocab}, "
          f"dVAE hidden {a.tok_hidden}, act ckpt {'on' if a.act_ckpt else 'off'}, {dev.type} "
          f"({'bf16 autocast' if dev.type == 'cuda' else f'fp32, {torch.get_num_threads()} threads'}), "
          f"median of {a.repeats} after 1 warm-up")
    print()
    print(f"| phase | median s | min s | share |")
    print(f"|---|---|---|---|")
    for p in phases:
        print(f"| {p} | {med[p]:.3f} | {min(times[p]):.3f} | {100 * med[p] / total:.1f} % |")
    print(f"| **step (sum)** | {total:.3f} | | 100 % |")
    print(f"\n{a.batch / total:.2f} images/s; last loss {loss.item():.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
