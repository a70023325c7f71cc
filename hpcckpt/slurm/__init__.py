"""Everything that knows Slurm: the command runner, the job environment, the chain script, the task
guard, the local backend and ``status``. The public names are re-exported from ``hpcckpt``."""
