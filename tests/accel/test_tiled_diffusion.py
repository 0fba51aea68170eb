"""Tiled denoising (``multidiffusion``, ``fstd``): tile placement and coverage, the tiled evaluation against an
independent per-pixel average of a hand-made denoiser, the identity that makes averaging model outputs equal to
averaging per-view sampler updates, the plain result when one tile covers the latent, FSTD's per-step shifts (Heun,
split CFG), circular panoramas (decode equivariance and the seam), the digits / digits-dit pipelines, img2img, the
CLI, restore and bad input."""
import dataclasses
import math
import types

import numpy as np
import pytest
import torch
from torch import nn

import velodiff as vd
from velodiff.accel import FSTD, MultiDiffusion, optimize, parse_technique, restore
from velodiff.accel.highres import tiling as T
from velodiff.pipelines.base import BasePipeline
from velodiff.pipelines.context import DenoiseContext

from fixtures import quiet_pipeline, run_cli

U32 = 2.0 ** -24  # fp32 unit round-off


@pytest.fixture(scope="module")
def digits():
    return quiet_pipeline("digits")


# ----------------------------------------------------------------------------------------------------------------
# placement and coverage
# ----------------------------------------------------------------------------------------------------------------

def brute_counts(size, tile, tiles, circular):
    """[H, W] how many tiles cover each pixel, by plain loops (columns mod W when circular)."""
    counts = np.zeros(size, dtype=np.int64)
    for y0, x0 in tiles:
        for y in range(y0, y0 + tile[0]):
            for x in range(x0, x0 + tile[1]):
                assert 0 <= y < size[0] and (circular or 0 <= x < size[1]), (y0, x0)
                counts[y, x % size[1]] += 1
    return counts


def random_cases(n, seed):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        h, w = (int(v) for v in rng.integers(1, 40, size=2))
        t = int(rng.integers(1, 12))
        yield (h, w), t, int(rng.integers(1, t + 1)), bool(rng.integers(0, 2))


@pytest.mark.parametrize("size, t, stride, circular", list(random_cases(40, 0)) + [
    ((16, 16), 8, 1, False), ((8, 32), 8, 1, True), ((17, 23), 8, 8, False), ((16, 40), 8, 3, True)])
def test_multidiffusion_tiles_cover_every_pixel(size, t, stride, circular):
    tile = (min(t, size[0]), min(t, size[1]))
    rows = T.multidiffusion_starts(size[0], tile[0], stride)
    cols = T.multidiffusion_starts(size[1], tile[1], stride, circular)
    tiling = T.Tiling(size, tile, tuple(rows), tuple(cols), circular)
    counts = brute_counts(size, tile, tiling.tiles, circular)
    assert counts.min() >= 1
    weight = tiling.weight_sum(T.tile_weights("uniform", tile, torch.float64))
    assert torch.equal(weight, torch.from_numpy(counts).double())
    assert float(weight.sum()) == len(tiling.tiles) * tile[0] * tile[1]
    for starts, length, side, wraps in ((rows, size[0], tile[0], False), (cols, size[1], tile[1], circular)):
        assert starts[0] == 0 and all(0 < b - a <= stride for a, b in zip(starts, starts[1:]))
        if not wraps:  # the last tile ends at the edge
            assert starts[-1] == length - side
        elif side < length:
            assert all(s < length for s in starts) and length - starts[-1] <= stride


@pytest.mark.parametrize("size, t, _, circular", list(random_cases(40, 1)) + [((16, 16), 8, 0, False),
                                                                               ((8, 32), 8, 0, True)])
def test_fstd_tiles_cover_every_pixel_without_overlap_inside(size, t, _, circular):
    """Every offset: each pixel covered; non-circular on an axis at least two tiles long, at most two tiles per
    pixel and only within a tile of the edges (the clamped tiles); circular with tile | W, an exact partition of the
    columns."""
    tile = (min(t, size[0]), min(t, size[1]))
    for oy in range(tile[0]):
        for ox in range(tile[1]):
            rows = T.fstd_starts(size[0], tile[0], oy)
            cols = T.fstd_starts(size[1], tile[1], ox, circular)
            counts = brute_counts(size, tile, [(y, x) for y in rows for x in cols], circular)
            assert counts.min() >= 1
            assert len(rows) <= math.ceil(size[0] / tile[0]) + 1
            col_cover = brute_counts((1, size[1]), (1, tile[1]), [(0, x) for x in cols], circular)[0]
            if circular and size[1] % tile[1] == 0:
                assert (col_cover == 1).all()
            elif not circular and size[1] >= 2 * tile[1]:
                assert col_cover.max() <= 2
                inside = col_cover[tile[1]:size[1] - tile[1]]  # away from the two clamped edge tiles
                assert (inside == 1).all()
            # the grid lines sit at k * tile - offset inside the latent
            if not circular and size[1] >= 3 * tile[1]:
                assert (tile[1] - ox) % tile[1] in [c % tile[1] for c in cols[1:-1]]


def test_fstd_offsets_reproduce_and_vary():
    tile = (8, 8)
    seq = [T.fstd_offset(7, s, tile) for s in range(20)]
    assert seq == [T.fstd_offset(7, s, tile) for s in range(20)]
    assert all(0 <= o < 8 for pair in seq for o in pair)
    assert len(set(seq)) >= 8  # 20 draws from 64 cells: fewer than 8 distinct is p < 1e-6
    assert seq != [T.fstd_offset(8, s, tile) for s in range(20)]


def test_gaussian_weights_are_the_mixture_of_diffusers_profile():
    w = T.tile_weights("gaussian", (8, 6), torch.float64)
    i = torch.arange(8, dtype=torch.float64)
    gy = torch.exp(-(i - 3.5) ** 2 / (2 * 0.01 * 64))
    j = torch.arange(6, dtype=torch.float64)
    gx = torch.exp(-(j - 2.5) ** 2 / (2 * 0.01 * 36))
    assert torch.allclose(w, gy[:, None] * gx[None, :], rtol=1e-15, atol=0)
    assert torch.equal(w, w.flip(0).flip(1)) and float(w.min()) > 0


# ----------------------------------------------------------------------------------------------------------------
# the tiled evaluation against an independent average (a hand-made denoiser)
# ----------------------------------------------------------------------------------------------------------------

class HandMade(nn.Module):
    """A deterministic function of the tile that is not local: every output pixel depends on the tile's mean, on its
    position inside the tile, and on its batch row's conditioning (so rows mixed up between tiles would show)."""

    def __init__(self, sample_size=8):
        super().__init__()
        self.config = types.SimpleNamespace(sample_size=sample_size)
        self.calls = []

    def forward(self, sample, timestep, encoder_hidden_states, added_cond_kwargs=None):
        self.calls.append(tuple(sample.shape))
        h, w = sample.shape[-2:]
        ramp = torch.arange(w, dtype=sample.dtype)[None, None, None, :] / w
        ramp = ramp + torch.arange(h, dtype=sample.dtype)[None, None, :, None] ** 2 / h
        cond = encoder_hidden_states.mean(dim=(1, 2))[:, None, None, None]
        out = 2 * sample + sample.mean(dim=(2, 3), keepdim=True) * cond + ramp * cond
        out = out + timestep.view(-1, 1, 1, 1) * 1e-3
        if added_cond_kwargs is not None:
            out = out + added_cond_kwargs["text_embeds"].sum(1)[:, None, None, None]
        return out


def hand_pipe():
    vae = types.SimpleNamespace(decoder=nn.Conv2d(4, 4, 3, padding=1))  # for circular=True's decode
    return BasePipeline({"unet": HandMade(), "vae": vae}, torch.float64, "cpu")


def reference_average(fn, x, args, tiles, tile, weights):
    """sum_i W_i f(crop_i) / sum_i W_i per pixel, float64, with crops by torch.roll (independent of tiling.py)."""
    n, _, h, w = x.shape
    acc = torch.zeros(n, 4, h, w, dtype=torch.float64)
    norm = torch.zeros(h, w, dtype=torch.float64)
    for y0, x0 in tiles:
        crop = x.roll(-x0, dims=3)[:, :, y0:y0 + tile[0], :tile[1]]
        out = fn(crop, *args) * weights
        pad = torch.zeros(n, 4, h, w, dtype=torch.float64)
        pad[:, :, y0:y0 + tile[0], :tile[1]] = out
        acc += pad.roll(x0, dims=3)
        wpad = torch.zeros(h, w, dtype=torch.float64)
        wpad[y0:y0 + tile[0], :tile[1]] = weights
        norm += wpad.roll(x0, dims=0 + 1)
    return acc / norm


def call_in_context(pipe, args, kwargs, step=0, steps=4):
    context = DenoiseContext(sampler="ddim", call_steps=tuple(range(steps)))
    with pipe._context.open(context):
        context.advance(step, 500.0)
        return pipe.unet(*args, **kwargs)


@pytest.mark.parametrize("config, size", [
    (MultiDiffusion(stride=3), (12, 20)),
    (MultiDiffusion(stride=5, circular=True), (8, 21)),
    (MultiDiffusion(overlap=4, weights="gaussian", batch=3), (13, 19)),
    (FSTD(seed=3), (12, 20)),
    (FSTD(seed=1, circular=True, weights="uniform", batch=1), (16, 30)),
])
def test_tiled_evaluation_is_the_weighted_per_pixel_mean(config, size):
    g = torch.Generator().manual_seed(0)
    n = 3
    x = torch.randn(n, 4, *size, generator=g, dtype=torch.float64)
    ts = torch.full((n,), 321.0, dtype=torch.float64)
    ehs = torch.randn(n, 5, 6, generator=g, dtype=torch.float64)
    added = {"text_embeds": torch.randn(n, 2, generator=g, dtype=torch.float64)}
    pipe = hand_pipe()
    plain = pipe.unet.forward
    optimize(pipe, config)
    step = 2
    got = call_in_context(pipe, (x, ts, ehs), {"added_cond_kwargs": added}, step=step)
    calls = list(pipe.unet.calls)
    tile = (min(8, size[0]), min(8, size[1]))
    if isinstance(config, FSTD):
        oy, ox = T.fstd_offset(config.seed, step, tile)
        tiles = [(y, xx) for y in T.fstd_starts(size[0], tile[0], oy)
                 for xx in T.fstd_starts(size[1], tile[1], ox, config.circular)]
    else:
        stride = config.stride or tile[1] - config.overlap
        tiles = [(y, xx) for y in T.multidiffusion_starts(size[0], tile[0], stride)
                 for xx in T.multidiffusion_starts(size[1], tile[1], stride, config.circular)]
    weights = T.tile_weights(config.weights, tile, torch.float64)
    want = reference_average(lambda c, *a: plain(c, *a, added_cond_kwargs=added), x, (ts, ehs), tiles, tile, weights)
    assert got.dtype == torch.float64 and got.shape == x.shape
    # same terms, different summation order: a few float64 ulps of values ~ 10
    assert torch.allclose(got, want, rtol=0, atol=1e-12), float((got - want).abs().max())
    # every call but the last has `batch` tiles of n rows each
    assert all(c[0] == n * config.batch for c in calls[:-1]) and len(calls) == math.ceil(len(tiles) / config.batch)
    # not the plain evaluation: the hand-made denoiser is not local
    assert not torch.allclose(got, plain(x, ts, ehs, added_cond_kwargs=added), atol=1e-3)
    # outside a pipeline call the denoiser runs plain; restore puts the class forward back
    assert torch.equal(pipe.unet(x, ts, ehs, added_cond_kwargs=added), plain(x, ts, ehs, added_cond_kwargs=added))
    restore(pipe)
    assert "forward" not in vars(pipe.unet)


def test_uniform_weights_give_exactly_the_mean():
    """A denoiser whose output is the tile index: the tiled output is, pixel by pixel, the mean of the indices of
    the tiles covering it (small integers: exact in float64)."""
    size, tile, stride = (11, 14), (8, 8), 3
    tiles = [(y, x) for y in T.multidiffusion_starts(11, 8, stride) for x in T.multidiffusion_starts(14, 8, stride)]
    counter = iter(range(10 ** 6))

    def fn(sample, *args):
        k = sample.shape[0]
        return torch.tensor([float(next(counter)) for _ in range(k)], dtype=torch.float64).view(k, 1, 1, 1) \
            .expand(k, 4, *sample.shape[-2:])
    tiling = T.Tiling(size, tile, tuple(T.multidiffusion_starts(11, 8, stride)),
                      tuple(T.multidiffusion_starts(14, 8, stride)))
    got = T.tiled_forward(fn, torch.zeros(1, 4, *size, dtype=torch.float64), (), {}, tiling, "uniform", batch=4)
    want = np.zeros(size)
    for y in range(size[0]):
        for x in range(size[1]):
            covering = [i for i, (y0, x0) in enumerate(tiles) if y0 <= y < y0 + 8 and x0 <= x < x0 + 8]
            want[y, x] = sum(covering) / len(covering)
    assert np.array_equal(got[0, 0].numpy(), want)


# ----------------------------------------------------------------------------------------------------------------
# averaging model outputs == averaging per-view sampler updates (samplers affine in the model output)
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpmpp_2m"])
def test_averaged_eps_update_equals_averaged_per_view_updates(digits, sampler):
    from velodiff.sampling import run_plan
    name, plan = digits.make_plan(sampler, 10)
    first = type(plan)(name=plan.name, calls=plan.calls[:1], history_slots=plan.history_slots,
                       init_noise_scale=plan.init_noise_scale, output_scale=plan.output_scale, info=plan.info)
    g = torch.Generator().manual_seed(1)
    size, tile, stride = (12, 20), (8, 8), 3
    tiling = T.Tiling(size, tile, tuple(T.multidiffusion_starts(12, 8, stride)),
                      tuple(T.multidiffusion_starts(20, 8, stride)))
    x = torch.randn(2, 4, *size, generator=g) * plan.init_noise_scale
    eps = [torch.randn(2, 4, *tile, generator=g) for _ in tiling.tiles]
    # per view: the sampler's update of the view's crop with the view's eps, then the per-pixel mean (MultiDiffusion)
    acc = torch.zeros_like(x)
    for (y0, x0), e in zip(tiling.tiles, eps):
        view = run_plan(first, lambda _x, _t, e=e: e, x[:, :, y0:y0 + 8, x0:x0 + 8].contiguous())
        acc[:, :, y0:y0 + 8, x0:x0 + 8] += view
    counts = tiling.weight_sum(torch.ones(tile))
    per_view = acc / counts
    # ours: one update of the whole latent with the per-pixel mean of the views' eps
    stack = iter(eps)
    mean_eps = T.tiled_forward(lambda s: torch.cat([next(stack) for _ in range(s.shape[0] // 2)]), x, (), {},
                               tiling, "uniform", batch=1)
    ours = run_plan(first, lambda _x, _t: mean_eps, x)
    # both sides sum at most k = 9 views plus ~4 rounded terms per pixel, each below `scale` in magnitude
    k = int(counts.max())
    scale = float(x.abs().max() + torch.stack(eps).abs().max() + ours.abs().max())
    tol = 4 * (k + 4) * U32 * scale
    assert float((ours - per_view).abs().max()) <= tol
    assert float((ours - x).abs().max()) > 100 * tol  # the update moved x: the comparison is not vacuous


# ----------------------------------------------------------------------------------------------------------------
# the pipelines
# ----------------------------------------------------------------------------------------------------------------

def run(pipe, h, w, config=None, steps=3, n=2, seed=0, output_type="latent", **kw):
    """Latents (or images) of ``n`` prompts at h x w with ``config`` (one technique or a tuple) applied for the call."""
    configs = () if config is None else (config if isinstance(config, tuple) else (config,))
    optimize(pipe, *configs)
    try:
        out = pipe([f"a handwritten {d}" for d in range(n)], num_inference_steps=steps, height=h, width=w,
                   generator=[torch.Generator().manual_seed(seed + i) for i in range(n)], output_type=output_type,
                   **kw)
    finally:
        restore(pipe)
    return out.images


@pytest.mark.parametrize("config, size", [(MultiDiffusion(), (16, 16)), (MultiDiffusion(tile=64), (32, 48)),
                                          (FSTD(tile=32, circular=True), (16, 48))])
def test_one_tile_over_the_latent_is_plain_bit_for_bit(digits, config, size):
    """Tile = the native 8x8 latent at the native 16x16 image, or a tile larger than the latent (clamped): one tile,
    the plain forward: equal bit for bit (the latents, before the decode)."""
    assert torch.equal(run(digits, *size, config, n=1), run(digits, *size, n=1))


def test_fstd_one_shift_per_step_under_heun_and_split_cfg(digits, monkeypatch):
    seen = []
    real = T.fstd_offset

    def spy(seed, step, tile):
        c = digits.denoise_context
        offset = real(seed, step, tile)
        seen.append((c.call_index, c.cfg_branch, step, c.step, offset))
        return offset
    monkeypatch.setattr(T, "fstd_offset", spy)
    steps, split = 3, vd.accel.SplitCFG()
    first = run(digits, 16, 24, (split, FSTD(seed=5)), steps=steps, n=1, sampler="heun")
    calls = list(seen)
    seen.clear()
    again = run(digits, 16, 24, (split, FSTD(seed=5)), steps=steps, n=1, sampler="heun")
    assert torch.equal(first, again) and seen == calls
    _, plan = digits.make_plan("heun", steps)
    # every denoiser call (two per evaluation under split CFG) asked for the shift of the plan's step
    assert all(step == ctx_step == plan.call_steps[i] for i, _, step, ctx_step, _ in calls)
    assert sorted({(i, b) for i, b, _, _, _ in calls}) == [(i, b) for i in range(len(plan.calls))
                                                            for b in ("cond", "uncond")]
    per_step, offsets = {}, {}
    for i, _, step, _, offset in calls:
        per_step.setdefault(step, set()).add(i)
        offsets.setdefault(step, set()).add(offset)
    assert len(per_step) == steps and max(len(v) for v in per_step.values()) == 2  # Heun's two evaluations
    # one shift per step for all of its calls, and the shifts move from step to step
    assert all(len(v) == 1 for v in offsets.values()) and len(set.union(*offsets.values())) > 1


def test_multidiffusion_dit_and_img2img(digits):
    dit = quiet_pipeline("digits-dit")
    calls, plain = [], dit.transformer.forward

    def spy(sample, *args, **kwargs):  # under the technique's forward: sees the tile batches
        calls.append(tuple(sample.shape))
        return plain(sample, *args, **kwargs)
    dit.transformer.forward = spy
    optimize(dit, MultiDiffusion(stride=4))
    try:
        out = dit([3, 5], num_inference_steps=2, height=32, width=32, output_type="latent",
                  generator=torch.Generator().manual_seed(0)).images
    finally:
        restore(dit)
        del dit.transformer.forward
    # 16x16 latent, 8x8 tiles every 4: 3 x 3 tiles, batch 8 -> calls of 8 and 1 tiles x 4 rows (CFG)
    assert out.shape == (2, 4, 16, 16) and bool(torch.isfinite(out).all())
    assert calls[:2] == [(32, 4, 8, 8), (4, 4, 8, 8)]
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    got = run(digits, 32, 32, MultiDiffusion(stride=4), steps=4, n=1, image=image, strength=0.5)
    plain = run(digits, 32, 32, None, steps=4, n=1, image=image, strength=0.5)
    assert got.shape == plain.shape == (1, 4, 16, 16) and not torch.equal(got, plain)


@pytest.mark.parametrize("kind", ["sdxl", "pixart"])
def test_side_by_side_tiles_of_real_denoisers_are_their_plain_halves(kind, tmp_path):
    """SDXL's UNet (added_cond_kwargs text_embeds / time_ids) and PixArt's transformer (encoder_attention_mask):
    with stride = tile on a latent two tiles wide, the tiled evaluation is the plain denoiser on each half, every
    per-row argument repeated to the tiles' rows. Equal up to the GEMMs' round-off at another batch size."""
    from fixtures import saved_and_loaded, tiny_pixart_pipeline, tiny_sd_pipeline
    _, pipe, _ = saved_and_loaded(tiny_sd_pipeline("sdxl") if kind == "sdxl" else tiny_pixart_pipeline(), str(tmp_path))
    g = torch.Generator().manual_seed(0)
    if kind == "sdxl":
        t = pipe.unet.config.sample_size
        x = torch.randn(2, 4, t, 2 * t, generator=g)
        args = (torch.tensor([400.0, 700.0]), torch.randn(2, 7, pipe.unet.config.cross_attention_dim, generator=g))
        kwargs = {"added_cond_kwargs": {"text_embeds": torch.randn(2, 32, generator=g),
                                        "time_ids": torch.tensor([[16.0, 32, 0, 0, 16, 32], [16, 32, 0, 0, 32, 16]])}}
        denoiser = pipe.unet
    else:
        t = pipe.transformer.config.sample_size
        x = torch.randn(2, 4, t, 2 * t, generator=g)
        args = (torch.randn(2, 6, pipe.transformer.config.caption_channels, generator=g), torch.tensor([400.0, 700.0]))
        kwargs = {"encoder_attention_mask": torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]])}
        denoiser = pipe.transformer
    with torch.no_grad():
        halves = torch.cat([denoiser(x[..., :t], *args, **kwargs), denoiser(x[..., t:], *args, **kwargs)], dim=3)
        optimize(pipe, MultiDiffusion(stride=t))
        try:
            context = DenoiseContext(sampler="ddim", call_steps=(0,))
            with pipe._context.open(context):
                context.advance(0, 500.0)
                got = denoiser(x, *args, **kwargs)
        finally:
            restore(pipe)
    assert got.shape == halves.shape
    assert torch.allclose(got, halves, rtol=1e-4, atol=1e-5), float((got - halves).abs().max())
    assert not torch.allclose(got, denoiser(x, *args, **kwargs), rtol=1e-2, atol=1e-2)  # not the untiled call


# ----------------------------------------------------------------------------------------------------------------
# circular panoramas
# ----------------------------------------------------------------------------------------------------------------

def test_circular_decode_is_shift_equivariant(digits):
    """With the decoder's convs padded circularly along x, decoding commutes with rolling the latent by s columns
    (the image rolls by s * f): convs, nearest upsampling, GroupNorm and the mid-block attention are all equivariant
    then. Without it, the zero padding breaks that at the edges."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 4, 8, 24, generator=g)
    f, s = digits.vae_scale_factor, 5

    def decode(latents):
        with torch.no_grad():
            return digits.vae.decode(digits.vae.latents_to_vae(latents))
    plain_gap = float((decode(z.roll(s, 3)) - decode(z).roll(s * f, 3)).abs().max())
    optimize(digits, FSTD(circular=True))
    try:
        a, b = decode(z.roll(s, 3)), decode(z).roll(s * f, 3)
    finally:
        restore(digits)
    assert not any("forward" in vars(m) for m in digits.vae.decoder.modules())
    # float reassociation only (GroupNorm / attention sums in another order): fp32 round-off of values ~ 1
    assert float((a - b).abs().max()) < 1e-4 < 0.1 < plain_gap


@pytest.mark.parametrize("config", [FSTD(seed=1), MultiDiffusion(stride=4)])
def test_circular_pipeline_is_roll_equivariant(digits, config):
    """A circular panorama has no special column: rolling the initial noise by 8 latent columns (a multiple of the
    stride and the tile, so the tiling maps onto itself) rolls the image by 8 * f pixels, up to float reassociation
    (the tiles reach the denoiser in another order). Without circular, the edges differ completely."""
    z = torch.randn(1, 4, 8, 32, generator=torch.Generator().manual_seed(0))
    f = digits.vae_scale_factor

    def gap(cfg):
        images = []
        for latents in (z, z.roll(8, 3)):
            optimize(digits, cfg)
            try:
                images.append(digits(["a handwritten 5"], num_inference_steps=4, height=16, width=64, latents=latents,
                                     output_type="pt").images)
            finally:
                restore(digits)
        return float((images[1] - images[0].roll(8 * f, 3)).abs().max())
    # measured 2.4e-7: fp32 round-off of pixel values in [0, 1], through 4 steps and the decode
    assert gap(dataclasses.replace(config, circular=True)) < 1e-4
    assert gap(config) > 0.1


@pytest.mark.parametrize("config", [FSTD(seed=1), MultiDiffusion(stride=4)])
def test_circular_panorama_seam_is_like_an_inner_column(digits, config):
    """16x64 panoramas, 6 images: the difference between the image's last and first columns (the seam, which crosses
    a latent pixel boundary) against the sample of differences across the inner latent pixel boundaries (columns
    2k+1 | 2k+2). With circular, the seam is within a factor 3 of the sample's median (measured: 0.65-1.2 x);
    without, it is below a third of it (the edges are the model's dark margins: measured 0.02-0.14 x)."""
    def seam_over_median(circular):
        img = run(digits, 16, 64, dataclasses.replace(config, circular=circular), steps=5, n=6, output_type="pt")
        f = digits.vae_scale_factor
        boundaries = (img[..., f::f] - img[..., f - 1:-1:f]).abs().mean(dim=(0, 1, 2))[2:-2]
        seam = (img[..., 0] - img[..., -1]).abs().mean()
        return float(seam / boundaries.median())
    assert 1 / 3 <= seam_over_median(True) <= 3
    assert seam_over_median(False) < 1 / 3


# ----------------------------------------------------------------------------------------------------------------
# the command line, bad input, combinations
# ----------------------------------------------------------------------------------------------------------------

def test_cli_generates_a_panorama(tmp_path, capsys):
    code, out, err = run_cli(["generate", "--model", "digits", "--prompt", "a handwritten 3", "--height", "32",
                              "--width", "64", "--steps", "1",
                              "--optimize", "multidiffusion:batch=64", "--outdir", str(tmp_path)], capsys)
    assert code == 0, err
    from PIL import Image
    assert Image.open(tmp_path / "000.png").size == (64, 32)


@pytest.mark.parametrize("spec, words", [
    ("multidiffusion:stride=0", ["--optimize multidiffusion:stride=0", "stride must be an integer >= 1"]),
    ("multidiffusion:tile=4,stride=6", ["stride=6 is larger than tile=4", "gaps"]),
    ("multidiffusion:tile=4,overlap=4", ["tile=4 is smaller than the overlap"]),
    ("multidiffusion:stride=9", ["--optimize multidiffusion:stride=9", "stride=9 is larger than tile=8"]),
    ("fstd:tile=0", ["tile must be an integer >= 1"]),
    ("fstd:seed=x", ["seed='x' is not a valid int"]),
])
def test_cli_bad_values_are_one_line(tmp_path, capsys, spec, words):
    code, out, err = run_cli(["generate", "--model", "digits", "--prompt", "a 3", "--steps", "1", "--optimize", spec,
                              "--outdir", str(tmp_path)], capsys)
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert all(w in err for w in words), err


@pytest.mark.parametrize("kwargs, field", [
    (dict(tile=0), "tile"), (dict(tile=-3), "tile"), (dict(tile=True), "tile"), (dict(tile=2.5), "tile"),
    (dict(stride=0), "stride"), (dict(tile=4, stride=5), "stride"), (dict(overlap=-1), "overlap"),
    (dict(tile=4, overlap=4), "overlap"), (dict(tile=4, overlap=9), "overlap"), (dict(stride=2, overlap=1), "overlap"),
    (dict(batch=0), "batch"), (dict(circular="yes"), "circular"), (dict(weights="cosine"), "weights"),
])
def test_multidiffusion_bad_fields(kwargs, field):
    with pytest.raises(ValueError, match=field):
        MultiDiffusion(**kwargs)


@pytest.mark.parametrize("kwargs, field", [(dict(seed=-1), "seed"), (dict(tile=0), "tile"), (dict(batch=1.5), "batch"),
                                           (dict(weights="box"), "weights")])
def test_fstd_bad_fields(kwargs, field):
    with pytest.raises(ValueError, match=field):
        FSTD(**kwargs)


def test_fitting_and_combinations(digits):
    dit = quiet_pipeline("digits-dit")
    with pytest.raises(ValueError, match="tile=7 must be a multiple of the transformer's patch size 2"):
        optimize(dit, MultiDiffusion(tile=7, stride=1))
    with pytest.raises(ValueError, match="stride=9 is larger than tile=8"):
        optimize(digits, MultiDiffusion(stride=9))  # against the native tile
    with pytest.raises(ValueError, match="overlap"):
        optimize(digits, MultiDiffusion(overlap=8))
    with pytest.raises(ValueError, match="both tiled_diffusion techniques"):
        optimize(digits, MultiDiffusion(), FSTD())
    # caches and tiled_vae (with circular): refused in either order, in one optimize call or two
    for first, second, words in ((parse_technique("deepcache"), MultiDiffusion(), "the cache keys its features"),
                                 (FSTD(), parse_technique("teacache"), "the cache keys its features"),
                                 (parse_technique("tiled_vae:tile_size=16"), FSTD(circular=True), "would not wrap"),
                                 (MultiDiffusion(circular=True), parse_technique("tiled_vae"), "would not wrap")):
        for together in (True, False):
            match = f"{second.name} and {first.name} cannot be applied together: .*{words}"
            with pytest.raises(ValueError, match=match):
                optimize(digits, first, second) if together else optimize(optimize(digits, first), second)
            assert digits._applied == ([] if together else [first])
            restore(digits)
    optimize(digits, parse_technique("tiled_vae:decode=false"), FSTD(circular=True))  # encode-only tiled_vae: fine
    restore(digits)
    assert "forward" not in vars(digits.unet)
    with pytest.raises(ValueError, match="no UNet or transformer"):
        optimize(types.SimpleNamespace(_restore_hooks=[], _applied=[]), MultiDiffusion())
