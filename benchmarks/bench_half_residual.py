"""Half precision and layer scale 1e-5: does each block still change the residual stream?

    python benchmarks/bench_half_residual.py [--steps 300] [--batch 16] [--depth 4] [--zero 2]
        [--modes fp32,fp16_allhalf,fp16_fp32res,autocast_fp16] [--json out.json]
        [--no-sweep] [--no-train] [--no-timing | --timing-only]

BEiT-Large/Huge use layer scale 1e-5 (zoo.py). DeepSpeed's fp16/bf16 modes cast the whole model
to half, so the residual stream ``x + gamma * f(x)`` was half precision: fp16's ulp at 1.0 is
~1e-3 (bf16's ~8e-3) and 1e-5 is subnormal in fp16, so a block's contribution rounds away. The
BEiT reference trained with torch autocast and fp32 weights, where the stream stays fp32. The
model now keeps the stream in float32 when its weights are half (beit.py
``Block._forward_fp32_residual``); ``*_allhalf`` below patches the old block back in.

Three parts, all from the same seed-0 fp32 initialisation of a small BeitForMIM (beit_debug
widths: dim 64, 2 heads, mlp 256; depth 4; 32 px images, patch 8; layer scale 1e-5):

1. Gamma sweep (forward only, no DeepSpeed): every layer scale set to g; each block's change of
   the residual stream compared with the fp32 block's change on the same input. Cell: median
   over blocks of ||d_half - d_fp32|| / ||d_fp32|| and, in brackets, the fraction of stream
   elements the block changes at all. ``*_allhalf`` / ``*_fp32res``: the model cast with
   ``.to(half)`` as DeepSpeed does, old / current block; ``autocast_*``: fp32 weights under
   ``torch.autocast``.

2. Training through a real DeepSpeed engine, one rank, each mode in its own process
   (DeepSpeed's torch_autocast state is process-global), same synthetic batches; AdamW lr 3e-3,
   wd 0.05, betas (0.9, 0.999), 20 warmup steps then cosine, gradient clipping 3.0 and the fp16
   loss-scaling settings of ds_configs/zero2.json, ZeRO stage ``--zero`` (per mode: ``mode:zN``):

     fp32            reference
     fp16_allhalf    DeepSpeed fp16 with the old block (everything half): the old behaviour
     fp16_fp32res    DeepSpeed fp16 with the current model (float32 residual stream)
     autocast_fp16   DeepSpeed ``torch_autocast`` (float16) with fp32 weights (torch GradScaler)
     bf16_allhalf, bf16_fp32res   the same two for DeepSpeed bf16

   Task: masked image modelling on synthetic smooth images (bicubic upsampling of 3x3 noise);
   a patch's target is its mean colour, 2 levels per channel (8 "visual tokens"); 40% of the
   patches masked at random. A masked patch is only predictable from its neighbours, i.e.
   through the blocks: every masked position sees the same [MASK] embedding, so without them
   the best is the label marginal ("marginal" below).

   Columns: rel dx @0 / @end: median over blocks of ||x_out - x_in|| / ||x_in|| on a fixed
   probe batch (64 images), in the dtype the run uses; changed @0: fraction of stream elements
   a block changes at all; probe loss at 0 / steps/4 / steps/2 / end; train loss end: mean of
   the last 20 steps; |d| vs fp32: mean |loss - fp32 loss| over all steps; |gamma| end: mean
   over all blocks (init 1e-5); grad norm: median of what the engine reports.

3. Timing (fp32, where nothing may change): one forward+backward of beit_debug and beit_mini at
   224 (batch 8) with the old and the current block, interleaved, median of
   ``--time-repeats``; outputs and every gradient compared for bit-identity. On a GPU the
   fp16/bf16 step times are added (the real cost of the float32 stream there).

On a CPU the fp16 modes use the TEST-ONLY switch of ENVIRONMENT.md (the CPU accelerator claims
fp16 support); half-precision matmuls on CPU are slow, hence the tiny model. On a GPU pass
larger widths, e.g. ``--img 224 --patch 16 --dim 1024 --heads 16 --mlp 4096 --depth 24``.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ALL_MODES = ("fp32", "fp16_allhalf", "fp16_fp32res", "autocast_fp16", "bf16_allhalf", "bf16_fp32res")
DEFAULT_MODES = "fp32,fp16_allhalf,fp16_fp32res,autocast_fp16"
CLIP = 3.0


# ----------------------------------------------------------------------------------------------
# synthetic MIM task
# ----------------------------------------------------------------------------------------------
def make_batch(step: int, batch: int, img: int, patch: int, seed: int = 0, lowres: int = 3, levels: int = 2):
    import torch
    import torch.nn.functional as F
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    low = torch.randn(batch, 3, lowres, lowres, generator=g)
    x = F.interpolate(low, size=(img, img), mode="bicubic", align_corners=False)
    colour = F.avg_pool2d(x, patch)  # [B, 3, gh, gw]
    # `levels` levels per channel, split at the quantiles of a zero-mean normal (std ~0.62 here)
    edges = torch.tensor([0.0] if levels == 2 else [-0.42, 0.0, 0.42])
    q = torch.bucketize(colour.contiguous(), edges)
    tokens = ((q[:, 0] * levels + q[:, 1]) * levels + q[:, 2]).flatten(1)  # [B, N], levels**3 classes
    n = tokens.shape[1]
    k = round(0.4 * n)
    order = torch.rand(batch, n, generator=g).argsort(dim=1)
    mask = torch.zeros(batch, n, dtype=torch.bool)
    mask.scatter_(1, order[:, :k], True)
    return x, mask, tokens[mask]


def marginal_loss(labels) -> float:
    """Cross-entropy of predicting the label marginal: what a model that ignores context gets."""
    import torch
    p = torch.bincount(labels).double()
    p = p[p > 0] / p.sum()
    return float(-(p * p.log()).sum())


def split_mode(spec: str, default_zero: int) -> tuple[str, int]:
    """'autocast_fp16:z0' -> ('autocast_fp16', 0); no suffix -> the --zero stage."""
    mode, _, z = spec.partition(":z")
    return mode, int(z) if z else default_zero


def ds_config(mode: str, batch: int, zero: int) -> dict:
    cfg = {"train_batch_size": batch, "train_micro_batch_size_per_gpu": batch,
           "gradient_accumulation_steps": 1, "gradient_clipping": CLIP,
           "zero_optimization": {"stage": zero}, "steps_per_print": 10 ** 9,
           "fp16": {"enabled": False}, "bf16": {"enabled": False}}
    if mode.startswith("fp16"):
        # the loss-scaling settings of ds_configs/zero2.json
        cfg["fp16"] = {"enabled": True, "auto_cast": False, "loss_scale": 0, "initial_scale_power": 16,
                       "loss_scale_window": 500, "hysteresis": 2, "consecutive_hysteresis": False,
                       "min_loss_scale": 1}
    elif mode.startswith("bf16"):
        cfg["bf16"] = {"enabled": True}
    elif mode == "autocast_fp16":
        cfg["torch_autocast"] = {"enabled": True, "dtype": "float16"}
    return cfg


def run_mode(args) -> dict:
    """One training run in this process (called in a child process per mode)."""
    import torch
    import torch.nn.functional as F
    from deepspeed.accelerator import get_accelerator

    mode, zero = split_mode(args.one, args.zero)
    acc = get_accelerator()
    on_cpu = acc.device_name() == "cpu"
    if on_cpu and ("fp16" in mode):
        type(acc).is_fp16_supported = lambda self: True  # TEST-ONLY switch (ENVIRONMENT.md)
    from beit_scale.models import beit as beit_mod
    from beit_scale.models.zoo import get_config
    from beit_scale.models.beit import BeitForMIM
    from beit_scale.train import engine as engine_mod
    from beit_scale.train.optim import build_optimizer_and_schedule, param_groups
    if mode.endswith("allhalf"):
        beit_mod.Block.forward = beit_mod.Block._forward_same_dtype
    engine_mod.init_distributed()
    device = torch.device(acc.current_device_name())

    torch.manual_seed(0)
    cfg = get_config("beit_debug", img_size=args.img, patch_size=args.patch, embed_dim=args.dim,
                     num_heads=args.heads, mlp_dim=args.mlp, depth=args.depth,
                     layer_scale_init=args.layer_scale, vocab_size=64, drop_path_rate=0.0)
    model = BeitForMIM(cfg).to(device)
    groups = param_groups(model, weight_decay=0.05)
    opt, sched = build_optimizer_and_schedule(groups, lr=args.lr, betas=(0.9, 0.999), eps=1e-8,
                                              warmup_steps=args.warmup, max_steps=args.steps,
                                              min_lr=1e-5)
    engine = engine_mod.build_engine(model, opt, sched, ds_config(mode, args.batch, zero))
    module = engine.module
    pdtype = next(module.parameters()).dtype

    probe = make_batch(10 ** 6, 64, args.img, args.patch, seed=1, lowres=args.lowres, levels=args.levels)

    def run_probe():
        rows = []

        def hook(mod, inp, out):
            a, b = inp[0].detach().double(), out.detach().double()
            rows.append(((b - a).norm() / a.norm()).item())
            changed.append((b != a).double().mean().item())
        changed = []
        hooks = [blk.register_forward_hook(hook) for blk in module.blocks]
        try:
            with torch.no_grad():
                x, m, y = probe
                logits = engine(x.to(device, pdtype), m.to(device))
                loss = F.cross_entropy(logits.float(), y.to(device)).item()
        finally:
            for h in hooks:
                h.remove()
        return {"rel_dx": rows, "changed": changed, "loss": loss}

    def gammas():
        vals = [torch.cat([b.gamma_1.detach().float().abs().flatten(), b.gamma_2.detach().float().abs().flatten()])
                for b in module.blocks if b.gamma_1 is not None]
        return [float(v.mean()) for v in vals]

    probes = {0: run_probe()}
    probe_at = {args.steps // 4, args.steps // 2}
    losses, scales, norms, t0 = [], [], [], time.time()
    for step in range(args.steps):
        x, m, y = make_batch(step, args.batch, args.img, args.patch, lowres=args.lowres, levels=args.levels)
        logits = engine(x.to(device, pdtype), m.to(device))
        loss = F.cross_entropy(logits.float(), y.to(device))
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
        scales.append(engine_mod.engine_loss_scale(engine))
        norms.append(engine_mod.engine_grad_norm(engine))
        if step + 1 in probe_at:
            probes[step + 1] = run_probe()
        if args.verbose and (step % 20 == 0 or step == args.steps - 1):
            print(f"[{mode}] step {step} loss {losses[-1]:.4f} ({time.time() - t0:.0f} s)", file=sys.stderr,
                  flush=True)
    probes[args.steps] = run_probe()
    out = {"mode": args.one, "param_dtype": str(pdtype), "losses": losses, "probes": probes,
           "probe_marginal_loss": marginal_loss(probe[2]),
           "gamma_mean_abs": gammas(), "loss_scale_end": scales[-1] if scales else None,
           "skipped_steps": int(getattr(engine, "skipped_steps", 0)), "seconds": time.time() - t0,
           "device": acc.device_name(), "zero": zero, "grad_norms": norms}
    engine_mod.shutdown_distributed()
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(mode: str, args) -> dict:
    env = dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), PYTHONPATH=str(ROOT))
    argv = [sys.executable, __file__, "--one", mode] + [a for a in sys.argv[1:]]
    p = subprocess.run(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=None if args.verbose else subprocess.PIPE,
                       text=True)
    if p.returncode != 0:
        tail = (p.stderr or "")[-3000:]
        return {"mode": mode, "error": f"exit {p.returncode}: {tail}"}
    return json.loads(p.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------
# timing: cost of the change
# ----------------------------------------------------------------------------------------------
def timing(args) -> list[dict]:
    import torch
    import torch.nn.functional as F
    from beit_scale.models import beit as beit_mod
    from beit_scale.models.zoo import build_model

    new_forward = beit_mod.Block.forward
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtypes = [torch.float32] + ([torch.float16, torch.bfloat16] if dev.type == "cuda" else [])
    rows = []
    for name in args.time_models.split(","):
        for dtype in dtypes:
            torch.manual_seed(0)
            model = build_model(name, task="mim").to(dev, dtype).train()
            cfg = model.cfg
            B = args.time_batch
            g = torch.Generator().manual_seed(0)
            x = torch.randn(B, 3, cfg.img_size, cfg.img_size, generator=g).to(dev, dtype)
            k = round(cfg.num_patches * 0.4)
            mask = torch.zeros(B, cfg.num_patches, dtype=torch.bool)
            mask[:, :k] = True
            mask = mask.to(dev)
            y = torch.randint(0, cfg.vocab_size, (B * k,), generator=g).to(dev)

            def step():
                model.zero_grad(set_to_none=True)
                out = model(x, mask)
                F.cross_entropy(out.float(), y).backward()
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                return out.detach().clone(), {n: p.grad.clone() for n, p in model.named_parameters()}

            times = {"before": [], "now": []}
            cpu = {"before": [], "now": []}
            results = {}
            for r in range(args.time_repeats + 1):
                for which, fwd in (("before", beit_mod.Block._forward_same_dtype), ("now", new_forward)):
                    beit_mod.Block.forward = fwd
                    t, c = time.perf_counter(), time.process_time()
                    res = step()
                    dt, dc = time.perf_counter() - t, time.process_time() - c
                    if r > 0:  # the first round is warm-up
                        times[which].append(dt)
                        cpu[which].append(dc)
                    results[which] = res
            beit_mod.Block.forward = new_forward
            (o1, g1), (o2, g2) = results["before"], results["now"]
            identical = torch.equal(o1, o2) and all(torch.equal(g1[n], g2[n]) for n in g1)
            tb, tn = statistics.median(times["before"]), statistics.median(times["now"])
            mb, mn = min(times["before"]), min(times["now"])
            cb, cn = statistics.median(cpu["before"]), statistics.median(cpu["now"])
            rows.append({"model": name, "dtype": str(dtype).replace("torch.", ""), "batch": B,
                         "before_s": tb, "now_s": tn, "ratio": tn / tb, "ratio_of_min": mn / mb,
                         "cpu_ratio": cn / cb, "bit_identical": identical,
                         "times": times, "cpu_times": cpu})
            print(f"timing {name} {rows[-1]['dtype']} batch {B}: before {tb * 1e3:.1f} ms, now {tn * 1e3:.1f} ms "
                  f"(medians of {len(times['now'])}): ratio {tn / tb:.3f}, ratio of minimums {mn / mb:.3f}, "
                  f"process-CPU-time ratio {cn / cb:.3f}; outputs+grads bit-identical: {identical}", flush=True)
            del model
    return rows


# ----------------------------------------------------------------------------------------------
# gamma sweep: the mechanism, forward only
# ----------------------------------------------------------------------------------------------
SWEEP_KINDS = ("fp16_allhalf", "fp16_fp32res", "autocast_fp16", "bf16_allhalf", "bf16_fp32res", "autocast_bf16")


def gamma_sweep(args) -> list[dict]:
    """Set every layer scale to g and compare each block's change of the residual stream with the
    fp32 block's on the same input; the model is cast the way DeepSpeed casts it (``.to(half)``)
    or kept fp32 under torch.autocast. Same seed-0 model and probe batch as the training runs."""
    import copy

    import torch
    from beit_scale.models import beit as beit_mod
    from beit_scale.models.beit import BeitForMIM
    from beit_scale.models.zoo import get_config

    new_forward = beit_mod.Block.forward
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    cfg = get_config("beit_debug", img_size=args.img, patch_size=args.patch, embed_dim=args.dim,
                     num_heads=args.heads, mlp_dim=args.mlp, depth=args.depth,
                     layer_scale_init=args.layer_scale, vocab_size=64, drop_path_rate=0.0)
    ref = BeitForMIM(cfg).to(dev).eval()
    x, m, _ = make_batch(10 ** 6, args.batch, args.img, args.patch, seed=1, lowres=args.lowres, levels=args.levels)
    x, m = x.to(dev), m.to(dev)
    rel = lambda mod: mod.shared_rel_pos() if mod.shared_rel_pos is not None else None  # noqa: E731
    rows = []
    for g in [float(v) for v in args.sweep_gammas.split(",")]:
        with torch.no_grad():
            for blk in ref.blocks:
                blk.gamma_1.fill_(g)
                blk.gamma_2.fill_(g)
        for kind in SWEEP_KINDS:
            half = torch.float16 if "fp16" in kind else torch.bfloat16
            beit_mod.Block.forward = beit_mod.Block._forward_same_dtype if kind.endswith("allhalf") else new_forward
            model = ref if kind.startswith("autocast") else copy.deepcopy(ref).to(half)
            io = []
            hooks = [b.register_forward_hook(lambda mod, a, o: io.append((a[0], o))) for b in model.blocks]
            try:
                with torch.no_grad(), torch.autocast(dev.type, dtype=half, enabled=kind.startswith("autocast")):
                    model(x if kind.startswith("autocast") else x.to(half), m)
            finally:
                for h in hooks:
                    h.remove()
            errs, changed, size = [], [], []
            for i, (a, o) in enumerate(io):
                with torch.no_grad():
                    want = (new_forward(ref.blocks[i], a.float(), rel_pos_bias=rel(ref)) - a.float()).double()
                got = o.double() - a.double()
                errs.append(((got - want).norm() / want.norm()).item())
                changed.append((got != 0).double().mean().item())
                size.append((want.norm() / a.double().norm()).item())
            beit_mod.Block.forward = new_forward
            rows.append({"gamma": g, "kind": kind, "rel_err": statistics.median(errs),
                         "changed": statistics.mean(changed), "rel_dx_fp32": statistics.median(size)})
    return rows


def sweep_report(rows) -> str:
    gammas = sorted({r["gamma"] for r in rows})
    head = ["gamma", "block rel. change (fp32)"] + [k for k in SWEEP_KINDS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in gammas:
        rs = {r["kind"]: r for r in rows if r["gamma"] == g}
        any_r = next(iter(rs.values()))
        cells = [f"{g:g}", f"{any_r['rel_dx_fp32']:.1e}"]
        cells += [f"{rs[k]['rel_err']:.3f} ({rs[k]['changed']:.0%})" for k in SWEEP_KINDS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------
def report(results: list[dict], args) -> str:
    ref = next((r for r in results if r.get("mode", "").startswith("fp32") and "error" not in r), None)
    s = args.steps
    cols = ["mode", "rel dx @0", "changed @0", f"rel dx @{s}",
            f"probe loss 0/{s // 4}/{s // 2}/{s}", "train loss end", "|d| vs fp32", "|gamma| end",
            "grad norm (median)", "skipped"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['mode']} | error: {r['error'].splitlines()[-1] if r['error'] else ''} |")
            continue
        p = r["probes"]
        p = {int(k): v for k, v in p.items()}
        med0 = statistics.median(p[0]["rel_dx"])
        medN = statistics.median(p[s]["rel_dx"])
        ch0 = statistics.mean(p[0]["changed"])
        pl = "/".join(f"{p[k]['loss']:.3f}" for k in (0, s // 4, s // 2, s) if k in p)
        end = statistics.mean(r["losses"][-20:])
        d = (statistics.mean(abs(a - b) for a, b in zip(r["losses"], ref["losses"])) if ref else float("nan"))
        gam = statistics.mean(r["gamma_mean_abs"]) if r["gamma_mean_abs"] else float("nan")
        gn = [g for g in r.get("grad_norms", []) if g is not None]
        gn = f"{statistics.median(gn):.3g}" if gn else "n/a"
        lines.append(f"| {r['mode']} | {med0:.2e} | {ch0:.3f} | {medN:.2e} | {pl} | {end:.3f} | {d:.4f} | "
                     f"{gam:.2e} | {gn} | {r['skipped_steps']} |")
    marg = next((r["probe_marginal_loss"] for r in results if "probe_marginal_loss" in r), None)
    if marg is not None:
        lines.append(f"\nprobe loss of the label marginal (a model that ignores context): {marg:.3f}")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--modes", default=DEFAULT_MODES)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--img", type=int, default=32)
    ap.add_argument("--patch", type=int, default=8)
    ap.add_argument("--lowres", type=int, default=3, help="images are bicubic upsamplings of lowres x lowres noise")
    ap.add_argument("--levels", type=int, default=2, choices=(2, 4), help="levels per channel of a patch's token")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--mlp", type=int, default=256)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--layer-scale", type=float, default=1e-5)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--zero", type=int, default=2)
    ap.add_argument("--time-models", default="beit_debug,beit_mini")
    ap.add_argument("--time-batch", type=int, default=8)
    ap.add_argument("--time-repeats", type=int, default=5)
    ap.add_argument("--sweep-gammas", default="1e-5,1e-4,1e-3,1e-2,1e-1")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--no-train", action="store_true")
    ap.add_argument("--timing-only", action="store_true")
    ap.add_argument("--no-timing", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.one:
        print(json.dumps(run_mode(args)))
        return
    cmd = "python " + " ".join([str(Path(__file__).relative_to(ROOT))] + sys.argv[1:])
    out = {"command": cmd, "args": vars(args)}
    if not (args.timing_only or args.no_sweep):
        out["sweep"] = gamma_sweep(args)
        print(sweep_report(out["sweep"]), flush=True)
    if not (args.timing_only or args.no_train):
        modes = [m for m in args.modes.split(",") if m]
        bad = [m for m in modes if split_mode(m, 0)[0] not in ALL_MODES]
        if bad:
            ap.error(f"unknown mode(s) {bad}; choose from {ALL_MODES}")
        results = []
        for m in modes:
            t = time.time()
            results.append(spawn(m, args))
            print(f"{m}: {time.time() - t:.0f} s", flush=True)
            out["runs"] = results
            if args.json:  # after every mode: a long run keeps what it has
                Path(args.json).write_text(json.dumps(out, indent=1))
        print(report(results, args))
    if not args.no_timing:
        out["timing"] = timing(args)
    print(f"command: {cmd}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
