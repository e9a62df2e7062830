"""Does MIM pretraining help?  (a) fine-tune from scratch, (b) MIM-pretrain then fine-tune with the
same fine-tuning budget, (c) linear probe on the frozen pretrained backbone -- several seeds, on
the embedded labelled dataset, through the real launchers (one process each).

    .venv/bin/python experiments/pretraining_helps.py [--seeds 3] [--ft_steps 60] [--pt_steps 150] ...

Prints a markdown table of final top-1 (mean +- std over seeds) and writes accuracy-vs-step curves
to OUT/curves.png.  The default budget (beit_debug at 64 px) is sized for ~10-15 minutes on 2 free
CPU cores; it is a smoke-scale comparison, not a reproduction of the paper's numbers.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


def launch(script: str, run_dir: Path, sets: list[str], log: Path) -> None:
    cmd = [PY, f"launch/{script}", "--deepspeed_config", "ds_configs/zero2.json", "--run_dir", str(run_dir)]
    for s in sets:
        cmd += ["--set", s]
    t0 = time.time()
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        r = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    print(f"  {script} -> {run_dir.name}: exit {r.returncode} ({time.time() - t0:.0f}s)", flush=True)
    if r.returncode:
        raise SystemExit(f"{script} failed (exit {r.returncode}); see {log}")


def evals(run_dir: Path) -> list[dict]:
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return [r for r in rows if r.get("kind") == "eval"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--model", default="beit_debug")
    p.add_argument("--size", type=int, default=64, help="input resolution (tokenizer sees size/2)")
    p.add_argument("--tok_steps", type=int, default=60)
    p.add_argument("--pt_steps", type=int, default=150)
    p.add_argument("--ft_steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--eval_batches", type=int, default=16, help="x 16 images per evaluation (0: all 500)")
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--ft_lr", type=float, default=2e-3)
    p.add_argument("--probe_lr", type=float, default=1e-2)
    p.add_argument("--out", default=str(REPO / "runs" / "pretraining_helps"))
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "launch.log"
    grid = a.size // 16
    common = [f"model.name={a.model}", f"model.img_size={a.size}", f"data.input_size={a.size}",
              "data.num_workers=1", "train.log_every=10", f"train.global_batch={a.batch}", "train.micro_batch=16",
              "checkpoint.resume=none", "checkpoint.overwrite=true", "model.drop_path=0.0"]
    t_start = time.time()

    tok = out / "tokenizer"
    tok_file = tok / "tokenizer.safetensors"
    if not tok_file.exists():
        print("tokenizer", flush=True)
        launch("train_tokenizer.py", tok, ["data.num_workers=1", f"tokenizer.vocab_size={a.vocab}",
                                          f"data.second_input_size={a.size // 2}", f"train.max_steps={a.tok_steps}",
                                          "train.log_every=10", "checkpoint.resume=none",
                                          "checkpoint.overwrite=true"], log)

    arms = {"scratch": [], "pretrained": [], "linear_probe": []}
    for seed in range(a.seeds):
        print(f"seed {seed}", flush=True)
        mim = out / f"mim_s{seed}"
        launch("pretrain.py", mim, common + [
            f"train.seed={seed}", f"train.max_steps={a.pt_steps}", f"tokenizer.checkpoint={tok_file}",
            f"tokenizer.vocab_size={a.vocab}", f"data.second_input_size={a.size // 2}",
            f"data.num_mask_patches={max(1, round(0.4 * grid * grid))}", "data.min_mask_patches=2",
            "optim.lr=1.5e-3", "optim.warmup_steps=10", "train.eval_batches=4"], log)
        ft = common + [f"train.seed={seed}", f"train.max_steps={a.ft_steps}", "model.num_classes=10",
                       f"train.eval_every={max(1, a.ft_steps // 4)}", f"train.eval_batches={a.eval_batches}",
                       "optim.warmup_steps=5", "optim.min_lr=1e-6"]
        runs = {
            # training from scratch gets no layer decay (nothing to preserve in the lower layers)
            "scratch": ft + ["init.from=scratch", f"optim.lr={a.ft_lr}", "optim.layer_decay=1.0"],
            "pretrained": ft + [f"init.from={mim}", f"optim.lr={a.ft_lr}", "optim.layer_decay=0.65"],
            "linear_probe": ft + [f"init.from={mim}", "finetune.linear_probe=true", f"optim.lr={a.probe_lr}",
                                  "optim.weight_decay=0.0", "optim.layer_decay=1.0"],
        }
        for arm, sets in runs.items():
            rd = out / f"{arm}_s{seed}"
            launch("finetune.py", rd, sets, log)
            arms[arm].append(evals(rd))

    # ---- table
    lines = [f"| arm | final top-1 (mean ± std, {a.seeds} seeds) | best top-1 | per seed |", "|---|---|---|---|"]
    for arm, runs in arms.items():
        final = [r[-1]["val_top1"] for r in runs]
        best = [max(e["val_top1"] for e in r) for r in runs]
        sd = statistics.stdev(final) if len(final) > 1 else 0.0
        lines.append(f"| {arm} | {100 * statistics.mean(final):.1f} ± {100 * sd:.1f} | "
                     f"{100 * statistics.mean(best):.1f} | {', '.join(f'{100 * x:.1f}' for x in final)} |")
    table = "\n".join(lines)
    budget = (f"{a.model} at {a.size}px; tokenizer {a.tok_steps} steps (vocab {a.vocab}); MIM {a.pt_steps} steps; "
              f"fine-tuning / probe {a.ft_steps} steps; global batch {a.batch}; eval on "
              f"{'all 500' if not a.eval_batches else a.eval_batches * 16} val images; chance = 10.0")
    print("\n" + budget + "\n\n" + table, flush=True)

    # ---- curves
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for arm, runs in arms.items():
        steps = [e["step"] for e in runs[0]]
        mean = [statistics.mean(r[i]["val_top1"] for r in runs) for i in range(len(steps))]
        ax.plot(steps, [100 * m for m in mean], marker="o", label=arm)
        for r in runs:
            ax.plot([e["step"] for e in r], [100 * e["val_top1"] for e in r], alpha=0.2,
                    color=ax.lines[-1].get_color())
    ax.axhline(10, ls=":", color="gray", label="chance")
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel("val top-1 (%)")
    ax.set_title(f"{a.model} @ {a.size}px, MIM {a.pt_steps} steps")
    ax.legend()
    fig.tight_layout()
    png = out / "curves.png"
    fig.savefig(png, dpi=120)
    (out / "table.md").write_text(budget + "\n\n" + table + "\n")
    print(f"\ncurves: {png}\ntable: {out / 'table.md'}\ntotal time {(time.time() - t_start) / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
