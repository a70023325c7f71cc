"""Where the tests' files live, named once.

tests/workers/ holds what runs in a process of its own (scripts started by path, modules that a
subprocess, a forkserver or a submitted job imports by name); tests/support/ holds what the tests import.
pyproject.toml's pytest ``pythonpath`` puts both folders on ``sys.path``, so both import by plain name.
"""

from __future__ import annotations

from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent
REPO = TESTS.parent
WORKERS = TESTS / "workers"

# The one toy training job that the single-process tests run (`python TRAIN_WORKER RUN_DIR ...`).
TRAIN_WORKER = WORKERS / "train_worker.py"
# The same toy training, one process per rank under torchrun or srun.
DDP_WORKER = WORKERS / "ddp_worker.py"
# The same toy training as a function, for submitit's executors (imported by name in the jobs).
SUBMITIT_TRAIN = WORKERS / "submitit_train.py"
# A TCP relay in front of the tests' S3 server: killed to cut the server off mid-transfer (s3lab.py).
TCP_RELAY = WORKERS / "tcprelay.py"
