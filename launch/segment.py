"""Fine-tune a BEiT semantic segmentation model (backbone + UperNet / SETR-PUP decoder).

    deepspeed launch/segment.py --deepspeed_config ds_configs/zero2.json --config configs/segment/base.yaml \
        --set data.path=/data/ADEChallengeData2016 --set init.from=runs/mim_beit_base_patch16_224 [--run_dir DIR]

init.from: a MIM or classification run dir (newest valid checkpoint), a checkpoint folder, an exported
.safetensors, a timm BEiT .safetensors/.pth, or `scratch`.  Unset: the default pretraining run
runs/mim_<model> if it exists.  With no --config: the embedded segmentation set (masks drawn by the
procedural generator), beit_mini, 128 px crops.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from beit_scale.train.run import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main("segment", description=__doc__))
