"""Distributed-launch helpers: one view of the rank layout under any launcher."""
from beit_scale.dist.env import (  # noqa: F401
    REQUEUE_EXIT_CODE,
    DistConfigError,
    DistEnv,
    cuda_device_index,
    detect_dist_env,
    fail_fast,
    parse_hostlist,
    parse_tasks_per_node,
    validate_slurm_env,
)
