"""run_plan's guidance scalars are checked before the loop: a NaN or infinite guidance gives NaN samples (or a
black image once decoded) otherwise."""
import math

import pytest
import torch

from velodiff.sampling import NoiseSchedule, build_plan, run_plan


def model(x, t):
    return torch.tanh(x), 0.5 * torch.tanh(x)


@pytest.fixture(scope="module")
def plan():
    return build_plan("dpmpp_2m", NoiseSchedule.sd(), 3)


def test_guidance_scalars_must_be_finite(plan):
    x = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    calls = []

    def counted(x_in, t):
        calls.append(t)
        return model(x_in, t)
    for kwargs, match in ((dict(guidance_scale=math.inf), "guidance_scale must be a finite number or None"),
                          (dict(guidance_scale=math.nan), "guidance_scale must be a finite number or None"),
                          (dict(guidance_scale="7"), "guidance_scale must be a finite number or None"),
                          (dict(guidance_scale=3.0, guidance_rescale=math.nan), r"guidance_rescale must be .*\[0, 1\]"),
                          (dict(guidance_scale=3.0, guidance_rescale=1.5), r"guidance_rescale must be .*\[0, 1\]"),
                          (dict(guidance_scale=3.0, cfg_delta=math.inf), "cfg_delta must be a finite number")):
        with pytest.raises(ValueError, match=match):
            run_plan(plan, counted, x, **kwargs)
    assert calls == []
    out = run_plan(plan, counted, x, guidance_scale=3.0, guidance_rescale=0.7)
    assert torch.isfinite(out).all() and len(calls) == 3
