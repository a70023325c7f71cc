"""``hpcckpt bench compression`` runs end to end (tiny sizes: the structure and the ratios are judged,
never the timings)."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path


def test_bench_compression_reports_ratio_and_speed_for_each_state_and_level(tmp_path: Path) -> None:
    out = tmp_path / "figures.json"
    argv = ["hpcckpt", "bench", "compression", "--quick", "--levels", "1,3", "--dir", str(tmp_path)]
    result = subprocess.run([*argv, "--json", str(out)], capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    states = report["figures"]["states"]
    assert set(states) == {"fp32 weights", "bf16 weights", "fp32 weights+AdamW"}
    for label, state in states.items():
        rows = state["rows"]
        assert set(rows) == {"none", "zstd-1", "zstd-3"}, label
        assert 0.95 < rows["none"]["ratio"] <= 1.0, "an uncompressed file is the raw bytes and a small header"
        for row in rows.values():
            assert all(math.isfinite(row[k]) and row[k] > 0 for k in ("ratio", "save_mb_s", "load_mb_s")), label
    # bf16 weights' high bytes repeat (a shared sign and exponent): zstd finds that even after a few steps.
    assert states["bf16 weights"]["rows"]["zstd-3"]["ratio"] > 1.1
    names = [t["name"] for t in report["targets"]]
    assert "compression, bf16 weights: zstd-3 ratio" in names and "zstd-1 ratio" in result.stdout


def test_bench_compression_rejects_a_bad_level(tmp_path: Path) -> None:
    result = subprocess.run(
        ["hpcckpt", "bench", "compression", "--levels", "3,30", "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2
    assert "Invalid --levels '3,30': expected zstd levels 1-22" in result.stderr
    assert not list(tmp_path.iterdir()), "nothing trained or written for a refused option"
