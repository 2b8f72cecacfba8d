"""Launching runs: rank facts (dist_env), Slurm jobs (slurm), preemption signals (preemption).

See docs/slurm.md. The submodules import nothing heavy at import time (torch only inside
``any_rank``), so the CLI can import this package cheaply.
"""

from orthrus_train.launch.dist_env import (
    DataShard,
    DistEnv,
    DistEnvError,
    expand_nodelist,
    export_torch_env,
    resolve_data_shard,
    resolve_dist_env,
)
from orthrus_train.launch.preemption import PreemptionHandler, any_rank, shared_handler
from orthrus_train.launch.slurm import (
    PIPELINE_STAGES,
    SlurmConfig,
    SlurmConfigError,
    orthrus_command,
    render_sbatch,
    submit,
)

__all__ = [
    "DataShard",
    "DistEnv",
    "DistEnvError",
    "PIPELINE_STAGES",
    "PreemptionHandler",
    "SlurmConfig",
    "SlurmConfigError",
    "any_rank",
    "expand_nodelist",
    "export_torch_env",
    "orthrus_command",
    "render_sbatch",
    "resolve_data_shard",
    "resolve_dist_env",
    "shared_handler",
    "submit",
]
