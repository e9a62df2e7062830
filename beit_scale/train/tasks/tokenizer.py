"""Stage "tokenizer": the discrete VAE that turns a 112 px view into visual-token ids."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from beit_scale.config import ConfigError
from beit_scale.train.tasks.base import Task, count_flops, device_images, param_dtype


class TokenizerTask(Task):
    """Discrete VAE: reconstruction + KL to a uniform prior, Gumbel-softmax temperature annealed."""
    name = "tokenizer"

    def dvae_config(self):
        from beit_scale.models.dvae import DVAEConfig
        t = self.cfg.tokenizer
        return DVAEConfig(vocab_size=t.vocab_size, image_size=self.cfg.data.second_input_size,
                          hidden_dim=t.hidden_dim)

    def build_model(self):
        from beit_scale.models.dvae import DVAE
        return DVAE(self.dvae_config())

    def preflight(self):
        super().preflight()
        try:
            self.dvae_config()
        except ValueError as e:  # e.g. data.second_input_size not divisible by the downsampling
            raise ConfigError(f"tokenizer (data.second_input_size={self.cfg.data.second_input_size}): {e}") from None

    def _schedules(self, step: int) -> tuple[float, float]:
        from beit_scale.models.dvae import kl_weight_at, temperature_at
        t, total = self.cfg.tokenizer, self.cfg.train.max_steps
        temp = temperature_at(step, start=t.temperature_start, end=t.temperature_end, anneal_steps=total)
        klw = kl_weight_at(step, end=t.kl_weight, warmup_steps=max(1, total // 4))
        return temp, klw

    def train_dataset(self):
        from beit_scale.data.datasets import TokenizerDataset
        from beit_scale.data.transforms import TokenizerTransform
        return TokenizerDataset(self.folder(self.cfg.data.train_split),
                                TokenizerTransform(size=self.cfg.data.second_input_size))

    def eval_dataset(self):
        from beit_scale.data.datasets import TokenizerDataset
        from beit_scale.data.transforms import TokenizerTransform
        return TokenizerDataset(self.folder(self.cfg.data.val_split),
                                TokenizerTransform(size=self.cfg.data.second_input_size))

    def step(self, engine, batch, step):
        from beit_scale.models.dvae import dvae_loss
        (img,) = batch
        img = device_images(img, self.device, param_dtype(engine.module), normalize=False)
        temp, klw = self._schedules(step)
        recon, logits = engine(img, temperature=temp)
        loss, parts = dvae_loss(recon.float(), img.float(), logits.float(), kl_weight=klw)
        ids = logits.detach().argmax(1)
        used = torch.zeros(self.cfg.tokenizer.vocab_size, device=ids.device)
        used.scatter_add_(0, ids.flatten(), torch.ones(ids.numel(), device=ids.device))
        probs = used / used.sum()
        # entr(p) = -p log p, 0 at p = 0: no boolean indexing, which would sync with the host.
        perplexity = torch.exp(torch.special.entr(probs).sum())
        metrics = {"recon": parts["recon"].detach(), "kl": parts["kl"].detach(),
                   "temperature": torch.full((), temp, device=ids.device),
                   "kl_weight": torch.full((), klw, device=ids.device),
                   "perplexity": perplexity.detach(), "codes_used": (used > 0).sum().float()}
        return loss, metrics

    def eval_batch(self, engine, batch, n_valid):
        (img,) = batch
        img = device_images(img[:n_valid], self.device, param_dtype(engine.module), normalize=False)
        temp, _ = self._schedules(self.cfg.train.max_steps)
        recon, logits = engine(img, temperature=temp)
        err = F.mse_loss(recon.float(), img.float(), reduction="none").flatten(1).mean(1)
        ids = logits.argmax(1).flatten()
        hist = torch.bincount(ids, minlength=self.cfg.tokenizer.vocab_size).float()
        return {"recon_mse": err.sum(), "count": torch.tensor(float(n_valid), device=err.device),
                "hist": hist}

    def finish_eval(self, sums):
        hist = sums["hist"]
        p = hist / hist.sum().clamp_min(1)
        nz = p[p > 0]
        return {"val_recon_mse": float(sums["recon_mse"] / sums["count"]),
                "val_perplexity": float(torch.exp(-(nz * nz.log()).sum())),
                "val_codes_used": int((hist > 0).sum())}

    def flops_per_sample(self):
        s = self.cfg.data.second_input_size
        with torch.device("meta"):
            model = self.build_model()
            x = torch.zeros(1, 3, s, s)
        fwd = count_flops(lambda: model(x, temperature=1.0))
        return None if fwd is None else 3 * fwd

    def log_images(self, writer, engine, batch, step):
        (img,) = batch
        img = device_images(img[:8], self.device, param_dtype(engine.module), normalize=False)
        # Every rank runs this forward (ZeRO-3 gathers partitioned weights inside it: rank 0
        # alone would wait forever); only rank 0 (the one with a writer) draws.
        with torch.no_grad():
            recon, _ = engine(img, temperature=self._schedules(step)[0])
        if writer is None:
            return
        import torchvision
        grid = torchvision.utils.make_grid(torch.cat([img.float(), recon.float().clamp(0, 1)]).cpu(),
                                           nrow=len(img))
        writer.add_image("tokenizer/input_vs_reconstruction", grid, step)

    def summary(self, m):
        return [f"tokenizer validation: reconstruction MSE {m['val_recon_mse']:.5f}, "
                f"codebook perplexity {m['val_perplexity']:.1f}, codes used {m['val_codes_used']}/"
                f"{self.cfg.tokenizer.vocab_size}"]


# ----------------------------------------------------------------------------- MIM

def read_tokenizer_meta(path: str | Path) -> dict:
    """Kind (ours / dalle), vocabulary and input size of a tokenizer file, read from its header
    without loading weights (models/tokenizers.py)."""
    from beit_scale.models.tokenizers import read_tokenizer_header
    try:
        h = read_tokenizer_header(path)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(str(e)) from None
    return {"kind": h.kind, "vocab_size": h.vocab_size, "image_size": h.image_size,
            "downsample": h.downsample}



def tokenizer_path_in(run_dir: Path) -> Path:
    """Where a tokenizer run (or the tokenizer stage of launch/pretrain.py) leaves its file."""
    return Path(run_dir) / "tokenizer.safetensors"
