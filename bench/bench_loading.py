"""Peak host memory and time while loading a safetensors checkpoint into fp16: velodiff vs safetensors' own ways.

Writes a few-hundred-MB fp32 file whose tensors have the shapes of the SD 1.5 UNet (the first ones, in
state-dict order, up to --mb), then loads it in fresh subprocesses and reads the peak resident set
(VmHWM) above the post-import baseline, and the load's wall time:
  velodiff            velodiff.loading.read_safetensors(path, dtype=torch.float16): tensor by tensor
  safetensors-stream  safetensors.safe_open(path, "pt") and ``f.get_tensor(k).to(torch.float16)`` for each key:
                      the streaming load a careful user writes
  safetensors         safetensors.torch.load_file(path) then .half() on each tensor (the usual two-step load)
  velodiff-fp32       read_safetensors(path) with no cast (result = file size)
Ratios are peak increase / size of the loaded weights (fp16 result, or fp32 for the no-cast row).
The issue's bound is 1.3x the weights' size. The loaders run in rounds (one fresh process each per round, the
order rotated per round, the file in the page cache for all); peak and time are median (min-max) over the
rounds, and each time ratio against velodiff is taken within a round. Usage:
  python bench/bench_loading.py [--mb 400] [--rounds 3] [--out bench/results]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Comparison, load_average, spread, write_results  # noqa: E402

_CHILD = r"""
import json, sys, time, torch
import safetensors, safetensors.torch
import velodiff.loading as L

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

def reset_hwm():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass

path, mode = sys.argv[1], sys.argv[2]
torch.empty(1)  # touch allocator
base = status("VmRSS:")
reset_hwm()
base_hwm = status("VmHWM:")
base_file = status("RssFile:")
base_anon = status("RssAnon:")
t0 = time.perf_counter()
file_end = anon_peak = None
if mode == "velodiff":
    sd = L.read_safetensors(path, dtype=torch.float16)
elif mode == "velodiff-fp32":
    sd = L.read_safetensors(path)
elif mode == "safetensors-stream":
    sd, anon_peak = {}, 0
    with safetensors.safe_open(path, framework="pt") as f:
        for k in f.keys():
            t = f.get_tensor(k)
            sd[k] = t.to(torch.float16)
            anon_peak = max(anon_peak, status("RssAnon:"))  # both copies of this tensor alive: its local peak
            del t
        file_end = status("RssFile:")  # file pages the open file still maps
else:
    sd = safetensors.torch.load_file(path)
    sd = {k: v.half() for k, v in sd.items()}
seconds = time.perf_counter() - t0
peak = status("VmHWM:")
file_end = max(file_end or 0, status("RssFile:"))
size = sum(v.numel() * v.element_size() for v in sd.values())
print(json.dumps({"base": base, "base_hwm": base_hwm, "peak": peak, "result_bytes": size, "seconds": seconds,
                  "base_file": base_file, "file_end": file_end, "base_anon": base_anon, "anon_peak": anon_peak}))
"""


def sd15_shapes(limit_bytes: int):
    from diffusers import UNet2DConditionModel
    from velodiff.loading import default_unet_config
    cfg = {k: v for k, v in default_unet_config("sd1").items() if not k.startswith("_")}
    with torch.device("meta"):
        unet = UNet2DConditionModel(**cfg)
    out, total = [], 0
    for k, v in unet.state_dict().items():
        nbytes = v.numel() * 4
        if total + nbytes > limit_bytes:
            break
        out.append((k, tuple(v.shape)))
        total += nbytes
    return out, total


MODES = ("velodiff", "safetensors-stream", "safetensors", "velodiff-fp32")


def run_child(path: str, mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD, path, mode], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=400)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0, help="seed of the loaders' order within the rounds")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    from velodiff.loading import write_safetensors
    load_start = load_average()
    shapes, total = sd15_shapes(args.mb * 2 ** 20)
    g = torch.Generator().manual_seed(0)
    base_order = list(MODES)
    random.Random(args.seed).shuffle(base_order)
    results = {m: [] for m in MODES}
    orders = []
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "unet_fp32.safetensors")
        write_safetensors({k: torch.randn(s, generator=g) for k, s in shapes}, path)
        file_bytes = os.path.getsize(path)
        largest = max(torch.Size(s).numel() for _, s in shapes) * 4
        for r in range(args.rounds):
            order = base_order[r % len(MODES):] + base_order[:r % len(MODES)]
            orders.append(order)
            for mode in order:
                results[mode].append(run_child(path, mode))
            print(f"round {r + 1}/{args.rounds}:",
                  {m: round((results[m][-1]["peak"] - results[m][-1]["base"]) / 2 ** 20, 1) for m in MODES},
                  flush=True)
    load_end = load_average()
    timing = Comparison(samples={m: [x["seconds"] for x in results[m]] for m in MODES},
                        inner={m: 1 for m in MODES}, order=orders, baseline="velodiff", load_before=load_start,
                        load_after=load_end)
    rows = []
    for mode in MODES:
        res = results[mode]
        weights = res[0]["result_bytes"]
        inc = [x["peak"] - x["base"] for x in res]
        # safe_open maps the file, and the pages it touched count in VmHWM although they are page cache (which
        # every loader fills); its anonymous peak is sampled in its loop while both copies of a tensor are alive.
        # The other loaders map nothing new: their peak less any growth of mapped file pages.
        anon = [x["anon_peak"] - x["base_anon"] if x["anon_peak"] is not None
                else x["peak"] - x["base"] - max(0, x["file_end"] - x["base_file"]) for x in res]
        peak_ratio = spread([i / weights for i in inc])
        rows.append({"loader": mode, "tensors": len(shapes), "file_MB": file_bytes / 2 ** 20,
                     "weights_MB": weights / 2 ** 20, "peak_increase_MB": spread([i / 2 ** 20 for i in inc]),
                     "peak_over_weights": peak_ratio["median"], "peak_over_weights_range": peak_ratio,
                     "peak_over_file": spread([i / file_bytes for i in inc])["median"],
                     "anon_peak_over_weights": spread([i / weights for i in anon]),
                     "within_1.3x": max(inc) <= 1.3 * weights, "load_s": timing.stats(mode),
                     "time_vs_velodiff": timing.ratio("velodiff", over=mode)})
        print({k: (v["median"] if isinstance(v, dict) else v) for k, v in rows[-1].items()}, flush=True)
    note = (f"SD 1.5 UNet tensor shapes (first {len(shapes)} in state-dict order), fp32 file of "
            f"{file_bytes / 2 ** 20:.0f} MB, largest tensor {largest / 2 ** 20:.1f} MB, loaded as fp16 (fp32 for "
            "velodiff-fp32). Peak = VmHWM minus the post-import VmRSS of a fresh process; weights = the loaded "
            f"tensors' bytes. {args.rounds} rounds, one fresh process per loader per round, order rotated; cells "
            "with ranges are median (min-max) over the rounds (peak_over_weights: the median). "
            "anon_peak_over_weights: the peak without file pages mapped from the checkpoint (page cache, which "
            "every loader fills, but only a mapping counts in VmHWM): for safetensors-stream the largest RssAnon "
            "increase sampled in its loop while both copies of a tensor are alive; for the others the peak less "
            "any growth of mapped file pages (about 3 MB). load_s: wall time of the load inside the process; "
            "time_vs_velodiff: that loader's time / velodiff's in the same round, median (min-max); > 1 means "
            "velodiff is faster. within_1.3x: every round's peak <= 1.3x the weights.")
    print(write_results("loading_peak_memory", rows,
                        ["loader", "tensors", "file_MB", "weights_MB", "peak_increase_MB", "peak_over_weights",
                         "peak_over_weights_range", "peak_over_file", "anon_peak_over_weights",
                         "within_1.3x", "load_s", "time_vs_velodiff"], args.out, note,
                        extra={"load_start": load_start, "load_end": load_end, "rounds": args.rounds,
                               "children": results, "timing": timing.to_json()}))


if __name__ == "__main__":
    main()
