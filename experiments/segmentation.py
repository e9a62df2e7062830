"""Does BEiT pretraining help segmentation?  On the embedded segmentation set (11 classes:
background + 10 shape families, per-pixel masks drawn by the generator), with one fixed budget:
(a) UperNet + BEiT from scratch, (b) from the default MIM pretraining, (c) from MIM pretraining
followed by classification fine-tuning (intermediate fine-tuning) -- several seeds, through the
real launchers (one process each).

    .venv/bin/python experiments/segmentation.py [--seeds 3] [--seg_steps 800] [--pt_out DIR] ...

The tokenizer, the MIM pretraining and the classification fine-tuning come from
experiments/pretraining_helps.py (run here with --seeds 1 unless PT_OUT already holds them:
its mim_r0 is arm (b)'s start and its pretrained_s0, fine-tuned on the embedded labels from
mim_r0, is arm (c)'s). Every arm's seed s shares the data order and decoder init.

Writes OUT/table.md (mIoU mean +- std over seeds, early and final, mAcc, aAcc), OUT/curves.png
(val mIoU vs step) and OUT/predictions.png (image | ground truth | prediction of each arm's
seed 0 at the end), and OUT/timings.json.
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from pretraining_helps import PY, launch, reusable, rows  # noqa: E402 - the same launch/record helpers

ARM_LABELS = {"scratch": "(a) scratch", "mim": "(b) MIM-pretrained",
              "intermediate": "(c) MIM + classification fine-tuning"}


def pretrain(a, pt_out: Path, log: Path, timings: dict) -> tuple[Path, Path]:
    """(MIM run, MIM->classification run) from pretraining_helps.py (which reuses what it finds)."""
    mim, cls = pt_out / "mim_r0", pt_out / "pretrained_s0"
    done = all((d / "checkpoints").is_dir() and any((c / "COMPLETE").exists()
                                                    for c in (d / "checkpoints").iterdir()) for d in (mim, cls))
    if not done:
        cmd = [PY, "experiments/pretraining_helps.py", "--seeds", "1", "--no_probe_random", "--out", str(pt_out),
               "--model", a.model, "--size", str(a.size), *shlex.split(a.pt_args)]
        print("pretraining (experiments/pretraining_helps.py --seeds 1)", flush=True)
        t0 = time.time()
        with open(log, "a") as f:
            f.write("$ " + " ".join(cmd) + "\n")
            f.flush()
            r = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
        timings["pretraining_helps"] = round(time.time() - t0, 1)
        if r.returncode:
            raise SystemExit(f"pretraining failed (exit {r.returncode}); see {log}")
    else:
        print(f"pretraining: reusing {mim} and {cls}", flush=True)
    return mim, cls


def add_seg_args(p: argparse.ArgumentParser) -> None:
    """The segmentation budget (shared with ablations.py's mIoU column)."""
    p.add_argument("--seg_steps", type=int, default=800,
                   help="below ~300 steps every arm predicts background only (measured: mIoU 0.073 = the prior at 200)")
    p.add_argument("--seg_lr", type=float, default=2e-3)
    p.add_argument("--decoder", default="upernet", choices=("upernet", "pup"))
    p.add_argument("--channels", type=int, default=64, help="decoder width")
    p.add_argument("--seg_batch", type=int, default=16)
    p.add_argument("--seg_eval_batches", type=int, default=0, help="x seg_batch images per evaluation (0: all 500)")


def seg_common_sets(a) -> list[str]:
    """--set values every segmentation launch of these experiments shares."""
    return [f"model.name={a.model}", f"model.img_size={a.size}", "model.num_classes=11", "model.drop_path=0.0",
            f"segment.decoder={a.decoder}", f"segment.channels={a.channels}",
            f"segment.aux_channels={a.channels // 2}", "data.num_workers=1", "train.log_every=10",
            f"train.global_batch={a.seg_batch}", f"train.micro_batch={a.seg_batch}", f"train.max_steps={a.seg_steps}",
            f"train.eval_every={max(1, a.seg_steps // 4)}", f"train.eval_batches={a.seg_eval_batches}",
            f"optim.lr={a.seg_lr}", "optim.warmup_steps=10", "optim.min_lr=1e-6", "optim.schedule=poly",
            "checkpoint.resume=none", "checkpoint.overwrite=true"]


def segment_run(a, rd: Path, common: list[str], seed: int, init, layer_decay: float, log: Path,
                timings: dict) -> list[dict]:
    """One segmentation fine-tuning (reused when a finished run of the same settings is in rd): its eval rows."""
    sets = common + [f"train.seed={seed}", f"init.from={init}", f"optim.layer_decay={layer_decay}"]
    if a.report_only or reusable(rd, sets, a.seg_steps):
        if not a.report_only:
            print(f"  reusing {rd.name}", flush=True)
    else:
        launch("segment.py", rd, sets, log, timings)
    return rows(rd, "eval")


def ms(xs) -> str:
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{100 * statistics.mean(xs):.1f} ± {100 * sd:.1f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--model", default="beit_mini")
    p.add_argument("--size", type=int, default=112, help="pretraining resolution and segmentation crop")
    add_seg_args(p)
    p.add_argument("--layer_decay", type=float, default=0.85, help="pretrained arms; scratch uses 1.0")
    p.add_argument("--pt_out", default=str(REPO / "runs" / "pretraining_helps"),
                   help="where pretraining_helps.py keeps (or makes) the tokenizer, MIM and classification runs")
    p.add_argument("--pt_args", default="", help="more arguments for pretraining_helps.py, e.g. "
                   "'--tok_steps 100 --pt_steps 300 --ft_steps 100' for a smaller budget")
    p.add_argument("--out", default=str(REPO / "runs" / "segmentation"))
    p.add_argument("--report_only", action="store_true", help="rebuild table and figures from OUT")
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "launch.log"
    t_start, timings = time.time(), {}
    mim, cls = (Path(a.pt_out) / "mim_r0", Path(a.pt_out) / "pretrained_s0") if a.report_only else \
        pretrain(a, Path(a.pt_out), log, timings)

    common = seg_common_sets(a)
    starts = {"scratch": ("scratch", 1.0), "mim": (mim, a.layer_decay), "intermediate": (cls, a.layer_decay)}
    arms = {k: [] for k in ARM_LABELS}
    for seed in range(a.seeds):
        print(f"segmentation seed {seed}", flush=True)
        for arm, (init, ld) in starts.items():
            rd = out / f"{arm}_s{seed}"
            arms[arm].append(segment_run(a, rd, common, seed, init, ld, log, timings))

    # ---- table
    first = arms["scratch"][0][0]["step"]
    lines = [f"| arm | mIoU at step {first} | final mIoU (step {a.seg_steps}) | best mIoU | final mAcc | "
             f"final aAcc | per seed (final mIoU) |", "|---|---|---|---|---|---|---|"]
    for arm, runs in arms.items():
        fin = [r[-1] for r in runs]
        lines.append(f"| {ARM_LABELS[arm]} | {ms([r[0]['val_mIoU'] for r in runs])} | "
                     f"**{ms([e['val_mIoU'] for e in fin])}** | "
                     f"{100 * statistics.mean(max(e['val_mIoU'] for e in r) for r in runs):.1f} | "
                     f"{ms([e['val_mAcc'] for e in fin])} | {ms([e['val_aAcc'] for e in fin])} | "
                     + ", ".join(f"{100 * e['val_mIoU']:.1f}" for e in fin) + " |")
    total_min = (time.time() - t_start) / 60
    if a.report_only and (out / "timings.json").exists():
        total_min = json.loads((out / "timings.json").read_text())["total_min"]
    budget = (f"{a.model} + {a.decoder} ({a.channels} ch) at {a.size}px crops on the embedded segmentation set "
              f"(2600 train / 500 val images, 11 classes); {a.seg_steps} steps x {a.seg_batch} images "
              f"({a.seg_steps * a.seg_batch / 2600:.1f} epochs), lr {a.seg_lr}, poly, layer decay {a.layer_decay} "
              f"(pretrained arms) / 1.0 (scratch); {a.seeds} seeds; starts: (b) {mim}, (c) {cls}; "
              f"evaluation on {'all 500' if not a.seg_eval_batches else a.seg_eval_batches * a.seg_batch} val images; "
              f"wall time {total_min:.1f} min")
    table = "\n".join(lines)
    print("\n" + budget + "\n\n" + table, flush=True)

    # ---- figures
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4.6))
    for arm, runs in arms.items():
        steps = [e["step"] for e in runs[0]]
        mean = [statistics.mean(r[i]["val_mIoU"] for r in runs) for i in range(len(steps))]
        ax.plot(steps, [100 * m for m in mean], marker="o", label=ARM_LABELS[arm])
        for r in runs:
            ax.plot([e["step"] for e in r], [100 * e["val_mIoU"] for e in r], alpha=0.2,
                    color=ax.lines[-1].get_color())
    ax.set_xlabel("segmentation fine-tuning step")
    ax.set_ylabel("val mIoU (%)")
    ax.set_title(f"{a.model} + {a.decoder} @ {a.size}px, {a.seeds} seeds (mean, seeds faint)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=120)

    fig, axes = plt.subplots(len(arms), 1, figsize=(6, 2.3 * len(arms) + 0.2))
    for axis, arm in zip(axes, arms):
        axis.imshow(plt.imread(out / f"{arm}_s0" / "segmentation_predictions.png"))
        axis.set_title(f"{ARM_LABELS[arm]}: image | ground truth | prediction", fontsize=8)
        axis.axis("off")
    fig.tight_layout()
    fig.savefig(out / "predictions.png", dpi=120)
    (out / "table.md").write_text(budget + "\n\n" + table + "\n")
    if not a.report_only:
        (out / "timings.json").write_text(json.dumps(dict(timings, total_min=round(total_min, 2)), indent=1))
    print(f"\ncurves: {out / 'curves.png'}\npredictions: {out / 'predictions.png'}\ntable: {out / 'table.md'}",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
