"""The task contract: a stage is a model, its data and its objective; the trainer is shared.

The contract is the `Task` base class below: every hook the trainer or the launcher calls is
declared there, abstract or with a default, so the loop never probes a task with `hasattr` and
nothing outside a task sets attributes on it (`configure` hands it what it may need).

  configure(run_dir, ds_config)  the run dir and DeepSpeed JSON, before preflight
  preflight()                checks that need no process group (paths, vocabularies); raises ConfigError
  build_model()              a plain nn.Module (meta-device safe for FLOP counting)          [abstract]
  prepare(device)            per-process extras (the frozen tokenizer for MIM)
  train_dataset() / eval_dataset()                                                          [abstract]
  collate_fn()               the DataLoader's collate_fn (None: torch's; data.decode=cuda: gpu_decode.collate)
  step(engine, batch, step) -> (loss, {metric: detached scalar tensor})                    [abstract]
  log_images(writer, engine, batch, step)  called on EVERY rank at the same steps; writer is None
                             except on rank 0 (a forward under ZeRO-3 is a collective)
  eval_batch(engine, batch, n_valid) -> {name: sum tensor}   (summed over the valid rows) [abstract]
  finish_eval(sums) -> {metric: float}                                                     [abstract]
  flops_per_sample()         forward+backward FLOPs of one training sample (for TFLOP/s)
  state_dict() / load_state_dict(state)  what the task keeps across a resume (JSON-able values
                             and tensors in one dict); the checkpoint manager saves it as "task"
  callbacks() -> [Callback]  what runs around the steps (EMA, best weights, ...)
  summary(metrics) -> lines  for the run log
"""
from __future__ import annotations

import abc
import logging
from pathlib import Path

import torch

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


def param_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype of the module's (first) parameter: what its inputs are cast to."""
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


def decoded(batch, device: torch.device):
    """The loader's batch with a data.decode=cuda head (``gpu_decode.EncodedBatch``) decoded on
    `device` into the uint8 views it stands for: ``(EncodedBatch, *rest) -> (*views, *rest)``
    (MIM: img, img_tok, mask; classification: img, label). Any other batch is returned as is."""
    from beit_scale.data.gpu_decode import EncodedBatch
    if len(batch) and isinstance(batch[0], EncodedBatch):
        return (*batch[0].decode(device), *batch[1:])
    return batch


def check_device_decode(cfg: ExperimentCfg, stage: str, supported: bool) -> None:
    """data.decode=cuda needs a stage that decodes on the device and a usable CUDA GPU in this
    process (ConfigError naming the fix otherwise); checked in preflight, before any process group."""
    if cfg.data.decode != "cuda":
        return
    if not supported:
        raise ConfigError(f"data.decode=cuda is not supported by the {stage} stage (only mim and classify "
                          f"decode JPEGs on the GPU); set data.decode=cpu")
    import os
    if os.environ.get("DS_ACCELERATOR", "").lower() == "cpu":
        raise ConfigError("data.decode=cuda but DS_ACCELERATOR=cpu trains on the CPU; set data.decode=cpu")
    if not torch.cuda.is_available():
        from beit_scale.dist.device import cuda_unusable_reason
        raise ConfigError(f"data.decode=cuda needs a CUDA GPU, but CUDA is not available here "
                          f"({cuda_unusable_reason()}); set data.decode=cpu (the default) or run on a GPU node")


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
        """The split's images (an ImageFolder, or shards with data.format=shards). In a run, the
        file list is cached (data.index_cache, default ~/.cache/beit_scale/file_index; rank 0 lists,
        the other ranks wait for its index) and unreadable files are recorded in
        <run_dir>/unreadable/<split>."""
        if split not in self._folders:
            from beit_scale.data.shards import open_folder
            root = data_root_for(self.cfg)
            path = root / split
            if not path.is_dir():
                raise ConfigError(f"{path}: missing '{split}' split under data.path={root}")
            try:
                self._folders[split] = open_folder(path, self.cfg.data.format, **self._folder_options(split))
            except (FileNotFoundError, ValueError) as e:
                raise ConfigError(str(e)) from None
        return self._folders[split]

    def _folder_options(self, split: str) -> dict:
        from beit_scale.dist.env import detect_dist_env
        from beit_scale.data.file_index import default_cache_dir
        cache = self.cfg.data.index_cache
        if cache == "off" or (cache is None and self.run_dir is None):
            cache = False
        elif cache is None:
            # Beside the other data caches, not in the run dir: the first listing happens in
            # preflight, and a run that then fails on its config must leave no run dir behind.
            cache = default_cache_dir()
        return {"index_cache": cache, "wait_for_index": cache is not False and detect_dist_env().rank != 0,
                "journal": None if self.run_dir is None else self.run_dir / "unreadable" / split}

    def unreadable(self, split: str) -> list[tuple[str, str]]:
        """``[(file, reason)]``: every unreadable file of the split that any worker of any rank
        has met so far in this run dir (each once); empty when the split was never opened."""
        from beit_scale.data.datasets import read_journal
        folder = self._folders.get(split)
        return read_journal(folder.journal) if folder is not None and folder.journal else []

    # data.decode=cuda: the stage's loader ships JPEG bytes and it decodes them (gpu_decode.py).
    device_decode = False

    def collate_fn(self):
        """The DataLoader's collate_fn for this stage (None: torch's default)."""
        if self.cfg.data.decode == "cuda" and self.device_decode:
            from beit_scale.data.gpu_decode import collate
            return collate
        return None

    def loader_transform(self, transform):
        """A training transform as the workers run it: wrapped for device decoding with
        data.decode=cuda (gpu_decode.DeviceDecode), unchanged otherwise."""
        if self.cfg.data.decode == "cuda" and self.device_decode:
            from beit_scale.data.gpu_decode import DeviceDecode
            return DeviceDecode(transform)
        return transform

    def preflight(self) -> None:
        check_device_decode(self.cfg, self.name, self.device_decode)
        if self.cfg.data.path:
            data_root_for(self.cfg)
            self.folder(self.cfg.data.train_split)  # raises on an empty dataset

    def prepare(self, device: torch.device) -> None:
        self.device = device

    def state_dict(self) -> dict:
        """Saved in each checkpoint beside the model: JSON-able values go into the manifest,
        tensors (identical on every rank) into its task_state file."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """On resume: what `state_dict()` returned at the save."""

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


