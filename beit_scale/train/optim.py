"""Optimizer parameter groups and the per-step learning-rate schedule.

Weight decay is not applied to 1-D parameters (biases, norm weights, layer-scale gammas) nor to
what the model lists in `no_weight_decay()` (position / relative-position tables, cls and [MASK]
tokens).  Layer-wise lr decay scales block i's lr by decay^(depth + 1 - layer_id).
"""
from __future__ import annotations

import math
from collections import OrderedDict

import torch


def _model_no_wd(model) -> set[str]:
    fn = getattr(model, "no_weight_decay", None)
    return set(fn()) if callable(fn) else set()


def _num_layers(model) -> int:
    blocks = getattr(model, "blocks", None)
    return len(blocks) if blocks is not None else 0


def param_groups(model: torch.nn.Module, weight_decay: float, layer_decay: float = 1.0,
                 frozen_prefixes: tuple[str, ...] = ()) -> list[dict]:
    """Groups keyed by (layer, decay/no-decay); each carries `lr_scale` and a readable `name`."""
    skip = _model_no_wd(model)
    depth = _num_layers(model)
    layer_of = getattr(model, "layer_id", None)
    groups: "OrderedDict[str, dict]" = OrderedDict()
    for name, p in model.named_parameters():
        if not p.requires_grad or name.startswith(frozen_prefixes):
            continue
        no_wd = p.ndim <= 1 or name in skip or name.endswith(".bias") or \
            any(name.endswith(s) or name == s for s in skip)
        layer = layer_of(name) if (layer_decay != 1.0 and callable(layer_of)) else 0
        scale = layer_decay ** (depth + 1 - layer) if layer_decay != 1.0 else 1.0
        key = f"layer_{layer}_{'no_decay' if no_wd else 'decay'}"
        g = groups.setdefault(key, {"name": key, "params": [], "param_names": [],
                                    "weight_decay": 0.0 if no_wd else weight_decay,
                                    "lr_scale": scale})
        g["params"].append(p)
        g["param_names"].append(name)
    return list(groups.values())


def describe_groups(groups: list[dict], base_lr: float) -> str:
    lines = [f"{'group':<22} {'params':>9} {'tensors':>7} {'lr_scale':>9} {'lr':>10} {'wd':>6}"]
    for g in groups:
        n = sum(p.numel() for p in g["params"])
        lines.append(f"{g['name']:<22} {n:>9,} {len(g['params']):>7} {g['lr_scale']:>9.4f} "
                     f"{base_lr * g['lr_scale']:>10.3e} {g['weight_decay']:>6.3f}")
    return "\n".join(lines)


def lr_factor(step: int, warmup_steps: int, max_steps: int, base_lr: float, min_lr: float,
              schedule: str = "cosine", power: float = 1.0) -> float:
    """Linear warmup to 1, then cosine (or poly: (1 - progress)^power, the segmentation recipe)
    to min_lr/base_lr (multiplier on each group's lr)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    floor = min_lr / base_lr
    if schedule == "poly":
        return floor + (1 - floor) * (1 - progress) ** power
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer_and_schedule(groups: list[dict], lr: float, betas, eps: float, warmup_steps: int,
                                 max_steps: int, min_lr: float, optimizer_cls=torch.optim.AdamW,
                                 schedule: str = "cosine"):
    torch_groups = []
    for g in groups:
        torch_groups.append({"params": g["params"], "weight_decay": g["weight_decay"],
                             "lr": lr * g["lr_scale"], "lr_scale": g["lr_scale"], "name": g["name"]})
    opt = optimizer_cls(torch_groups, lr=lr, betas=tuple(betas), eps=eps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, warmup_steps, max_steps, lr, min_lr, schedule))
    return opt, sched
