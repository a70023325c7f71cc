"""Validation with ranks (issue 14): every rank validates what rank 0 chose; any rank failing makes the
checkpoint bad for all, and all ranks restore the same older one. Real gloo process groups on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from harness import clean_env, free_port

from hpcckpt import CheckpointStore

# See tests/test_distributed.py: torch's gloo sometimes aborts a rank at teardown, after its last line.
TEARDOWN_ABORT = "terminate called without an active exception"

WORKER = textwrap.dedent(
    """
    import json, sys, warnings
    import torch
    import torch.distributed as dist
    from hpcckpt import CheckpointStore, TrainState

    warnings.simplefilter("ignore")
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = torch.nn.Linear(4, 2)
    store = CheckpointStore(sys.argv[1], keep_last=None, format="dcp")
    for step in (1, 2, 3):
        with torch.no_grad():
            model.weight.fill_(float(step))
        store.save(TrainState(model=model, step=step))
    fresh = TrainState(model=torch.nn.Linear(4, 2))

    def validate(state):
        return not (rank == 1 and state.step == 3)  # only rank 1 sees the problem

    chosen = store.restore(fresh, validate=validate)
    print(json.dumps({"rank": rank, "step": chosen.step, "weight": float(fresh.model.weight[0, 0])}), flush=True)
    dist.barrier()
    dist.destroy_process_group()
    """
)


def test_a_checkpoint_one_rank_rejects_is_bad_for_every_rank(tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    run_dir = tmp_path / "run"
    port = str(free_port())
    processes = []
    for rank in range(2):
        env = clean_env("RANK", "WORLD_SIZE", RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
        env |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "PYTHONPATH": os.pathsep.join(sys.path)}
        processes.append(
            subprocess.Popen(
                [sys.executable, str(script), str(run_dir)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
            )
        )
    outputs = [process.communicate(timeout=300) for process in processes]
    lines = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs if out.strip()]
    errors = "\n".join(err for _, err in outputs)
    assert len(lines) == 2, errors[-3000:]
    assert all(p.returncode == 0 for p in processes) or TEARDOWN_ABORT in errors, errors[-3000:]
    assert [(line["step"], line["weight"]) for line in lines] == [(2, 2.0), (2, 2.0)]
    store = CheckpointStore(run_dir, keep_last=None)
    assert [c.step for c in store.list()] == [1, 2]
    (bad,) = [c for c in store.list(include_bad=True) if c.step == 3]
    assert store.registry.bad_reason(bad) == "rank 1: validate returned False"
