"""Stage "classify": fine-tuning (and linear probing) a BEiT backbone on an ImageFolder.

Data (train/val splits), objective (mixup/cutmix, label smoothing via timm), optional weight EMA
and the best weights (callbacks), evaluation (top-1/top-5/loss over the held-out split).  The
weights come from `init.from` through the checkpoint package's weight-import reader
(beit_scale/train/checkpoint/reader.py).  Layer-wise lr decay needs nothing here:
`optim.param_groups` reads `model.layer_id`.
"""
from __future__ import annotations

import json

import torch
import torch.nn.functional as F

from beit_scale.config import ConfigError, ExperimentCfg
from beit_scale.dist.env import say_rank0 as _say
from beit_scale.train.callbacks import BestWeights, EMACallback
from beit_scale.train.checkpoint.reader import (REPO, SCRATCH, InitReport, check_is_beit, default_init_source,
                                               load_init_weights, pending_init, read_state_dict)
from beit_scale.train.tasks.base import Task, count_flops, decoded, device_images, param_dtype


class ClassifyTask(Task):
    """Image classification fine-tuning (and linear probing) of a BEiT backbone."""
    name = "classify"
    device_decode = True  # data.decode=cuda: the training split (the eval split decodes on the CPU)

    def __init__(self, cfg: ExperimentCfg):
        super().__init__(cfg)
        self._init = None                     # (source, state dict, kind) read in preflight
        self.init_report: InitReport | None = None
        self.mixup = None

    # -- config checks, before any process group
    def model_kwargs(self) -> dict:
        m, f = self.cfg.model, self.cfg.finetune
        kw = {"num_classes": m.num_classes, "img_size": m.img_size}
        if m.drop_path is not None:
            kw["drop_path_rate"] = m.drop_path
        if f.linear_probe:
            kw["drop_path_rate"] = 0.0       # a frozen backbone: no stochastic depth noise on its features
        if m.layer_scale_init is not None:
            kw["layer_scale_init"] = m.layer_scale_init
        if m.rel_pos_bias is not None:
            kw["rel_pos_bias"] = m.rel_pos_bias
        return kw

    def init_source(self) -> str | None:
        src = self.cfg.init.from_
        if src is None:
            found = default_init_source(self.cfg.model.name)
            if found is None:
                _say(f"init.from not set and no default pretraining run at {REPO / 'runs' / ('mim_' + self.cfg.model.name)}: "
                     f"fine-tuning FROM SCRATCH (random init)")
                return None
            _say(f"init.from not set: using the default pretraining run {found} "
                 f"(set init.from=scratch to train from random init)")
            return str(found)
        if str(src).strip().lower() in SCRATCH:
            _say("init.from=scratch: fine-tuning FROM SCRATCH (random init)")
            return None
        return src

    def preflight(self) -> None:
        super().preflight()
        cfg, f = self.cfg, self.cfg.finetune
        from beit_scale.models.zoo import get_config
        try:
            get_config(cfg.model.name, **self.model_kwargs())
        except (KeyError, ValueError) as e:
            raise ConfigError(f"model.name={cfg.model.name}: {e}") from None
        if cfg.model.img_size != cfg.data.input_size:
            raise ConfigError(f"model.img_size={cfg.model.img_size} but data.input_size={cfg.data.input_size}; "
                              f"set both (e.g. --set model.img_size=384 --set data.input_size=384)")
        classes = self.folder(cfg.data.train_split).classes
        if len(classes) != cfg.model.num_classes:
            raise ConfigError(f"the training set has {len(classes)} classes but model.num_classes="
                              f"{cfg.model.num_classes}; set --set model.num_classes={len(classes)}")
        if cfg.data.decode == "cuda" and f.rand_augment:
            raise ConfigError(f"data.decode=cuda with finetune.rand_augment={f.rand_augment!r}: RandAugment works "
                              f"on decoded PIL images in the workers; set data.decode=cpu or drop rand_augment")
        zero = int(((self.ds_config or {}).get("zero_optimization") or {}).get("stage", 0) or 0)
        if f.ema and zero == 3:
            raise ConfigError("finetune.ema=true needs the full weights on every rank, which ZeRO 3 does "
                              "not keep; use ds_configs/zero2.json (or zero0/1) with EMA, or turn EMA off")
        src = self.init_source()
        if src is not None:
            sd, kind = read_state_dict(src)
            # Dry run on the meta device: every mismatch surfaces here, before a process group exists.
            from beit_scale.models.zoo import build_model
            with torch.device("meta"):
                probe = build_model(cfg.model.name, task="classify", **self.model_kwargs())
            check_is_beit(sd, src)
            self._init = (src, sd, kind)
            load_init_weights(probe, src, sd=sd, kind=kind, check_only=True)

    # -- model
    def _plain_model(self):
        from beit_scale.models.zoo import build_model
        return build_model(self.cfg.model.name, task="classify", **self.model_kwargs())

    def build_model(self):
        model = self._plain_model()
        init, self._init = pending_init(self.cfg.init.from_, self._init), None  # None: free the source tensors
        if init is not None:
            src, sd, kind = init
            self.init_report = load_init_weights(model, src, sd=sd, kind=kind)
            for line in self.init_report.lines():
                _say(line)
        if self.cfg.finetune.linear_probe:
            for n, p in model.named_parameters():
                p.requires_grad_(n.startswith(("head.", "fc_norm.")))
            _say("linear probe: backbone frozen, training fc_norm + head only")
        return model

    def prepare(self, device):
        super().prepare(device)
        f = self.cfg.finetune
        if f.mixup > 0 or f.cutmix > 0:
            from timm.data import Mixup
            self.mixup = Mixup(mixup_alpha=f.mixup, cutmix_alpha=f.cutmix, prob=f.mixup_prob,
                               switch_prob=f.mixup_switch_prob, mode="batch",
                               label_smoothing=f.label_smoothing, num_classes=self.cfg.model.num_classes)

    def state_dict(self):
        return {"init": self.init_report.to_dict() if self.init_report else None}

    def callbacks(self):
        """The weight EMA (finetune.ema) and the best-weights keeper (run_dir/best/)."""
        from beit_scale.config import to_dict
        cbs = []
        if self.cfg.finetune.ema:
            cbs.append(EMACallback(self.cfg.finetune.ema_decay, self.score, say=_say))
        if self.run_dir is not None:
            cbs.append(BestWeights(self.run_dir, "val_top1",
                                   {"model": self.cfg.model.name, "config": json.dumps(to_dict(self.cfg))}))
        return cbs

    # -- data
    def train_dataset(self):
        from beit_scale.data.datasets import ClassifyDataset
        from beit_scale.data.transforms import ClassifyTransform
        d = self.cfg.data
        tf = ClassifyTransform(train=True, size=d.input_size, scale=(d.crop_min_scale, 1.0),
                               rand_augment=self.cfg.finetune.rand_augment)
        return ClassifyDataset(self.folder(d.train_split), self.loader_transform(tf))

    def eval_dataset(self):
        from beit_scale.data.datasets import ClassifyDataset
        from beit_scale.data.transforms import ClassifyTransform
        d = self.cfg.data
        return ClassifyDataset(self.folder(d.val_split), ClassifyTransform(train=False, size=d.input_size))

    # -- objective
    def step(self, engine, batch, step):
        img, target = decoded(batch, self.device)
        # uint8 from the loader -> normalised float32 on the device; mixup/cutmix mix those
        # float32 images (as before), the cast to the model's dtype comes after.
        img = device_images(img, self.device, torch.float32, normalize=True)
        target = target.to(self.device, non_blocking=True)
        metrics = {}
        if self.mixup is not None:
            img, soft = self.mixup(img, target)
            logits = engine(img.to(param_dtype(engine.module))).float()
            loss = torch.sum(-soft * F.log_softmax(logits, dim=-1), dim=-1).mean()
        else:
            logits = engine(img.to(param_dtype(engine.module))).float()
            loss = F.cross_entropy(logits, target, label_smoothing=self.cfg.finetune.label_smoothing)
            metrics["train_top1"] = (logits.detach().argmax(-1) == target).float().mean()
        return loss, metrics

    @staticmethod
    def _scores(logits, target, prefix=""):
        k = min(5, logits.shape[-1])
        topk = logits.topk(k, dim=-1).indices
        hit = topk == target[:, None]
        return {f"{prefix}correct1": hit[:, 0].float().sum(), f"{prefix}correct5": hit.any(-1).float().sum(),
                f"{prefix}loss_sum": F.cross_entropy(logits, target, reduction="sum")}

    def score(self, model, batch, n_valid: int, dtype: torch.dtype, prefix: str = "") -> dict:
        """Top-1/top-5/loss sums of `model` on the valid rows.  The images are made in `dtype`
        (the trained model's) and cast to `model`'s, so the EMA (fp32) sees what the model saw."""
        img, target = decoded([b[:n_valid] for b in batch], self.device)
        img = device_images(img, self.device, dtype, normalize=True)
        target = target.to(self.device)
        return self._scores(model(img.to(param_dtype(model))).float(), target, prefix)

    def eval_batch(self, engine, batch, n_valid):
        out = self.score(engine, batch, n_valid, param_dtype(engine.module))
        out["count"] = torch.tensor(float(n_valid), device=self.device)
        return out

    def finish_eval(self, sums):
        n = max(float(sums["count"]), 1.0)
        res = {"val_top1": float(sums["correct1"]) / n, "val_top5": float(sums["correct5"]) / n,
               "val_loss": float(sums["loss_sum"]) / n}
        if "ema_correct1" in sums:
            res.update(val_top1_ema=float(sums["ema_correct1"]) / n, val_top5_ema=float(sums["ema_correct5"]) / n,
                       val_loss_ema=float(sums["ema_loss_sum"]) / n)
        return res

    def flops_per_sample(self):
        s = self.cfg.data.input_size
        with torch.device("meta"):
            model = self._plain_model()
            x = torch.zeros(1, 3, s, s)
        fwd = count_flops(lambda: model(x))
        return None if fwd is None else 3 * fwd

    def summary(self, m):
        line = f"classification on held-out images: top-1 {m['val_top1']:.4f}, top-5 {m['val_top5']:.4f}, " \
               f"loss {m['val_loss']:.4f}"
        if "val_top1_ema" in m:
            line += f" | EMA top-1 {m['val_top1_ema']:.4f}"
        if "best_top1" in m:
            line += f" | best top-1 {m['best_top1']:.4f} at step {m['best_step']} " \
                    f"({self.run_dir / 'best' / 'model.safetensors'})"
        return [line]
