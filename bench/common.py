"""Shared helpers of the benchmarks: interleaved timing, machine description, load average, result files.

Every timing script measures through :func:`compare`: the candidates run in rounds, every candidate once per
round in an order that changes from round to round, so that drift in the machine's load hits all of them alike;
ratios against the baseline are taken within each round, where the load was the same, and summarised over the
rounds (median, with min and max).
"""
from __future__ import annotations

import gc
import json
import math
import os
import platform
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence

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


def load_average() -> str:
    """The 1, 5 and 15 minute load averages as ``uptime`` prints them, e.g. ``"0.52 0.31 0.20"``."""
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "unknown"


def _sync_for(device: str) -> Callable[[], None]:
    if str(device).startswith("cuda"):
        return torch.cuda.synchronize
    return lambda: None


def spread(values: Sequence[float]) -> Dict[str, float]:
    """``{"median", "min", "max"}`` of ``values``."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


@dataclass
class Comparison:
    """What :func:`compare` measured: seconds per call of every candidate in every round.

    ``samples[name][r]`` is the mean seconds per call of ``name`` over its ``inner[name]`` back-to-back calls in
    round ``r``; ``order[r]`` is the order the candidates ran in that round.
    """

    samples: Dict[str, List[float]]
    inner: Dict[str, int]
    order: List[List[str]]
    baseline: Optional[str] = None
    load_before: str = ""
    load_after: str = ""
    meta: Dict[str, object] = field(default_factory=dict)

    @property
    def rounds(self) -> int:
        return len(self.order)

    def stats(self, name: str, scale: float = 1.0) -> Dict[str, object]:
        """min / median / max seconds per call of ``name`` (times ``scale``, e.g. 1e3 for ms), with the samples."""
        vals = [v * scale for v in self.samples[name]]
        return dict(spread(vals), samples=vals, inner=self.inner[name])

    def ratio(self, name: str, over: Optional[str] = None) -> Dict[str, object]:
        """How many times faster ``name`` is than ``over`` (default: the baseline), taken round by round.

        Each round gives ``time(over) / time(name)`` from timings made moments apart; the result is the median of
        those per-round ratios with their min and max (and the ratios themselves). > 1: ``name`` is faster.
        """
        over = over or self.baseline
        if over is None:
            raise ValueError("ratio: no baseline given and none set")
        per_round = [b / a for a, b in zip(self.samples[name], self.samples[over])]
        return dict(spread(per_round), samples=per_round)

    def to_json(self) -> Dict[str, object]:
        return {"samples": self.samples, "inner": self.inner, "order": self.order, "baseline": self.baseline,
                "rounds": self.rounds, "load_before": self.load_before, "load_after": self.load_after, **self.meta}


def compare(candidates: Mapping[str, Callable[[], object]], baseline: Optional[str] = None, *, rounds: int = 5,
            warmup: int = 2, min_time: float = 0.05, min_inner: int = 1, inner: Optional[Mapping[str, int]] = None,
            device: str = "cpu", seed: int = 0, clock: Callable[[], float] = time.perf_counter,
            log: Optional[Callable[[str], None]] = None) -> Comparison:
    """Time named callables interleaved over ``rounds`` rounds; see :class:`Comparison` for the result.

    Each candidate first runs ``warmup`` times (at least once), each call timed; the fastest of those calls
    chooses its inner count ``n = max(min_inner, ceil(min_time / fastest))``, so one timing spans at least
    ``min_time`` seconds (about; fixed counts can be given per name in ``inner``). Then every round times each
    candidate once as ``n`` back-to-back calls, in an order that is a seeded shuffle rotated by one place per
    round (every candidate takes every position equally often over ``len(candidates)`` rounds). CUDA is
    synchronised before and after each timing when ``device`` is a CUDA device; ``gc.collect()`` runs before
    each round, never inside a timing. ``clock`` is ``time.perf_counter`` (replaceable for tests).
    """
    if not candidates:
        raise ValueError("compare: no candidates")
    if baseline is not None and baseline not in candidates:
        raise ValueError(f"compare: baseline {baseline!r} is not one of the candidates {sorted(candidates)}")
    if rounds < 1:
        raise ValueError(f"compare: rounds must be >= 1, got {rounds}")
    sync = _sync_for(device)
    names = list(candidates)
    load_before = load_average()
    counts: Dict[str, int] = {}
    for name in names:
        fn = candidates[name]
        fastest = math.inf
        for _ in range(max(1, warmup)):
            sync()
            t0 = clock()
            fn()
            sync()
            fastest = min(fastest, clock() - t0)
        if inner is not None and name in inner:
            counts[name] = int(inner[name])
        else:
            counts[name] = max(int(min_inner), math.ceil(min_time / max(fastest, 1e-9)))
    base_order = names[:]
    random.Random(seed).shuffle(base_order)
    samples: Dict[str, List[float]] = {n: [] for n in names}
    orders: List[List[str]] = []
    for r in range(rounds):
        k = r % len(base_order)
        order = base_order[k:] + base_order[:k]
        orders.append(order)
        gc.collect()
        for name in order:
            fn, n = candidates[name], counts[name]
            sync()
            t0 = clock()
            for _ in range(n):
                fn()
            sync()
            samples[name].append((clock() - t0) / n)
        if log is not None:
            log(f"round {r + 1}/{rounds}: " + ", ".join(f"{n} {samples[n][-1] * 1e3:.4g} ms" for n in names))
    return Comparison(samples=samples, inner=counts, order=orders, baseline=baseline, load_before=load_before,
                      load_after=load_average())


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
