"""velodiff::cache_gate vs the same arithmetic as plain torch ops, at the probe sizes of real caches.

One gate step as a DiT cache takes it (TeaCache's setting: a degree-4 rescale polynomial, ACCUMULATE and
STORE_ALWAYS; FBCache's: the plain distance), then the one host read of the decision:
  fused   CacheGate.step: velodiff::cache_gate (one pass: distance, polynomial, accumulation, decision, the
          probe stored into the spare buffer), then .item()
  torch   the same arithmetic as separate torch ops, as cache implementations write it: sub, abs, per-sample sums
          (fp32 accumulation), the 0/0 guard (where), div, max, the polynomial (Horner), the accumulation, the
          comparison, the copy of the probe into the spare buffer, then .item()
Probe sizes: DiT-XL/2's first-block residual [2, 256, 1152] (fp32 and fp16), a FLUX-like [2, 4096, 3072] bf16
stream, and the built-in digits-dit's [2, 16, 96]. Both candidates are timed interleaved with bench/common.py's
``compare`` (rounds, rotated order); ratios are taken per round and given as median (min-max) over the rounds.
Usage:
  python bench/bench_cache_gate.py [--device cpu|cuda] [--rounds 10] [--threads N] [--max-load 2.5]
                                   [--wait 900] [--out bench/results]
``--max-load``: before timing, wait (up to ``--wait`` seconds) until the 1-minute load average is below it; the
loads at the start and the end are recorded either way.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import compare, load_average, summarise_ratios, write_results  # noqa: E402

from velodiff.ops import CacheGate  # noqa: E402

SHAPES = {  # name: (shape, dtype)
    "digits-dit-fp32": ((2, 16, 96), torch.float32),
    "dit-xl2-fp32": ((2, 256, 1152), torch.float32),
    "dit-xl2-fp16": ((2, 256, 1152), torch.float16),
    "flux-bf16": ((2, 4096, 3072), torch.bfloat16),
}
# TeaCache's published FLUX rescale polynomial (highest degree first).
TEACACHE_POLY = (498.651651, -283.781631, 55.8554382, -3.82021401, 0.264230861)
MODES = {"teacache": dict(coefficients=TEACACHE_POLY, accumulate=True, store_always=True, threshold=0.4),
         "fbcache": dict(coefficients=(), accumulate=False, store_always=False, threshold=0.12)}


def torch_gate(probe: torch.Tensor, threshold: float, coefficients, accumulate: bool, store_always: bool):
    """The gate as separate torch ops over the same two buffers; the valid index and accumulator kept on the
    host, as the peers keep them."""
    b = probe.shape[0]
    stored = torch.empty((2,) + tuple(probe.shape), dtype=probe.dtype, device=probe.device)
    stored[0].copy_(probe)
    box = {"v": 0, "acc": 0.0}
    inf = torch.tensor(math.inf, device=probe.device)
    zero = torch.tensor(0.0, device=probe.device)

    def step() -> bool:
        v = box["v"]
        w = 1 - v
        p, s = probe.reshape(b, -1), stored[v].reshape(b, -1)
        num = (p - s).abs().sum(dim=1, dtype=torch.float32)
        den = s.abs().sum(dim=1, dtype=torch.float32)
        d = torch.where(den > 0, num / den, torch.where(num == 0, zero, inf)).max()
        r = d
        if coefficients:
            r = torch.zeros_like(d)
            for c in coefficients:
                r = r * d + c
        a = r + box["acc"] if accumulate else r
        compute = bool((a >= threshold).item())
        stored[w].copy_(probe)
        box["acc"] = 0.0 if compute or not accumulate else float(a)
        if compute or store_always:
            box["v"] = w
        return compute

    return step


def wait_for_quiet(max_load: float, wait: float) -> str:
    t0 = time.time()
    while os.getloadavg()[0] >= max_load and time.time() - t0 < wait:
        print(f"load {load_average()} >= {max_load}: waiting", flush=True)
        time.sleep(20)
    return load_average()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--max-load", type=float, default=math.inf)
    ap.add_argument("--wait", type=float, default=900.0)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = args.device
    load_start = wait_for_quiet(args.max_load, args.wait) if math.isfinite(args.max_load) else load_average()
    rows, timings = [], {}
    for name, (shape, dtype) in SHAPES.items():
        for mode, cfg in MODES.items():
            g = torch.Generator().manual_seed(0)
            base = torch.randn(shape, generator=g)
            # The probe drifts by ~2% a step, as a cached probe does between neighbouring steps; the two
            # candidates see the same buffer (its content does not change the work either does).
            probe = (base + 0.02 * torch.randn(shape, generator=g)).to(dtype).to(dev)
            gate = CacheGate()
            gate.step(base.to(dtype).to(dev), 0.0)
            thr, coefs = cfg["threshold"], cfg["coefficients"]
            acc, always = cfg["accumulate"], cfg["store_always"]

            def fused():
                return gate.step(probe, thr, coefs, accumulate=acc, store_always=always)

            candidates = {"fused": fused, "torch": torch_gate(probe, thr, coefs, acc, always)}
            res = compare(candidates, "fused", rounds=args.rounds, warmup=3, device=dev)
            key = f"{name}/{mode}"
            timings[key] = res.to_json()
            row = {"probe": name, "gate": mode, "shape": "x".join(map(str, shape)), "elements": base.numel(),
                   "fused_us": res.stats("fused", 1e6), "torch_us": res.stats("torch", 1e6),
                   "torch/fused": res.ratio("fused", over="torch")}
            rows.append(row)
            print({k: (v["median"] if isinstance(v, dict) else v) for k, v in row.items()}, flush=True)
    load_end = load_average()
    summary = {"torch/fused": summarise_ratios({f"{r['probe']}/{r['gate']}": r["torch/fused"]["median"]
                                                for r in rows})}
    sentences = " ".join(f"{k}: {v['sentence']}." for k, v in summary.items())
    tag = torch.cuda.get_device_name(0).replace(" ", "_") if dev.startswith("cuda") else "cpu"
    path = write_results(
        f"cache_gate_{tag}", rows, ["probe", "gate", "shape", "elements", "fused_us", "torch_us", "torch/fused"],
        args.out,
        note="One cache-gate step and its host read of the decision. teacache: degree-4 rescale polynomial, "
             "ACCUMULATE, STORE_ALWAYS; fbcache: plain relative L1. fused: velodiff::cache_gate through "
             "CacheGate.step (fp64 sums); torch: the same arithmetic as separate torch ops (fp32 sums). Each "
             f"cell is median (min-max) over {args.rounds} interleaved rounds; every timing spans >= 50 ms of "
             "back-to-back calls. Ratio: torch time / fused time within each round, then median (min-max) over "
             f"the rounds; > 1 means the fused op is faster. Summary over rows: {sentences}",
        extra={"load_start": load_start, "load_end": load_end, "rounds": args.rounds, "threads": args.threads,
               "summary": summary, "timing": timings})
    print(sentences)
    print("wrote", path)


if __name__ == "__main__":
    main()
