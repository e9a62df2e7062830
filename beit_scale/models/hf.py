"""State-dict and config conversion: beit_scale <-> Hugging Face transformers' BEiT.

transformers is not imported here: the mapping is plain torch and JSON, so exporting needs no
transformers install and importing an HF directory reads its files directly.

Keys are those of the files transformers writes (``save_pretrained``; the hub checkpoints have
the same), for ``BeitForImageClassification`` / ``BeitForMaskedImageModeling`` (prefix
``beit.``) and ``BeitModel`` (no prefix; read only). Per block ``i`` (``L = beit.encoder.layer.i``):

    beit_scale                           transformers
    blocks.i.attn.qkv.weight [3D, D]     L.attention.attention.{query,key,value}.weight (split)
    blocks.i.attn.q_bias / v_bias        L.attention.attention.query.bias / value.bias (no key bias)
    blocks.i.attn.rel_pos.table          L.attention.attention.relative_position_bias.relative_position_bias_table
    blocks.i.attn.proj                   L.attention.output.dense
    blocks.i.norm1 / norm2               L.layernorm_before / layernorm_after
    blocks.i.mlp.fc1 / fc2               L.intermediate.dense / L.output.dense
    blocks.i.gamma_1 / gamma_2           L.lambda_1 / lambda_2   (layer scale)
    shared_rel_pos.table                 beit.encoder.relative_position_bias.relative_position_bias_table
    cls_token, mask_token, pos_embed     beit.embeddings.cls_token, .mask_token, .position_embeddings
    patch_embed.proj                     beit.embeddings.patch_embeddings.projection
    fc_norm, head (classifier)           beit.pooler.layernorm, classifier   (mean pooling)
    norm, lm_head (MIM)                  layernorm, lm_head

Our classifier pools by the mean of the patch tokens (``use_mean_pooling: true`` in HF), and the
MIM model has one final norm before its head (HF: ``layernorm``; ``beit.layernorm`` is then an
Identity). Index buffers (``relative_position_index``) are derived, never written or read.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Mapping

import torch

from .beit import LN_EPS
from .config import BeitConfig

__all__ = ["to_hf", "from_hf", "hf_config", "config_from_hf", "task_of_hf_config",
           "read_hf_dir", "is_hf_dir", "HF_ARCHITECTURES"]

log = logging.getLogger(__name__)

HF_ARCHITECTURES = {"classify": "BeitForImageClassification", "mim": "BeitForMaskedImageModeling",
                    "backbone": "BeitModel"}

_L = "beit.encoder.layer.{i}."
_A = _L + "attention.attention."
# (ours, transformers); {i}: block index, {p}: weight|bias
_PAIRS = (
    ("cls_token", "beit.embeddings.cls_token"),
    ("mask_token", "beit.embeddings.mask_token"),
    ("pos_embed", "beit.embeddings.position_embeddings"),
    ("patch_embed.proj.{p}", "beit.embeddings.patch_embeddings.projection.{p}"),
    ("shared_rel_pos.table", "beit.encoder.relative_position_bias.relative_position_bias_table"),
    ("blocks.{i}.attn.q_bias", _A + "query.bias"),
    ("blocks.{i}.attn.v_bias", _A + "value.bias"),
    ("blocks.{i}.attn.rel_pos.table", _A + "relative_position_bias.relative_position_bias_table"),
    ("blocks.{i}.attn.proj.{p}", _L + "attention.output.dense.{p}"),
    ("blocks.{i}.norm1.{p}", _L + "layernorm_before.{p}"),
    ("blocks.{i}.norm2.{p}", _L + "layernorm_after.{p}"),
    ("blocks.{i}.mlp.fc1.{p}", _L + "intermediate.dense.{p}"),
    ("blocks.{i}.mlp.fc2.{p}", _L + "output.dense.{p}"),
    ("blocks.{i}.gamma_1", _L + "lambda_1"),
    ("blocks.{i}.gamma_2", _L + "lambda_2"),
    ("fc_norm.{p}", "beit.pooler.layernorm.{p}"),
    ("head.{p}", "classifier.{p}"),
    ("norm.{p}", "layernorm.{p}"),
    ("lm_head.{p}", "lm_head.{p}"),
)
_QKV = "blocks.{i}.attn.qkv.weight"
_QKV_HF = tuple(_A + f"{n}.weight" for n in ("query", "key", "value"))


def _regex(template: str) -> re.Pattern:
    pat = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)")
    return re.compile(pat + "$")


_TO_HF = [(_regex(o), h) for o, h in _PAIRS]
_FROM_HF = [(_regex(h), o) for o, h in _PAIRS]
_QKV_RE = _regex(_QKV)
_QKV_HF_RE = [_regex(t) for t in _QKV_HF]


def _map(key: str, rules) -> str | None:
    for pattern, template in rules:
        m = pattern.match(key)
        if m:
            return template.format(**m.groupdict())
    return None


def to_hf(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our model's state dict (classifier or MIM) -> transformers' keys; ValueError on a key
    with no transformers counterpart (nothing is dropped silently)."""
    out, unmapped = {}, []
    for k, v in state_dict.items():
        m = _QKV_RE.match(k)
        if m:
            for name, part in zip(_QKV_HF, v.chunk(3, dim=0)):
                out[name.format(i=m["i"])] = part.contiguous()
            continue
        new = _map(k, _TO_HF)
        if new is None:
            unmapped.append(k)
        else:
            out[new] = v
    if unmapped:
        raise ValueError(f"no transformers BEiT counterpart for {unmapped}")
    return out


def from_hf(state_dict: Mapping[str, torch.Tensor]
            ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A transformers BEiT state dict (any of the three classes' files) -> (our keys, the HF
    entries that have no place in our models, e.g. a cls-pooling ``beit.layernorm`` or
    ``relative_position_index`` buffers of older files; names with the ``beit.`` prefix).

    ValueError when a block's query/key/value weights are incomplete (they are fused here)."""
    sd = dict(state_dict)
    if not any(k.startswith("beit.") for k in sd):  # saved by BeitModel: no class prefix
        sd = {f"beit.{k}": v for k, v in sd.items()}
    out, unused = {}, {}
    qkv: dict[str, dict[int, torch.Tensor]] = {}
    for k, v in sd.items():
        part = next(((j, m) for j, r in enumerate(_QKV_HF_RE) if (m := r.match(k))), None)
        if part is not None:
            j, m = part
            qkv.setdefault(m["i"], {})[j] = v
            continue
        new = _map(k, _FROM_HF)
        if new is None:
            unused[k] = v
        else:
            out[new] = v
    for i, parts in qkv.items():
        if len(parts) != 3:
            raise ValueError(f"block {i}: the checkpoint has only {sorted(parts)} of query/key/value "
                             f"(0/1/2) weights; all three are needed")
        out[_QKV.format(i=i)] = torch.cat([parts[0], parts[1], parts[2]], dim=0)
    return out, unused


def hf_config(cfg: BeitConfig, task: str) -> dict:
    """The ``config.json`` of our ``cfg`` (rel_pos_bias resolved) as transformers' BeitConfig."""
    if cfg.rel_pos_bias not in ("layer", "shared", "none"):
        raise ValueError(f"resolve rel_pos_bias={cfg.rel_pos_bias!r} first (zoo.resolve_config)")
    out = {
        "architectures": [HF_ARCHITECTURES[task]], "model_type": "beit",
        "hidden_size": cfg.embed_dim, "num_hidden_layers": cfg.depth,
        "num_attention_heads": cfg.num_heads, "intermediate_size": cfg.mlp_dim,
        "hidden_act": "gelu", "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
        "initializer_range": cfg.init_std, "layer_norm_eps": LN_EPS,
        "image_size": cfg.img_size, "patch_size": cfg.patch_size, "num_channels": cfg.in_chans,
        "use_mask_token": task == "mim",
        "use_absolute_position_embeddings": cfg.abs_pos_emb,
        "use_relative_position_bias": cfg.rel_pos_bias == "layer",
        "use_shared_relative_position_bias": cfg.rel_pos_bias == "shared",
        "layer_scale_init_value": float(cfg.layer_scale_init or 0.0),
        "drop_path_rate": cfg.drop_path_rate, "use_mean_pooling": True,
        "vocab_size": cfg.vocab_size, "dtype": "float32",
    }
    if task == "classify":  # transformers reads num_labels from id2label
        out["id2label"] = {str(i): f"LABEL_{i}" for i in range(cfg.num_classes)}
        out["label2id"] = {f"LABEL_{i}": i for i in range(cfg.num_classes)}
    return out


def task_of_hf_config(hf: Mapping) -> str | None:
    """'classify' / 'mim' / 'backbone' from the config's architectures (None if not recorded)."""
    by_arch = {v: k for k, v in HF_ARCHITECTURES.items()}
    return next((by_arch[a] for a in hf.get("architectures") or [] if a in by_arch), None)


def config_from_hf(hf: Mapping, name: str = "hf") -> BeitConfig:
    """Our BeitConfig for a transformers BEiT ``config.json`` (transformers' defaults where a
    field is absent). ValueError for what our model cannot represent."""
    g = hf.get
    if g("model_type", "beit") != "beit":
        raise ValueError(f"config.json has model_type={g('model_type')!r}; only 'beit' converts")
    if g("hidden_act", "gelu") != "gelu":
        raise ValueError(f"hidden_act={g('hidden_act')!r}: beit_scale's MLP uses exact GELU only")
    layer, shared = g("use_relative_position_bias", False), g("use_shared_relative_position_bias", False)
    if layer and shared:
        raise ValueError("config.json enables both per-layer and shared relative position bias; "
                         "beit_scale uses one or the other")
    eps = float(g("layer_norm_eps", 1e-12))
    if eps != LN_EPS:
        log.info("HF config layer_norm_eps=%g; beit_scale's LayerNorms use %g", eps, LN_EPS)
    labels = g("id2label")
    num_classes = len(labels) if labels else int(g("num_labels", 2))
    ls = float(g("layer_scale_init_value", 0.1))
    return BeitConfig(
        name=name, img_size=int(g("image_size", 224)), patch_size=int(g("patch_size", 16)),
        in_chans=int(g("num_channels", 3)), embed_dim=int(g("hidden_size", 768)),
        depth=int(g("num_hidden_layers", 12)), num_heads=int(g("num_attention_heads", 12)),
        mlp_dim=int(g("intermediate_size", 3072)), layer_scale_init=ls if ls > 0 else None,
        drop_path_rate=float(g("drop_path_rate", 0.1)),
        rel_pos_bias="shared" if shared else "layer" if layer else "none",
        abs_pos_emb=bool(g("use_absolute_position_embeddings", False)), num_classes=num_classes,
        vocab_size=int(g("vocab_size", 8192)), init_std=float(g("initializer_range", 0.02)))


def is_hf_dir(path) -> bool:
    """A directory with a transformers ``config.json`` of model_type 'beit'."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text()).get("model_type") == "beit"
    except (OSError, ValueError):
        return False


def read_hf_dir(path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json as a dict, the HF state dict) of a transformers model directory: reads
    model.safetensors, its sharded form (model.safetensors.index.json) or pytorch_model.bin
    (loaded with weights_only=True, so no code runs)."""
    from safetensors.torch import load_file
    path = Path(path)
    if not is_hf_dir(path):
        raise ValueError(f"{path} is not a transformers BEiT directory (no config.json with "
                         f"model_type 'beit')")
    hf = json.loads((path / "config.json").read_text())
    index = path / "model.safetensors.index.json"
    if (path / "model.safetensors").is_file():
        sd = load_file(str(path / "model.safetensors"))
    elif index.is_file():
        sd = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            sd.update(load_file(str(path / shard)))
    elif (path / "pytorch_model.bin").is_file():
        sd = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"{path} has a config.json but no model.safetensors, "
                         f"model.safetensors.index.json or pytorch_model.bin")
    return hf, sd
