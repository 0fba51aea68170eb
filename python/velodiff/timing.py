"""Interleaved wall-clock timing, shared by ``velodiff bench`` and the scripts under bench/.

:func:`compare` runs named callables in rounds, every candidate once per round in an order that changes from round
to round, so that drift in the machine's load hits all of them alike; ratios against a baseline are taken within
each round, where the load was the same, and summarised over the rounds (median, with min and max).
"""
from __future__ import annotations

import gc
import math
import os
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence


def load_average() -> str:
    """The 1, 5 and 15 minute load averages as ``uptime`` prints them, e.g. ``"0.52 0.31 0.20"``."""
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "unknown"


def _sync_for(device: str) -> Callable[[], None]:
    if str(device).startswith("cuda"):
        import torch
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
