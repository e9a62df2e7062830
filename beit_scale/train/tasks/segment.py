"""Stage "segment": semantic segmentation, a BEiT backbone + UperNet or SETR-PUP decoder.

Data: the ADE20K layout or an image+mask folder (beit_scale/data/segmentation.py); unset
data.path means the embedded set with masks (synthetic.ensure_synthetic_segmentation). The
crop is model.img_size; the relative-position tables of the source weights are resized to its
patch grid by the same adaptation as fine-tuning at 384 px. Weights come from `init.from` via
the classification stage's reader (a classifier of the same backbone is the go-between, so every
check and report of `load_init_weights` applies), then the backbone part goes into the
segmenter (`decoders.backbone_weights_for`). Layer-wise lr decay comes from `model.layer_id`
(decoder parameters get the full lr).

Evaluation: whole-image or sliding-window inference on each image's valid region; under ZeRO-3
every forward is a collective, so there the windows cover the fixed canvas of the whole batch
and every rank runs the same number of forwards. Each rank sums a confusion matrix (float64,
exact); the trainer all-reduces it, and mIoU / mAcc / aAcc come from the total, so the numbers
are identical on any number of ranks. Data problems (unreadable / mismatched samples, label
values outside the classes) are counted per sample and reported as totals over all ranks.
"""
from __future__ import annotations

import json

import numpy as np
import torch
import torch.distributed as dist

from beit_scale.config import ConfigError, ExperimentCfg
from beit_scale.dist.env import say_rank0 as _say
from beit_scale.train.callbacks import BestWeights, Callback
from beit_scale.train.checkpoint.reader import (InitReport, check_is_beit, load_init_weights, pending_init,
                                               read_state_dict)
from beit_scale.train.tasks.base import Task, count_flops, device_images, param_dtype
from beit_scale.train.tasks.classify import ClassifyTask

PICTURE_FILE = "segmentation_predictions.png"
PER_CLASS_FILE = "segmentation_eval.json"


class SegmentTask(Task):
    """Semantic segmentation fine-tuning of a BEiT backbone with a dense decoder."""
    name = "segment"
    # init.from: the same rule as classification fine-tuning (default pretraining run, scratch, ...)
    init_source = ClassifyTask.init_source

    def __init__(self, cfg: ExperimentCfg):
        super().__init__(cfg)
        self._init = None                     # (source, state dict, kind) read in preflight
        self.init_report: InitReport | None = None
        self._pairs: dict = {}
        self._root = None
        self.pictures = None                  # (images, labels, predictions) of the last eval
        self.train_flags = torch.zeros(3, dtype=torch.float64)   # all ranks' totals, synced at eval
        self._flags_here = torch.zeros(3, dtype=torch.float64)   # this rank's since the last sync
        self.per_class: list | None = None

    # -- config
    def backbone_kwargs(self) -> dict:
        m = self.cfg.model
        kw = {"img_size": m.img_size, "num_classes": m.num_classes}
        for key, value in (("drop_path_rate", m.drop_path), ("layer_scale_init", m.layer_scale_init),
                           ("rel_pos_bias", m.rel_pos_bias)):
            if value is not None:
                kw[key] = value
        return kw

    def head_config(self):
        from beit_scale.models.decoders import SegHeadConfig
        s = self.cfg.segment
        return SegHeadConfig(num_classes=self.cfg.model.num_classes, decoder=s.decoder, channels=s.channels,
                             aux_head=s.aux_head, aux_weight=s.aux_weight, aux_channels=s.aux_channels,
                             out_indices=tuple(s.out_indices) if s.out_indices else None)

    def data_root(self):
        if self._root is None:
            from pathlib import Path
            if self.cfg.data.path:
                self._root = Path(self.cfg.data.path).expanduser()
                if not self._root.is_dir():
                    raise ConfigError(f"data.path={self.cfg.data.path}: no such directory. Point it at an "
                                      f"ADE20K root (images/ + annotations/) or an image+mask folder "
                                      f"(<split>/ + masks/<split>/), or leave it unset for the embedded set")
            else:
                from beit_scale.data.synthetic import ensure_synthetic_segmentation
                self._root = ensure_synthetic_segmentation()
        return self._root

    def pairs(self, split: str):
        if split not in self._pairs:
            from beit_scale.data.segmentation import find_pairs
            try:
                self._pairs[split] = find_pairs(self.data_root(), split, self.cfg.segment.layout)
            except (FileNotFoundError, ValueError) as e:
                raise ConfigError(f"data.path={self.data_root()}: {e}") from None
        return self._pairs[split]

    def preflight(self) -> None:
        from beit_scale.data.segmentation import check_num_classes
        from beit_scale.models.decoders import build_segmenter
        from beit_scale.models.zoo import build_model, get_config
        cfg = self.cfg
        try:
            bcfg = get_config(cfg.model.name, **self.backbone_kwargs())
            head = self.head_config()
            with torch.device("meta"):
                build_segmenter(bcfg, head)
        except (KeyError, ValueError) as e:
            raise ConfigError(f"model.name={cfg.model.name} / segment.*: {e}") from None
        for split in (cfg.data.train_split, cfg.data.val_split):
            self.pairs(split)
        try:
            check_num_classes(self.data_root(), self.pairs(cfg.data.train_split), cfg.model.num_classes,
                              cfg.data.reduce_zero_label)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        src = self.init_source()
        if src is not None:
            sd, kind = read_state_dict(src)
            check_is_beit(sd, src)
            self._init = (src, sd, kind)
            with torch.device("meta"):  # every mismatch surfaces here, before a process group exists
                probe = build_model(cfg.model.name, task="classify", **self.backbone_kwargs())
            load_init_weights(probe, src, sd=_split_decoder(sd)[0], kind=kind, check_only=True)

    # -- model
    def _plain_model(self):
        from beit_scale.models.decoders import build_segmenter
        from beit_scale.models.zoo import get_config
        return build_segmenter(get_config(self.cfg.model.name, **self.backbone_kwargs()), self.head_config())

    def build_model(self):
        model = self._plain_model()
        init, self._init = pending_init(self.cfg.init.from_, self._init), None  # None: free the source tensors
        if init is not None:
            self._load_backbone(model, *init)
        return model

    def _load_backbone(self, model, src, sd, kind) -> None:
        """Backbone through a classifier (the reader's checks and report), then into `model`; a
        segmentation source's decoder tensors are taken where their shapes fit (not the
        classifier layers of another class count)."""
        from beit_scale.models.decoders import DECODER_PREFIXES, backbone_weights_for
        from beit_scale.models.zoo import build_model
        backbone, decoder = _split_decoder(sd)
        clf = build_model(self.cfg.model.name, task="classify", **self.backbone_kwargs())
        self.init_report = load_init_weights(clf, src, sd=backbone, kind=kind)
        weights, _ = backbone_weights_for(model, clf.state_dict())
        want = model.state_dict()
        fitting = {k: v for k, v in decoder.items() if k in want and want[k].shape == v.shape}
        weights.update(fitting)
        missing, unexpected = model.load_state_dict(weights, strict=False)
        stray = [k for k in missing if not k.startswith(DECODER_PREFIXES)]
        assert not unexpected and not stray, (unexpected, stray)
        self.init_report.missing = sorted(missing)
        self.init_report.unexpected = sorted(set(self.init_report.unexpected) | (set(decoder) - set(fitting)))
        self.init_report.notes.append(f"classifier fc_norm/head not used; decoder: {len(fitting)} tensors from "
                                      f"the source, {len(missing)} freshly initialised")
        for line in self.init_report.lines():
            _say(line)

    # -- data
    def _dataset(self, split: str, transform):
        from beit_scale.data.segmentation import SegmentationDataset
        return SegmentationDataset(self.pairs(split), transform, self.cfg.model.num_classes,
                                   self.cfg.data.reduce_zero_label)

    def train_dataset(self):
        from beit_scale.data.segmentation import SegTrainTransform
        s = self.cfg.segment
        return self._dataset(self.cfg.data.train_split, SegTrainTransform(
            self.cfg.model.img_size, ratio_range=s.ratio_range, cat_max_ratio=s.cat_max_ratio,
            photometric=s.photometric))

    def eval_dataset(self):
        from beit_scale.data.segmentation import SegEvalTransform
        return self._dataset(self.cfg.data.val_split, SegEvalTransform(self.cfg.model.img_size))

    # -- objective
    def step(self, engine, batch, step):
        from beit_scale.models.decoders import segmentation_loss
        img, labels, _, flags = batch
        self._flags_here += flags.sum(0).double()
        x = device_images(img, self.device, param_dtype(engine.module), normalize=True)
        loss, metrics = segmentation_loss(engine(x), labels.to(self.device, non_blocking=True),
                                          self.cfg.segment.aux_weight)
        return loss, metrics

    def _zero3(self) -> bool:
        return int(((self.ds_config or {}).get("zero_optimization") or {}).get("stage", 0) or 0) == 3

    def predict(self, engine, x: torch.Tensor, hw: torch.Tensor, n_valid: int) -> torch.Tensor:
        """Class map [n_valid, H, W] of the first ``n_valid`` normalised images on their canvas;
        outside each image's valid region (``hw``) the prediction is 0 (labelled ignored there).
        Under ZeRO-3 the forwards are collectives, so every rank must run the same number: there
        every row of the batch (padding rows included) is predicted, and sliding windows cover
        the whole canvas."""
        from beit_scale.models.seg_eval import slide_inference, whole_inference
        size, s = self.cfg.model.img_size, self.cfg.segment
        stride = s.eval_stride or max(1, (2 * size) // 3)
        K = self.cfg.model.num_classes

        def run(region):
            if s.eval_mode == "whole":
                return whole_inference(engine, region, size)
            return slide_inference(engine, region, K, size, stride, max_batch=self.cfg.train.micro_batch)

        lockstep = self._zero3()
        if lockstep and s.eval_mode == "slide":
            return run(x).argmax(1)[:n_valid]
        rows = x.shape[0] if lockstep else n_valid
        pred = torch.zeros(rows, *x.shape[-2:], dtype=torch.long, device=x.device)
        for i, (h, w) in enumerate(hw[:rows].tolist()):
            pred[i, :h, :w] = run(x[i:i + 1, :, :h, :w]).argmax(1)[0]
        return pred[:n_valid]

    def eval_batch(self, engine, batch, n_valid):
        from beit_scale.models.seg_eval import confusion_matrix
        img, labels, hw, flags = batch
        x = device_images(img, self.device, param_dtype(engine.module), normalize=True)
        pred = self.predict(engine, x, hw, n_valid)
        img, labels, flags = img[:n_valid], labels[:n_valid].to(self.device), flags[:n_valid]
        if self.pictures is None:
            self._keep_pictures(img, labels, pred, hw[:n_valid])
        return {"cm": confusion_matrix(pred, labels, self.cfg.model.num_classes).double(),
                "bad_data": flags.sum(0).double().to(self.device)}

    def _keep_pictures(self, img, labels, pred, hw) -> None:
        """The first images of an evaluation for the overlays, cut to their valid region (the
        canvas padding is not shown; predictions there are blanked)."""
        from beit_scale.data.segmentation import IGNORE
        k = self.cfg.segment.num_images
        h, w = (int(v) for v in hw[:k].max(0).values)
        pred = pred[:k].cpu().clone()
        for i, (hi, wi) in enumerate(hw[:k].tolist()):
            pred[i, hi:], pred[i, :, wi:] = IGNORE, IGNORE
        self.pictures = (img[:k, :, :h, :w].clone(), labels[:k, :h, :w].cpu(), pred[:, :h, :w])

    def finish_eval(self, sums):
        from beit_scale.models.seg_eval import seg_metrics
        K = self.cfg.model.num_classes
        cm = sums.get("cm")
        m = seg_metrics(cm.cpu().round().long() if cm is not None else torch.zeros(K, K, dtype=torch.long))
        self.per_class = m["IoU"]
        self._sync_train_flags()
        res = {"val_mIoU": m["mIoU"], "val_mAcc": m["mAcc"], "val_aAcc": m["aAcc"]}
        bad = sums.get("bad_data")
        names = ("unreadable", "size_mismatch", "bad_label_pixels")
        for name, v in zip(names, bad.tolist() if bad is not None else [0, 0, 0]):
            res[f"val_{name}"] = float(v)
        for name, v in zip(names, self.train_flags.tolist()):
            res[f"train_{name}"] = float(v)
        return res

    def _sync_train_flags(self) -> None:
        """Add every rank's training-data problem counts since the last eval to the totals (a
        collective: finish_eval runs on every rank)."""
        delta = self._flags_here.clone()
        if dist.is_initialized():
            dist.all_reduce(delta)
        self.train_flags += delta
        self._flags_here.zero_()

    def take_pictures(self):
        pics, self.pictures = self.pictures, None
        return pics

    def state_dict(self):
        return {"init": self.init_report.to_dict() if self.init_report else None,
                "train_flags": self.train_flags.tolist()}

    def load_state_dict(self, state):
        if state and state.get("train_flags") is not None:
            self.train_flags = torch.tensor(state["train_flags"], dtype=torch.float64)

    def callbacks(self):
        from beit_scale.config import to_dict
        cbs = [SegmentationPictures(self)]
        if self.run_dir is not None:
            cbs.append(BestWeights(self.run_dir, "val_mIoU",
                                   {"model": self.cfg.model.name, "config": json.dumps(to_dict(self.cfg))}))
        return cbs

    def flops_per_sample(self):
        s = self.cfg.model.img_size
        with torch.device("meta"):
            model = self._plain_model().eval()
            x = torch.zeros(1, 3, s, s)
        fwd = count_flops(lambda: model(x))
        return None if fwd is None else 3 * fwd

    def summary(self, m):
        from beit_scale.data.segmentation import flags_summary
        line = (f"segmentation on held-out images: mIoU {m['val_mIoU']:.4f}, mAcc {m['val_mAcc']:.4f}, "
                f"aAcc {m['val_aAcc']:.4f}")
        if "best_mIoU" in m:
            line += f" | best mIoU {m['best_mIoU']:.4f} at step {m['best_step']}"
        lines = [line]
        if self.per_class is not None:
            lines.append("per-class IoU: " + ", ".join(
                f"{c}:{'n/a' if np.isnan(v) else f'{v:.3f}'}" for c, v in enumerate(self.per_class)))
        for split in ("train", "val"):
            note = flags_summary([m.get(f"{split}_{n}", 0) for n in ("unreadable", "size_mismatch",
                                                                     "bad_label_pixels")])
            if note:
                lines.append(f"{split}: {note}")
        return lines


def _split_decoder(sd: dict) -> tuple[dict, dict]:
    """(backbone and other tensors, decoder tensors) of a source state dict."""
    from beit_scale.models.decoders import DECODER_PREFIXES
    dec = {k: v for k, v in sd.items() if k.startswith(DECODER_PREFIXES)}
    return {k: v for k, v in sd.items() if k not in dec}, dec


class SegmentationPictures(Callback):
    """After each evaluation (rank 0): image | ground truth | prediction overlays of the first
    validation images to tensorboard, and the same grid as run_dir/segmentation_predictions.png
    (overwritten each time, so after the run it shows the final model), plus the per-class IoU
    table as run_dir/segmentation_eval.json."""

    def __init__(self, task: SegmentTask):
        self.task = task

    def on_eval_end(self, trainer, result: dict) -> None:
        pics = self.task.take_pictures()
        if not trainer.is_main or pics is None:
            return
        from PIL import Image
        from beit_scale.data.segmentation import overlay_grid
        from beit_scale.io import atomic_path, atomic_write_text
        grid = overlay_grid(*pics, self.task.cfg.model.num_classes)
        writer = trainer.metrics.tb if trainer.metrics is not None else None
        if writer is not None:
            writer.add_image("segment/image_gt_pred", grid, trainer.step, dataformats="HWC")
        trainer.run_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(trainer.run_dir / PICTURE_FILE) as tmp:
            Image.fromarray(grid).save(tmp, format="PNG")
        atomic_write_text(trainer.run_dir / PER_CLASS_FILE, json.dumps(
            {"step": trainer.step, **result, "per_class_iou": self.task.per_class},
            indent=1))
