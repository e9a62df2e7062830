"""The trainer driven by a small stand-in engine and checkpoint manager: no DeepSpeed, no process
group, a tiny task.  What the loop itself promises: accumulation, the callback order, metrics
records, the stop on a signal at the next sync step, the final save and evaluation."""
import json
import os
import signal

import torch

from beit_scale.config import build_config
from beit_scale.train.callbacks import Callback
from beit_scale.train.checkpoint.manager import TRAINER, split_states
from beit_scale.train.tasks import Task
from beit_scale.train.trainer import Trainer


class ToyData(torch.utils.data.Dataset):
    """y = x @ w: 64 samples, keyed by (index, seed) as the trainer's sampler hands them out."""

    def __init__(self, n=64):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 8, generator=g)
        self.y = self.x @ torch.randn(8, 1, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, key):
        i = key[0] if isinstance(key, tuple) else key
        return self.x[i], self.y[i]


class ToyTask(Task):
    name = "toy"

    def build_model(self):
        return torch.nn.Linear(8, 1)

    def train_dataset(self):
        return ToyData()

    def eval_dataset(self):
        return ToyData(16)

    def step(self, engine, batch, step):
        x, y = batch
        loss = torch.nn.functional.mse_loss(engine(x), y)
        return loss, {"abs_err": (engine(x) - y).abs().mean().detach()}

    def eval_batch(self, engine, batch, n_valid):
        x, y = (b[:n_valid] for b in batch)
        return {"se": ((engine(x) - y) ** 2).sum(), "n": torch.tensor(float(n_valid))}

    def finish_eval(self, sums):
        return {"val_mse": float(sums["se"] / sums["n"])}


class FakeEngine:
    """The engine interface the trainer uses, over a plain optimizer (no ZeRO, fp32)."""

    def __init__(self, model, optimizer, scheduler, ds_config, device):
        self.module, self.optimizer, self.lr_scheduler = model, optimizer, scheduler
        self.device, self.accum, self.micro, self.skipped_steps = torch.device("cpu"), \
            ds_config["gradient_accumulation_steps"], 0, 0
        self.optimizer_steps = 0

    def __call__(self, *a, **k):
        return self.module(*a, **k)

    def backward(self, loss):
        (loss / self.accum).backward()

    def step(self):
        self.micro += 1
        if self.micro % self.accum == 0:
            self.optimizer.step()
            self.optimizer.zero_grad()
            self.lr_scheduler.step()
            self.optimizer_steps += 1

    def gradient_accumulation_steps(self):
        return self.accum

    def zero_optimization_stage(self):
        return 0

    def fp16_enabled(self):
        return False

    def bfloat16_enabled(self):
        return False

    def train(self):
        self.module.train()

    def eval(self):
        self.module.eval()

    def get_lr(self):
        return [g["lr"] for g in self.optimizer.param_groups]

    def get_global_grad_norm(self):
        return None


class FakeCheckpoints:
    def __init__(self, run_dir):
        self.dir, self.saves, self.saved_step = run_dir / "checkpoints", [], None

    def start_clock(self):
        pass

    def clock_expired(self):
        return False

    def due_by_steps(self, step):
        return step == 4

    def last_saved_step(self):
        return self.saved_step

    def save(self, engine, states, wait=True):
        extra, tensors = split_states(states)   # the real manager's split of the named states
        step = states[TRAINER].state_dict()["step"]
        self.saves.append((step, extra, sorted(tensors)))
        self.saved_step = step

    def finish(self):
        pass


class Recorder(Callback):
    key = "recorder"

    def __init__(self, signal_at=None):
        self.events, self.signal_at = [], signal_at

    def on_build_start(self, trainer):
        self.events.append("build")

    def on_train_start(self, trainer):
        self.events.append("train")

    def on_step_end(self, trainer):
        self.events.append(trainer.step)
        if trainer.step == self.signal_at:
            os.kill(os.getpid(), signal.SIGUSR1)

    def on_eval_end(self, trainer, result):
        self.events.append("eval")
        result["seen_by_callback"] = 1.0

    def state_dict(self):
        return {"events": len(self.events), "t": torch.zeros(1)}


def _trainer(tmp_path, recorder, *sets):
    cfg, _, _ = build_config("mim", overrides=["train.max_steps=6", "train.global_batch=8", "train.micro_batch=4",
                                               "train.log_every=2", "data.num_workers=0", "optim.warmup_steps=0",
                                               "optim.lr=0.05", "train.eval_batches=2", *sets])
    task = ToyTask(cfg)
    task.callbacks = lambda: [recorder]
    ckpt = FakeCheckpoints(tmp_path)
    ds = {"gradient_accumulation_steps": 2}
    return Trainer(cfg, task, ds, tmp_path, ckpt, engine_builder=FakeEngine), ckpt


def test_trainer_runs_a_task_on_a_fake_engine(tmp_path):
    rec = Recorder()
    trainer, ckpt = _trainer(tmp_path, rec)
    result = trainer.fit()
    assert rec.events == ["build", "train", 1, 2, 3, 4, 5, 6, "eval"]
    assert trainer.engine.optimizer_steps == 6 and trainer.engine.micro == 12  # 2 micro batches a step
    rows = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train] == [2, 4, 6]
    assert train[-1]["loss"] < train[0]["loss"] and "abs_err" in train[0] and "step_time_s" in train[0]
    assert rows[-1]["kind"] == "eval" and rows[-1]["seen_by_callback"] == 1.0 and result["val_mse"] >= 0
    # the periodic save at step 4 and the final one; task extra + callback state + callback tensors
    assert [s[0] for s in ckpt.saves] == [4, 6]
    assert ckpt.saves[-1][1]["recorder"] == {"events": 8} and ckpt.saves[-1][2] == ["recorder/t"]
    assert trainer.offset == 6 * 8 and trainer.samples_seen == 48


def test_a_signal_stops_at_the_next_sync_step_with_a_save(tmp_path):
    rec = Recorder(signal_at=1)
    trainer, ckpt = _trainer(tmp_path, rec, "train.sync_every=3")
    old = signal.getsignal(signal.SIGUSR1)
    result = trainer.fit()
    assert result == {"stopped": "SIGUSR1", "step": 3}   # the ranks agree at step 3, not 1
    assert [s[0] for s in ckpt.saves] == [3] and rec.events == ["build", "train", 1, 2, 3]
    assert signal.getsignal(signal.SIGUSR1) == old       # the trainer's handler is removed again
