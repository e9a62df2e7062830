"""`srun --label python -m beit_scale.dist`: one line per rank saying what it will use."""
import sys

from beit_scale.dist.env import DistConfigError, detect_dist_env, validate_slurm_env

try:
    env = detect_dist_env()
    print(env.describe(), flush=True)
    validate_slurm_env(env)
except DistConfigError as e:
    print(f"ERROR: {e}", file=sys.stderr, flush=True)
    sys.exit(2)
