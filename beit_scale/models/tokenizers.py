"""The visual tokenizers MIM can predict, behind one header and one loader.

Two kinds of safetensors tokenizer file, told apart by the ``format`` entry of their header:

    ours   beit_scale.dvae   our dVAE (models/dvae.py), trained by the tokenizer stage
    dalle  beit_scale.dalle  OpenAI's DALL-E dVAE (models/dalle.py), converted once from the
                             published ``encoder.pkl`` / ``decoder.pkl`` by the command below

``read_tokenizer_header`` gives the kind, vocabulary, input size and downsampling without loading
weights; ``load_tokenizer`` returns a frozen module whose ``get_codebook_indices(img01)`` maps
[0, 1] images to token ids, whichever the kind.

    python -m beit_scale.models.tokenizers convert-dalle encoder.pkl [decoder.pkl] \\
        --out dalle.safetensors --trust-pickle

The published files are whole pickled Python modules, so reading them can run code: the command
refuses without ``--trust-pickle``. It unpickles with the ``dall_e`` classes replaced by a plain
container (the ``dall-e`` package need not be installed) and only the globals a pickled module
needs allowed (tensor rebuilding, torch.nn module classes, OrderedDict, plain builtins); the
output file is weights plus a JSON header, and loads without pickle from then on.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import sys
import types
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn

from .dalle import DalleConfig, DalleTokenizer
from .dvae import load_tokenizer as load_dvae, read_tokenizer_config

__all__ = ["TokenizerHeader", "read_tokenizer_header", "load_tokenizer", "save_dalle",
           "dalle_from_pickles", "convert_dalle", "KINDS", "DALLE_FORMAT"]

KINDS = ("ours", "dalle")
DALLE_FORMAT = "beit_scale.dalle"
DALLE_FORMAT_VERSION = "1"
CONVERT_CMD = "python -m beit_scale.models.tokenizers convert-dalle"


@dataclass(frozen=True)
class TokenizerHeader:
    kind: str          # one of KINDS
    vocab_size: int
    image_size: int    # the input size it expects (data.second_input_size)
    downsample: int    # input pixels per token, per side


def _metadata(path: Path) -> dict | None:
    """The safetensors header metadata, or None when the file is missing or unreadable."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception:  # noqa: BLE001 - safetensors raises several types; the caller reports
        return None


def _dalle_config(path: Path, meta: dict) -> DalleConfig:
    try:
        raw = json.loads(meta["config"])
        unknown = set(raw) - {f.name for f in fields(DalleConfig)}
        if unknown:
            raise ValueError(f"unknown DalleConfig keys {sorted(unknown)}")
        return DalleConfig(**raw)
    except (KeyError, ValueError, TypeError) as e:
        raise ValueError(f"tokenizer file {path} has an invalid DALL-E header: {e}") from e


def read_tokenizer_header(path: str | os.PathLike) -> TokenizerHeader:
    """Kind, vocabulary and input size of a tokenizer file, from its header (no weights read).

    FileNotFoundError / ValueError (naming the problem) for a missing, unreadable or foreign file."""
    path = Path(path)
    meta = _metadata(path) if path.is_file() else None
    if meta is not None and meta.get("format") == DALLE_FORMAT:
        c = _dalle_config(path, meta)
        return TokenizerHeader("dalle", c.vocab_size, c.image_size, c.downsample)
    try:  # ours, or dvae's own error for a missing / corrupt / foreign file
        c = read_tokenizer_config(path)
    except ValueError as e:
        raise ValueError(f"{e}, or converted from the DALL-E pickles with `{CONVERT_CMD}`") from None
    return TokenizerHeader("ours", c.vocab_size, c.image_size, c.downsample)


def load_tokenizer(path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """A frozen tokenizer (eval mode, no grads) of either kind; see the module docstring."""
    path = Path(path)
    if read_tokenizer_header(path).kind == "ours":
        return load_dvae(path, device)
    from safetensors.torch import load_file
    model = DalleTokenizer(_dalle_config(path, _metadata(path)))
    try:
        model.load_state_dict(load_file(str(path), device="cpu"), strict=True)
    except Exception as e:  # noqa: BLE001 - unreadable tensors or a header / weights mismatch
        raise ValueError(f"tokenizer file {path}: its DALL-E weights do not load into the "
                         f"architecture its header describes ({model.cfg}): {e}") from e
    return model.to(device).eval().requires_grad_(False)


def save_dalle(model: DalleTokenizer, path: str | os.PathLike) -> Path:
    """Weights + header (kind, config) as a safetensors file, written atomically."""
    from safetensors.torch import save_file
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {"format": DALLE_FORMAT, "format_version": DALLE_FORMAT_VERSION, "kind": "dalle",
            "config": json.dumps(asdict(model.cfg), sort_keys=True)}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(sd, str(tmp), metadata=meta)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# ----------------------------------------------------------------------------- the pickles

class _PickledDalleModule(nn.Module):
    """Stands in for every ``dall_e`` class while unpickling: nn.Module's own state restore keeps
    the submodules and parameters, which is all the conversion reads (the forward is ours)."""


_SAFE_BUILTINS = {"set", "frozenset", "dict", "list", "tuple", "slice", "int", "float", "bool",
                  "str", "bytes", "bytearray", "complex"}


def _allowed(module: str, name: str):
    """The object a pickled dVAE module may name, or None. What the published files (and
    torch.save of the package's modules) refer to: tensor/parameter rebuild functions, torch
    devices, sizes and dtypes, torch.nn module classes, OrderedDict and plain builtins."""
    import torch.nn.modules as torch_modules
    if module == "torch._utils" and name.startswith("_rebuild_"):
        return getattr(torch._utils, name, None)
    if module == "torch":
        obj = getattr(torch, name, None)
        return obj if obj in (torch.device, torch.Size) or isinstance(obj, torch.dtype) else None
    if module.startswith("torch.nn.modules.") or module == "torch.nn.parameter":
        obj = getattr(sys.modules.get(module) or torch_modules, name, None)
        ok = isinstance(obj, type) and issubclass(obj, (nn.Module, nn.Parameter))
        return obj if ok else None
    if (module, name) == ("collections", "OrderedDict"):
        from collections import OrderedDict
        return OrderedDict
    if module == "builtins" and name in _SAFE_BUILTINS:
        import builtins
        return getattr(builtins, name)
    return None


class _Unpickler(pickle.Unpickler):
    def find_class(self, module, name):
        module = "builtins" if module == "__builtin__" else module  # protocol 2: Python 2 names
        if module.split(".")[0] == "dall_e":
            return _PickledDalleModule
        obj = _allowed(module, name)
        if obj is None:
            raise pickle.UnpicklingError(
                f"the DALL-E pickle refers to {module}.{name}, which a pickled dVAE module does not "
                f"need; refusing to load it (is this really OpenAI's encoder.pkl / decoder.pkl?)")
        return obj


# torch.load's pickle_module: it subclasses .Unpickler (and the legacy format calls .load).
_pickle_module = types.SimpleNamespace(
    Unpickler=_Unpickler, load=lambda f, **kw: _Unpickler(f, **kw).load(),
    __name__="beit_scale_dalle_pickle")


def _unpickled_state(path: Path) -> dict[str, torch.Tensor]:
    obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_pickle_module)
    if not isinstance(obj, nn.Module):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a pickled DALL-E module")
    # dall_e's own conv keeps its parameters as .w / .b
    return {re.sub(r"\.w$", ".weight", re.sub(r"\.b$", ".bias", k)): v.float()
            for k, v in obj.state_dict().items()}


def _config_from_states(enc: dict, dec: dict | None, image_size: int) -> DalleConfig:
    """The shapes, read from the weights (the published models are n_hid 256, 2 blocks a group)."""
    try:
        n_hid, channels = enc["blocks.input.weight"].shape[:2]
        vocab = enc["blocks.output.conv.weight"].shape[0]
    except KeyError as e:
        raise ValueError(f"the encoder pickle has no {e} weight: not a DALL-E encoder") from None
    blocks = {m.group(1) for k in enc if (m := re.match(r"blocks\.group_1\.block_(\d+)\.", k))}
    n_init = dec["blocks.input.weight"].shape[0] if dec is not None else DalleConfig.n_init
    return DalleConfig(vocab_size=int(vocab), image_size=image_size, n_hid=int(n_hid),
                       n_blk_per_group=len(blocks), channels=int(channels), n_init=int(n_init),
                       has_decoder=dec is not None)


def dalle_from_pickles(encoder_pkl: str | os.PathLike, decoder_pkl: str | os.PathLike | None = None,
                       image_size: int = 112) -> DalleTokenizer:
    """Our DalleTokenizer holding the weights of the published pickles (which are trusted: the
    caller decides). ValueError when a pickle does not fit the DALL-E architecture."""
    enc = _unpickled_state(Path(encoder_pkl))
    dec = _unpickled_state(Path(decoder_pkl)) if decoder_pkl else None
    model = DalleTokenizer(_config_from_states(enc, dec, image_size))
    sd = {f"encoder.{k}": v for k, v in enc.items()}
    sd.update({f"decoder.{k}": v for k, v in (dec or {}).items()})
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise ValueError(f"the pickles do not fit the DALL-E architecture {model.cfg}: {e}") from e
    return model.eval().requires_grad_(False)


def convert_dalle(encoder_pkl, decoder_pkl, out, image_size: int = 112) -> TokenizerHeader:
    save_dalle(dalle_from_pickles(encoder_pkl, decoder_pkl, image_size), out)
    return read_tokenizer_header(out)


PICKLE_WARNING = (
    "refusing to read {files}: the published DALL-E files are whole pickled Python modules "
    "(OpenAI's dall-e package pickled its Encoder/Decoder objects, not just weights), and "
    "unpickling can run code named in the file. Convert only files you trust (OpenAI's "
    "https://cdn.openai.com/dall-e/encoder.pkl and decoder.pkl) and pass --trust-pickle. The "
    "safetensors file it writes loads without pickle from then on.")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m beit_scale.models.tokenizers",
                                description="Tokenizer file tools.")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert-dalle", help="DALL-E encoder.pkl [decoder.pkl] -> our safetensors "
                                             "tokenizer file (MIM: --set tokenizer.checkpoint=OUT)")
    c.add_argument("encoder", type=Path)
    c.add_argument("decoder", type=Path, nargs="?", default=None,
                   help="optional: only needed to reconstruct images from tokens")
    c.add_argument("--out", type=Path, required=True)
    c.add_argument("--image-size", type=int, default=112,
                   help="input size recorded in the header (BEiT: 112 = 14x14 tokens)")
    c.add_argument("--trust-pickle", action="store_true",
                   help="required: the inputs are pickled modules (see the message without it)")
    a = p.parse_args(argv)
    files = [str(f) for f in (a.encoder, a.decoder) if f is not None]
    if not a.trust_pickle:
        print(PICKLE_WARNING.format(files=" and ".join(files)), file=sys.stderr)
        return 2
    missing = [f for f in files if not Path(f).is_file()]
    if missing:
        print(f"convert-dalle: no such file: {', '.join(missing)}", file=sys.stderr)
        return 2
    try:
        h = convert_dalle(a.encoder, a.decoder, a.out, a.image_size)
    except (ValueError, pickle.UnpicklingError) as e:
        print(f"convert-dalle: {e}", file=sys.stderr)
        return 1
    print(f"wrote {a.out}: kind={h.kind} vocab_size={h.vocab_size} image_size={h.image_size} "
          f"({h.image_size // h.downsample}x{h.image_size // h.downsample} tokens)"
          f"{'' if a.decoder else ', encoder only'}. MIM: --set tokenizer.checkpoint={a.out} "
          f"--set tokenizer.vocab_size={h.vocab_size} --set data.second_input_size={h.image_size}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
