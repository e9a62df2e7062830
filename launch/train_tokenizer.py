"""Train the dVAE visual tokenizer (stage 1).

    deepspeed launch/train_tokenizer.py --deepspeed_config ds_configs/zero2.json [--config YAML] [--run_dir DIR] [--set k=v ...]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from beit_scale.train.run import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main("tokenizer", description=__doc__))
