"""Stages as tasks: each one is a model, its data and its objective.  The trainer is shared.

The contract is the `Task` base class below: every hook the trainer or the launcher calls is
declared there, abstract or with a default, so the loop never probes a task with `hasattr` and
nothing outside a task sets attributes on it (`configure` hands it what it may need).

  configure(run_dir, ds_config)  the run dir and DeepSpeed JSON, before preflight
  preflight()                checks that need no process group (paths, vocabularies); raises ConfigError
  build_model()              a plain nn.Module (meta-device safe for FLOP counting)          [abstract]
  prepare(device)            per-process extras (the frozen tokenizer for MIM)
  train_dataset() / eval_dataset()                                                          [abstract]
  step(engine, batch, step) -> (loss, {metric: detached scalar tensor})                    [abstract]
  log_images(writer, engine, batch, step)  called on EVERY rank at the same steps; writer is None
                             except on rank 0 (a forward under ZeRO-3 is a collective)
  eval_batch(engine, batch, n_valid) -> {name: sum tensor}   (summed over the valid rows) [abstract]
  finish_eval(sums) -> {metric: float}                                                     [abstract]
  flops_per_sample()         forward+backward FLOPs of one training sample (for TFLOP/s)
  extra_state() / state_tensors()      JSON for the manifest / tensors saved beside the model
  load_extra_state(extra, tensors)     both back, on resume
  callbacks() -> [Callback]  what runs around the steps (EMA, best weights, ...)
  summary(metrics) -> lines  for the run log
"""
from __future__ import annotations

import abc
import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from beit_scale.config import ConfigError, ExperimentCfg

log = logging.getLogger(__name__)


def data_root_for(cfg: ExperimentCfg) -> Path:
    """The ImageFolder root (with train/ and val/ splits) of a run, checked (ConfigError naming the
    fix); the embedded dataset when data.path is unset."""
    if cfg.data.path:
        root = Path(cfg.data.path).expanduser()
        if not root.exists():
            raise ConfigError(f"data.path={cfg.data.path}: no such directory. Point data.path at an "
                              f"ImageFolder root with '{cfg.data.train_split}/<class>/*.jpg' (ImageNet layout), "
                              f"or leave it unset to use the embedded dataset")
        if not (root / cfg.data.train_split).is_dir():
            raise ConfigError(f"data.path={root}: expected a '{cfg.data.train_split}/' split folder with one "
                              f"sub-folder per class inside it (ImageNet layout)")
        return root
    from beit_scale.data.synthetic import ensure_synthetic_imagefolder
    return ensure_synthetic_imagefolder()


def _model_dtype(module: torch.nn.Module) -> torch.dtype:
    for p in module.parameters():
        return p.dtype
    return torch.float32


def device_images(x: torch.Tensor, device: torch.device, dtype: torch.dtype, normalize: bool) -> torch.Tensor:
    """A uint8 image batch from the loader -> float on `device` in `dtype`.

    The loader ships uint8 (a quarter of float32's shared memory); scaling to [0,1] and the
    ImageNet normalisation (`normalize`, the backbone views) happen here, in fp32 on the device,
    with exactly the old CPU pipeline's numbers, then the cast to the model's dtype."""
    from beit_scale.data.transforms import to_float_image
    return to_float_image(x.to(device, non_blocking=True), normalize, dtype)


def uniform_mask_count(mask: torch.Tensor) -> int | None:
    """K if every row of a CPU mask batch [B, ...] has exactly K masked positions, else None.

    Read on the CPU copy the loader delivers, so knowing K costs no device->host sync (boolean
    indexing on the device has to sync to learn its output size)."""
    if mask.device.type != "cpu" or mask.shape[0] == 0:
        return None
    counts = mask.reshape(mask.shape[0], -1).sum(1)
    return int(counts[0]) if bool((counts == counts[0]).all()) else None


def masked_positions(mask: torch.Tensor, k: int) -> torch.Tensor:
    """[B, N] bool with exactly k True per row -> [B, k] long: the masked positions of each row,
    ascending, so `x.gather(1, pos)` lists the same elements in the same (row-major) order as
    `x[mask]`, with a size known in advance (no host sync)."""
    n = mask.shape[1]
    ar = torch.arange(n, device=mask.device)
    key = torch.where(mask, ar, ar + n)  # masked first, each group in position order; keys unique
    return key.sort(dim=1).values[:, :k]




def count_flops(fn) -> float | None:
    """FLOPs of `fn()` counted by torch's FlopCounterMode (a multiply-add counts as 2)."""
    try:
        from torch.utils.flop_counter import FlopCounterMode
        with FlopCounterMode(display=False) as fc:
            fn()
        return float(fc.get_total_flops())
    except Exception as e:  # counting is informative only; never fail a run over it
        log.debug("flop counting failed: %s", e)
        return None


class Task(abc.ABC):
    name = "task"

    def __init__(self, cfg: ExperimentCfg):
        self.cfg = cfg
        self.device = torch.device("cpu")
        self.run_dir: Path | None = None     # from configure(): where best weights etc. may go
        self.ds_config: dict | None = None   # from configure(): settings that live in the DeepSpeed JSON
        self._folders = {}

    def configure(self, *, run_dir: str | Path | None = None, ds_config: dict | None = None) -> None:
        """What the launcher and trainer hand the task (before preflight / build)."""
        if run_dir is not None:
            self.run_dir = Path(run_dir)
        if ds_config is not None:
            self.ds_config = ds_config

    # -- the objective: what every stage must define
    @abc.abstractmethod
    def build_model(self) -> torch.nn.Module: ...

    @abc.abstractmethod
    def train_dataset(self): ...

    @abc.abstractmethod
    def eval_dataset(self): ...

    @abc.abstractmethod
    def step(self, engine, batch, step: int) -> tuple[torch.Tensor, dict]: ...

    @abc.abstractmethod
    def eval_batch(self, engine, batch, n_valid: int) -> dict: ...

    @abc.abstractmethod
    def finish_eval(self, sums: dict) -> dict: ...

    # -- data
    def folder(self, split: str):
        if split not in self._folders:
            from beit_scale.data.datasets import SafeImageFolder
            root = data_root_for(self.cfg)
            path = root / split
            if not path.is_dir():
                raise ConfigError(f"{path}: missing '{split}' split under data.path={root}")
            try:
                self._folders[split] = SafeImageFolder(path)
            except (FileNotFoundError, ValueError) as e:
                raise ConfigError(str(e)) from None
        return self._folders[split]

    def preflight(self) -> None:
        if self.cfg.data.path:
            data_root_for(self.cfg)
            self.folder(self.cfg.data.train_split)  # raises on an empty dataset

    def prepare(self, device: torch.device) -> None:
        self.device = device

    def extra_state(self) -> dict:
        return {}

    def state_tensors(self) -> dict:
        """Tensors saved in each checkpoint beside the model (identical on every rank)."""
        return {}

    def load_extra_state(self, extra: dict, tensors: dict) -> None:
        """On resume: the checkpoint's `extra_state()` and `state_tensors()` output."""

    def callbacks(self) -> list:
        """What runs around the steps for this stage (beit_scale/train/callbacks.py)."""
        return []

    def flops_per_sample(self) -> float | None:
        return None

    def log_images(self, writer, engine, batch, step: int) -> None:
        """Called on every rank at the same steps; `writer` is None except on rank 0.

        Anything collective (an engine forward: ZeRO-3 all-gathers partitioned weights in it)
        must run on every rank; only the drawing/writing is rank 0's."""

    def summary(self, metrics: dict) -> list[str]:
        return [f"{k}: {v:.4f}" for k, v in metrics.items()]


# ----------------------------------------------------------------------------- tokenizer

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
        img = device_images(img, self.device, _model_dtype(engine.module), normalize=False)
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
        img = device_images(img[:n_valid], self.device, _model_dtype(engine.module), normalize=False)
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
        img = device_images(img[:8], self.device, _model_dtype(engine.module), normalize=False)
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
    """Vocabulary and input size of a tokenizer file, read from its header without loading weights."""
    from beit_scale.models.dvae import read_tokenizer_config
    try:
        c = read_tokenizer_config(path)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(str(e)) from None
    return {"vocab_size": c.vocab_size, "image_size": c.image_size, "downsample": c.downsample}


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

    def extra_state(self):
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
        x = device_images(img, self.device, _model_dtype(engine.module), normalize=True)
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


def tokenizer_path_in(run_dir: Path) -> Path:
    """Where a tokenizer run (or the tokenizer stage of launch/pretrain.py) leaves its file."""
    return Path(run_dir) / "tokenizer.safetensors"
