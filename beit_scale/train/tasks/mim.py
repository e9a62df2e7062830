"""Stage "mim": masked image modeling; predict the frozen tokenizer's ids at masked patches."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from beit_scale.config import ConfigError, ExperimentCfg
from beit_scale.train.tasks.base import (Task, count_flops, device_images, masked_positions, param_dtype,
                                         uniform_mask_count)
from beit_scale.train.tasks.tokenizer import read_tokenizer_meta

log = logging.getLogger(__name__)


class MIMTask(Task):
    """Masked image modeling: predict the frozen tokenizer's ids at masked patches."""
    name = "mim"

    def __init__(self, cfg: ExperimentCfg, tokenizer_path: str | Path | None = None):
        super().__init__(cfg)
        self.tokenizer_path = Path(tokenizer_path or cfg.tokenizer.checkpoint) if \
            (tokenizer_path or cfg.tokenizer.checkpoint) else None
        self.tokenizer = None

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
        from beit_scale.models.zoo import build_model
        return build_model(self.cfg.model.name, task="mim", **self.model_kwargs())

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
        from beit_scale.models.dvae import load_tokenizer
        if self.tokenizer_path is None:
            raise ConfigError("MIM needs a tokenizer: set tokenizer.checkpoint or let launch/pretrain.py train one")
        tok = load_tokenizer(self.tokenizer_path, device=device)
        # Targets are argmaxes, so half precision costs nothing in accuracy on GPU and halves the time.
        if device.type == "cuda":
            tok = tok.half()
        self.tokenizer = tok.eval().requires_grad_(False)

    def state_dict(self):
        return {"tokenizer_checkpoint": str(self.tokenizer_path) if self.tokenizer_path else None}

    def _datasets(self, split):
        from beit_scale.data.datasets import MIMDataset
        from beit_scale.data.masking import MaskingGenerator
        from beit_scale.data.transforms import MIMTransform
        d = self.cfg.data
        grid = self.model_config().grid_size  # the model's patch grid (patch 16, 14, ...)
        masker = MaskingGenerator(input_size=grid, num_masking_patches=d.num_mask_patches,
                                  min_num_patches=d.min_mask_patches)
        tf = MIMTransform(input_size=d.input_size, second_input_size=d.second_input_size,
                          scale=(d.crop_min_scale, 1.0), color_jitter=d.color_jitter)
        return MIMDataset(self.folder(split), tf, masker)

    def train_dataset(self):
        return self._datasets(self.cfg.data.train_split)

    def eval_dataset(self):
        return self._datasets(self.cfg.data.val_split)

    def _targets_and_logits(self, engine, batch):
        img, img_tok, mask = batch
        # The blockwise masker returns exactly num_mask_patches per image: with a count known on
        # the CPU, the targets are a fixed-size gather instead of `ids[mask]`, whose output size
        # the host must read back from the device (a sync every step).
        k = uniform_mask_count(mask)
        mask = mask.to(self.device, non_blocking=True).flatten(1).bool()
        with torch.no_grad():
            tok_in = device_images(img_tok, self.device, next(self.tokenizer.parameters()).dtype, normalize=False)
            ids = self.tokenizer.get_codebook_indices(tok_in).flatten(1)
        extra = {}
        if k is not None:
            pos = masked_positions(mask, k)
            labels = ids.gather(1, pos).reshape(-1)  # == ids[mask]: same positions, same order
            extra["masked_index"] = pos  # the model gathers its masked rows without a sync too
        else:
            labels = ids[mask]
        x = device_images(img, self.device, param_dtype(engine.module), normalize=True)
        logits = engine(x, mask, **extra)
        return logits.float(), labels

    def step(self, engine, batch, step):
        logits, labels = self._targets_and_logits(engine, batch)
        loss = F.cross_entropy(logits, labels)
        acc = (logits.detach().argmax(-1) == labels).float().mean()
        return loss, {"mim_acc": acc}

    def eval_batch(self, engine, batch, n_valid):
        batch = [b[:n_valid] for b in batch]
        logits, labels = self._targets_and_logits(engine, batch)
        return {"correct": (logits.argmax(-1) == labels).float().sum(),
                "loss_sum": F.cross_entropy(logits, labels, reduction="sum"),
                "count": torch.tensor(float(labels.numel()), device=labels.device),
                "hist": torch.bincount(labels, minlength=self.cfg.tokenizer.vocab_size).float()}

    def finish_eval(self, sums):
        count = float(sums["count"])
        acc = float(sums["correct"]) / max(count, 1)
        baseline = float(sums["hist"].max()) / max(count, 1)
        return {"val_mim_acc": acc, "val_mim_loss": float(sums["loss_sum"]) / max(count, 1),
                "val_majority_acc": baseline, "val_acc_over_majority": acc / max(baseline, 1e-12)}

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
        mcfg = model.cfg
        fwd += 2.0 * d.num_mask_patches * mcfg.embed_dim * mcfg.vocab_size
        return 3 * fwd

    def summary(self, m):
        return [f"MIM accuracy on held-out images: {m['val_mim_acc']:.4f} vs {m['val_majority_acc']:.4f} for "
                f"always guessing the most frequent token ({m['val_acc_over_majority']:.2f}x)"]
