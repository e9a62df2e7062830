"""The BEiT paper's ablations on the embedded data, through the real launchers (one process each).

    .venv/bin/python experiments/ablations.py [--seeds 3] [--pt_steps 1000] [--ft_steps 200] ...

Pretrains each variant with one budget, fine-tunes and linear-probes each the same way (several
seeds), and prints the paper-style table (its Table 4 rows): top-1 after fine-tuning and after a
linear probe of the frozen backbone for
  BEiT (visual tokens, blockwise masking)       mim.target=tokens  data.mask_mode=block
  random masking                                mim.target=tokens  data.mask_mode=random
  pixel regression (blockwise)                  mim.target=pixels  data.mask_mode=block
  pixel regression with random masking          mim.target=pixels  data.mask_mode=random
  BEiT with half the pretraining steps          (its own schedule over pt_steps / 2)
  training from scratch                         (probe column: a frozen random backbone)
and, with --miou_seeds N, the mIoU after segmentation fine-tuning of each (experiments/segmentation.py's
budget on the embedded segmentation set); then which of the paper's orderings hold here, with the
difference and its spread. Writes
OUT/table.md, OUT/curves.png (fine-tuning and probe top-1 vs step, mean over seeds) and
OUT/timings.json.

Every pretraining and fine-tuning run already in OUT with the same settings and a complete final
checkpoint is reused (delete OUT, or the run's folder, to redo it). The BEiT arm uses exactly the
settings of experiments/pretraining_helps.py's MIM run (folder names too), so `--out
runs/pretraining_helps` reuses that experiment's tokenizer and pretraining. The defaults are the
budget of docs/ablations.md (beit_mini at 112 px); see there for the wall time.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pretraining_helps import REPO, add_budget_args, common_sets, launch, reusable, rows  # noqa: E402  (same folder)
from segmentation import add_seg_args, seg_common_sets, segment_run  # noqa: E402

# arm -> (label, pretraining sets beyond the BEiT arm's, pretraining steps as a fraction)
ARMS = {
    "beit": ("BEiT (tokens, blockwise)", [], 1.0),
    "random": ("random masking (tokens)", ["data.mask_mode=random"], 1.0),
    "pixels": ("pixel regression (blockwise)", ["mim.target=pixels"], 1.0),
    "pixels_random": ("pixel regression, random masking", ["mim.target=pixels", "data.mask_mode=random"], 1.0),
    "beit_half": ("BEiT, half the pretraining steps", [], 0.5),
    "scratch": ("training from scratch", None, 0.0),
}
MIM_DIR = {"beit": "mim_r0"}  # pretraining_helps.py's name for the same run
# The paper's claims, as (better arm, worse arm).
ORDERINGS = [("beit", "random"), ("beit", "pixels"), ("pixels", "pixels_random"), ("random", "pixels_random"),
             ("beit", "beit_half"), ("beit", "scratch")]


def _mean_sd(xs: list[float]) -> tuple[float, float]:
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _fmt(xs: list[float]) -> str:
    m, s = _mean_sd(xs)
    return f"{100 * m:.1f} ± {100 * s:.1f}"


def _mim_metric(run: Path) -> str:
    e = rows(run, "eval")[-1]
    if "val_mim_acc" in e:
        return f"token acc {e['val_mim_acc']:.3f} (majority {e['val_majority_acc']:.3f})"
    return f"pixel MSE {e['val_pixel_mse']:.3f} (predicting 0: {e['val_pixel_mse_zero']:.3f})"


def pretrain(a, out: Path, common: list[str], tok_file: Path, log: Path, timings: dict) -> dict[str, Path]:
    grid = a.size // 16
    mims = {}
    for arm, (label, extra, frac) in ARMS.items():
        if extra is None:
            continue
        steps = max(1, int(a.pt_steps * frac))
        # In pretraining_helps.py's order, so that its MIM run is reusable as the BEiT arm.
        tokens = "mim.target=pixels" not in extra  # pixel targets load no tokenizer (an error if given)
        sets = common + ["train.seed=0", f"train.max_steps={steps}"] + \
            ([f"tokenizer.checkpoint={tok_file}"] if tokens else []) + [
            f"tokenizer.vocab_size={a.vocab}", f"data.second_input_size={a.size // 2}",
            f"data.num_mask_patches={max(1, round(a.mask_ratio * grid * grid))}", "data.min_mask_patches=2",
            f"optim.lr={a.pt_lr}", "optim.warmup_steps=20", "train.eval_batches=8"] + extra
        run = out / MIM_DIR.get(arm, f"mim_{arm}")
        if a.report_only or reusable(run, sets, steps):
            print(f"pretraining {arm}: reusing {run}", flush=True)
        else:
            print(f"pretraining {arm} ({label}, {steps} steps)", flush=True)
            launch("pretrain.py", run, sets, log, timings)
        mims[arm] = run
    return mims


def finetune(a, out: Path, common: list[str], mims: dict[str, Path], log: Path, timings: dict) -> dict:
    """-> {arm: {"ft": [eval rows per seed], "probe": [...]}}"""
    res = {arm: {"ft": [], "probe": []} for arm in ARMS}
    for seed in range(a.seeds):
        ft = common + [f"train.seed={seed}", f"train.max_steps={a.ft_steps}", "model.num_classes=10",
                       f"train.eval_every={max(1, a.ft_steps // 4)}", f"train.eval_batches={a.eval_batches}",
                       "optim.warmup_steps=5", "optim.min_lr=1e-6"]
        probe = ["finetune.linear_probe=true", f"optim.lr={a.probe_lr}", "optim.weight_decay=0.0",
                 "optim.layer_decay=1.0"]
        for arm in ARMS:
            init = f"init.from={mims[arm]}" if arm in mims else "init.from=scratch"
            decay = a.layer_decay if arm in mims else 1.0  # scratch: nothing in the lower layers to keep
            kinds = [("ft", ft + [init, f"optim.lr={a.ft_lr}", f"optim.layer_decay={decay}"])]
            if not a.no_probe:
                kinds.append(("probe", ft + [init] + probe))
            for kind, sets in kinds:
                rd = out / f"{kind}_{arm}_s{seed}"
                if not (a.report_only or reusable(rd, sets, a.ft_steps)):
                    print(f"{kind} {arm} seed {seed}", flush=True)
                    launch("finetune.py", rd, sets, log, timings)
                res[arm][kind].append(rows(rd, "eval"))
    return res


def segment(a, out: Path, mims: dict[str, Path], log: Path, timings: dict) -> dict:
    """-> {arm: [segmentation eval rows per seed]} (the mIoU column)."""
    common, res = seg_common_sets(a), {arm: [] for arm in ARMS}
    for seed in range(a.miou_seeds):
        for arm in ARMS:
            print(f"segmentation {arm} seed {seed}", flush=True)
            init, decay = (mims[arm], a.layer_decay) if arm in mims else ("scratch", 1.0)
            res[arm].append(segment_run(a, out / f"seg_{arm}_s{seed}", common, seed, init, decay, log, timings))
    return res


def table(a, res: dict, mims: dict[str, Path], seg: dict | None = None) -> tuple[str, str]:
    seg = seg or {arm: [] for arm in ARMS}
    with_seg = any(seg.values())
    lines = ["| variant | fine-tuned top-1 | linear probe top-1 |" + (" segmentation mIoU |" if with_seg else "")
             + " pretraining steps | held-out MIM |", "|---|---|---|" + ("---|" if with_seg else "") + "---|---|"]
    for arm, (label, _, frac) in ARMS.items():
        ft = [r[-1]["val_top1"] for r in res[arm]["ft"]]
        pr = [r[-1]["val_top1"] for r in res[arm]["probe"]]
        steps = int(a.pt_steps * frac) if arm in mims else 0
        probe = "-" if a.no_probe else _fmt(pr) + (" (random backbone)" if arm == "scratch" else "")
        miou = f" {_fmt([r[-1]['val_mIoU'] for r in seg[arm]])} |" if with_seg else ""
        lines.append(f"| {label} | **{_fmt(ft)}** | {probe} |{miou} "
                     f"{steps} | {_mim_metric(mims[arm]) if arm in mims else '-'} |")
    checks = ["| paper's ordering | fine-tuned: difference (points) | holds? | linear probe: difference | holds? |"
              + (" mIoU: difference | holds? |" if with_seg else ""), "|---|---|---|---|---|" + ("---|---|" if with_seg else "")]
    for hi, lo in ORDERINGS:
        cells = []
        for kind in ("ft", "probe") + (("seg",) if with_seg else ()):
            if kind == "seg":
                d = [x[-1]["val_mIoU"] - y[-1]["val_mIoU"] for x, y in zip(seg[hi], seg[lo])]
            else:
                d = [x[-1]["val_top1"] - y[-1]["val_top1"] for x, y in zip(res[hi][kind], res[lo][kind])]
            if not d:
                cells += ["-", "-"]
                continue
            m, s = _mean_sd(d)
            if len(d) < 2:  # one seed: a sign, no spread to judge it by
                verdict = "higher (1 seed)" if m > 0 else "lower (1 seed)" if m < 0 else "equal (1 seed)"
            else:
                verdict = "yes" if m - s > 0 else "no (reversed)" if m + s < 0 else "within the spread"
            cells += [f"{100 * m:+.1f} ± {100 * s:.1f}", verdict]
        checks.append(f"| {ARMS[hi][0]} > {ARMS[lo][0]} | {' | '.join(cells)} |")
    return "\n".join(lines), "\n".join(checks)


def curves(a, res: dict, png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    kinds = [("ft", "fine-tuning")] + ([] if a.no_probe else [("probe", "linear probe")])
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.5 * len(kinds), 4.8), sharey=True, squeeze=False)
    axes = axes[0]
    for ax, (kind, title) in zip(axes, kinds):
        for arm, (label, _, _) in ARMS.items():
            runs = res[arm][kind]
            if not runs:
                continue
            steps = [e["step"] for e in runs[0]]
            mean = [statistics.mean(r[i]["val_top1"] for r in runs) for i in range(len(steps))]
            ax.plot(steps, [100 * m for m in mean], marker="o", label=label, ls="--" if arm == "scratch" else "-")
        ax.axhline(10, ls=":", color="gray")
        ax.set_xlabel(f"{title} step")
        ax.set_title(f"{title} (mean of {a.seeds} seeds)")
    axes[0].set_ylabel("val top-1 (%)")
    axes[-1].legend(fontsize=8, loc="lower right")
    fig.suptitle(f"BEiT ablations: {a.model} @ {a.size}px, MIM {a.pt_steps} steps")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3, help="fine-tuning / probe seeds per arm")
    add_budget_args(p)
    p.add_argument("--no_probe", action="store_true", help="fine-tuning only (halves the fine-tuning launches)")
    p.add_argument("--miou_seeds", type=int, default=0,
                   help="segmentation seeds per arm for the mIoU column (0: no column; ~5.5 min per run on 2 cores)")
    add_seg_args(p)
    p.add_argument("--out", default=str(REPO / "runs" / "ablations"))
    p.add_argument("--report_only", action="store_true", help="launch nothing: rebuild from the runs in OUT")
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    log, t0 = out / "launch.log", time.time()
    # Launch times accumulate over invocations that add runs (e.g. the probes, later the mIoU column).
    earlier = json.loads((out / "timings.json").read_text()) if (out / "timings.json").exists() else {}
    timings = {k: v for k, v in earlier.items() if k != "total_min"}
    common = common_sets(a)   # the same as pretraining_helps.py's, so that its runs are reusable here
    tok = out / "tokenizer"
    tok_sets = ["data.num_workers=1", f"tokenizer.vocab_size={a.vocab}", f"data.second_input_size={a.size // 2}",
                f"train.max_steps={a.tok_steps}", "train.log_every=10", "checkpoint.resume=none",
                "checkpoint.overwrite=true"]
    if a.report_only or reusable(tok, tok_sets, a.tok_steps):
        print(f"tokenizer: reusing {tok}", flush=True)
    else:
        print("tokenizer", flush=True)
        launch("train_tokenizer.py", tok, tok_sets, log, timings)
    mims = pretrain(a, out, common, tok / "tokenizer.safetensors", log, timings)
    res = finetune(a, out, common, mims, log, timings)
    seg = segment(a, out, mims, log, timings)

    main_table, checks = table(a, res, mims, seg)
    tok_eval = rows(tok, "eval")[-1]
    total_min = (time.time() - t0) / 60 + earlier.get("total_min", 0.0)
    budget = (f"{a.model} at {a.size}px; tokenizer {a.tok_steps} steps (vocab {a.vocab}, {tok_eval['val_codes_used']} "
              f"codes used on val images); MIM {a.pt_steps} steps x {a.batch} images (half: {a.pt_steps // 2}), mask "
              f"ratio {a.mask_ratio}; fine-tuning (lr {a.ft_lr}, layer decay {a.layer_decay}, scratch 1.0) and "
              f"linear probe (lr {a.probe_lr}) {a.ft_steps} steps x {a.batch} images; {a.seeds} seeds; top-1 on "
              f"{'all 500' if not a.eval_batches else a.eval_batches * 16} val images, final step, mean ± std; "
              f"chance 10.0; 'holds' = the mean difference exceeds its std over seeds; wall time {total_min:.1f} min")
    if a.miou_seeds:
        budget += (f"; mIoU: {a.decoder} ({a.channels} ch) on the embedded segmentation set at {a.size}px, "
                   f"{a.seg_steps} steps x {a.seg_batch} images, lr {a.seg_lr}, {a.miou_seeds} seed(s), all 500 val "
                   f"images (experiments/segmentation.py's budget)")
    text = budget + "\n\n" + main_table + "\n\n" + checks + "\n"
    print("\n" + text, flush=True)
    png = out / "curves.png"
    curves(a, res, png)
    (out / "table.md").write_text(text)
    if not a.report_only:
        (out / "timings.json").write_text(json.dumps(dict(timings, total_min=round(total_min, 2)), indent=1))
    print(f"curves: {png}\ntable: {out / 'table.md'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
