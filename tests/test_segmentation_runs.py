"""Segmentation under the real engine: two 2-rank launches (gloo, CPU) checked for several things.

Launch 1 (one process group): a ZeRO-2 reference run from a MIM weights file (4 steps, eval at
2 and 4); the same run stopped at step 2 (mid-epoch: 40 images, global batch 8); a ZeRO-3 run with
the PUP decoder. Launch 2: the stopped run resumed in a new process group.
"""
import json
import math

import pytest
import torch

from launching import read_metrics, run_ranks

SEG = ["model.name=beit_debug", "model.img_size=64", "model.num_classes=11", "data.num_workers=0",
       "segment.channels=16", "segment.aux_channels=8", "train.log_every=1", "train.micro_batch=4",
       "train.global_batch=8", "train.eval_batches=0", "optim.warmup_steps=1", "optim.lr=1e-3",
       "optim.schedule=poly", "optim.layer_decay=0.65", "checkpoint.resume=auto"]


def _run(run_dir, data, init, zero=2, *extra):
    return {"stage": "segment", "deepspeed_config": f"ds_configs/zero{zero}.json", "run_dir": str(run_dir),
            "set": SEG + [f"data.path={data}", f"init.from={init}", *extra]}


@pytest.fixture(scope="module")
def seg_runs(tmp_path_factory):
    from safetensors.torch import save_file
    from beit_scale.data.synthetic import ensure_synthetic_segmentation
    from beit_scale.models.zoo import build_model
    tmp = tmp_path_factory.mktemp("segruns")
    data = ensure_synthetic_segmentation(tmp / "data", train_per_class=4, val_per_class=1, image_size=64,
                                         verbose=False)
    torch.manual_seed(0)
    mim = build_model("beit_debug", task="mim", img_size=32)  # 2x2 grid: the tables get resized to 4x4
    with torch.no_grad():
        mim.shared_rel_pos.table.normal_()
    save_file({k: v.contiguous() for k, v in mim.state_dict().items()}, str(tmp / "mim.safetensors"))
    init = tmp / "mim.safetensors"
    ref = _run(tmp / "ref", data, init, 2, "train.max_steps=4", "train.eval_every=2")
    stopped = _run(tmp / "resumed", data, init, 2, "train.max_steps=4", "train.eval_every=2",
                   "train.stop_at_step=2", "checkpoint.every_steps=2")
    z3 = _run(tmp / "z3", data, "scratch", 3, "train.max_steps=3", "train.eval_every=2",
              "segment.decoder=pup")
    spec = tmp / "first.json"
    spec.write_text(json.dumps({"runs": [ref, stopped, z3]}))
    codes, logs = run_ranks(2, ["tests/drivers/multi_run.py", str(spec)], tmp / "logs1", timeout=600)
    assert codes == [0, 0], logs[-5000:]
    spec = tmp / "second.json"
    spec.write_text(json.dumps({"runs": [_run(tmp / "resumed", data, init, 2, "train.max_steps=4",
                                              "train.eval_every=2")]}))
    codes, logs2 = run_ranks(2, ["tests/drivers/multi_run.py", str(spec)], tmp / "logs2", timeout=600)
    assert codes == [0, 0], logs2[-5000:]
    return tmp, data, logs + logs2


def test_zero2_and_zero3_train_and_evaluate(seg_runs):
    tmp, _, logs = seg_runs
    for run, steps, evals in (("ref", [1, 2, 3, 4], [2, 4]), ("z3", [1, 2, 3], [2, 3])):
        train = read_metrics(tmp / run)
        assert [r["step"] for r in train] == steps
        assert all(math.isfinite(r["loss"]) and r["loss_aux"] > 0 for r in train)
        ev = read_metrics(tmp / run, "eval")
        assert [e["step"] for e in ev] == evals
        for e in ev:
            assert 0 <= e["val_mIoU"] <= 1 and 0 < e["val_aAcc"] <= 1
            assert e["val_unreadable"] == e["train_unreadable"] == 0
        assert (tmp / run / "segmentation_predictions.png").is_file()
        best = json.loads((tmp / run / "best" / "best.json").read_text())
        assert best["val_mIoU"] == max(e["val_mIoU"] for e in ev)
    assert "layer-wise lr decay groups" in logs
    assert "shared relative position bias copied into each of the 2 blocks" in logs
    assert "relative position tables resized to the (4, 4) patch grid" in logs


def test_exact_resume_mid_epoch(seg_runs):
    tmp, _, logs = seg_runs
    ref, res = read_metrics(tmp / "ref"), read_metrics(tmp / "resumed")
    assert [r["step"] for r in res] == [1, 2, 3, 4]
    assert [r["loss"] for r in res] == [r["loss"] for r in ref]
    assert read_metrics(tmp / "resumed", "eval")[-1]["val_mIoU"] == read_metrics(tmp / "ref", "eval")[-1]["val_mIoU"]
    assert "resuming from" in logs


def test_eval_two_ranks_equals_one_process(seg_runs):
    """The 2-rank evaluation of the best weights (all-reduced confusion matrix) gives exactly the
    numbers of a single-process evaluation of the same weights through the same task code."""
    from beit_scale.config import build_config
    from beit_scale.train.tasks.segment import SegmentTask
    tmp, data, _ = seg_runs
    best = json.loads((tmp / "ref" / "best" / "best.json").read_text())
    cfg, _, _ = build_config("segment", None, SEG + [f"data.path={data}", "init.from=" + best["weights"]])
    task = SegmentTask(cfg)
    model = task.build_model().eval()

    class Engine:  # what eval_batch needs of a DeepSpeed engine: a callable with .module
        module = model

        def __call__(self, x):
            return model(x)

    ds = task.eval_dataset()
    sums = {}
    with torch.no_grad():
        for i in range(0, len(ds), 3):   # other batches than the ranks had: the sum is the same
            batch = [torch.stack(t) for t in zip(*[ds[j] for j in range(i, min(i + 3, len(ds)))])]
            for k, v in task.eval_batch(Engine(), batch, len(batch[0])).items():
                sums[k] = sums.get(k, 0) + v
    one = task.finish_eval(sums)
    assert sums["cm"].sum() == 10 * 64 * 64  # every pixel of the 10 val images is labelled
    for k in ("val_mIoU", "val_mAcc", "val_aAcc"):
        assert one[k] == best[k], k


def test_class_count_mismatch_is_an_error_before_any_process_group(seg_runs, capsys):
    import torch.distributed as dist
    from beit_scale.train import run
    tmp, data, _ = seg_runs
    code = run.main("segment", ["--run_dir", str(tmp / "bad"), "--deepspeed_config", "ds_configs/zero2.json",
                                "--set", f"data.path={data}", "--set", "model.name=beit_debug",
                                "--set", "model.img_size=64", "--set", "model.num_classes=5",
                                "--set", "init.from=scratch"])
    assert code == 2 and not dist.is_initialized()
    err = capsys.readouterr().err
    assert "declares 11 segmentation classes" in err and "model.num_classes=11" in err
    assert not (tmp / "bad" / "checkpoints").exists()
