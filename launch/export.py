"""Export a checkpoint as one safetensors file (consolidated fp32 weights + metadata, no pickles).

    python launch/export.py RUN_DIR_OR_CHECKPOINT --format safetensors --out model.safetensors
    python launch/export.py runs/finetune --format timm --out beit_timm.safetensors
    python launch/export.py runs/finetune --format hf --out beit_hf/   # a transformers directory

RUN_DIR_OR_CHECKPOINT is a run dir (its newest intact checkpoint) or one checkpoint folder
(.../checkpoints/step_00001000).  --format safetensors keeps our parameter names (the whole model
of the stage); --format timm writes timm's Beit layout (see docs/checkpoint.md); --format hf writes
a directory that transformers' BeitForImageClassification / BeitForMaskedImageModeling / BeitModel
load with from_pretrained (see docs/interop.md).  Exit status 2
with one message when the input cannot be exported.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

USAGE_ERROR_EXIT = 2


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="run dir or checkpoint folder")
    p.add_argument("--format", choices=("safetensors", "timm", "hf"), default="safetensors")
    p.add_argument("--out", default=None,
                   help="output file, a directory for --format hf (default: "
                        "RUN_DIR/exports/<model>-<stage>-step<N>-<format>.safetensors, or ...-hf/)")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip the strict load into timm before writing (--format timm)")
    args = p.parse_args(argv)

    import contextlib
    from beit_scale.train.export import ExportError, export_checkpoint
    try:
        # DeepSpeed's zero_to_fp32 prints its progress on stdout; keep stdout for our summary.
        with contextlib.redirect_stdout(sys.stderr):
            out, meta = export_checkpoint(args.source, args.format, args.out, verify=args.verify)
    except (ExportError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return USAGE_ERROR_EXIT
    files = list(out.iterdir()) if out.is_dir() else [out]
    size = sum(f.stat().st_size for f in files) / 2**20
    desc = ", ".join(f"{k}={meta[k]}" for k in ("model", "stage", "step", "format", "num_classes",
                                                 "vocab_size", "img_size", "timm_model") if k in meta)
    print(f"exported {out} ({size:.1f} MiB): {desc}")
    print(f"contents: {meta.get('contents', meta.get('task'))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
