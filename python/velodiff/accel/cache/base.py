"""What every cache technique shares: the ``cache`` group, and the check that it fits the pipeline's denoiser."""
from __future__ import annotations

from typing import ClassVar, Optional

from velodiff.accel.registry import Technique

#: denoiser kinds: a UNet (``pipe.unet``) or a transformer (``pipe.transformer``: DiT, PixArt)
UNET, TRANSFORMER = "unet", "transformer"


def denoiser_kind(pipe) -> Optional[str]:
    """``"unet"`` when ``pipe`` denoises with a UNet, ``"transformer"`` with a DiT / PixArt transformer, else None."""
    if getattr(pipe, "unet", None) is not None:
        return UNET
    if getattr(pipe, "transformer", None) is not None:
        return TRANSFORMER
    return None


class CacheTechnique(Technique):
    """Base of the cache configs. ``denoiser``: the denoiser kind the cache works on (:data:`UNET` or
    :data:`TRANSFORMER`); :meth:`check` refuses other pipelines and names the caches that fit them."""

    group: ClassVar[Optional[str]] = "cache"
    denoiser: ClassVar[str] = UNET

    def check(self, pipe) -> None:
        kind = denoiser_kind(pipe)
        if kind == self.denoiser:
            return
        from velodiff.accel.registry import TECHNIQUES
        fits = sorted(n for n, cls in TECHNIQUES.items()
                      if issubclass(cls, CacheTechnique) and cls.denoiser == kind)
        what = {UNET: "a UNet", TRANSFORMER: "a transformer (DiT / PixArt)"}
        raise ValueError(f"{self.name} caches {what[self.denoiser]} but {type(pipe).__name__} denoises with "
                         f"{what.get(kind, 'no known denoiser')}; caches that fit it: {', '.join(fits) or 'none'}")
