"""Peak host memory of a fp32 -> fp16 load stays within 1.3x the loaded weights (runs bench_loading.py)."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_peak_memory_within_bound(tmp_path):
    subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_loading.py"), "--mb", "300",
                    "--out", str(tmp_path)], check=True, capture_output=True, text=True)
    rows = {r["loader"]: r for r in json.load(open(tmp_path / "loading_peak_memory.json"))["rows"]}
    assert rows["velodiff"]["peak_over_weights"] <= 1.3, rows["velodiff"]
    assert rows["velodiff-fp32"]["peak_over_weights"] <= 1.3, rows["velodiff-fp32"]
