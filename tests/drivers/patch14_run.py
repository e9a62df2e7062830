"""Test driver: tests/drivers/multi_run.py with a debug-size patch-14 model in the zoo.

    python tests/drivers/patch14_run.py SPEC.json          (SPEC as for multi_run.py)

The zoo's only patch-14 entry is the ~1B giant; `beit_debug_patch14` (beit_debug's width and
depth, 14 px patches) lets a CPU test train the patch-14 data path (a 16x16 grid at 224 px,
128 px tokenizer views) end to end through the real launcher path.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

PATCH14_DEBUG = "beit_debug_patch14"


def register():
    from beit_scale.models.zoo import get_config, list_models, register as reg
    if PATCH14_DEBUG not in list_models():
        reg(get_config("beit_debug").replace(name=PATCH14_DEBUG, patch_size=14))


if __name__ == "__main__":
    register()
    import multi_run
    multi_run.main()
