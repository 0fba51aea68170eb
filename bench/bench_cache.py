"""All caches in one place: runs the UNet and DiT cache benchmarks and draws what people compare caches by.

  bench_cache_unet.py  DeepCache, T-GATE, Faster Diffusion on ``digits`` (+ the DeepCache and tgate packages on
                       diffusers, + a full-size SD 1.5 UNet): results/cache_unet_digits.*, cache_unet_sd15_cpu.*,
                       the grid results/cache_unet_grid_digits.png
  bench_cache_dit.py   FBCache, TeaCache, DBCache, TaylorSeer on ``digits-dit`` (+ the cache-dit package on
                       diffusers' DiTPipeline): results/cache_dit_digits.*
  bench_cache_dit_xl.py  FBCache, TeaCache, TaylorSeer on a full-size DiT-XL/2: results/cache_dit_xl_cpu.*
  bench_cache_gate.py  the fused gate op against the same arithmetic in torch ops: results/cache_gate_cpu.*

This script (``--run`` first runs the four above, one after another) then draws from their JSON files:

- results/cache_pareto.png: wall-clock speed-up over the same library's uncached run (whole call) against the mean
  PSNR of each image to the uncached image of the same seed; one point per method, setting and step count;
  velodiff in blue, the peer packages in red; left panel digits (UNet caches), right panel digits-dit (DiT caches);
- results/cache_dit_grid_digits.png: the ten classes of seeds 0-9 at 20 steps, one row per DiT cache setting
  (the uncached row first), as cache_unet_grid_digits.png does for the UNet caches.

  python bench/bench_cache.py [--run] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from typing import List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
Point = Tuple[float, float, str, str]  # (speed-up, PSNR dB, label, colour)
VELODIFF, PEER = "blue", "red"


def short_unet(spec: str) -> str:
    return (spec.replace("deepcache:interval=", "dc").replace("tgate:gate_step=", "tg")
            .replace("faster_diffusion:interval=", "fd").replace("faster_diffusion", "fd"))


def short_dit(method: str, setting: str) -> str:
    """'teacache', 'threshold 0.1 (default)' -> 'tea0.1'; DBCache / TaylorSeer settings keep their numbers."""
    prefix = {"fbcache": "fb", "teacache": "tea", "dbcache": "db", "taylorseer": "ts"}.get(method, method)
    numbers = re.findall(r"\d+(?:\.\d+)?", setting.replace("cache-dit", ""))
    return prefix + "/".join(numbers)


def unet_points(results: dict) -> List[Point]:
    """Settings that have a peer: both sides from the peers section (same seeds, one interleaved timing); the other
    settings from the main table."""
    points: List[Point] = []
    peered = set()
    for steps, peer in results.get("peers", {}).items():
        for spec, row in peer["rows"].items():
            peered.add(spec)
            for side, colour in (("velodiff", VELODIFF), ("peer", PEER)):
                if row.get(f"{side}_speedup") and row.get(f"{side}_psnr_mean") is not None:
                    points.append((row[f"{side}_speedup"]["median"], row[f"{side}_psnr_mean"],
                                   f"{short_unet(spec)}@{steps}", colour))
    for row in results.get("quality", {}).values():
        if row["config"] not in peered and row.get("speedup") and row.get("psnr_mean") is not None:
            points.append((row["speedup"]["median"], row["psnr_mean"], f"{short_unet(row['config'])}@{row['steps']}",
                           VELODIFF))
    return points


def dit_points(results: dict) -> List[Point]:
    points: List[Point] = []
    for row in results.get("rows", []):
        if row.get("method") in (None, "none") or "error" in row or not row.get("speedup"):
            continue
        psnr = row.get("psnr_mean")
        if psnr is None or psnr == float("inf"):
            continue
        colour = VELODIFF if row["library"] == "velodiff" else PEER
        label = short_dit(row["method"], row["setting"]) + ("*" if colour == PEER else "")
        points.append((row["speedup"]["median"], psnr, f"{label}@{row['steps']}", colour))
    return points


def draw_pareto(panels: List[Tuple[str, str, List[Point]]], out_path: str) -> None:
    """panels: (title, legend, points) side by side; the axes span each panel's own points."""
    from PIL import Image, ImageDraw
    w, h, m = 820, 620, 70
    img = Image.new("RGB", (w * len(panels), h), "white")
    d = ImageDraw.Draw(img)
    for k, (title, legend, points) in enumerate(panels):
        left = k * w
        d.text((left + m, 8), title, fill="black")
        d.text((left + m, 24), legend, fill="black")
        if not points:
            d.text((left + w // 3, h // 2), "no results yet", fill="black")
            continue
        x0, x1 = 1.0, max(p[0] for p in points) * 1.08
        y0, y1 = min(p[1] for p in points) - 2, max(p[1] for p in points) + 2

        def xy(x, y):
            return (left + m + (x - x0) / (x1 - x0) * (w - 2 * m),
                    h - m - (y - y0) / (y1 - y0) * (h - 2 * m - 30))
        d.line([xy(x0, y0), xy(x1, y0)], fill="black")
        d.line([xy(x0, y0), xy(x0, y1)], fill="black")
        for j in range(6):
            x, y = x0 + j * (x1 - x0) / 5, y0 + j * (y1 - y0) / 5
            d.text((xy(x, y0)[0] - 10, h - m + 6), f"{x:.2f}x", fill="black")
            d.text((left + 6, xy(x0, y)[1] - 6), f"{y:.1f} dB", fill="black")
        d.text((left + w // 2 - 190, h - 24), "wall-clock speed-up over own uncached (whole call; right is faster)",
               fill="black")
        for x, y, label, colour in points:
            px, py = xy(x, y)
            d.ellipse([px - 4, py - 4, px + 4, py + 4], fill=colour)
            d.text((px + 6, py - 6), label, fill=colour)
    img.save(out_path)


def dit_grid(out_path: str, steps: int = 20, scale: int = 4) -> None:
    """One row per digits-dit cache setting of bench_cache_dit.METHODS: classes 0-9, seeds 0-9."""
    import numpy as np
    from PIL import Image, ImageDraw
    sys.path.insert(0, HERE)
    import bench_cache_dit as bd
    rows = []
    for method, setting, config in bd.METHODS:
        images = bd.velodiff_batch(bd.velodiff_pipe(config), range(10), range(10), steps)
        rows.append(("uncached" if config is None else f"{method} {setting}", images))
    side, gap, label_w = images.shape[1] * scale, 4, 330
    grid = Image.new("RGB", (label_w + 10 * (side + gap), len(rows) * (side + gap)), "white")
    draw = ImageDraw.Draw(grid)
    for r, (label, images) in enumerate(rows):
        draw.text((4, r * (side + gap) + side // 2 - 6), label, fill="black")
        for c, im in enumerate(images):
            tile = Image.fromarray((np.clip(im, 0, 1) * 255).round().astype(np.uint8).squeeze())
            grid.paste(tile.resize((side, side), Image.NEAREST), (label_w + c * (side + gap), r * (side + gap)))
    grid.save(out_path)


def read(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", action="store_true", help="run the four cache benchmarks first (hours on 2 cores)")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args()
    if args.run:
        for script, extra in (("bench_cache_gate.py", ["--max-load", "1.5"]), ("bench_cache_unet.py", []),
                              ("bench_cache_unet.py", ["--sections", "sd15", "pictures"]),
                              ("bench_cache_dit.py", []), ("bench_cache_dit_xl.py", [])):
            subprocess.run([sys.executable, os.path.join(HERE, script), "--out", args.out, *extra], check=True)
    unet = read(os.path.join(args.out, "cache_unet_digits.json")) or {}
    dit = read(os.path.join(args.out, "cache_dit_digits.json")) or {}
    draw_pareto([
        ("digits (UNet caches), dpmpp_2m, 20 and 50 steps",
         "blue: velodiff, red: DeepCache / tgate packages on diffusers; dc = deepcache interval, tg = tgate gate "
         "step, fd = faster_diffusion; @steps", unet_points(unet)),
        ("digits-dit (DiT caches), dpmpp_2m, 20 and 50 steps",
         "blue: velodiff, red (*): cache-dit on diffusers; fb/tea = threshold, db = F/B/threshold, ts = order/"
         "interval; @steps", dit_points(dit)),
    ], os.path.join(args.out, "cache_pareto.png"))
    dit_grid(os.path.join(args.out, "cache_dit_grid_digits.png"))
    print("wrote", os.path.join(args.out, "cache_pareto.png"), "and cache_dit_grid_digits.png")


if __name__ == "__main__":
    main()
