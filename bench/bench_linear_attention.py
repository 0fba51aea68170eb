"""velodiff::linear_attention against exact attention as the token count grows: where linear attention pays off.

Candidates, all on the same inputs (q / k / v as the models pass them: transposed views of [B, N, H, D] projections,
no copy), self-attention (Nq = Nk = N), batch 1:
  linear        velodiff.ops.linear_attention(q, k, v, kind=KIND)              (ours, O(N))
  linear_torch  the same linear attention as torch ops (LinFusion's formulation: elu + 1, mean-normalised state,
                eps 1e-4 on the mean denominator; SANA's relu / sum for --kind relu), what the peers' code runs
  attention     velodiff.ops.attention(q, k, v)                                 (exact softmax, O(N^2))
  sdpa          torch.nn.functional.scaled_dot_product_attention(q, k, v)       (exact softmax, O(N^2))
Head configurations: heads 8 x D 40 (LinFusion on SD 1.5's first level) and heads 10 x D 64 (LinFusion on SDXL).
Token counts 128 ... 65536 (powers of two). The exact candidates are skipped at a token count when their time at
half that count, times 4, exceeds --exact-limit seconds per call (said so in the table, with that prediction).
Timed interleaved with bench/common.py's ``compare`` (rounds, rotated order), medians (min-max) over the rounds;
ratios exact / linear taken per round. The crossover per configuration is the smallest measured token count from
which ``linear`` is faster than each exact candidate at every larger measured count. Usage:
  python bench/bench_linear_attention.py [--kind linfusion|relu] [--rounds 5] [--threads N] [--exact-limit 15]
                                         [--tokens 128,256,...] [--quick] [--out bench/results]
``--quick``: tiny sizes, one round (a smoke test of the script, not a measurement). Writes
<out>/linear_attention_cpu.{md,json} (fp32, CPU).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import compare, load_average, write_results  # noqa: E402

from velodiff.ops import attention, linear_attention  # noqa: E402

CONFIGS = {"h8-d40": (8, 40), "h10-d64": (10, 64)}  # name: (heads, head dim)
TOKENS = [128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536]
QUICK_TOKENS = [64, 128]
EXACT = ("attention", "sdpa")


def inputs(heads, d, n, seed=0):
    g = torch.Generator().manual_seed(seed)

    def proj():  # a [B, N, H, D] projection seen as [B, H, N, D]
        return torch.randn(1, n, heads, d, generator=g).transpose(1, 2)
    return proj(), proj(), proj()


def linear_torch(q, k, v, kind):
    """Linear attention as plain torch ops (the peers' formulation; fp32 throughout)."""
    if kind == "linfusion":
        fq, fk = F.elu(q) + 1.0, F.elu(k) + 1.0
        n = k.shape[2]
        z = fq @ fk.mean(dim=-2, keepdim=True).transpose(-2, -1) + 1e-4
        state = (fk.transpose(-2, -1) * n ** -0.5) @ (v * n ** -0.5)
        return fq @ state / z
    fq, fk = torch.relu(q), torch.relu(k)
    z = fq @ fk.sum(dim=-2, keepdim=True).transpose(-2, -1) + 1e-8
    return fq @ (fk.transpose(-2, -1) @ v) / z


def crossover(rows, config, exact):
    """The smallest measured N from which linear beats ``exact`` at every larger measured N (None: it never does;
    the string "< N" when it already does at the smallest measured N)."""
    measured = [r for r in rows if r["config"] == config and isinstance(r.get(f"{exact}_ms"), dict)]
    if not measured:
        return None
    wins = [r[f"{exact}/linear"]["median"] > 1.0 for r in measured]
    first = None
    for i in range(len(measured) - 1, -1, -1):
        if not wins[i]:
            break
        first = i
    if first is None:
        return None
    return f"<= {measured[0]['N']}" if first == 0 else measured[first]["N"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kind", choices=["linfusion", "relu"], default="linfusion")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--exact-limit", type=float, default=15.0, help="seconds per call above which exact is skipped")
    ap.add_argument("--tokens", default="", help="comma-separated token counts (default 128 ... 65536)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tokens = QUICK_TOKENS if args.quick else ([int(t) for t in args.tokens.split(",")] if args.tokens else TOKENS)
    rounds = 1 if args.quick else args.rounds
    load_start = load_average()
    rows, timings = [], {}
    for config, (heads, d) in CONFIGS.items():
        last = {}  # exact candidate -> (N, median seconds) of its last measured row
        for n in tokens:
            q, k, v = inputs(heads, d, n)
            candidates = {"linear": lambda: linear_attention(q, k, v, kind=args.kind),
                          "linear_torch": lambda: linear_torch(q, k, v, args.kind)}
            skipped = {}
            for name in EXACT:
                if name in last:
                    predicted = last[name][1] * (n / last[name][0]) ** 2
                    if predicted > args.exact_limit:
                        skipped[name] = predicted
                        continue
                candidates[name] = (lambda: attention(q, k, v)) if name == "attention" else \
                    (lambda: F.scaled_dot_product_attention(q, k, v))
            with torch.no_grad():
                diff = float((candidates["linear"]() - candidates["linear_torch"]()).abs().max())
                res = compare(candidates, "linear", rounds=rounds, warmup=1, min_time=0.2)
            row = {"config": config, "heads": heads, "D": d, "N": n,
                   "linear_ms": res.stats("linear", 1e3), "linear_torch_ms": res.stats("linear_torch", 1e3),
                   "linear_torch/linear": res.ratio("linear", over="linear_torch")}
            for name in EXACT:
                if name in skipped:
                    row[f"{name}_ms"] = f"skipped (~{skipped[name]:.0f} s predicted)"
                    row[f"{name}/linear"] = ""
                else:
                    row[f"{name}_ms"] = res.stats(name, 1e3)
                    row[f"{name}/linear"] = res.ratio("linear", over=name)
                    last[name] = (n, res.stats(name)["median"])
            row["max_abs_diff_vs_torch"] = f"{diff:.2g}"
            rows.append(row)
            timings[f"{config}-{n}"] = res.to_json()
            print({k_: (v_["median"] if isinstance(v_, dict) else v_) for k_, v_ in row.items()}, flush=True)
    load_end = load_average()
    cross = {f"{config} vs {exact}": crossover(rows, config, exact) for config in CONFIGS for exact in EXACT}
    cross_text = "; ".join(f"{k}: {'never' if v is None else v}" for k, v in cross.items())
    path = write_results(
        f"linear_attention_cpu{'_quick' if args.quick else ''}", rows,
        ["config", "N", "linear_ms", "linear_torch_ms", "attention_ms", "sdpa_ms", "linear_torch/linear",
         "attention/linear", "sdpa/linear", "max_abs_diff_vs_torch"],
        args.out,
        note=f"Self-attention, batch 1, fp32, kind {args.kind}, inputs as transposed [B, N, H, D] views. linear: "
             "velodiff::linear_attention; linear_torch: the same linear attention as torch ops; attention: "
             "velodiff::attention (exact softmax); sdpa: torch.nn.functional.scaled_dot_product_attention (exact, "
             f"its default backend). Each cell is median (min-max) over {rounds} interleaved rounds; ratios: the "
             "other candidate's time / linear's within each round, > 1 means linear is faster. Exact candidates "
             f"are skipped where their time at half the tokens x 4 exceeds {args.exact_limit:g} s per call. "
             f"Crossover (smallest N from which linear is faster at every larger measured N): {cross_text}.",
        extra={"load_start": load_start, "load_end": load_end, "rounds": rounds, "threads": args.threads,
               "kind": args.kind, "crossover": cross, "timing": timings})
    print("crossover:", cross_text)
    print("wrote", path)


if __name__ == "__main__":
    main()
