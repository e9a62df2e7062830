"""The study config (a typed model: unknown keys, bad choices and out-of-range values are errors
when the YAML is read) and its expansion into grid points."""
import itertools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

REPO = Path(__file__).resolve().parents[3]
AXES = ("models", "zero", "act_ckpt", "micro_batch", "precision", "ranks", "nodes")


@dataclass(frozen=True)
class Point:
    model: str
    zero: int
    act_ckpt: bool
    micro_batch: int
    precision: str
    ranks: int            # ranks per node (GPUs per node, or CPU processes)
    nodes: int = 1

    @property
    def world(self) -> int:
        return self.ranks * self.nodes

    @property
    def id(self) -> str:
        return (f"{self.model}-z{self.zero}-{'ckpt' if self.act_ckpt else 'nockpt'}-mb{self.micro_batch}"
                f"-{self.precision}-r{self.ranks}x{self.nodes}")


class StudyConfig(BaseModel):
    """A grid: list-valued axes (AXES) are crossed into points; the rest applies to every point."""
    model_config = ConfigDict(extra="forbid")

    models: list[str] = Field(default_factory=lambda: ["beit_debug"], min_length=1)
    zero: list[Literal[0, 1, 2, 3]] = Field(default_factory=lambda: [1], min_length=1)
    act_ckpt: list[bool] = Field(default_factory=lambda: [False], min_length=1)
    # >= 0, not >= 1: a 0 reaches the trainer, which rejects it, and the point is a failed result
    micro_batch: list[Annotated[int, Field(ge=0)]] = Field(default_factory=lambda: [2], min_length=1)
    precision: list[Literal["fp32", "fp16", "bf16"]] = Field(default_factory=lambda: ["fp32"], min_length=1)
    ranks: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [1], min_length=1)
    nodes: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [1], min_length=1)
    # the first step includes start-up and is never measured; CPU memory needs 2 (optimizer state)
    warmup_steps: int = Field(2, ge=1)
    measure_steps: int = Field(5, ge=1)
    out_dir: str = "runs/scaling_study"
    tokenizer_vocab: int = Field(8192, ge=2)    # random dVAE made once per study (targets, not quality)
    tokenizer_hidden: int = Field(64, ge=1)
    launcher: Literal["auto", "local", "srun"] = "auto"
    timeout_s: float = Field(1800.0, gt=0)      # per point
    num_workers: int = Field(2, ge=0)           # data.num_workers of each run
    extra_sets: list[str] = Field(default_factory=list)    # more --set k=v for every point
    ds_config_dir: str = "ds_configs"           # zero{N}.json inside
    keep_checkpoints: bool = False              # the trainer saves one at the end; a study does not need it
    # srun --cpus-per-task of each point (CPU cores per rank: the rank + its data workers).
    # 0: SRUN_CPUS_PER_TASK, else the allocation's SLURM_CPUS_PER_TASK (sbatch --cpus-per-task),
    # which srun 22.05+ does not inherit by itself; neither set: srun's default of 1 core.
    cpus_per_task: int = Field(0, ge=0)

    @field_validator(*AXES, "extra_sets", mode="before")
    @classmethod
    def _scalar_is_one_value_axis(cls, v):
        return v if isinstance(v, (list, tuple)) else [v]

    @field_validator("act_ckpt", mode="before")
    @classmethod
    def _ckpt_words(cls, v):   # "all"/"none" as in train.act_ckpt, besides true/false
        v = v if isinstance(v, (list, tuple)) else [v]
        return [x.lower() in ("1", "true", "yes", "on", "all") if isinstance(x, str) else bool(x) for x in v]

    @field_validator("models")
    @classmethod
    def _models_in_zoo(cls, v):   # every point of such a model would fail after a process start
        from beit_scale.models.zoo import list_models
        bad = [m for m in v if m not in list_models()]
        if bad:
            raise ValueError(f"unknown model(s) {bad} in the study grid; zoo models: {', '.join(list_models())}")
        return v


def load_study(path: Optional[str | os.PathLike] = None, **overrides) -> StudyConfig:
    """A StudyConfig from YAML (keys = the model's fields) plus keyword overrides (None = not given)."""
    import yaml
    raw = (yaml.safe_load(Path(path).read_text()) or {}) if path is not None else {}
    raw.update({k: v for k, v in overrides.items() if v is not None})
    where = f" in {path}" if path is not None else ""
    unknown = sorted(set(raw) - set(StudyConfig.model_fields))
    if unknown:
        raise ValueError(f"unknown study key(s) {unknown}{where}; known: {sorted(StudyConfig.model_fields)}")
    try:
        return StudyConfig(**raw)
    except ValidationError as e:   # one line per problem, named by key, instead of pydantic's layout
        raise ValueError(f"study config{where}: " + "; ".join(
            f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())) from None


def grid_points(cfg: StudyConfig) -> list[Point]:
    """Every combination of the axes, in YAML order (models outermost, nodes innermost)."""
    return [Point(*values) for values in itertools.product(*(getattr(cfg, a) for a in AXES))]
