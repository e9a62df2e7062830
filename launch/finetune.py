"""Fine-tune a BEiT classifier (stage 3), e.g. from a MIM pretraining run.

    deepspeed launch/finetune.py --deepspeed_config ds_configs/zero2.json --config configs/finetune/base.yaml \
        --set init.from=runs/mim_beit_base_patch16_224 [--run_dir DIR] [--set k=v ...]

init.from: a run dir (newest valid checkpoint), a checkpoint folder, an exported .safetensors, a timm
BEiT .safetensors/.pth, or `scratch`.  Unset: the default pretraining run runs/mim_<model> if it exists.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from beit_scale.train.run import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main("classify", description=__doc__))
