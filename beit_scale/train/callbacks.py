"""What runs around the trainer's steps, outside the loop body and outside the tasks.

A task lists its callbacks (`Task.callbacks()`); the trainer calls every hook on every rank, in
list order.  A callback that must survive a resume has a `key` and a `state_dict()` (JSON-able
values and tensors in one dict); the trainer hands it to the checkpoint manager under that key
(JSON in the manifest's "extra", tensors in the checkpoint's task_state file as "<key>/<name>"),
and `load_state_dict()` gets the same dict back on resume.

  on_build_start(trainer)            before the model is built (nothing allocated for it yet)
  on_train_start(trainer)            engine built, resume loaded, before the first step
  load_state_dict(state)             on resume, and again mid-training when the divergence guard
                                     rolls back (train/guard.py): it must take effect at once
  on_step_end(trainer)               after each optimizer step (trainer.step already counts it)
  eval_batch(trainer, batch, n_valid) -> {name: sum tensor}   extra sums beside the task's
  on_eval_end(trainer, result)       after the task's finish_eval; may add entries to `result`
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from beit_scale.io import atomic_write_text


class Callback:
    key: str | None = None   # the name its state is saved under (None: nothing to keep)

    def on_build_start(self, trainer) -> None:
        pass

    def on_train_start(self, trainer) -> None:
        pass

    def on_step_end(self, trainer) -> None:
        pass

    def eval_batch(self, trainer, batch, n_valid: int) -> dict:
        return {}

    def on_eval_end(self, trainer, result: dict) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


# ----------------------------------------------------------------------------- the trainer's own

class ImageLogger(Callback):
    """Every `every` steps and at the last step, the task's pictures of the last batch
    (tokenizer: input vs reconstruction; MIM: decoded predictions) to tensorboard.  Runs on every
    rank: the task's forward may be a collective (ZeRO-3); only rank 0 has a writer."""

    def __init__(self, every: int):
        self.every = every

    def on_step_end(self, trainer) -> None:
        # The last step too: what the finished model predicts is the picture a report shows.
        if self.every and (trainer.step % self.every == 0 or trainer.step == trainer.cfg.train.max_steps):
            writer = trainer.metrics.tb if trainer.metrics is not None else None
            trainer.task.log_images(writer, trainer.engine, trainer.last_batch, trainer.step)


class CpuMemoryProbe(Callback):
    """CPU only (scaling studies): the tensor high-water mark over the first `steps` steps,
    from just before the model is built (train/mem_probe.py); then the profiler is stopped so the
    measured steps run at full speed.  `peak_bytes` is None until it has a figure."""

    def __init__(self, steps: int):
        self.steps = steps
        self.probe = None

    @property
    def peak_bytes(self) -> int | None:
        return None if self.probe is None else self.probe.peak_bytes

    def on_build_start(self, trainer) -> None:
        if trainer.device.type == "cpu" and self.steps > 0:
            from beit_scale.train.mem_probe import CpuTensorHighWater
            self.probe = CpuTensorHighWater().start()

    def on_step_end(self, trainer) -> None:
        if self.probe is not None and self.probe.running and \
                (trainer.step >= self.steps or trainer.step == trainer.cfg.train.max_steps):
            self.probe.stop()


# ----------------------------------------------------------------------------- weight EMA

class WeightEMA:
    """ema = decay * ema + (1 - decay) * weights, after every optimizer step (fp32 copy).

    Written here rather than taken from timm (ModelEmaV3): its tensors must be saved in every
    checkpoint under our names and put back bit-exactly on resume, and the copy must drop the
    activation-checkpointing `forward` wrappers (below), which timm's deepcopy would keep."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(module).float().eval().requires_grad_(False)
        # Activation checkpointing wraps `blk.forward` on the instance with a closure over the
        # *original* block; deepcopy keeps that closure, so the copy would run the live weights.
        for m in self.model.modules():
            m.__dict__.pop("forward", None)

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        for e, p in zip(self.model.state_dict().values(), module.state_dict().values()):
            if e.is_floating_point():
                e.mul_(self.decay).add_(p.detach().float(), alpha=1 - self.decay)
            else:
                e.copy_(p)

    def state_dict(self) -> dict:
        # Floating-point entries only: integer buffers (relative-position indices) are derived,
        # never averaged, and may share storage between blocks, which safetensors refuses.
        return {k: v.detach().clone() for k, v in self.model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def load_state_dict(self, tensors: dict) -> None:
        """Restore from `state_dict()` output; raises ValueError if the names or shapes differ."""
        mine = {k: v for k, v in self.model.state_dict().items() if v.is_floating_point()}
        theirs = {k: v for k, v in tensors.items() if isinstance(v, torch.Tensor)}
        if set(theirs) != set(mine) or any(theirs[k].shape != v.shape for k, v in mine.items()):
            raise ValueError("the saved EMA does not match this model")
        for k, v in mine.items():
            v.copy_(theirs[k])


class EMACallback(Callback):
    """Keeps a WeightEMA of the engine's module, evaluates it beside the live weights (its sums
    are prefixed "ema_"), and saves it in every checkpoint (as "ema/<name>" tensors).

    `evaluate(model, batch, n_valid, dtype, prefix)` is the task's scoring of one eval batch with a
    given model.  Needs the full weights on every rank (not ZeRO-3; the task refuses that)."""

    key = "ema"

    def __init__(self, decay: float, evaluate: Callable, say: Callable[[str], None] = print):
        self.decay, self.evaluate, self.say = decay, evaluate, say
        self.ema: WeightEMA | None = None
        self._saved: dict | None = None   # EMA tensors from the checkpoint being resumed

    def on_train_start(self, trainer) -> None:
        from beit_scale.config import ConfigError
        self.ema = WeightEMA(trainer.engine.module, self.decay)
        if self._saved is not None:
            try:
                self.ema.load_state_dict(self._saved)
            except ValueError as e:
                raise ConfigError(f"cannot resume the weight EMA: {e}") from None
            self._saved = None
            self.say(f"weight EMA on (decay {self.decay}), restored from the checkpoint")
        else:
            self.say(f"weight EMA on (decay {self.decay})")

    def on_step_end(self, trainer) -> None:
        self.ema.update(trainer.engine.module)

    def eval_batch(self, trainer, batch, n_valid: int) -> dict:
        # the inputs are made in the trained model's dtype, as its own evaluation makes them
        dtype = next(trainer.engine.module.parameters()).dtype
        return self.evaluate(self.ema.model, batch, n_valid, dtype, "ema_")

    def state_dict(self) -> dict:
        if self.ema is not None:
            return self.ema.state_dict()
        return dict(self._saved or {})  # resumed and saved again before training started

    def load_state_dict(self, state: dict) -> None:
        saved = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        if saved and self.ema is not None:
            # mid-training (the divergence guard's rollback): the EMA goes back with the weights
            self.ema.load_state_dict(saved)
        elif saved:
            self._saved = saved
        else:
            self.say("note: the checkpoint has no weight EMA (saved with finetune.ema off?); "
                     "the EMA restarts from the resumed weights")


# ----------------------------------------------------------------------------- best weights

class BestWeights(Callback):
    """After each evaluation: if `metric` beat the best so far, write the weights to
    run_dir/best/model.safetensors (+ best.json), atomically, outside the checkpoint folder (so
    retention never deletes them).  The record survives a resume, so a resumed run never
    overwrites best/ with a worse model.  Adds best_<metric> and best_step to the result."""

    key = "best"

    def __init__(self, run_dir: Path, metric: str, metadata: dict):
        self.run_dir, self.metric, self.metadata = Path(run_dir), metric, metadata
        self.best: dict | None = None

    @property
    def path(self) -> Path:
        return self.run_dir / "best" / "model.safetensors"

    def on_eval_end(self, trainer, result: dict) -> None:
        # Every rank sees the same (all-reduced) result, so every rank takes the same branch:
        # gathering ZeRO-3 weights inside is a collective.
        if self.metric in result and (self.best is None or result[self.metric] > self.best[self.metric]):
            self.best = dict(result, step=trainer.step)
            self._save(trainer, self.best)
        if self.best is not None:
            result[f"best_{self.metric.removeprefix('val_')}"] = self.best[self.metric]
            result["best_step"] = self.best["step"]

    def _save(self, trainer, info: dict) -> None:
        from beit_scale.train.engine import full_state_dict
        sd = full_state_dict(trainer.engine, rank0_only=True)
        if trainer.is_main:
            from beit_scale.io import save_safetensors
            self.path.parent.mkdir(parents=True, exist_ok=True)
            sd = {k: v for k, v in sd.items() if not k.endswith(".index")}  # derived buffers
            save_safetensors(sd, self.path, metadata=dict(self.metadata, step=info["step"]))
            atomic_write_text(self.path.parent / "best.json",
                              json.dumps(dict(info, model=self.metadata.get("model"), weights=str(self.path)),
                                         indent=2))
        if dist.is_initialized():  # the file exists for every rank once this returns
            dist.barrier()

    def state_dict(self) -> dict:
        return dict(self.best or {})

    def load_state_dict(self, state: dict) -> None:
        self.best = dict(state) if state else self.best
