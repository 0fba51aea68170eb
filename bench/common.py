"""Shared helpers of the benchmarks: interleaved timing, machine description, load average, result files.

Every timing script measures through :func:`compare`: the candidates run in rounds, every candidate once per
round in an order that changes from round to round, so that drift in the machine's load hits all of them alike;
ratios against the baseline are taken within each round, where the load was the same, and summarised over the
rounds (median, with min and max).
"""
from __future__ import annotations

import json
import math
import os
import platform
from typing import Callable, Dict, List, Mapping, Optional

from velodiff.timing import Comparison, compare, load_average, spread  # noqa: F401  (the one timing helper)

import torch


def check_ranges(script: str, checks) -> None:
    """Exit with one line and status 2 (as the CLI does) when a flag is out of range: ``checks`` holds
    (flag, value, lowest, highest)."""
    import sys
    for flag, value, lo, hi in checks:
        if not lo <= value <= hi:
            print(f"{script}: {flag}: must be from {lo} to {hi}, got {value}", file=sys.stderr)
            sys.exit(2)


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
    """Median seconds per call of one callable (kept for older callers; comparisons should use :func:`compare`)."""
    res = compare({"fn": fn}, rounds=5, warmup=warmup, min_time=max(min_time / 5, 0.01), device=device)
    return res.stats("fn")["median"]


def summarise_ratios(values: Mapping[str, float], outlier_factor: float = 2.0) -> Dict[str, object]:
    """The range of per-row median ratios for a summary sentence, with one lone extreme row set apart.

    With four rows or more, the largest row counts as a single-row outlier when it is more than
    ``outlier_factor`` times the next largest, or else the smallest when it is less than 1 / ``outlier_factor``
    times the next smallest; at most one row is set apart, and the sentence names it with its value.
    Returns ``{"min", "max", "rows", "outliers": {row: value}, "sentence"}``.
    """
    items = sorted(values.items(), key=lambda kv: kv[1])
    outliers: Dict[str, float] = {}
    if len(items) >= 4:
        high = items[-1][1] / items[-2][1]
        low = items[1][1] / items[0][1] if items[0][1] > 0 else math.inf
        if max(high, low) > outlier_factor:
            k, v = items.pop(-1 if high >= low else 0)
            outliers[k] = v
    lo, hi = items[0][1], items[-1][1]
    sentence = f"{lo:.3g}-{hi:.3g}x (range of the per-row medians over {len(items)} rows"
    if outliers:
        sentence += "; set apart as a single-row outlier: " + ", ".join(f"{k} {v:.3g}x" for k, v in outliers.items())
    sentence += ")"
    return {"min": lo, "max": hi, "rows": [k for k, _ in items], "outliers": outliers, "sentence": sentence}


def write_results(name: str, rows: List[dict], columns: List[str], outdir: str, note: str = "",
                  extra: Optional[Dict[str, object]] = None) -> str:
    """Write <outdir>/<name>.json and <name>.md (a markdown table with the machine); returns the md path.

    ``extra`` (e.g. load averages, rounds, per-round samples) goes into the JSON as is, and its plain values
    (strings and numbers) into the markdown header. A cell holding a :func:`spread`-like dict prints as
    ``median (min-max)``.
    """
    os.makedirs(outdir, exist_ok=True)
    meta = machine()
    payload = {"machine": meta, "rows": rows, "note": note}
    if extra:
        payload.update(extra)
    with open(os.path.join(outdir, f"{name}.json"), "w") as f:
        json.dump(payload, f, indent=1)
    lines = [f"# {name}", "", "Machine: " + ", ".join(f"{k} {v}" for k, v in meta.items()), ""]
    plain = {k: v for k, v in (extra or {}).items() if isinstance(v, (str, int, float))}
    if plain:
        lines += ["Run: " + ", ".join(f"{k} {_fmt(v)}" for k, v in plain.items()), ""]
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
    if isinstance(v, dict) and {"median", "min", "max"} <= set(v):
        return f"{v['median']:.4g} ({v['min']:.3g}-{v['max']:.3g})"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
