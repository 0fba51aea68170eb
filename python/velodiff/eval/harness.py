"""``velodiff.eval.evaluate``: generate digits with a pipeline and judge them against the real ones."""
from __future__ import annotations

import os
import platform
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from velodiff.eval.metrics import _as_array, to_digits
from velodiff.eval.reference import (CLASSIFIER, FEATURE_SPACE, UPSAMPLE_MODES, reference_for)

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DEFAULT_PROMPT = "a handwritten {d}"

#: the keys of :func:`evaluate`'s result (and of ``velodiff eval --json``, which adds "model")
RESULT_KEYS = (
    "pipeline", "conditioning", "sampler", "steps", "guidance", "per_class", "num_images", "seed", "batch_size",
    "prompt_template", "pipe_kwargs", "image_size",
    "conditional_accuracy", "conditional_accuracy_ci", "per_class_accuracy",
    "frechet_distance", "frechet_distance_ci", "frechet_distance_bootstrap_bias", "frechet_distance_floor",
    "frechet_distance_floor_std", "frechet_distance_floor_n",
    "classifier", "classifier_heldout_accuracy", "classifier_cv_accuracy", "feature_space", "reference_upsample", "confidence", "n_boot",
    "seconds_per_image", "model_evaluations_per_image", "generation_seconds", "evaluation_seconds",
    "machine", "versions",
)

# ----------------------------------------------------------------------------------------------------------------
# generation steps: one small function per kind of conditioning, chosen by pipeline type
# ----------------------------------------------------------------------------------------------------------------

GenerationStep = Callable[..., Tuple[np.ndarray, int, str]]


def prompt_step(pipe, labels: Sequence[int], generators: List[Any], prompt_template: str,
                **call_kwargs) -> Tuple[np.ndarray, int, str]:
    """Text-to-image pipelines: one prompt per label, ``prompt_template.format(d=label, word=WORDS[label])``.
    Returns (images [B, H, W, 3] float32 in [0, 1], model evaluations per image, sampler name)."""
    prompts = [prompt_template.format(d=int(d), word=WORDS[int(d)]) for d in labels]
    out = pipe(prompts, generator=generators, output_type="np", **call_kwargs)
    return _output(out)


def class_label_step(pipe, labels: Sequence[int], generators: List[Any], prompt_template: Optional[str] = None,
                     **call_kwargs) -> Tuple[np.ndarray, int, str]:
    """Class-conditional pipelines (DiT): the digit is the class label. ``prompt_template`` is ignored."""
    out = pipe(class_labels=[int(d) for d in labels], generator=generators, output_type="np", **call_kwargs)
    return _output(out)


def _output(out) -> Tuple[np.ndarray, int, str]:
    images = out.images
    if hasattr(images, "detach"):
        images = images.detach().cpu().numpy()
    return np.asarray(images), int(getattr(out, "num_model_evaluations", 0) or 0), str(getattr(out, "sampler", ""))


#: pipeline class name (anywhere in the type's MRO) -> generation step; anything else gets :func:`prompt_step`
GENERATION_STEPS: Dict[str, GenerationStep] = {"DiTPipeline": class_label_step}


def generation_step(pipe) -> GenerationStep:
    """The generation step for ``pipe``, looked up by the class names of its type's MRO in GENERATION_STEPS."""
    for cls in type(pipe).__mro__:
        if cls.__name__ in GENERATION_STEPS:
            return GENERATION_STEPS[cls.__name__]
    return prompt_step


# ----------------------------------------------------------------------------------------------------------------
# the harness
# ----------------------------------------------------------------------------------------------------------------

def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def image_seeds(seed: int, n: int) -> List[int]:
    """The per-image noise seeds: ``np.random.SeedSequence(seed).generate_state(n, np.uint64)``, so image i of
    a run depends only on (seed, i), never on the batch size."""
    return [int(s) for s in np.random.SeedSequence(int(seed)).generate_state(n, dtype=np.uint64)]


def judge(images, labels: Sequence[int], upsample: str = "bilinear", n_boot: int = 1000, fd_boot: int = 200,
          confidence: float = 0.95, seed: int = 0) -> Dict[str, Any]:
    """Judge images of digits (any source) against the real digits.

    ``images``: anything :func:`velodiff.eval.metrics.to_digits` accepts ([N, H, W] or [N, H, W, C] in [0, 1] ...),
    ``labels``: [N] the requested digits. ``upsample``: how real digits are rendered at H x W for comparison (see
    :mod:`velodiff.eval.reference`). Returns the metric keys of :data:`RESULT_KEYS`."""
    if upsample not in UPSAMPLE_MODES:
        raise ValueError(f"upsample must be one of {UPSAMPLE_MODES}, got {upsample!r}")
    x = _as_array(images)
    digits = to_digits(x)
    size = (int(x.shape[1]), int(x.shape[2]))
    ref = reference_for(size, upsample)
    acc = ref.conditional_accuracy(digits, labels, n_boot=n_boot,
                                   confidence=confidence, seed=seed)
    fd = ref.frechet(digits, labels, n_boot=fd_boot, confidence=confidence, seed=seed)
    return {
        "image_size": list(size),
        "conditional_accuracy": acc["value"], "conditional_accuracy_ci": [acc["ci_low"], acc["ci_high"]],
        "per_class_accuracy": acc["per_class"],
        "frechet_distance": fd["value"], "frechet_distance_ci": [fd["ci_low"], fd["ci_high"]],
        "frechet_distance_bootstrap_bias": fd["bias"], "frechet_distance_floor": fd["floor"],
        "frechet_distance_floor_std": fd["floor_std"], "frechet_distance_floor_n": fd["floor_n"],
        "classifier": CLASSIFIER, "classifier_heldout_accuracy": ref.heldout_accuracy,
        "classifier_cv_accuracy": ref.cv_accuracy,
        "feature_space": FEATURE_SPACE, "reference_upsample": upsample, "confidence": confidence,
        "n_boot": {"accuracy": n_boot, "frechet_distance": fd_boot},
    }


def evaluate(pipe, sampler: Optional[str] = "dpmpp_2m", steps: int = 20, guidance: Optional[float] = None,
             per_class: int = 100, seed: int = 0, batch_size: int = 100,
             prompt_template: str = DEFAULT_PROMPT, upsample: str = "bilinear", n_boot: int = 1000,
             fd_boot: int = 200, warmup: bool = True, progress: bool = False, **pipe_kwargs) -> Dict[str, Any]:
    """Generate ``per_class`` images of each digit 0..9 with ``pipe`` and judge them.

    ``pipe``: a velodiff pipeline (or any pipeline whose call takes prompts, or class labels for DiT: see
    :func:`generation_step`) called with ``num_inference_steps=steps, guidance_scale=guidance, sampler=sampler``
    (``sampler=None``: the pipeline's own scheduler, and no ``sampler`` argument is passed; ``guidance=None``: the
    model's own default guidance, see :func:`default_guidance`), ``output_type="np"`` and ``pipe_kwargs``.
    Prompts are ``prompt_template.format(d=digit, word="seven")``. Images are generated
    class-major (all 0s, then all 1s, ...) in batches of ``batch_size``; image i gets its own
    ``torch.Generator().manual_seed(image_seeds(seed)[i])`` for its initial noise and (stochastic samplers) its
    step noise, so a run is reproducible and independent of the batch size up to float rounding. ``warmup``: one untimed single-image call first; ``progress``: a progress bar over
    the images (on stderr). The bootstraps use ``seed`` too.

    Returns a dict with the keys of :data:`RESULT_KEYS`: accuracy and FD with 95% intervals, the real-vs-real FD
    floor, the judge's held-out accuracy, ``seconds_per_image`` (generation wall time / images, warmup excluded),
    ``model_evaluations_per_image`` (denoiser calls per image; with guidance each call evaluates the conditional
    and unconditional branch in one batch), and the machine and library versions."""
    import torch

    from velodiff.sampling import SAMPLERS
    t_start = time.perf_counter()
    _check_int("steps", steps, 1)
    _check_int("per_class", per_class, 1)
    _check_int("batch_size", batch_size, 1)
    _check_int("seed", seed, 0)
    if guidance is None:  # the model's own default: passed on explicitly when known, so that it is recorded
        guidance = default_guidance(pipe)
    elif (isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not guidance >= 0
            or not np.isfinite(guidance)):
        raise ValueError(f"guidance must be a finite number >= 0 or None, got {guidance!r}")
    if sampler is not None and sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {sorted(SAMPLERS)} or None, got {sampler!r}")
    if upsample not in UPSAMPLE_MODES:
        raise ValueError(f"upsample must be one of {UPSAMPLE_MODES}, got {upsample!r}")
    step = generation_step(pipe)
    if step is prompt_step:
        try:
            prompt_template.format(d=7, word="seven")
        except (AttributeError, KeyError, IndexError, ValueError) as e:
            raise ValueError(f"prompt_template must be a str.format template with {{d}} and/or {{word}}, got "
                             f"{prompt_template!r} ({e})") from None
        if "{d}" not in prompt_template and "{word}" not in prompt_template:
            raise ValueError(f"prompt_template must contain {{d}} or {{word}}, got {prompt_template!r}")
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    call = dict(num_inference_steps=steps, **pipe_kwargs)
    if guidance is not None:
        call["guidance_scale"] = float(guidance)
    if sampler is not None:
        call["sampler"] = sampler
    labels = np.repeat(np.arange(10), per_class)
    seeds = image_seeds(seed, len(labels))

    def run(idx: np.ndarray):
        gens = [torch.Generator().manual_seed(seeds[i]) for i in idx]
        with torch.inference_mode():
            return step(pipe, labels[idx], gens, prompt_template=prompt_template, **call)

    if warmup:
        run(np.arange(1))
    images, nfe, used = [], 0, ""
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(labels), desc="generating", unit="image")
    t0 = time.perf_counter()
    for start in range(0, len(labels), batch_size):
        batch, nfe, used = run(np.arange(start, min(start + batch_size, len(labels))))
        images.append(batch)
        if bar is not None:
            bar.update(len(batch))
    gen_seconds = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    images = np.concatenate(images)
    result: Dict[str, Any] = {
        "pipeline": type(pipe).__name__,
        "conditioning": "class_label" if step is class_label_step else "prompt",
        "sampler": used or sampler, "steps": steps,
        "guidance": None if guidance is None else float(guidance), "per_class": per_class,
        "num_images": len(labels), "seed": seed, "batch_size": batch_size,
        "prompt_template": prompt_template if step is prompt_step else None,
        "pipe_kwargs": {k: (v if isinstance(v, (int, float, str, bool, type(None))) else repr(v))
                        for k, v in pipe_kwargs.items()},
    }
    result.update(judge(images, labels, upsample=upsample, n_boot=n_boot, fd_boot=fd_boot, seed=seed))
    result.update(seconds_per_image=gen_seconds / len(labels), model_evaluations_per_image=nfe,
                  generation_seconds=gen_seconds, evaluation_seconds=time.perf_counter() - t_start,
                  machine=machine(pipe), versions=versions())
    return {k: result[k] for k in RESULT_KEYS}


def default_guidance(pipe) -> Optional[float]:
    """The guidance scale ``pipe`` uses when called without one: velodiff pipelines say it
    (``pipe.default_guidance_scale``: the folder's ``_velodiff_defaults``, e.g. digits 3, digits-dit 1.5, else
    diffusers' default); for other pipelines, the default of their call signature; None when neither says."""
    import inspect
    value = getattr(pipe, "default_guidance_scale", None)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    param = inspect.signature(type(pipe).__call__).parameters.get("guidance_scale")
    if param is None or not isinstance(param.default, (int, float)) or isinstance(param.default, bool):
        return None
    return float(param.default)


def machine(pipe=None) -> Dict[str, Any]:
    """Where the numbers were measured: OS, CPU model, cores, torch threads, device (and GPU name)."""
    import torch

    from velodiff.info import cpu_model
    device = str(getattr(pipe, "device", "cpu"))
    return {"platform": platform.platform(), "cpu": cpu_model(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "device": device,
            "gpu": torch.cuda.get_device_name(0) if device.startswith("cuda") and torch.cuda.is_available() else None}


def versions() -> Dict[str, Optional[str]]:
    """Versions of velodiff and the libraries the numbers depend on (None where not installed)."""
    import importlib.metadata as md
    out: Dict[str, Optional[str]] = {"python": platform.python_version()}
    from velodiff._version import __version__
    out["velodiff"] = __version__
    for name in ("torch", "numpy", "scipy", "scikit-learn", "diffusers", "transformers"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def format_table(result: Dict[str, Any]) -> str:
    """The result of :func:`evaluate` as a table for people."""
    ci = lambda key: "[{:.4f}, {:.4f}]".format(*result[key])  # noqa: E731
    pct = lambda key: "[{:.1f}%, {:.1f}%]".format(*(100 * v for v in result[key]))  # noqa: E731
    cond = (f"prompt {result['prompt_template']!r}" if result["conditioning"] == "prompt" else "class label")
    rows = [
        ("model", str(result.get("model", result["pipeline"]))),
        ("pipeline", f"{result['pipeline']} ({cond})"),
        ("sampler / steps / guidance", f"{result['sampler']} / {result['steps']} / "
                                       f"{'default' if result['guidance'] is None else format(result['guidance'], 'g')}"),
        ("images", f"{result['num_images']} ({result['per_class']} per digit, seed {result['seed']}, "
                   f"{result['image_size'][0]}x{result['image_size'][1]})"),
        ("conditional accuracy", f"{100 * result['conditional_accuracy']:.1f}%  "
                                 f"{int(100 * result['confidence'])}% CI {pct('conditional_accuracy_ci')}"),
        ("  per digit", " ".join(f"{d}:{'-' if a is None else f'{100 * a:.0f}'}"
                                 for d, a in enumerate(result["per_class_accuracy"]))),
        ("  judge accuracy", f"{100 * result['classifier_heldout_accuracy']:.1f}% on the 1347 digits it was not "
                             f"fitted on, {100 * result['classifier_cv_accuracy']:.1f}% cross-validated "
                             f"({result['classifier']})"),
        ("Frechet distance", f"{result['frechet_distance']:.4f}  {int(100 * result['confidence'])}% CI "
                             f"{ci('frechet_distance_ci')}"),
        ("  floor (real digits)", f"{result['frechet_distance_floor']:.4f} +- "
                                  f"{result['frechet_distance_floor_std']:.4f} "
                                  f"({result['frechet_distance_floor_n']} real digits)"),
        ("seconds per image", f"{result['seconds_per_image']:.4f} ({result['generation_seconds']:.1f} s generating, "
                              f"{result['evaluation_seconds']:.1f} s in all)"),
        ("model evaluations per image", str(result["model_evaluations_per_image"])),
        ("machine", f"{result['machine']['cpu']}, {result['machine']['torch_threads']} threads, "
                    f"{result['machine']['device']}"),
        ("versions", ", ".join(f"{k} {v}" for k, v in result["versions"].items() if v)),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
