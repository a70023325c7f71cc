"""The scripts in sbatch/ are the template's output for these specs; tests/test_chain.py keeps them so.

Regenerate after a template change:  python tests/support/golden.py
"""

from __future__ import annotations

from pathlib import Path

from hpcckpt.slurm.script import render
from hpcckpt.slurm.spec import ChainSpec

SBATCH = Path(__file__).resolve().parent.parent.parent / "sbatch"

GOLDEN: dict[str, ChainSpec] = {
    # Ready to submit by hand: edit the run directory and the command, then `sbatch chain.sbatch`.
    "chain.sbatch": ChainSpec(
        run_dir=Path("/scratch/hpcckpt-runs/example"),
        command=("python3", "train.py"),
        tasks=10,
        time_seconds=4 * 3600,
        signal_name="USR1",
        signal_lead=300,
        job_name="hpcckpt-example",
        python="python3",
    ),
    "examples/gpu-4h-10-tasks.sbatch": ChainSpec(
        run_dir=Path("/scratch/hpcckpt-runs/llm-finetune"),
        command=("python3", "examples/train_mlp.py", "--steps", "500000"),
        tasks=10,
        time_seconds=4 * 3600,
        signal_name="USR1",
        signal_lead=300,
        job_name="llm-finetune",
        partition="gpu",
        gpus="1",
        cpus_per_task=8,
        mem="64G",
        extra_directives=("--mail-type=END,FAIL",),
        auto_extend=2,
        python="python3",
    ),
    "examples/two-nodes-srun.sbatch": ChainSpec(
        run_dir=Path("/scratch/hpcckpt-runs/ddp"),
        command=("python3", "train_ddp.py"),
        tasks=6,
        time_seconds=2 * 3600,
        signal_name="USR2",
        signal_lead=240,
        job_name="ddp",
        launcher="srun --kill-on-bad-exit=1 ",
        nodes=2,
        ntasks_per_node=1,
        python="python3",
    ),
    # --setup, --conda and --venv: the site setup without a template of one's own.
    "examples/site-setup.sbatch": ChainSpec(
        run_dir=Path("/scratch/hpcckpt-runs/site"),
        command=("python3", "train.py"),
        tasks=4,
        time_seconds=2 * 3600,
        signal_name="USR1",
        signal_lead=300,
        job_name="site",
        python="python3",
        setup=("module load cuda/12.4", 'export NCCL_DEBUG="WARN"'),
        conda="my env",
        venv=Path("/scratch/venvs/my venv"),
    ),
}


def regenerate() -> None:
    for name, spec in GOLDEN.items():
        path = SBATCH / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render(spec))


if __name__ == "__main__":
    regenerate()
