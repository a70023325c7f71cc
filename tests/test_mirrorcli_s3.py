"""``hpcckpt push/pull/ls URL/verify URL``, ``status`` listing the mirror, and ``submit --mirror``'s check,
against the tests' S3 server with the real client (s3fs). Errors are one line that names the location
and never shows a secret; bad usage exits 2, a failing location 1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import s3fs
from harness import clean_env, events, train_command
from s3lab import S3Lab

from hpcckpt import CheckpointStore, HpcckptWarning
from hpcckpt.cli.main import main


def _store(path: Path, steps: list[int]) -> CheckpointStore:
    store = CheckpointStore(path, keep_last=None)
    for step in steps:
        store.save({"w": [step] * 100, "step": step}, step=step, metrics={"loss": 1.0 / step})
    return store


def _cli(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``hpcckpt ARGV`` in a process of its own, as a user runs it (the environment of this test)."""
    return subprocess.run(
        [sys.executable, "-m", "hpcckpt", *argv],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
        env=env if env is not None else dict(os.environ),
    )


def _one_line_error(result: subprocess.CompletedProcess[str], code: int, secret: str) -> str:
    assert result.returncode == code, result.stdout + result.stderr
    assert result.stderr.count("\n") == 1, result.stderr  # one line, no traceback
    assert "Traceback" not in result.stderr and secret not in result.stderr + result.stdout
    return result.stderr


def test_push_then_ls_verify_and_pull_into_an_empty_run_directory(
    s3_env: S3Lab, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"s3://{s3_env.new_bucket()}/runs/a"
    store = _store(tmp_path / "run", [10, 20, 30])
    names = [c.name for c in store.list()]
    assert main(["push", str(store.run_dir), url]) == 0
    assert capsys.readouterr().out.endswith(f"3 pushed, 0 already there, to {url}\n")
    assert main(["push", str(store.run_dir), url]) == 0  # nothing twice, nothing overwritten
    assert capsys.readouterr().out.endswith(f"0 pushed, 3 already there, to {url}\n")

    assert main(["ls", url, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(c["name"], c["step"]) for c in listed] == [(n, s) for n, s in zip(names, [10, 20, 30], strict=True)]
    assert main(["ls", url]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["NAME", "STEP", "EPOCH"] and [row.split()[0] for row in table[1:]] == names

    assert main(["verify", url]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"3 ok, 0 corrupt at {url}"

    assert main(["pull", url, str(tmp_path / "new")]) == 0
    assert f"pulled {names[-1]} (step 30" in capsys.readouterr().out
    fresh = CheckpointStore(tmp_path / "new", create=False)
    assert [c.name for c in fresh.list()] == [names[-1]]
    assert fresh.load()["w"] == [30] * 100
    assert main(["pull", url, str(tmp_path / "new")]) == 0  # already there: left as it is
    assert "is already in" in capsys.readouterr().out
    assert [c.name for c in fresh.list()] == [names[-1]]

    # An older step pulled is the newest commit: the run resumes from it (a roll-back), and says so.
    assert main(["pull", url, str(tmp_path / "new"), "--step", "10"]) == 0
    assert "a resume of this run starts from it" in capsys.readouterr().out
    assert [c.step for c in fresh.list()] == [30, 10]
    assert fresh.load()["w"] == [10] * 100


def test_pull_of_a_step_the_mirror_lacks_names_the_steps_it_has(s3_env: S3Lab, tmp_path: Path) -> None:
    url = f"s3://{s3_env.new_bucket()}/runs/b"
    store = _store(tmp_path / "run", [4, 8])
    assert _cli("push", str(store.run_dir), url).returncode == 0
    err = _one_line_error(_cli("pull", url, str(tmp_path / "x"), "--step", "5"), 1, s3_env.secret_key)
    assert f"no checkpoint at step 5 at {url}; its steps: 4, 8" in err


def test_verify_names_the_corrupt_file_and_pull_skips_to_the_newest_valid(
    s3_env: S3Lab, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bucket = s3_env.new_bucket()
    url = f"s3://{bucket}/runs/c"
    store = _store(tmp_path / "run", [1, 2])
    assert main(["push", str(store.run_dir), url]) == 0
    newest = store.list()[-1]
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    (data,) = [f for f in newest.files if f.name != "manifest.json"][:1]
    key = f"{bucket}/runs/c/checkpoints/{newest.name}/{data.name}"
    body = fs.cat(key)
    fs.pipe(key, bytes([body[0] ^ 0xFF]) + body[1:])  # a bit flipped at rest
    capsys.readouterr()
    assert main(["verify", url]) == 1
    out = capsys.readouterr().out
    assert f"CORRUPT  {newest.name}" in out and data.name in out
    assert out.splitlines()[-1] == f"1 ok, 1 corrupt at {url}"
    with pytest.warns(HpcckptWarning, match=f"{newest.name} does not verify, trying an older one"):
        assert main(["pull", url, str(tmp_path / "new")]) == 0
    assert [c.step for c in CheckpointStore(tmp_path / "new", create=False).list()] == [1]


def test_a_run_directory_is_told_from_a_url_by_its_scheme(
    s3_env: S3Lab, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mirror_dir = tmp_path / "project" / "mirror"
    store = _store(tmp_path / "run", [3])
    assert main(["push", str(store.run_dir), str(mirror_dir)]) == 0  # push/pull: a plain path is a location
    capsys.readouterr()
    assert main(["ls", f"file://{mirror_dir}", "--json"]) == 0
    assert [c["step"] for c in json.loads(capsys.readouterr().out)] == [3]
    for command in ("ls", "verify", "status"):  # without a scheme: a run directory, which it is not
        assert main([command, str(mirror_dir)]) == 2
        assert f"a mirror is named by its URL (file://{mirror_dir})" in capsys.readouterr().err
    assert sorted(p.name for p in mirror_dir.iterdir()) == ["checkpoints"]  # nothing written there


def test_errors_are_one_line_naming_the_location_without_the_secret(s3_lab: S3Lab, tmp_path: Path) -> None:
    secret = s3_lab.secret_key
    good = clean_env(**s3_lab.env())
    err = _one_line_error(_cli("ls", "nosuch://bucket/x", env=good), 2, secret)
    assert "nosuch://bucket/x" in err
    err = _one_line_error(_cli("ls", "gs://bucket/x", env=good), 2, secret)
    assert "pip install 'hpcckpt[gcs]'" in err  # gcsfs is not installed here
    err = _one_line_error(_cli("ls", "s3://no-such-bucket-here/x", env=good), 1, secret)
    assert err.startswith("hpcckpt ls: error: mirror s3://no-such-bucket-here/x: ")
    bucket = s3_lab.new_bucket()
    wrong = clean_env(**s3_lab.wrong_env())
    err = _one_line_error(_cli("ls", f"s3://{bucket}/x", env=wrong), 1, secret)
    assert err.startswith(f"hpcckpt ls: error: mirror s3://{bucket}/x: access denied")
    assert "not-the-secret" not in err
    err = _one_line_error(_cli("verify", f"s3://k:{secret}@{bucket}/x", env=good), 2, secret)
    assert f"s3://***@{bucket}/x" in err


def test_status_lists_the_mirror_and_says_so(s3_env: S3Lab, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"s3://{s3_env.new_bucket()}/runs/s"
    store = _store(tmp_path / "run", [1, 2])
    assert main(["push", str(store.run_dir), url, "--step", "1"]) == 0
    capsys.readouterr()
    assert main(["status", str(store.run_dir), "--mirror", url, "--json"]) == 0
    mirror = json.loads(capsys.readouterr().out)["mirror"]
    assert mirror["source"] == "listed at the mirror" and mirror["remote_count"] == 1
    assert mirror["newest"]["step"] == 1
    assert mirror["pending"] == [store.list()[-1].name]


# -- submit --mirror -----------------------------------------------------------------------------------
def _submit(tmp_path: Path, url: str, env: dict[str, str], *more: str) -> subprocess.CompletedProcess[str]:
    argv = ["submit", "--backend", "local", "--run-dir", str(tmp_path / "run"), "--tasks", "2", "--time", "2"]
    return _cli(*argv, "--mirror", url, *more, "--", *train_command(tmp_path / "run", "--epochs", "2"), env=env)


def test_submit_refuses_a_mirror_it_cannot_write_and_submits_nothing(s3_lab: S3Lab, tmp_path: Path) -> None:
    secret = s3_lab.secret_key
    good = clean_env(**s3_lab.env())
    err = _one_line_error(_submit(tmp_path, "s3://no-such-bucket-here/r", good), 2, secret)
    assert err.startswith("hpcckpt submit: error: Invalid --mirror 's3://no-such-bucket-here/r': it cannot be written")
    bucket = s3_lab.new_bucket()
    err = _one_line_error(_submit(tmp_path, f"s3://{bucket}/r", clean_env(**s3_lab.wrong_env())), 2, secret)
    assert f"Invalid --mirror 's3://{bucket}/r': it cannot be written" in err
    assert not (tmp_path / "run").exists()  # nothing written, nothing submitted


def test_submit_dry_run_probes_the_mirror_and_leaves_nothing_there(s3_env: S3Lab, tmp_path: Path) -> None:
    s3_lab = s3_env
    bucket = s3_lab.new_bucket()
    env = clean_env(**s3_lab.env())
    result = _submit(tmp_path, f"s3://{bucket}/r", env, "--dry-run")
    assert result.returncode == 0, result.stderr
    assert f"export HPCCKPT_MIRROR=s3://{bucket}/r\n" in result.stdout
    assert s3_lab.secret_key not in result.stdout + result.stderr
    assert s3fs.S3FileSystem(skip_instance_cache=True).find(bucket) == []  # the probe object was removed


@pytest.mark.timeout(600, func_only=True)
def test_the_local_backend_mirrors_a_chain(s3_lab: S3Lab, tmp_path: Path) -> None:
    bucket = s3_lab.new_bucket()
    url = f"s3://{bucket}/runs/local"
    result = _submit(tmp_path, url, clean_env(**s3_lab.env()))
    assert result.returncode == 0, result.stdout + result.stderr
    run_dir = tmp_path / "run"
    assert events(run_dir, "complete")
    local = CheckpointStore(run_dir, create=False).list()
    assert {e["name"] for e in events(run_dir, "uploaded")} >= {local[-1].name}
    listed = _cli("ls", url, "--json", env=clean_env(**s3_lab.env()))
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout)[-1]["name"] == local[-1].name
    written = [p for p in sorted(run_dir.rglob("*")) if p.is_file()]
    assert [str(p) for p in written if s3_lab.secret_key.encode() in p.read_bytes()] == []
