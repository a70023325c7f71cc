"""Validation with ranks (issue 14): every rank validates what rank 0 chose; any rank failing makes the
checkpoint bad for all, and all ranks restore the same older one. Real gloo process groups on CPU."""

from __future__ import annotations

import textwrap
from pathlib import Path

from harness import run_ranks

from hpcckpt import CheckpointStore

# See tests/test_distributed.py: torch's gloo sometimes aborts a rank at teardown, after its last line.

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
    lines = run_ranks(script, str(run_dir))
    assert [(line["step"], line["weight"]) for line in lines] == [(2, 2.0), (2, 2.0)]
    store = CheckpointStore(run_dir, keep_last=None)
    assert [c.step for c in store.list()] == [1, 2]
    (bad,) = [c for c in store.list(include_bad=True) if c.step == 3]
    assert store.registry.bad_reason(bad) == "rank 1: validate returned False"
