"""Peak host memory while loading a safetensors checkpoint into fp16 (velodiff vs safetensors + .half()).

Writes a few-hundred-MB fp32 file whose tensors have the shapes of the SD 1.5 UNet (the first ones, in
state-dict order, up to --mb), then loads it in fresh subprocesses and reads the peak resident set
(VmHWM) above the post-import baseline:
  velodiff      velodiff.loading.read_safetensors(path, dtype=torch.float16): tensor by tensor
  safetensors   safetensors.torch.load_file(path) then .half() on each tensor (the usual two-step load)
  velodiff-fp32 read_safetensors(path) with no cast (result = file size)
Ratios are peak increase / size of the loaded weights (fp16 result, or fp32 for the no-cast row).
The issue's bound is 1.3x the weights' size. Usage:
  python bench/bench_loading.py [--mb 400] [--out bench/results]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import write_results  # noqa: E402

_CHILD = r"""
import json, sys, torch
import safetensors.torch
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
if mode == "velodiff":
    sd = L.read_safetensors(path, dtype=torch.float16)
elif mode == "velodiff-fp32":
    sd = L.read_safetensors(path)
else:
    sd = safetensors.torch.load_file(path)
    sd = {k: v.half() for k, v in sd.items()}
peak = status("VmHWM:")
size = sum(v.numel() * v.element_size() for v in sd.values())
print(json.dumps({"base": base, "base_hwm": base_hwm, "peak": peak, "result_bytes": size}))
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=400)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    from velodiff.loading import write_safetensors
    shapes, total = sd15_shapes(args.mb * 2 ** 20)
    g = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "unet_fp32.safetensors")
        write_safetensors({k: torch.randn(s, generator=g) for k, s in shapes}, path)
        file_bytes = os.path.getsize(path)
        largest = max(torch.Size(s).numel() for _, s in shapes) * 4
        rows = []
        for mode in ("velodiff", "safetensors", "velodiff-fp32"):
            res = json.loads(subprocess.run([sys.executable, "-c", _CHILD, path, mode], check=True,
                                            capture_output=True, text=True).stdout.strip().splitlines()[-1])
            inc = res["peak"] - res["base"]
            rows.append({"loader": mode, "tensors": len(shapes), "file_MB": file_bytes / 2 ** 20,
                         "weights_MB": res["result_bytes"] / 2 ** 20, "peak_increase_MB": inc / 2 ** 20,
                         "peak_over_weights": inc / res["result_bytes"], "peak_over_file": inc / file_bytes,
                         "within_1.3x": inc <= 1.3 * res["result_bytes"]})
            print(rows[-1], flush=True)
    note = (f"SD 1.5 UNet tensor shapes (first {len(shapes)} in state-dict order), fp32 file of "
            f"{file_bytes / 2 ** 20:.0f} MB, largest tensor {largest / 2 ** 20:.1f} MB. Peak = VmHWM minus the "
            "post-import VmRSS of a fresh process; weights = the loaded tensors' bytes.")
    print(write_results("loading_peak_memory", rows, ["loader", "tensors", "file_MB", "weights_MB",
                                                      "peak_increase_MB", "peak_over_weights", "peak_over_file",
                                                      "within_1.3x"], args.out, note))


if __name__ == "__main__":
    main()
