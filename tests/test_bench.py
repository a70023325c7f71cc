"""`hpcckpt bench store` runs end to end and reports every figure (tiny sizes; timings are not judged)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest


@pytest.mark.slow
def test_bench_store_reports_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "figures.json"
    result = subprocess.run(
        [
            "hpcckpt",
            "bench",
            "store",
            "--dir",
            str(tmp_path),
            "--repeats",
            "1",
            "--large-mib",
            "4",
            "--small-mib",
            "1",
            "--small-count",
            "50",
            "--history",
            "20",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    figures = report["figures"]
    names = [t["name"] for t in report["targets"]]
    assert "large: save speed vs torch.save" in names
    assert "registry commit p99 (ms)" in names
    assert all(t["value"] > 0 for t in report["targets"] if "A/B" not in t["name"])
    assert figures["large"]["bytes"] == 4 << 20
    assert len(figures["registry"]["commit_ms"]) == 200
    assert "registry lookup p99 (ms)" in result.stdout
    assert [p.name for p in tmp_path.iterdir()] == ["figures.json"]  # scratch space removed


def test_bench_rejects_bad_sizes(tmp_path: Path) -> None:
    result = subprocess.run(
        ["hpcckpt", "bench", "store", "--repeats", "0", "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "--repeats" in result.stderr and "whole numbers >= 1" in result.stderr
