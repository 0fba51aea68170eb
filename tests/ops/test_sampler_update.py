"""velodiff::sampler_update: CPU (and CUDA) kernels against the float64 pure-PyTorch reference."""
import itertools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from velodiff.ops import reference as ref
from velodiff.ops import sampler_update

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
SHAPES = [(1, 1), (1, 7), (3, 5, 7), (2, 4, 8, 8), (2, 4, 33, 17), (5, 3, 1, 129)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_inputs(shape, dtype, k, device, *, uncond=True, anchor=True, noise=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    x = r(*shape)
    cond = r(*shape).to(dtype)
    u = r(*shape).to(dtype) if uncond else None
    a = r(*shape) if anchor else None
    z = r(*shape) if noise else None
    h = r(k, *shape) if k > 0 else None
    coef = r(ref.sampler_coef_count(k))
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return to(x), to(cond), to(u), to(a), to(z), to(h), to(coef)


def rel(a, b):
    return float((a.double().cpu() - b.double().cpu()).norm() / b.double().cpu().norm().clamp_min(1e-30))


def check_against_reference(device, shape, dtype, k, write_slot, uncond, anchor, noise, rescale, want_y, seed=0):
    x, c, u, a, z, h, coef = make_inputs(shape, dtype, k, device, uncond=uncond, anchor=anchor, noise=noise,
                                         seed=seed)
    h_ours = None if h is None else h.clone()
    h_ref = None if h is None else h.clone().cpu()
    cpu = lambda t: None if t is None else t.cpu()  # noqa: E731
    xn, y = sampler_update(x, c, u, a, z, h_ours, coef, write_slot=write_slot, guidance_rescale=rescale,
                           want_y=want_y)
    xr, yr = ref.sampler_update(cpu(x), cpu(c), cpu(u), cpu(a), cpu(z), h_ref, cpu(coef), write_slot=write_slot,
                                guidance_rescale=rescale, want_y=want_y, compute_dtype=torch.float64)
    assert xn.dtype == torch.float32 and xn.shape == x.shape and xn.device == x.device
    # fp32 arithmetic on inputs that are exact in fp32 (fp16/bf16 upcast exactly): fp32 bound of the blueprint.
    assert rel(xn, xr) <= 1e-5
    if want_y:
        assert y.shape == x.shape and rel(y, yr) <= 1e-5
    else:
        assert y.numel() == 0
    if h is not None:
        assert rel(h_ours, h_ref) <= 1e-5
        if write_slot < 0:
            assert torch.equal(h_ours, h), "history must not change when write_slot == -1"
        else:
            others = [i for i in range(k) if i != write_slot]
            assert torch.equal(h_ours[others], h[others]), "only the write slot may change"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k,write_slot", [(0, -1), (1, 0), (3, 1), (3, -1), (8, 7)])
def test_matches_reference(device, shape, dtype, k, write_slot):
    check_against_reference(device, shape, dtype, k, write_slot, True, True, True, 0.0, True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("uncond,anchor,noise,want_y", list(itertools.product([False, True], repeat=4)))
def test_optional_inputs(device, uncond, anchor, noise, want_y):
    check_against_reference(device, (2, 3, 9, 5), torch.float16, 2, 0, uncond, anchor, noise, 0.0, want_y)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(1, 2), (3, 4, 8, 8), (2, 4, 65, 33)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("phi", [0.3, 0.7, 1.0])
def test_guidance_rescale(device, shape, dtype, phi):
    check_against_reference(device, shape, dtype, 2, 1, True, False, True, phi, False)


def test_guidance_rescale_matches_diffusers():
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
    g = torch.Generator().manual_seed(3)
    c, u, x = (torch.randn(2, 4, 16, 16, generator=g) for _ in range(3))
    w, phi = 7.5, 0.7
    coef = torch.zeros(ref.sampler_coef_count(0))
    coef[ref.COEF_W], coef[ref.COEF_DELTA], coef[ref.COEF_PM], coef[ref.COEF_CD] = w, 1.0, 1.0, 1.0
    xn, _ = sampler_update(x, c, u, None, None, None, coef, guidance_rescale=phi)
    guided = u + w * (c - u)
    expect = rescale_noise_cfg(guided, c, guidance_rescale=phi)
    assert rel(xn, expect) <= 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic(device):
    args = make_inputs((2, 4, 16, 16), torch.bfloat16, 3, device, seed=5)
    h1, h2 = args[5].clone(), args[5].clone()
    a1 = sampler_update(*args[:5], h1, args[6], write_slot=2, guidance_rescale=0.5, want_y=True)
    a2 = sampler_update(*args[:5], h2, args[6], write_slot=2, guidance_rescale=0.5, want_y=True)
    assert torch.equal(a1[0], a2[0]) and torch.equal(a1[1], a2[1]) and torch.equal(h1, h2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k,write_slot,rescale,want_y", [(0, -1, 0.0, False), (2, 1, 0.0, True), (3, 0, 0.7, True)])
def test_opcheck(device, k, write_slot, rescale, want_y):
    x, c, u, a, z, h, coef = make_inputs((2, 3, 4, 5), torch.float16, k, device, seed=7)
    torch.library.opcheck(torch.ops.velodiff.sampler_update.default,
                          (x, c, u, a, z, h, coef, write_slot, rescale, want_y))


# --- bad input: a clear exception naming the argument, from the wrapper and from the op itself ---

def _valid():
    x, c, u, a, z, h, coef = make_inputs((2, 3, 4), torch.float32, 2, "cpu", seed=1)
    return dict(x=x, cond=c, uncond=u, anchor=a, noise=z, history=h, coef=coef, write_slot=0,
                guidance_rescale=0.0)


BAD = [
    ("x", lambda v: v["x"].double(), TypeError),
    ("x", lambda v: v["x"].transpose(1, 2), ValueError),
    ("cond", lambda v: v["cond"].int(), TypeError),
    ("cond", lambda v: v["cond"][:1], ValueError),
    ("cond", lambda v: torch.randn(2, 4, 3).transpose(1, 2), ValueError),
    ("uncond", lambda v: v["uncond"].half(), TypeError),
    ("uncond", lambda v: v["uncond"].reshape(2, 12), ValueError),
    ("anchor", lambda v: v["anchor"].half(), TypeError),
    ("anchor", lambda v: v["anchor"][:, :2], ValueError),
    ("noise", lambda v: v["noise"].double(), TypeError),
    ("noise", lambda v: v["noise"].reshape(6, 4), ValueError),
    ("history", lambda v: v["history"].half(), TypeError),
    ("history", lambda v: v["history"][0], ValueError),
    ("history", lambda v: torch.randn(9, 2, 3, 4), ValueError),
    ("coef", lambda v: v["coef"].double(), TypeError),
    ("coef", lambda v: v["coef"][:-1], ValueError),
    ("write_slot", lambda v: 2, ValueError),
    ("write_slot", lambda v: -2, ValueError),
    ("guidance_rescale", lambda v: 1.5, ValueError),
    ("guidance_rescale", lambda v: -0.1, ValueError),
]


@pytest.mark.parametrize("name,make,exc", BAD, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(BAD)])
def test_bad_input_names_the_argument(name, make, exc):
    v = _valid()
    v[name] = make(v)
    with pytest.raises(exc, match=name):
        sampler_update(**v)
    # The native op checks too (its errors name the argument as well), for callers that bypass the wrapper.
    with pytest.raises((TypeError, ValueError, RuntimeError), match=name):
        torch.ops.velodiff.sampler_update(v["x"], v["cond"], v["uncond"], v["anchor"], v["noise"], v["history"],
                                          v["coef"], v["write_slot"], float(v["guidance_rescale"]), False)


def test_rescale_without_uncond_is_refused():
    v = _valid()
    v["uncond"], v["guidance_rescale"] = None, 0.5
    with pytest.raises(ValueError, match="uncond"):
        sampler_update(**v)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=st.integers(1, 4), dims=st.lists(st.integers(1, 9), min_size=0, max_size=3),
       k=st.integers(0, 8), dtype=st.sampled_from(DTYPES), data=st.data())
def test_random_valid_arguments(batch, dims, k, dtype, data):
    shape = (batch, *dims)
    write_slot = data.draw(st.integers(-1, k - 1)) if k else -1
    per_sample = 1
    for d in dims:
        per_sample *= d
    rescale = data.draw(st.sampled_from([0.0, 0.5])) if per_sample >= 2 else 0.0
    flags = data.draw(st.tuples(st.booleans(), st.booleans(), st.booleans()))
    uncond = flags[0] or rescale > 0
    check_against_reference("cpu", shape, dtype, k, write_slot, uncond, flags[1], flags[2], rescale, True,
                            seed=data.draw(st.integers(0, 2 ** 16)))


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(["x", "cond", "uncond", "anchor", "noise", "history", "coef"]),
       how=st.sampled_from(["dtype", "shape", "type"]))
def test_random_invalid_arguments(name, how):
    v = _valid()
    t = v[name]
    if how == "dtype":
        v[name] = t.to(torch.int32) if t.dtype != torch.int32 else t.float()
    elif how == "shape":
        v[name] = t.reshape(-1)[:-1].clone()
    else:
        v[name] = t.tolist()
    with pytest.raises((TypeError, ValueError), match=name):
        sampler_update(**v)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_every_half_precision_value_converts_exactly(device, dtype):
    """All 65536 bit patterns of the model dtype pass through D = cond, x_next = D unchanged (NaNs stay NaN)."""
    values = torch.arange(0, 65536, dtype=torch.int32).to(torch.int16).view(dtype).reshape(1, -1).to(device)
    coef = torch.zeros(ref.sampler_coef_count(0))
    coef[ref.COEF_PM], coef[ref.COEF_CD] = 1.0, 1.0
    x = torch.zeros(values.shape, device=device)
    out, _ = sampler_update(x, values.contiguous(), None, None, None, None, coef.to(device))
    expect = values.float()
    nan = torch.isnan(expect)
    assert torch.equal(out[~nan], expect[~nan])
    assert bool(torch.isnan(out[nan]).all())
