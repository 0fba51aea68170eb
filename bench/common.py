"""Shared helpers of the benchmarks: timing, machine description, result files."""
from __future__ import annotations

import json
import os
import platform
import time
from typing import Callable, Dict, List

import torch


def machine() -> Dict[str, str]:
    from velodiff.info import cpu_model
    info = {"cpu": cpu_model(), "cpu_threads": str(torch.get_num_threads()), "torch": torch.__version__,
            "cuda": str(torch.version.cuda), "python": platform.python_version()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["driver"] = _driver()
    return info


def _driver() -> str:
    try:
        import subprocess
        return subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:
        return "unknown"


def time_fn(fn: Callable[[], object], device: str, min_time: float = 0.3, warmup: int = 3) -> float:
    """Median seconds per call over repeated batches, synchronising CUDA around each batch."""
    for _ in range(warmup):
        fn()
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    once = max(time.perf_counter() - t0, 1e-7)
    reps = max(1, int(0.05 / once))
    samples: List[float] = []
    start = time.perf_counter()
    while time.perf_counter() - start < min_time or len(samples) < 5:
        sync()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        sync()
        samples.append((time.perf_counter() - t0) / reps)
    samples.sort()
    return samples[len(samples) // 2]


def write_results(name: str, rows: List[dict], columns: List[str], outdir: str, note: str = "") -> str:
    """Write <outdir>/<name>.json and <name>.md (a markdown table with the machine); returns the md path."""
    os.makedirs(outdir, exist_ok=True)
    meta = machine()
    with open(os.path.join(outdir, f"{name}.json"), "w") as f:
        json.dump({"machine": meta, "rows": rows, "note": note}, f, indent=1)
    lines = [f"# {name}", "", "Machine: " + ", ".join(f"{k} {v}" for k, v in meta.items()), ""]
    if note:
        lines += [note, ""]
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "---|" * len(columns))
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |")
    path = os.path.join(outdir, f"{name}.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
