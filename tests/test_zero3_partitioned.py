"""ZeRO-3 with really partitioned weights, 2 gloo ranks, the real launcher path.

ds_configs/zero3.json keeps every parameter under 1e5 elements whole on every rank
(stage3_param_persistence_threshold), which covers all of a debug model, so the other ZeRO-3
tests never all-gather a weight.  Here the threshold is 0: every parameter is sharded and each
forward gathers it, so a forward that runs on one rank only (the trainer used to call
`log_images`, a tokenizer forward, on rank 0 alone) waits forever or desynchronises the ranks.
"""
import json

from launching import REPO, losses, read_metrics, run_ranks

DEBUG = ["model.name=beit_debug", "model.drop_path=0.0", "data.num_workers=0", "train.log_every=1",
         "train.eval_batches=1", "optim.warmup_steps=1", "optim.lr=1e-3", "train.max_steps=3",
         "train.global_batch=8", "train.micro_batch=4"]


def partitioned_zero3(tmp_path):
    ds = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    ds["zero_optimization"].update(stage3_param_persistence_threshold=0, stage3_max_live_parameters=1000,
                                   stage3_prefetch_bucket_size=100)
    path = tmp_path / "zero3_partitioned.json"
    path.write_text(json.dumps(ds))
    return path


def test_zero3_partitioned_tokenizer_image_logging_and_mim(tmp_path, tokenizer_file):
    ds = str(partitioned_zero3(tmp_path))
    runs = [{"stage": "tokenizer", "deepspeed_config": ds, "run_dir": str(tmp_path / "tok"),
             "set": DEBUG + ["tokenizer.vocab_size=64", "tokenizer.hidden_dim=16", "train.image_log_every=1"]},
            {"stage": "mim", "deepspeed_config": ds, "run_dir": str(tmp_path / "mim"),
             "set": DEBUG + [f"tokenizer.checkpoint={tokenizer_file}", "tokenizer.vocab_size=64",
                             "train.image_log_every=1"]}]
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"runs": runs}))
    # A hang is the failure this guards against: a modest timeout turns it into a test failure.
    codes, logs = run_ranks(2, ["tests/drivers/zero3_probe.py", str(spec)], tmp_path / "logs", timeout=300)
    assert codes == [0, 0], logs[-4000:]
    probes = [ln for ln in logs.splitlines() if ln.startswith("[zero3 probe]")]
    assert len(probes) == 4, probes  # 2 runs x 2 ranks
    for ln in probes:  # every weight is sharded: each forward all-gathers
        shards, total = ln.rsplit(": ", 1)[1].split(" ")[0].split("/")
        assert int(shards) == int(total) > 0, ln
    for run in ("tok", "mim"):
        assert sorted(losses(tmp_path / run)) == [1, 2, 3]
        assert read_metrics(tmp_path / run, "eval")
    # rank 0 wrote the images: one per step
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ev = EventAccumulator(str(tmp_path / "tok" / "tensorboard"), size_guidance={"images": 0})
    ev.Reload()
    assert [e.step for e in ev.Images("tokenizer/input_vs_reconstruction")] == [1, 2, 3]
