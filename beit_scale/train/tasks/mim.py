"""Stage "mim": masked image modeling; predict the frozen tokenizer's ids at masked patches
(mim.target=tokens) or the masked patches' normalized pixels (mim.target=pixels, no tokenizer)."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from beit_scale.config import ConfigError, ExperimentCfg
from beit_scale.models.mim_pixels import pixel_regression_loss, pixel_targets
from beit_scale.train.tasks.base import (Task, count_flops, decoded, device_images, masked_positions,
                                         param_dtype, uniform_mask_count)
from beit_scale.train.tasks.tokenizer import read_tokenizer_meta

log = logging.getLogger(__name__)


class MIMTask(Task):
    """Masked image modeling: predict the frozen tokenizer's ids at masked patches, or (the
    paper's ablation, mim.target=pixels) regress their per-patch normalized pixels."""
    name = "mim"
    device_decode = True  # data.decode=cuda: both views decoded on the device

    def __init__(self, cfg: ExperimentCfg, tokenizer_path: str | Path | None = None):
        super().__init__(cfg)
        self.pixels = cfg.mim.target == "pixels"
        # Pixel targets need no tokenizer: none is trained, loaded or recorded.
        tok = None if self.pixels else (tokenizer_path or cfg.tokenizer.checkpoint)
        self.tokenizer_path = Path(tok) if tok else None
        self.tokenizer = None
        self.tokenizer_kind = None  # "ours" / "dalle", from the file's header in prepare()

    def model_kwargs(self) -> dict:
        m = self.cfg.model
        kw = {"vocab_size": self.cfg.tokenizer.vocab_size, "img_size": m.img_size}
        if m.drop_path is not None:
            kw["drop_path_rate"] = m.drop_path
        if m.layer_scale_init is not None:
            kw["layer_scale_init"] = m.layer_scale_init
        if m.rel_pos_bias is not None:
            kw["rel_pos_bias"] = m.rel_pos_bias
        return kw

    def build_model(self):
        from beit_scale.models.beit import BeitForMIM
        return BeitForMIM(self.model_config(), target=self.cfg.mim.target)

    def model_config(self):
        """The zoo config this run builds (patch size, grid): needs no weights and no files."""
        from beit_scale.models.zoo import get_config
        try:
            return get_config(self.cfg.model.name, **self.model_kwargs())
        except (KeyError, ValueError) as e:
            raise ConfigError(f"model.name={self.cfg.model.name}: {e}") from None

    def check_geometry(self, tokenizer_downsample: int | None = None) -> None:
        """Image size, patch grid, mask count and tokenizer grid agree (ConfigError if not).

        Needs no files, so a launcher can call it before training a tokenizer.  The targets are
        one token per patch: the tokenizer's grid (data.second_input_size / its downsampling,
        8 for our dVAE and DALL-E's) must equal the patch grid (data.input_size / patch size)."""
        from beit_scale.models.dvae import DVAEConfig
        d, name = self.cfg.data, self.cfg.model.name
        mcfg = self.model_config()
        if d.input_size != mcfg.img_size:
            raise ConfigError(f"model.img_size={mcfg.img_size} but data.input_size={d.input_size}; the MIM "
                              f"mask grid follows the model's patch grid, so set both (e.g. --set "
                              f"model.img_size={d.input_size} --set data.input_size={d.input_size})")
        g, p = mcfg.grid_size[0], mcfg.patch_size
        n = g * g
        if d.num_mask_patches > n:
            raise ConfigError(f"data.num_mask_patches={d.num_mask_patches} is larger than the {g}x{g} = {n} "
                              f"patch grid of {name} ({d.input_size}px / patch {p}); use at most {n}")
        if self.pixels:
            return  # no tokenizer grid to match
        down = int(tokenizer_downsample or DVAEConfig().downsample)
        s = d.second_input_size
        if s % down or s // down != g:
            raise ConfigError(
                f"data.second_input_size={s}: the tokenizer downsamples by {down}, giving "
                f"{s / down:g}x{s / down:g} target tokens, but {name} sees {g}x{g} patches "
                f"({d.input_size}px / patch {p}); MIM needs one target per patch, so set "
                f"data.second_input_size={g * down} (= {g} x {down})")

    def preflight(self):
        super().preflight()
        meta = read_tokenizer_meta(self.tokenizer_path) if self.tokenizer_path is not None else None
        self.check_geometry(meta["downsample"] if meta else None)
        if meta is not None:
            if int(meta["vocab_size"]) != self.cfg.tokenizer.vocab_size:
                raise ConfigError(
                    f"tokenizer {self.tokenizer_path} has a vocabulary of {meta['vocab_size']} tokens but the MIM "
                    f"head predicts {self.cfg.tokenizer.vocab_size} (tokenizer.vocab_size); set "
                    f"--set tokenizer.vocab_size={meta['vocab_size']} or use a matching tokenizer")
            if int(meta["image_size"]) != self.cfg.data.second_input_size:
                raise ConfigError(
                    f"tokenizer {self.tokenizer_path} expects {meta['image_size']}px inputs but "
                    f"data.second_input_size={self.cfg.data.second_input_size}")

    def prepare(self, device):
        super().prepare(device)
        if self.pixels:
            return
        from beit_scale.models.tokenizers import load_tokenizer  # ours or a converted DALL-E file
        if self.tokenizer_path is None:
            raise ConfigError("MIM needs a tokenizer: set tokenizer.checkpoint or let launch/pretrain.py train one")
        tok = load_tokenizer(self.tokenizer_path, device=device)
        self.tokenizer_kind = read_tokenizer_meta(self.tokenizer_path)["kind"]
        # Targets are argmaxes, so half precision costs nothing in accuracy on GPU and halves the time.
        if device.type == "cuda":
            tok = tok.half()
        self.tokenizer = tok.eval().requires_grad_(False)

    def state_dict(self):
        # The kind (ours / dalle) too: the manifest says where the targets came from even after
        # the tokenizer file is gone.
        return {"tokenizer_checkpoint": str(self.tokenizer_path) if self.tokenizer_path else None,
                "tokenizer_kind": self.tokenizer_kind}

    def _datasets(self, split):
        from beit_scale.data.datasets import MIMDataset
        from beit_scale.data.masking import build_masker
        from beit_scale.data.transforms import MIMTransform
        d = self.cfg.data
        grid = self.model_config().grid_size  # the model's patch grid (patch 16, 14, ...)
        masker = build_masker(d.mask_mode, grid, d.num_mask_patches, min_num_patches=d.min_mask_patches)
        tf = MIMTransform(input_size=d.input_size, second_input_size=d.second_input_size,
                          scale=(d.crop_min_scale, 1.0), color_jitter=d.color_jitter)
        return MIMDataset(self.folder(split), self.loader_transform(tf), masker)

    def train_dataset(self):
        return self._datasets(self.cfg.data.train_split)

    def eval_dataset(self):
        return self._datasets(self.cfg.data.val_split)

    def _forward(self, engine, batch):
        """The model on a batch -> (its rows for the masked patches, row-major over (image, patch):
        logits or pixels; the normalized input x, float32 for pixels; mask [B, N]; token ids
        [B, N] or None for pixels; the masked positions [B, K] or None)."""
        img, img_tok, mask = decoded(batch, self.device)  # data.decode=cuda: JPEGs -> uint8 views here
        # Both maskers return exactly num_mask_patches per image: with a count known on the CPU,
        # the targets are a fixed-size gather instead of `ids[mask]`, whose output size the host
        # must read back from the device (a sync every step).
        k = uniform_mask_count(mask)
        mask = mask.to(self.device, non_blocking=True).flatten(1).bool()
        ids = None
        if not self.pixels:
            with torch.no_grad():
                tok_in = device_images(img_tok, self.device, next(self.tokenizer.parameters()).dtype,
                                       normalize=False)
                ids = self.tokenizer.get_codebook_indices(tok_in).flatten(1)
        pos = masked_positions(mask, k) if k is not None else None
        extra = {"masked_index": pos} if pos is not None else {}  # the model gathers without a sync too
        dtype = param_dtype(engine.module)
        x = device_images(img, self.device, torch.float32 if self.pixels else dtype, normalize=True)
        out = engine(x.to(dtype), mask, **extra)  # pixel targets come from the float32 x
        return out, x, mask, ids, pos

    def _targets_and_logits(self, engine, batch):
        logits, _, mask, ids, pos = self._forward(engine, batch)
        labels = ids.gather(1, pos).reshape(-1) if pos is not None else ids[mask]  # == ids[mask], same order
        return logits.float(), labels

    def step(self, engine, batch, step):
        if self.pixels:
            pred, x, mask, _, _ = self._forward(engine, batch)
            return pixel_regression_loss(pred, x, mask, self.model_config().patch_size), {}
        logits, labels = self._targets_and_logits(engine, batch)
        loss = F.cross_entropy(logits, labels)
        acc = (logits.detach().argmax(-1) == labels).float().mean()
        return loss, {"mim_acc": acc}

    def eval_batch(self, engine, batch, n_valid):
        batch = [b[:n_valid] for b in batch]
        if self.pixels:
            pred, x, mask, _, _ = self._forward(engine, batch)
            target = pixel_targets(x, self.model_config().patch_size)[mask]
            # Per-patch mean squared error, and that of predicting 0 (each patch's mean) as the baseline.
            return {"sq_err": (pred.float() - target).pow(2).mean(-1).sum(),
                    "sq_zero": target.pow(2).mean(-1).sum(),
                    "count": torch.tensor(float(len(target)), device=target.device)}
        logits, labels = self._targets_and_logits(engine, batch)
        return {"correct": (logits.argmax(-1) == labels).float().sum(),
                "loss_sum": F.cross_entropy(logits, labels, reduction="sum"),
                "count": torch.tensor(float(labels.numel()), device=labels.device),
                "hist": torch.bincount(labels, minlength=self.cfg.tokenizer.vocab_size).float()}

    def finish_eval(self, sums):
        count = float(sums["count"])
        if self.pixels:
            mse = float(sums["sq_err"]) / max(count, 1)
            return {"val_mim_loss": mse, "val_pixel_mse": mse,
                    "val_pixel_mse_zero": float(sums["sq_zero"]) / max(count, 1)}
        acc = float(sums["correct"]) / max(count, 1)
        baseline = float(sums["hist"].max()) / max(count, 1)
        return {"val_mim_acc": acc, "val_mim_loss": float(sums["loss_sum"]) / max(count, 1),
                "val_majority_acc": baseline, "val_acc_over_majority": acc / max(baseline, 1e-12)}

    def log_images(self, writer, engine, batch, step):
        """The decoded-prediction grid (train/viz_callbacks.py): the forward on every rank (a ZeRO-3
        collective), the drawing on rank 0, to tensorboard and the run dir's PNG."""
        from beit_scale.train import viz_callbacks as vc
        batch = [b[:vc.GRID_IMAGES] for b in batch]
        with torch.no_grad():
            out, x, mask, ids, _ = self._forward(engine, batch)
        if writer is None:
            return
        p = self.model_config().patch_size
        if self.pixels:
            rows = vc.pixel_rows(x, mask, out, p)
        else:
            from beit_scale.data.transforms import denormalize
            rows = vc.token_rows(self.tokenizer, denormalize(x).clamp(0, 1), mask, ids, out.argmax(-1), p)
        vc.write_grid(writer, vc.make_grid(rows), step, self.run_dir)

    def flops_per_sample(self):
        # Counted on the meta device: the backbone without a mask (the [MASK] swap costs nothing)
        # plus the head on the masked positions, which boolean indexing hides from a meta trace.
        d = self.cfg.data
        with torch.device("meta"):
            model = self.build_model()
            x = torch.zeros(1, 3, d.input_size, d.input_size)
        fwd = count_flops(lambda: model.forward_features(x))
        if fwd is None:
            return None
        fwd += 2.0 * d.num_mask_patches * model.cfg.embed_dim * model.lm_head.out_features
        return 3 * fwd

    def summary(self, m):
        if self.pixels:
            return [f"MIM pixel regression on held-out images: MSE {m['val_pixel_mse']:.4f} on normalized masked "
                    f"patches vs {m['val_pixel_mse_zero']:.4f} for predicting each patch's mean"]
        return [f"MIM accuracy on held-out images: {m['val_mim_acc']:.4f} vs {m['val_majority_acc']:.4f} for "
                f"always guessing the most frequent token ({m['val_acc_over_majority']:.2f}x)"]
