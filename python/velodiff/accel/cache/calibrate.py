"""TeaCache calibration: fit the polynomial that maps the change of block 0's modulated input to the change of the
model output, on the model's own uncached trajectories, and the calibration files that carry it.

The procedure is the TeaCache maintainers' (ali-vilab/TeaCache issue 2): run the model without a cache over many
inputs (``num_samples`` class labels or prompts), and at every model evaluation after the first record, per
sample, ``x`` = the relative L1 change of block 0's timestep-modulated input and ``y`` = the relative L1 change of
the transformer's output, both against the previous evaluation of the same sample; then ``numpy.polyfit(x, y, 4)``.
With classifier-free guidance each half of the batch (conditional, unconditional) is a sample of its own.

A calibration file (JSON) records the model it was fitted on (:func:`model_identity`: class, number of blocks and
the SHA-256 of its config) and TeaCache refuses it for any other model. Built-in models ship theirs as
``teacache.json`` in their folder (found by identity, so a quantized copy of a built-in model uses it too).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from typing import Any, Dict, List, Optional, Sequence

FORMAT, VERSION = "velodiff-cache-calibration", 1
#: the file name built-in model folders ship their TeaCache coefficients under
BUILTIN_FILE = "teacache.json"


def model_identity(model) -> Dict[str, Any]:
    """{"class", "num_blocks", "config_sha256"}: what a calibration file must match. The hash is over the model's
    config (every constructor argument, as JSON with sorted keys); the weights are not hashed."""
    config = dict(getattr(model, "config", {}) or {})
    text = json.dumps(config, sort_keys=True, default=str, separators=(",", ":"))
    return {"class": type(model).__name__, "num_blocks": int(getattr(model, "num_blocks", 0) or 0),
            "config_sha256": hashlib.sha256(text.encode()).hexdigest()}


def _describe(identity: Dict[str, Any]) -> str:
    return (f"{identity.get('class')} with {identity.get('num_blocks')} blocks, config sha256 "
            f"{str(identity.get('config_sha256'))[:12]}")


def read_calibration(path: str, method: str = "teacache") -> Dict[str, Any]:
    """Read and check a calibration file; ValueError naming ``calibration`` and the file on any problem."""
    where = f"calibration file {path!r}"
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"calibration: {where} does not exist (write one with velodiff calibrate-cache --model M "
                         f"--method {method} --out FILE)") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"calibration: {where} cannot be read as JSON ({e})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"calibration: {where} is not a velodiff cache calibration (no \"format\": \"{FORMAT}\")")
    if data.get("version") != VERSION:
        raise ValueError(f"calibration: {where} has format version {data.get('version')!r}; this velodiff reads "
                         f"version {VERSION}")
    if data.get("method") != method:
        raise ValueError(f"calibration: {where} is for {data.get('method')!r}, not {method!r}")
    coefficients = data.get("coefficients")
    if not isinstance(coefficients, list) or not 1 <= len(coefficients) <= 8 or not all(
            isinstance(c, (int, float)) and not isinstance(c, bool) and math.isfinite(c) for c in coefficients):
        raise ValueError(f"calibration: {where}: coefficients must be 1 to 8 finite numbers, highest degree first")
    model = data.get("model")
    if not isinstance(model, dict) or not {"class", "num_blocks", "config_sha256"} <= set(model):
        raise ValueError(f"calibration: {where} does not say which model it was fitted on (\"model\": {{\"class\", "
                         f"\"num_blocks\", \"config_sha256\"}})")
    return data


def check_identity(data: Dict[str, Any], model, path: str) -> None:
    """ValueError naming ``calibration`` when the file ``data`` (from ``path``) was fitted on another model."""
    mine = model_identity(model)
    theirs = data["model"]
    if any(theirs.get(k) != mine[k] for k in mine):
        raise ValueError(f"calibration: {path!r} was fitted on another model ({_describe(theirs)}); this pipeline's "
                         f"transformer is {_describe(mine)}. Fit one for it: velodiff calibrate-cache --model M "
                         f"--method {data.get('method', 'teacache')} --out FILE")


def builtin_calibration(model, method: str = "teacache") -> Optional[Dict[str, Any]]:
    """The calibration a built-in model ships for ``model`` (matched by :func:`model_identity`), or None."""
    from velodiff.loading.builtin import BUILTIN_MODELS
    mine = model_identity(model)
    for folder in BUILTIN_MODELS.values():
        path = os.path.join(folder, BUILTIN_FILE if method == "teacache" else f"{method}.json")
        if not os.path.isfile(path):
            continue
        data = read_calibration(path, method)
        if all(data["model"].get(k) == mine[k] for k in mine):
            return dict(data, path=path)
    return None


# ----------------------------------------------------------------------------------------------------------------
# fitting
# ----------------------------------------------------------------------------------------------------------------

def _rel_l1(a, b):
    """Relative L1 change of ``a`` against ``b`` per sample ([B, ...] -> [B] float64); 0 when both are zero."""
    import torch
    a, b = a.reshape(a.shape[0], -1).double(), b.reshape(b.shape[0], -1).double()
    num, den = (a - b).abs().sum(1), b.abs().sum(1)
    return torch.where(den > 0, num / den.clamp_min(1e-300), torch.where(num == 0, 0.0, math.inf))


def collect_teacache_pairs(pipe, num_samples: int = 64, sampler: Optional[str] = None, steps: Sequence[int] = (20,),
                           guidance: Optional[float] = None, seed: int = 0, batch_size: int = 16,
                           prompts: Optional[Sequence[str]] = None):
    """Run ``pipe`` uncached over ``num_samples`` inputs for each step count in ``steps`` and return (x, y) as
    numpy arrays (see the module docstring). DiT pipelines take class labels 0, 1, 2, ... (cycled over the
    classes); prompt pipelines (PixArt) take ``prompts``, cycled. Each input gets its own seeded generator."""
    import numpy as np
    import torch

    from velodiff.accel.cache.dit_hooks import block_stack
    from velodiff.eval.harness import image_seeds
    from velodiff.pipelines.base import is_class_conditional

    model = block_stack(pipe)
    if "block_stack_hook" in vars(model):
        raise ValueError("the pipeline has a DiT cache applied; calibrate the uncached model (velodiff.restore)")
    class_conditional = is_class_conditional(pipe)
    if not class_conditional and not prompts:
        raise ValueError("prompts: a text-conditioned pipeline needs prompts to calibrate on")
    xs: List[float] = []
    ys: List[float] = []
    record: Dict[str, Any] = {}

    def hook(m, tokens, inputs):
        ctx = pipe.denoise_context
        if ctx is not None:
            record["probe"] = m.modulated_input(tokens, inputs).float()
        return m.run_blocks(tokens, inputs)

    def after_forward(module, args, output):
        ctx = pipe.denoise_context
        if ctx is None or "probe" not in record:
            return
        probe, out = record.pop("probe"), output.float()
        previous = record.get("previous")
        if previous is not None and previous[0] == ctx.call_index - 1 and previous[1].shape == probe.shape:
            xs.extend(_rel_l1(probe, previous[1]).tolist())
            ys.extend(_rel_l1(out, previous[2]).tolist())
        record["previous"] = (ctx.call_index, probe, out)

    seeds = image_seeds(seed, num_samples)
    model.block_stack_hook = hook
    handle = model.register_forward_hook(after_forward)
    try:
        for n in steps:
            for start in range(0, num_samples, batch_size):
                idx = range(start, min(start + batch_size, num_samples))
                gens = [torch.Generator().manual_seed(seeds[i]) for i in idx]
                call: Dict[str, Any] = dict(num_inference_steps=int(n), generator=gens, output_type="latent")
                if guidance is not None:
                    call["guidance_scale"] = float(guidance)
                if sampler is not None:
                    call["sampler"] = sampler
                record.clear()
                with torch.inference_mode():
                    if class_conditional:
                        classes = int(model.config.num_embeds_ada_norm)
                        pipe(class_labels=[i % classes for i in idx], **call)
                    else:
                        pipe([prompts[i % len(prompts)] for i in idx], **call)
    finally:
        handle.remove()
        vars(model).pop("block_stack_hook", None)
    x, y = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
    keep = np.isfinite(x) & np.isfinite(y)
    return x[keep], y[keep]


def fit_teacache(pipe, num_samples: int = 64, sampler: Optional[str] = None, steps: Sequence[int] = (20,),
                 guidance: Optional[float] = None, seed: int = 0, batch_size: int = 16, degree: int = 4,
                 prompts: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Fit TeaCache's polynomial for ``pipe``'s transformer (:func:`collect_teacache_pairs`, then
    ``numpy.polyfit(x, y, degree)``); returns the calibration as a dict ready for :func:`write_calibration`."""
    import numpy as np

    from velodiff import __version__
    from velodiff.accel.cache.dit_hooks import block_stack
    from velodiff.eval.harness import default_guidance

    for name, value, low in (("num_samples", num_samples, 1), ("batch_size", batch_size, 1), ("seed", seed, 0),
                             ("degree", degree, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if not steps or any(isinstance(n, bool) or not isinstance(n, int) or n < 2 for n in steps):
        raise ValueError(f"steps must be integers >= 2, got {list(steps)!r}")
    if degree > 7:
        raise ValueError(f"degree must be at most 7 (8 coefficients), got {degree}")
    model = block_stack(pipe)
    if guidance is None:
        guidance = default_guidance(pipe)
    t0 = time.perf_counter()
    x, y = collect_teacache_pairs(pipe, num_samples, sampler, steps, guidance, seed, batch_size, prompts)
    if len(x) <= degree:
        raise ValueError(f"only {len(x)} (x, y) pairs: more samples or steps are needed to fit degree {degree}")
    coefficients = np.polyfit(x, y, degree)
    fitted = np.polyval(coefficients, x)
    ss_res, ss_tot = float(((y - fitted) ** 2).sum()), float(((y - y.mean()) ** 2).sum())
    used = pipe.make_plan(sampler, int(steps[0]))[0]
    return {
        "format": FORMAT, "version": VERSION, "method": "teacache",
        "model": model_identity(model),
        "coefficients": [float(c) for c in coefficients],
        "fit": {"degree": degree, "points": int(len(x)), "r2": 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0,
                "x_range": [float(x.min()), float(x.max())], "y_range": [float(y.min()), float(y.max())],
                "sampler": used, "steps": [int(n) for n in steps], "guidance": guidance,
                "num_samples": num_samples, "seed": seed, "batch_size": batch_size,
                "seconds": round(time.perf_counter() - t0, 1)},
        "made_with": {"velodiff": __version__},
        "procedure": "velodiff calibrate-cache: per model evaluation and sample, x = relative L1 change of block "
                     "0's modulated input, y = relative L1 change of the transformer output, both against the "
                     "previous evaluation (uncached); numpy.polyfit(x, y, degree)",
    }


def write_calibration(data: Dict[str, Any], path: str) -> str:
    """Write a calibration dict as JSON (under a temporary name, then renamed)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)
    return path
