"""Does MIM pretraining help?  (a) fine-tune from scratch, (b) MIM-pretrain then fine-tune with the
same fine-tuning budget, (c) linear probe on the frozen pretrained backbone, and the control
(d) the same linear probe on a frozen RANDOM backbone -- several seeds, on the embedded labelled
dataset, through the real launchers (one process each).

    .venv/bin/python experiments/pretraining_helps.py [--seeds 3] [--ft_steps 200] [--pt_steps 800] ...

Prints a markdown table of top-1 (mean +- std over seeds, early and final) and writes
accuracy-vs-step curves to OUT/curves.png, the table to OUT/table.md and per-stage wall times to
OUT/timings.json.  The defaults are the budget of the table in docs/finetune.md (beit_mini at
112 px); see there for the wall time and for what each setting was chosen against.

Seeds: the tokenizer is trained once.  With --pt_runs 1 (default) MIM pretraining runs once
(seed 0) and every fine-tuning seed starts from it, as in the paper (one pretraining, several
fine-tunings); --pt_runs N pretrains N times and seed s fine-tunes from pretraining s % N.
The scratch arm's seed s and the pretrained arm's seed s share the data order and head init.
A tokenizer or MIM run already in OUT with the same settings is reused (delete OUT to start over).
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


def launch(script: str, run_dir: Path, sets: list[str], log: Path, timings: dict) -> None:
    cmd = [PY, f"launch/{script}", "--deepspeed_config", "ds_configs/zero2.json", "--run_dir", str(run_dir)]
    for s in sets:
        cmd += ["--set", s]
    t0 = time.time()
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        r = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    timings[run_dir.name] = round(time.time() - t0, 1)
    print(f"  {script} -> {run_dir.name}: exit {r.returncode} ({time.time() - t0:.0f}s)", flush=True)
    if r.returncode:
        raise SystemExit(f"{script} failed (exit {r.returncode}); see {log}")
    (run_dir / "launch_sets.json").write_text(json.dumps(sets))


def reusable(run_dir: Path, sets: list[str], steps: int) -> bool:
    """A finished run of exactly these settings is already there."""
    f = run_dir / "launch_sets.json"
    return f.exists() and json.loads(f.read_text()) == sets and \
        (run_dir / "checkpoints" / f"step_{steps:08d}" / "COMPLETE").exists()


def rows(run_dir: Path, kind: str) -> list[dict]:
    out = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return [r for r in out if r.get("kind") == kind]


ARM_LABELS = {"scratch": "(a) scratch", "pretrained": "(b) MIM-pretrained, fine-tuned",
              "linear_probe": "(c) linear probe, frozen MIM backbone",
              "probe_random": "(d) linear probe, frozen random backbone (control)"}


def add_budget_args(p: argparse.ArgumentParser) -> None:
    """The model, tokenizer, pretraining and fine-tuning budget (shared with ablations.py, whose
    runs are reusable here and the other way round because the settings are the same)."""
    p.add_argument("--model", default="beit_mini")
    p.add_argument("--size", type=int, default=112, help="input resolution (tokenizer sees size/2)")
    p.add_argument("--tok_steps", type=int, default=400)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--pt_steps", type=int, default=1000)
    p.add_argument("--pt_lr", type=float, default=1.5e-3)
    p.add_argument("--mask_ratio", type=float, default=0.4, help="fraction of patches masked in MIM")
    p.add_argument("--ft_steps", type=int, default=200)
    p.add_argument("--ft_lr", type=float, default=2e-3)
    p.add_argument("--layer_decay", type=float, default=0.85,
                   help="layer-wise lr decay of the pretrained arm(s) (scratch always uses 1.0)")
    p.add_argument("--probe_lr", type=float, default=1e-2)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--eval_batches", type=int, default=0, help="x 16 images per evaluation (0: all 500)")


def common_sets(a) -> list[str]:
    """--set values every launch of these experiments shares."""
    return [f"model.name={a.model}", f"model.img_size={a.size}", f"data.input_size={a.size}",
            "data.num_workers=1", "train.log_every=10", f"train.global_batch={a.batch}", "train.micro_batch=16",
            "checkpoint.resume=none", "checkpoint.overwrite=true", "model.drop_path=0.0"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3, help="fine-tuning seeds per arm")
    p.add_argument("--pt_runs", type=int, default=1, help="MIM pretraining runs (seed s uses run s %% pt_runs)")
    add_budget_args(p)
    p.add_argument("--no_probe_random", action="store_true", help="skip the random-backbone control arm")
    p.add_argument("--out", default=str(REPO / "runs" / "pretraining_helps"))
    p.add_argument("--report_only", action="store_true",
                   help="launch nothing: rebuild the table and curves from the runs already in OUT")
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "launch.log"
    grid = a.size // 16
    common = common_sets(a)
    t_start = time.time()
    timings: dict[str, float] = {}

    tok = out / "tokenizer"
    tok_file = tok / "tokenizer.safetensors"
    tok_sets = ["data.num_workers=1", f"tokenizer.vocab_size={a.vocab}", f"data.second_input_size={a.size // 2}",
                f"train.max_steps={a.tok_steps}", "train.log_every=10", "checkpoint.resume=none",
                "checkpoint.overwrite=true"]
    if a.report_only or (tok_file.exists() and reusable(tok, tok_sets, a.tok_steps)):
        print(f"tokenizer: reusing {tok_file}", flush=True)
    else:
        print("tokenizer", flush=True)
        launch("train_tokenizer.py", tok, tok_sets, log, timings)
    tok_eval = rows(tok, "eval")[-1]

    mims = []
    for r in range(a.pt_runs):
        mim = out / f"mim_r{r}"
        sets = common + [
            f"train.seed={r}", f"train.max_steps={a.pt_steps}", f"tokenizer.checkpoint={tok_file}",
            f"tokenizer.vocab_size={a.vocab}", f"data.second_input_size={a.size // 2}",
            f"data.num_mask_patches={max(1, round(a.mask_ratio * grid * grid))}", "data.min_mask_patches=2",
            f"optim.lr={a.pt_lr}", "optim.warmup_steps=20", "train.eval_batches=8"]
        if a.report_only or reusable(mim, sets, a.pt_steps):
            print(f"MIM pretraining {r}: reusing {mim}", flush=True)
        else:
            print(f"MIM pretraining {r}", flush=True)
            launch("pretrain.py", mim, sets, log, timings)
        mims.append(mim)

    arms = {k: [] for k in ARM_LABELS if not (k == "probe_random" and a.no_probe_random)}
    for seed in range(a.seeds):
        print(f"fine-tuning seed {seed}", flush=True)
        mim = mims[seed % a.pt_runs]
        ft = common + [f"train.seed={seed}", f"train.max_steps={a.ft_steps}", "model.num_classes=10",
                       f"train.eval_every={max(1, a.ft_steps // 4)}", f"train.eval_batches={a.eval_batches}",
                       "optim.warmup_steps=5", "optim.min_lr=1e-6"]
        probe = ["finetune.linear_probe=true", f"optim.lr={a.probe_lr}", "optim.weight_decay=0.0",
                 "optim.layer_decay=1.0"]
        runs = {
            # training from scratch gets no layer decay (nothing to preserve in the lower layers)
            "scratch": ft + ["init.from=scratch", f"optim.lr={a.ft_lr}", "optim.layer_decay=1.0"],
            "pretrained": ft + [f"init.from={mim}", f"optim.lr={a.ft_lr}", f"optim.layer_decay={a.layer_decay}"],
            "linear_probe": ft + [f"init.from={mim}"] + probe,
            "probe_random": ft + ["init.from=scratch"] + probe,
        }
        for arm in arms:
            rd = out / f"{arm}_s{seed}"
            if not a.report_only:
                launch("finetune.py", rd, runs[arm], log, timings)
            arms[arm].append(rows(rd, "eval"))

    # ---- table
    first = arms["scratch"][0][0]["step"]
    lines = [f"| arm | top-1 at step {first} | final top-1 (step {a.ft_steps}) | best top-1 | per seed (final) |",
             "|---|---|---|---|---|"]
    for arm, runs in arms.items():
        early = [r[0]["val_top1"] for r in runs]
        final = [r[-1]["val_top1"] for r in runs]
        best = [max(e["val_top1"] for e in r) for r in runs]

        def ms(xs):
            sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
            return f"{100 * statistics.mean(xs):.1f} ± {100 * sd:.1f}"
        lines.append(f"| {ARM_LABELS[arm]} | {ms(early)} | **{ms(final)}** | {100 * statistics.mean(best):.1f} | "
                     f"{', '.join(f'{100 * x:.1f}' for x in final)} |")
    table = "\n".join(lines)
    mim_evals = [rows(m, "eval")[-1] for m in mims]
    total_min = (time.time() - t_start) / 60
    if a.report_only:  # the wall time of the run that made them
        total_min = json.loads((out / "timings.json").read_text())["total_min"]
    budget = (f"{a.model} at {a.size}px; tokenizer {a.tok_steps} steps (vocab {a.vocab}: "
              f"{tok_eval['val_codes_used']} codes used on val images, perplexity {tok_eval['val_perplexity']:.1f}); "
              f"MIM {a.pt_steps} steps x {a.batch} images ({a.pt_steps * a.batch / 2600:.1f} epochs), "
              f"{a.pt_runs} pretraining run(s), mask ratio {a.mask_ratio}, held-out MIM accuracy "
              + ", ".join(f"{e['val_mim_acc']:.3f}" for e in mim_evals) + " vs most-frequent-token "
              + ", ".join(f"{e['val_majority_acc']:.3f}" for e in mim_evals) + "; "
              f"fine-tuning / probe {a.ft_steps} steps x {a.batch} images, lr {a.ft_lr}, layer decay "
              f"{a.layer_decay} (pretrained arm) / 1.0 (scratch); {a.seeds} fine-tuning seeds; evaluation on "
              f"{'all 500' if not a.eval_batches else a.eval_batches * 16} val images; chance = 10.0; "
              f"wall time {total_min:.1f} min")
    print("\n" + budget + "\n\n" + table, flush=True)

    # ---- curves
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 5.0))
    for arm, runs in arms.items():
        steps = [e["step"] for e in runs[0]]
        mean = [statistics.mean(r[i]["val_top1"] for r in runs) for i in range(len(steps))]
        ax.plot(steps, [100 * m for m in mean], marker="o", label=ARM_LABELS[arm],
                ls="--" if arm == "probe_random" else "-")
        for r in runs:
            ax.plot([e["step"] for e in r], [100 * e["val_top1"] for e in r], alpha=0.2,
                    color=ax.lines[-1].get_color())
    ax.axhline(10, ls=":", color="gray", label="chance")
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel("val top-1 (%)")
    ax.set_title(f"{a.model} @ {a.size}px: MIM {a.pt_steps} steps, {a.seeds} seeds (mean, seeds faint)")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    fig.tight_layout()
    png = out / "curves.png"
    fig.savefig(png, dpi=120)
    (out / "table.md").write_text(budget + "\n\n" + table + "\n")
    if not a.report_only:
        (out / "timings.json").write_text(json.dumps(dict(timings, total_min=round(total_min, 2)), indent=1))
    print(f"\ncurves: {png}\ntable: {out / 'table.md'}\ntotal time {total_min:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
