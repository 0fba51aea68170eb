"""Image conversion, Frechet distance and bootstrap intervals for the digits quality harness.

Everything here works in float64 NumPy; nothing depends on torch, so the metrics can judge images from any source.
"""
from __future__ import annotations

import warnings
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np

#: side of scikit-learn's digits images
DIGIT_SIDE = 8
#: the largest pixel value of scikit-learn's digits (``load_digits().data`` is in 0..16, 16 = full ink)
DIGIT_MAX = 16.0


def _area_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] float64 weights of exact area averaging: output cell ``i`` covers the input interval
    ``[i * n_in / n_out, (i + 1) * n_in / n_out)`` and averages the input pixels weighted by their overlap with it.
    Each row sums to 1; when ``n_in`` is a multiple of ``n_out`` it is a plain block mean."""
    m = np.zeros((n_out, n_in), dtype=np.float64)
    scale = n_in / n_out
    for i in range(n_out):
        lo, hi = i * scale, (i + 1) * scale
        for j in range(int(np.floor(lo)), min(n_in, int(np.ceil(hi)))):
            m[i, j] = max(0.0, min(hi, j + 1) - max(lo, j))
    return m / scale


def _as_array(images) -> np.ndarray:
    """A batch of images as a NumPy array: NumPy arrays and torch tensors pass (tensors are moved to the CPU), a
    list of PIL images is stacked (grayscale or RGB, uint8)."""
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("images is an empty list")
        if all(hasattr(im, "convert") and hasattr(im, "size") for im in images):  # PIL images
            return np.stack([np.asarray(im.convert("RGB")) for im in images])
        return np.stack([np.asarray(im) for im in images])
    if hasattr(images, "detach"):  # torch.Tensor, without importing torch
        return images.detach().cpu().float().numpy()
    return np.asarray(images)


def to_digits(images) -> np.ndarray:
    """Convert generated images to scikit-learn's digits format.

    ``images``: [N, H, W] (grayscale) or [N, H, W, C] channels-last with C = 1 or 3, float in [0, 1] (white =
    1 = ink, as the digits model draws: bright strokes on a black background) or uint8 in 0..255 (divided by
    255); a list of PIL images is accepted too. Any H and W >= 8.

    Conversion, in float64: (1) gray = the mean of the channels; (2) exact area averaging to 8x8 (each output
    pixel is the overlap-weighted mean of the input pixels its 1/8 x 1/8 cell covers; a plain block mean when H
    and W are multiples of 8); (3) multiply by 16 and clip to [0, 16]. Values are not rounded (scikit-learn's
    are integers). An 8x8 digit ``v`` (0..16) shown as ``v / 16`` and upsampled with nearest neighbours by any
    integer factor maps back to ``v`` exactly.

    Returns [N, 64] float64 in [0, 16], rows in row-major pixel order like ``load_digits().data``.
    """
    small = area_resample(images, DIGIT_SIDE)
    return np.clip(small * DIGIT_MAX, 0.0, DIGIT_MAX).reshape(len(small), DIGIT_SIDE * DIGIT_SIDE)


def area_resample(images, side: int) -> np.ndarray:
    """Images -> gray [N, side, side] float64 by exact area averaging (not clipped).

    ``images``: [N, H, W] or channels-last [N, H, W, C] (C = 1 or 3), float in [0, 1] or uint8 (divided by 255),
    or a list of PIL images; H, W >= ``side``. Gray is the mean of the channels; each output pixel is the
    overlap-weighted mean of the input pixels its cell covers (a block mean when H and W are multiples of
    ``side``). TypeError / ValueError naming ``images`` for a wrong dtype, shape, too small a size or NaN / inf."""
    x = _as_array(images)
    if x.dtype == np.uint8:
        x = x.astype(np.float64) / 255.0
    elif not np.issubdtype(x.dtype, np.floating) and not np.issubdtype(x.dtype, np.integer):
        raise TypeError(f"images must be float (0..1) or uint8 (0..255) images, got dtype {x.dtype}")
    x = x.astype(np.float64, copy=False)
    if x.ndim == 4:
        if x.shape[-1] not in (1, 3):
            raise ValueError(f"images must be [N, H, W] or channels-last [N, H, W, C] with C = 1 or 3, got shape "
                             f"{x.shape} (pass output_type='np' to a pipeline for channels-last images)")
        x = x.mean(axis=-1)
    elif x.ndim != 3:
        raise ValueError(f"images must be [N, H, W] or [N, H, W, C], got shape {x.shape}")
    n, h, w = x.shape
    if n == 0 or h < side or w < side:
        raise ValueError(f"images must hold at least one image of at least {side}x{side} pixels, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("images contain NaN or infinite values")
    return np.einsum("ih,nhw,jw->nij", _area_matrix(h, side), x, _area_matrix(w, side))


def gaussian_stats(features: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(mean [D], covariance [D, D]) in float64 of features [N, D] (N >= 2; unbiased covariance, as np.cov)."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be [N, D] with N >= 2, got shape {f.shape}")
    return f.mean(axis=0), np.atleast_2d(np.cov(f, rowvar=False))


def frechet_distance_from_stats(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                                eps: float = 1e-6) -> float:
    """The Frechet (2-Wasserstein squared) distance between N(mu1, sigma1) and N(mu2, sigma2):
    ``||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2))``.

    ``mu*``: [D], ``sigma*``: [D, D] symmetric positive semi-definite; computed in float64 with
    ``scipy.linalg.sqrtm``. Its result is complex when round-off gives the product tiny negative eigenvalues:
    the imaginary part is dropped when it is small (max |imag| < 1e-3 * max(1, max |real|)), otherwise a
    ``ValueError`` is raised. sqrtm's warning about a singular product (fewer samples than dimensions) is
    silenced; when the product is singular enough that sqrtm is not finite, ``eps`` is added to
    both diagonals (as pytorch-fid does). Never negative (round-off is clipped at 0)."""
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.shape[0],) * 2:
        raise ValueError(f"shapes disagree: mu1 {mu1.shape}, mu2 {mu2.shape}, sigma1 {s1.shape}, sigma2 {s2.shape}")
    diff = mu1 - mu2
    with warnings.catch_warnings():  # singular products (fewer samples than dimensions) are expected here
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(s1 @ s2)
        if not np.all(np.isfinite(covmean)):
            offset = np.eye(s1.shape[0]) * eps
            covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        imag = np.max(np.abs(covmean.imag))
        if imag > 1e-3 * max(1.0, float(np.max(np.abs(covmean.real)))):
            raise ValueError(f"sqrtm(sigma1 @ sigma2) has a large imaginary part ({imag:.3g}): the covariances are "
                             f"not positive semi-definite or badly conditioned")
        covmean = covmean.real
    value = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))
    return max(value, 0.0)


def frechet_distance(features1: np.ndarray, features2: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to features1 [N1, D] and features2 [N2, D] (float64)."""
    f1, f2 = np.asarray(features1), np.asarray(features2)
    if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1]:
        raise ValueError(f"features1 and features2 must be [N, D] with the same D, got {f1.shape} and {f2.shape}")
    return frechet_distance_from_stats(*gaussian_stats(f1), *gaussian_stats(f2))


def bootstrap(statistic: Callable[[np.ndarray], float], n: int, point: Optional[float] = None,
              n_boot: int = 200, confidence: float = 0.95, seed: int = 0,
              lower_bound: Optional[float] = None) -> Dict[str, float]:
    """A bootstrap confidence interval of ``statistic(indices)`` over resamples (with replacement) of ``n`` items.

    ``statistic`` gets int64 indices [n] and returns a float; ``point`` is its value on the original sample
    (computed when None). The interval is the percentile interval of the ``n_boot`` resampled values shifted by
    the bootstrap bias estimate ``bias = mean(resampled) - point`` (resampling duplicates items, which biases
    statistics like the Frechet distance upwards; for a mean, bias ~ 0 and this is the plain percentile
    interval), then clipped at ``lower_bound`` when given (0 for a distance). Resampling is driven by
    ``np.random.default_rng(seed)``, so the interval is reproducible.

    Returns {"value", "ci_low", "ci_high", "bias", "confidence", "n_boot"}."""
    if not isinstance(n, (int, np.integer)) or n < 2:
        raise ValueError(f"n must be an integer >= 2, got {n!r}")
    if not isinstance(n_boot, (int, np.integer)) or n_boot < 10:
        raise ValueError(f"n_boot must be an integer >= 10, got {n_boot!r}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    if point is None:
        point = float(statistic(np.arange(n)))
    rng = np.random.default_rng(seed)
    values = np.array([statistic(rng.integers(0, n, size=n)) for _ in range(n_boot)], dtype=np.float64)
    bias = float(values.mean() - point)
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(values, [alpha, 1.0 - alpha]) - bias
    if lower_bound is not None:
        lo, hi = max(lo, lower_bound), max(hi, lower_bound)
    return {"value": float(point), "ci_low": float(lo), "ci_high": float(hi), "bias": bias,
            "confidence": float(confidence), "n_boot": int(n_boot)}


def bootstrap_mean(values: Sequence[float], n_boot: int = 1000, confidence: float = 0.95,
                   seed: int = 0) -> Dict[str, float]:
    """Bootstrap percentile interval of the mean of ``values`` [N] (e.g. 0/1 correctness), all resamples drawn at
    once from ``np.random.default_rng(seed)``. The mean is unbiased under resampling, so the interval is the plain
    percentile interval (no shift). Returns the same keys as :func:`bootstrap`."""
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size < 2:
        raise ValueError(f"values must hold at least 2 numbers, got {v.size}")
    if not isinstance(n_boot, (int, np.integer)) or n_boot < 10:
        raise ValueError(f"n_boot must be an integer >= 10, got {n_boot!r}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(n_boot, v.size))].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return {"value": float(v.mean()), "ci_low": float(lo), "ci_high": float(hi),
            "bias": float(means.mean() - v.mean()), "confidence": float(confidence), "n_boot": int(n_boot)}
