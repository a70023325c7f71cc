"""``--mirror`` on a chain (issue 14): the option is checked as declared (no credentials, one line, a path
made absolute), the script exports it and logs beside the run directory, a task that finds the run
directory gone makes it again with the chain's records, and ``hpcckpt status`` shows the mirror."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from harness import events

from hpcckpt import CheckpointStore, UsageError
from hpcckpt.cli.main import main
from hpcckpt.rundir import EVENTS, LOGS, SCRIPT
from hpcckpt.slurm.script import render
from hpcckpt.slurm.spec import chain_spec
from hpcckpt.slurm.status import format_status, summarize, summarize_mirror
from hpcckpt.slurm.tasks import task_begin, task_end

SECRET = "wJalrXUtnFEMIzK7MDENGbPxRfiCYzEXAMPLEKEY"


def spec(tmp_path: Path, mirror: str | None) -> object:
    return chain_spec(run_dir=tmp_path / "run", tasks=3, time="1:00:00", command=["python", "train.py"], mirror=mirror)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (f"s3://AKIDEXAMPLE:{SECRET}@bucket/run", "s3://***@bucket/run"),
        # A "/" in the secret (AWS secret keys have them) ends urlsplit's netloc before the "@".
        (f"s3://AKIDEXAMPLE:{SECRET[:9]}/{SECRET[9:]}@bucket/run", "s3://***@bucket/run"),
        (f"s3://bucket/run?key=AKIDEXAMPLE&secret={SECRET}", "s3://bucket/run?key=***&secret=***"),
        (f"gs://bucket/run?token={SECRET}", "gs://bucket/run?token=***"),
    ],
)
def test_a_mirror_url_with_credentials_is_refused_without_showing_them(tmp_path: Path, url: str, shown: str) -> None:
    with pytest.raises(UsageError) as raised:
        spec(tmp_path, url)
    message = str(raised.value)
    assert SECRET not in message
    assert message.startswith(f"Invalid --mirror {shown!r}: it carries credentials")
    assert "AWS_ACCESS_KEY_ID" in message  # where they belong instead


def test_render_refuses_a_credential_url_before_printing_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["render", "--run-dir", str(tmp_path / "r"), "--tasks", "2", "--time", "10", "--mirror"]
    assert main([*argv, f"s3://me:{SECRET}@bucket/p", "--", "python", "x.py"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert SECRET not in err and "s3://***@bucket/p" in err


@pytest.mark.parametrize("bad", ["", "s3://bucket/a\nrm -rf /", "s3:/\x00x", "3s://bucket"])
def test_a_malformed_mirror_is_refused_naming_the_accepted_forms(tmp_path: Path, bad: str) -> None:
    with pytest.raises(UsageError, match=r"Invalid --mirror .*s3://bucket/prefix, gs://bucket/prefix"):
        spec(tmp_path, bad)


def test_the_script_exports_the_mirror_and_logs_beside_the_run_directory(tmp_path: Path) -> None:
    script = render(spec(tmp_path, "s3://bucket/runs/r1"))  # type: ignore[arg-type]
    logs = tmp_path / f"run.{LOGS}"
    assert "export HPCCKPT_MIRROR=s3://bucket/runs/r1\n" in script
    assert f"#SBATCH --output={logs}/%A_%a.out\n" in script
    assert f"#SBATCH --error={logs}/%A_%a.err\n" in script
    assert f'task-begin --max-failures 3 --log-dir {logs} --script "$0"\n' in script
    assert f"--log-dir {logs}\n" in script  # task-end records the log where Slurm writes it


def test_a_chain_without_mirror_keeps_its_logs_in_the_run_directory(tmp_path: Path) -> None:
    script = render(spec(tmp_path, None))  # type: ignore[arg-type]
    assert "HPCCKPT_MIRROR" not in script and "--log-dir" not in script
    assert f"#SBATCH --output={tmp_path / 'run' / LOGS}/%A_%a.out\n" in script


def test_a_mirror_on_a_second_filesystem_is_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    script = render(spec(tmp_path, "project/mirror"))  # type: ignore[arg-type]
    assert f"export HPCCKPT_MIRROR={tmp_path / 'project' / 'mirror'}\n" in script


def test_the_rendered_script_holds_no_credential_from_the_environment(tmp_path: Path) -> None:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("HPCCKPT_", "SLURM_"))},
        "AWS_ACCESS_KEY_ID": "AKIDEXAMPLE",
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_SESSION_TOKEN": SECRET + "token",
    }
    argv = ["render", "--run-dir", str(tmp_path / "r"), "--tasks", "2", "--time", "10"]
    result = subprocess.run(
        [sys.executable, "-m", "hpcckpt", *argv, "--mirror", "s3://bucket/p", "--", "python", "x.py"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert "export HPCCKPT_MIRROR=s3://bucket/p" in result.stdout
    assert SECRET not in result.stdout and "AKIDEXAMPLE" not in result.stdout


# -- a task that finds its run directory gone ---------------------------------------------------------------
def slurm_env(task: int) -> dict[str, str]:
    return {
        "SLURM_JOB_ID": str(900 + task),
        "SLURM_ARRAY_JOB_ID": "800",
        "SLURM_ARRAY_TASK_ID": str(task),
        "SLURM_ARRAY_TASK_MAX": "4",
    }


def test_a_task_that_finds_the_run_directory_gone_makes_it_again_with_the_chain_records(tmp_path: Path) -> None:
    run_dir, logs = tmp_path / "run", tmp_path / "run.logs"
    spool = tmp_path / "spool" / "slurm_script"  # the copy of the script Slurm runs
    spool.parent.mkdir()
    spool.write_text("#!/bin/bash\n# the chain script\n")
    assert task_begin(run_dir, slurm_env(2), 3, pid=1, cancel=False, script=spool, log_dir=logs)
    assert (run_dir / SCRIPT).read_text() == spool.read_text()
    assert logs.is_dir()
    (submit,) = events(run_dir, "submit")
    assert (submit["job"], submit["tasks"], submit["backend"]) == ("800", 4, "slurm")
    assert [e["job"] for e in events(run_dir, "task-begin")] == ["800_2"]
    task_end(run_dir, slurm_env(2), 0, 3, 0, cancel=False, log_dir=logs)
    (end,) = events(run_dir, "task-end")
    assert end["log"] == str(logs / "800_2.err")
    # The next task finds everything in place: nothing recorded twice.
    assert task_begin(run_dir, slurm_env(3), 3, pid=1, cancel=False, script=spool, log_dir=logs)
    assert len(events(run_dir, "submit")) == 1


def test_a_task_of_an_intact_run_records_no_submission(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    CheckpointStore(run_dir, keep_last=None)
    (run_dir / SCRIPT).write_text("#!/bin/bash\n")
    spool = tmp_path / "slurm_script"
    spool.write_text("#!/bin/bash\n# other\n")
    assert task_begin(run_dir, slurm_env(1), 3, pid=1, cancel=False, script=spool, log_dir=tmp_path / "logs")
    assert events(run_dir, "submit") == []
    assert (run_dir / SCRIPT).read_text() == "#!/bin/bash\n"


def test_status_of_a_mirrored_run_directory_that_is_gone_says_where_things_are(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "run.logs").mkdir()
    assert main(["status", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert f"run directory {tmp_path / 'run'} does not exist" in err
    assert f"logs are in {tmp_path / 'run.logs'}" in err
    assert "resumes from the mirror" in err


# -- status -------------------------------------------------------------------------------------------------
def _event(kind: str, time: float, **fields: object) -> dict[str, object]:
    return {"time": time, "event": kind, **fields}


def _store_with(tmp_path: Path, steps: list[int]) -> CheckpointStore:
    store = CheckpointStore(tmp_path / "run", keep_last=None)
    for step in steps:
        store.save({"w": [step]}, step=step)
    return store


URL = "s3://bucket/runs/r1"


def test_status_from_the_events_shows_newest_upload_pending_and_last_failure(tmp_path: Path) -> None:
    store = _store_with(tmp_path, [10, 20, 30])
    names = [c.name for c in store.list()]
    log = [
        _event("uploaded", 100.0, name=names[0], step=10, url=f"{URL}/checkpoints/{names[0]}", size=5, seconds=0.1),
        _event("upload_failed", 110.0, name=names[1], step=20, url=URL, error="EndpointConnectionError: down"),
        _event("upload_failed", 120.0, name=names[2], step=30, url=URL, error="EndpointConnectionError: down"),
    ]
    m = summarize_mirror(URL, log, store.list(), None, "no answer within 5 s", 160.0)
    assert m.newest == {"name": names[0], "step": 10, "age_seconds": 60.0}
    assert m.pending == names[1:]
    assert m.failed == {"name": names[2], "error": "EndpointConnectionError: down", "failures": 2}
    assert m.source == "from the run's events (the mirror was not listed: no answer within 5 s)"
    status = summarize(store.run_dir, log, store.list(), None, 160.0)
    text = format_status(type(status)(**{**status.__dict__, "mirror": m}))
    assert f"mirror   {URL}" in text
    assert f"newest there: {names[0]} (step 10, 60 s ago; from the run's events" in text
    assert f"uploads pending: {names[1]}, {names[2]}" in text
    assert "upload FAILED 2 time(s) since the last success" in text


def test_status_prefers_the_listing_and_a_later_success_clears_the_failures(tmp_path: Path) -> None:
    store = _store_with(tmp_path, [10, 20])
    local = store.list()
    log = [
        _event("upload_failed", 100.0, name=local[0].name, step=10, url=URL, error="x"),
        _event("uploaded", 110.0, name=local[0].name, step=10, url=URL, size=5, seconds=0.1),
    ]
    m = summarize_mirror(URL, log, local, local, None, 1e12)
    assert m.failed is None
    assert m.pending == []
    assert m.newest is not None and m.newest["name"] == local[1].name
    assert (m.source, m.remote_count) == ("listed at the mirror", 2)


def test_status_json_names_the_mirror_of_the_chain_script_offline(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = _store_with(tmp_path, [5])
    (store.run_dir / SCRIPT).write_text(render(spec(tmp_path, URL)))  # type: ignore[arg-type]
    assert (store.run_dir / EVENTS).exists()
    assert main(["status", str(store.run_dir), "--json", "--offline"]) == 0
    mirror = json.loads(capsys.readouterr().out)["mirror"]
    assert mirror["url"] == URL
    assert mirror["newest"] is None
    assert mirror["pending"] == [store.list()[0].name]
    assert mirror["source"] == "from the run's events (the mirror was not listed: --offline)"


# -- submitit's Resumable ----------------------------------------------------------------------------------
def _report_mirror() -> None:
    raise RuntimeError(f"mirror={os.environ.get('HPCCKPT_MIRROR')}")


def test_resumable_passes_the_mirror_to_run_and_refuses_credentials(tmp_path: Path) -> None:
    from hpcckpt.integrations.submitit import Resumable

    with pytest.raises(UsageError, match=r"s3://\*\*\*@bucket/r"):
        Resumable(_report_mirror, tmp_path / "run", mirror=f"s3://k:{SECRET}@bucket/r")
    resumable = Resumable(_report_mirror, tmp_path / "run", mirror="s3://bucket/r")
    with pytest.raises(RuntimeError, match=r"^mirror=s3://bucket/r$"):
        resumable()
    assert "HPCCKPT_MIRROR" not in os.environ  # set for the job's function only


def test_a_secret_with_a_slash_is_refused_and_hidden_wherever_a_mirror_url_is_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from hpcckpt.environment import check_environment
    from hpcckpt.store.locations import open_location

    url = f"s3://AKIDEXAMPLE:{SECRET[:9]}/{SECRET[9:]}@bucket/run"
    with pytest.raises(UsageError) as raised:
        open_location(url)
    assert "s3://***@bucket/run" in str(raised.value) and SECRET[9:] not in str(raised.value)
    with pytest.raises(UsageError) as raised:
        check_environment({"HPCCKPT_MIRROR": url})  # Run reads it from there
    assert SECRET[:9] not in str(raised.value) and SECRET[9:] not in str(raised.value)
