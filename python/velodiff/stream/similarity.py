"""The stochastic similarity filter of StreamDiffusion (Kodaira et al. 2023, section 3.4): a frame that barely
differs from the last *processed* frame is skipped with a probability that grows with the similarity.

With the cosine similarity ``c`` of the frame's pixels to the last processed frame's and the threshold ``eta``,
the skip probability is ``p = max(0, (c - eta) / (1 - eta))`` (0 when eta = 1). A uniform draw ``u`` decides:
skip when ``u < p``. A skipped frame leaves the reference frame unchanged, so a slow drift is compared against the
frame last processed, not its predecessor; after ``max_skip_frame`` skips in a row the next frame is processed
whatever its similarity. The similarity and the probability are computed on the frame's device; the draw comes
from a seeded CPU generator, so a run is reproducible.

velodiff's cache gate op (``velodiff::cache_gate``) decides with a *relative L1* distance against a fixed
threshold; the paper's rule is a cosine similarity and a random draw, so the filter follows the paper with
ordinary tensor ops (one host read per frame for the decision, which a skip needs anyway).
"""
from __future__ import annotations

import numbers
from typing import Optional

import torch
import torch.nn.functional as F


def check_filter_args(threshold, max_skip_frame) -> None:
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not 0 <= float(threshold) <= 1:
        raise ValueError(f"similarity threshold must be a number in [0, 1], got {threshold!r}")
    if isinstance(max_skip_frame, bool) or not isinstance(max_skip_frame, numbers.Integral) or max_skip_frame < 0:
        raise ValueError(f"max_skip_frame must be an integer >= 0, got {max_skip_frame!r}")


def skip_probability(cosine: torch.Tensor, threshold: float) -> torch.Tensor:
    """``max(0, (cosine - threshold) / (1 - threshold))`` (0 for threshold 1); same shape and device."""
    if threshold >= 1.0:
        return torch.zeros_like(cosine)
    return ((cosine - threshold) / (1.0 - threshold)).clamp(min=0.0)


class SimilarityFilter:
    """Decides per frame whether to skip it. ``threshold`` in [0, 1] (0.98 in the paper's examples; 1 never
    skips), ``max_skip_frame`` the longest run of skips (10), ``seed`` for the draws."""

    def __init__(self, threshold: float = 0.98, max_skip_frame: int = 10, seed: int = 0):
        check_filter_args(threshold, max_skip_frame)
        self.threshold = float(threshold)
        self.max_skip_frame = int(max_skip_frame)
        self.seed = seed
        self.reset()

    def reset(self) -> None:
        """Forget the reference frame (the next frame is processed) and restart the draws."""
        self._reference: Optional[torch.Tensor] = None
        self._skips_in_row = 0
        self._generator = torch.Generator().manual_seed(self.seed)
        self.processed = 0
        self.skipped = 0

    def should_skip(self, frame: torch.Tensor) -> bool:
        """True to skip ``frame`` (any shape, float); False to process it, which makes it the new reference."""
        flat = frame.detach().reshape(-1).float()
        skip = False
        if self._reference is not None and self._reference.shape == flat.shape \
                and self._skips_in_row < self.max_skip_frame:
            cosine = F.cosine_similarity(self._reference, flat, dim=0)
            p = skip_probability(cosine, self.threshold)
            u = torch.rand((), generator=self._generator)
            skip = bool(u.to(p.device) < p)
        if skip:
            self._skips_in_row += 1
            self.skipped += 1
            return True
        self._reference = flat.clone()
        self._skips_in_row = 0
        self.processed += 1
        return False
