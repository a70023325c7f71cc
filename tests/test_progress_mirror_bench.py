"""`hpcckpt bench store --only mirror` runs end to end against the tests' S3 server and against a second
directory, and reports its rows (tiny sizes; timings are never judged here: the rows must exist, be finite
positive numbers, and the bench must leave nothing behind on the mirror)."""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path
from typing import Any

import s3fs
from s3lab import S3Lab

ROWS = (
    "mirror upload throughput: hpcckpt / client's own put",
    "mirror: training step during an upload / without",
    "mirror: longest training step during an upload (ms)",
    "mirror: longest training step without upload (ms)",
)


def bench(tmp_path: Path, *extra: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    out = tmp_path / "figures.json"
    argv = ["hpcckpt", "bench", "store", "--quick", "--only", "mirror", "--dir", str(tmp_path / "scratch")]
    result = subprocess.run(
        [*argv, "--json", str(out), *extra],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env=dict(os.environ),  # the S3 server's standard variables, set by s3_env
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result, json.loads(out.read_text())


def check_rows(result: subprocess.CompletedProcess[str], report: dict[str, Any]) -> dict[str, Any]:
    targets = {t["name"]: t for t in report["targets"]}
    assert set(targets) == set(ROWS), set(targets) ^ set(ROWS)
    for name in ROWS:
        value = targets[name]["value"]
        assert isinstance(value, float) and math.isfinite(value) and value > 0, targets[name]
        assert name in result.stdout
    assert targets[ROWS[0]]["goal"] == ">= 0.9" and targets[ROWS[1]]["goal"] == "<= 1.1"
    figures: dict[str, Any] = report["figures"]["mirror"]
    assert figures["bytes"] >= 4 << 20  # --quick: 4 MiB of tensors, plus the file's index
    assert set(figures["upload_s"]) == {"Mirror.upload", "client's own put"}
    assert all(steps["count"] >= 20 for steps in figures["steps"].values())
    return figures


def test_mirror_bench_against_the_s3_server(s3_env: S3Lab, tmp_path: Path) -> None:
    bucket = s3_env.new_bucket()
    result, report = bench(tmp_path, "--mirror-url", f"s3://{bucket}/bench")
    figures = check_rows(result, report)
    assert figures["url"] == f"s3://{bucket}/bench"
    assert s3_env.secret_key not in result.stdout + result.stderr + json.dumps(report)
    assert s3fs.S3FileSystem(skip_instance_cache=True).find(bucket) == []  # it deleted what it wrote


def test_mirror_bench_to_a_second_directory(tmp_path: Path) -> None:
    second = tmp_path / "second"
    second.mkdir()
    (second / "kept.txt").write_text("not the bench's")
    result, report = bench(tmp_path, "--mirror-url", str(second))
    check_rows(result, report)
    assert [p.name for p in second.iterdir()] == ["kept.txt"]
    assert [p.name for p in (tmp_path / "scratch").iterdir()] == []  # the scratch directory removed
