"""A DeepSpeed user's first move after a run: `cd RUN/checkpoints && python zero_to_fp32.py . out`.

DeepSpeed 0.19.8 copies zero_to_fp32.py (and zero_to_torch.py) into the save_dir it is given,
i.e. `RUN/checkpoints/`, not into each `step_XXXXXXXX/` folder; the script reads the tag from
`checkpoints/latest`, which the checkpoint manager keeps equal to LATEST.  A real 2-rank ZeRO-3 run
(tiny model, 2 steps, the end-of-run checkpoint), then the script as a user runs it; its fp32
weights must equal our own consolidation (beit_scale.train.export.consolidated_state_dict).
"""
import os
import subprocess
import sys

import torch

from beit_scale.train.checkpoint import COMPLETE, CheckpointManager
from launching import run_ranks


def test_zero_to_fp32_script_reads_our_latest(tmp_path, tokenizer_file):
    run_dir = tmp_path / "run"
    argv = ["launch/pretrain.py", "--deepspeed_config", "ds_configs/zero3.json", "--run_dir", str(run_dir)]
    for s in ["model.name=beit_debug", "model.drop_path=0.0", "data.num_workers=0", "train.log_every=1",
              "train.eval_batches=1", "optim.warmup_steps=1", f"tokenizer.checkpoint={tokenizer_file}",
              "tokenizer.vocab_size=64", "train.global_batch=8", "train.micro_batch=4", "train.max_steps=2"]:
        argv += ["--set", s]
    codes, logs = run_ranks(2, argv, tmp_path / "logs")
    assert codes == [0, 0], logs[-3000:]

    ckpts = run_dir / "checkpoints"
    tag = "step_00000002"
    assert (ckpts / tag / COMPLETE).exists()
    assert (ckpts / "LATEST").read_bytes() == (ckpts / "latest").read_bytes() == f"{tag}\n".encode()
    m = CheckpointManager.read_manifest(ckpts / tag)
    assert m["zero_stage"] == 3 and m["world_size"] == 2
    # where DeepSpeed puts its recovery script: the checkpoints dir, once, not the step folder
    assert (ckpts / "zero_to_fp32.py").is_file() and not (ckpts / tag / "zero_to_fp32.py").exists()

    # a user's shell: no launcher variables, no PYTHONPATH to this repo (the script needs only
    # torch + deepspeed), cwd = where DeepSpeed put the script
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                        "PYTHONPATH")}
    res = subprocess.run([sys.executable, "zero_to_fp32.py", ".", "out"], cwd=ckpts, capture_output=True,
                         text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    theirs = torch.load(ckpts / "out" / "pytorch_model.bin", map_location="cpu", weights_only=True)

    from beit_scale.train.export import consolidated_state_dict
    ours, manifest = consolidated_state_dict(run_dir, checksums=True)
    assert manifest["tag"] == tag
    assert sorted(theirs) == sorted(ours) and len(ours) > 10
    for k, v in ours.items():
        assert theirs[k].dtype == torch.float32 and theirs[k].shape == v.shape, k
        assert torch.equal(theirs[k], v), k
