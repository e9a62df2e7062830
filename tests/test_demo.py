"""The embedded default pretraining, exactly as `make demo` runs it (one process, CPU):
tokenizer first, then MIM; the MIM accuracy on held-out images must beat the best
context-free guess (always the most frequent token) by 1.5x, and the tokenizer's
reconstruction loss must fall by at least half."""
import re
import subprocess
import sys

from launching import REPO, read_metrics


def test_default_demo_learns(tmp_path):
    run_dir = tmp_path / "demo"
    res = subprocess.run([sys.executable, "launch/pretrain.py", "--deepspeed_config", "ds_configs/zero2.json",
                          "--run_dir", str(run_dir)], cwd=REPO, capture_output=True, text=True, timeout=900)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    assert "training the default tokenizer first" in out
    assert "running in fp32 instead" in out
    tail = out[out.rindex("run dir"):]
    for what in ("metrics.jsonl", "tensorboard", "checkpoints"):
        assert what in tail
    m = re.search(r"MIM accuracy ([0-9.]+) on held-out masked patches vs ([0-9.]+) for the most frequent token", tail)
    assert m, tail
    acc, baseline = float(m.group(1)), float(m.group(2))
    assert acc >= 1.5 * baseline, (acc, baseline)
    ev = read_metrics(run_dir, "eval")[-1]
    assert abs(ev["val_mim_acc"] - acc) < 1e-4

    tok = read_metrics(run_dir / "tokenizer")
    assert tok[-1]["recon"] <= 0.5 * tok[0]["recon"], (tok[0]["recon"], tok[-1]["recon"])
    assert tok[-1]["codes_used"] > 1 and tok[-1]["perplexity"] > 1
    assert (run_dir / "tokenizer" / "tokenizer.safetensors").exists()

    # the second run reuses the cached tokenizer and finds the finished run
    res2 = subprocess.run([sys.executable, "launch/pretrain.py", "--run_dir", str(run_dir)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert res2.returncode == 0, res2.stderr[-3000:]
    assert "using the cached tokenizer" in res2.stdout and "resuming from" in res2.stdout
