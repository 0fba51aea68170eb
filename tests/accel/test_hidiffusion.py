"""HiDiffusion (``hidiffusion``): MSW-MSA's windowed attention against an independent implementation, the RAU-Net
switch at the planned step (every sampler, Heun's two evaluations, split CFG), any size, img2img, state scoped to
one call, restore, tiny SD / SDXL pipelines, bad input."""
import math

import pytest
import torch
import torch.nn.functional as F

from velodiff.accel.highres.msw_msa import shift_for, window_attention

from fixtures import quiet_pipeline


def plain_window_attention(q, k, v, size, grid, shift):
    """An independent MSW-MSA: roll the [B, H, h, w, D] map by -shift (torch.roll), cut it into windows of
    ceil(h/gh) x ceil(w/gw) tokens (the last row / column of windows smaller when the grid does not divide the map),
    SDPA on each window's real tokens alone, put every window back and roll by +shift."""
    b, heads, n, d = q.shape
    h, w = size
    wh, ww = math.ceil(h / grid[0]), math.ceil(w / grid[1])
    maps = [t.reshape(b, heads, h, w, t.shape[-1]).roll((-shift[0], -shift[1]), dims=(2, 3)) for t in (q, k, v)]
    out = torch.empty(b, heads, h, w, v.shape[-1], dtype=q.dtype)
    for y0 in range(0, h, wh):
        for x0 in range(0, w, ww):
            qw, kw, vw = (m[:, :, y0:y0 + wh, x0:x0 + ww].reshape(b, heads, -1, m.shape[-1]) for m in maps)
            ys, xs = min(wh, h - y0), min(ww, w - x0)
            out[:, :, y0:y0 + ys, x0:x0 + xs] = F.scaled_dot_product_attention(qw, kw, vw).view(b, heads, ys, xs, -1)
    return out.roll((shift[0], shift[1]), dims=(2, 3)).reshape(b, heads, n, -1)


def qkv(b, heads, n, d, dtype, seed=0, dv=None):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, heads, n, dv if (dv and i == 2) else d, generator=g).to(dtype) for i in range(3)]


# square, non-square, and sizes the 2x2 grid does not divide; odd grids; grids finer than the map
SIZES_GRIDS = [((8, 8), (2, 2)), ((6, 10), (2, 2)), ((7, 9), (2, 2)), ((5, 5), (2, 2)), ((16, 12), (2, 2)),
               ((9, 7), (3, 2)), ((4, 6), (4, 4)), ((1, 7), (2, 2)), ((3, 3), (5, 1))]


@pytest.mark.parametrize("size, grid", SIZES_GRIDS)
@pytest.mark.parametrize("k_shift", range(4))
def test_window_attention_matches_roll_partition_reverse(size, grid, k_shift):
    q, k, v = qkv(2, 3, size[0] * size[1], 8, torch.float64, seed=k_shift)
    shift = shift_for(k_shift, size, grid)
    got = window_attention(q, k, v, size, grid, shift)
    want = plain_window_attention(q, k, v, size, grid, shift)
    assert torch.allclose(got, want, rtol=0, atol=1e-12), (got - want).abs().max()


@pytest.mark.parametrize("shift", [(3, 1), (-2, 11), (0, 0)])
def test_any_shift_is_cyclic(shift):
    """Shifts beyond the map wrap around (mod h, w); a shift of a whole period changes nothing."""
    size, grid = (6, 5), (2, 2)
    q, k, v = qkv(1, 2, 30, 4, torch.float64)
    got = window_attention(q, k, v, size, grid, shift)
    assert torch.allclose(got, plain_window_attention(q, k, v, size, grid, (shift[0] % 6, shift[1] % 5)),
                          rtol=0, atol=1e-12)
    assert torch.equal(got, window_attention(q, k, v, size, grid, (shift[0] + 6, shift[1] - 10)))


@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("size", [(8, 8), (6, 10), (7, 9)])
def test_window_attention_dtypes(dtype, rtol, size):
    """fp32 / bf16 inputs against the float64 reference (relative Frobenius error, the blueprint's bounds); v may
    have its own head dim."""
    q, k, v = qkv(2, 2, size[0] * size[1], 16, torch.float64, dv=12)
    shift = shift_for(1, size, (2, 2))
    want = plain_window_attention(q, k, v, size, (2, 2), shift)
    got = window_attention(q.to(dtype), k.to(dtype), v.to(dtype), size, (2, 2), shift)
    assert got.dtype == dtype and got.shape == want.shape
    assert float((got.double() - want).norm() / want.norm()) < rtol


@pytest.mark.parametrize("size", [(8, 8), (6, 10), (7, 9)])
def test_one_window_is_global_attention(size):
    q, k, v = qkv(2, 4, size[0] * size[1], 8, torch.float32)
    want = F.scaled_dot_product_attention(q, k, v)
    for shift in ((0, 0), (3, 2)):
        got = window_attention(q, k, v, size, (1, 1), shift)
        assert float((got - want).norm() / want.norm()) < 1e-6


def test_windows_are_local():
    """A change in one token reaches the tokens of its window only (a 2x2 grid, no shift, on 6x8)."""
    q, k, v = qkv(1, 1, 48, 4, torch.float64)
    base = window_attention(q, k, v, (6, 8), (2, 2), (0, 0))
    v2 = v.clone()
    v2[0, 0, 0] += 1.0  # token (0, 0): window rows 0-2, columns 0-3
    changed = (window_attention(q, k, v2, (6, 8), (2, 2), (0, 0)) - base).abs().sum(-1)[0, 0].view(6, 8) > 0
    expected = torch.zeros(6, 8, dtype=torch.bool)
    expected[:3, :4] = True
    assert torch.equal(changed, expected)


@pytest.mark.parametrize("kwargs, message", [
    (dict(size=(5, 5)), "h \\* w = L"),
    (dict(size=(0, 36)), "positive"),
    (dict(size=8), "size must be a pair"),
    (dict(grid=(0, 2)), "grid must have at least one window"),
    (dict(grid=(2.0, 2)), "grid must be a pair of integers"),
    (dict(shift=(1,)), "shift must be a pair"),
])
def test_window_attention_bad_input(kwargs, message):
    q, k, v = qkv(1, 2, 36, 4, torch.float32)
    args = dict(size=(6, 6), grid=(2, 2), shift=(0, 0))
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        window_attention(q, k, v, **args)


def test_window_attention_bad_tensors():
    q, k, v = qkv(1, 2, 36, 4, torch.float32)
    with pytest.raises(ValueError, match="q, k and v must share"):
        window_attention(q, k[:, :, :30], v, (6, 6))
    with pytest.raises(ValueError, match="q must be a \\[B, H, L, D\\] tensor"):
        window_attention(q[0], k, v, (6, 6))


# ------------------------------------------------------------------------------------------------------------------
# the technique on pipelines
# ------------------------------------------------------------------------------------------------------------------

import velodiff as vd  # noqa: E402
from velodiff.accel import parse_technique  # noqa: E402
from velodiff.accel.highres.hidiffusion import HiDiffusion  # noqa: E402
from velodiff.accel.highres.raunet import CONV, POOL, raunet_phase  # noqa: E402
from velodiff.sampling import SAMPLERS  # noqa: E402

SD_SAMPLERS = sorted(s for s in SAMPLERS if s != "flow_euler")


@pytest.fixture(scope="module")
def pipe():
    return quiet_pipeline("digits")


def generate(pipe, steps=4, sampler="dpmpp_2m", prompts=("a 3", "a 7"), seed=0, size=(32, 32), **kw):
    gens = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    return pipe(list(prompts), num_inference_steps=steps, sampler=sampler, generator=gens, output_type="pt",
                height=size[0], width=size[1], **kw).images


def with_technique(pipe, config, **kw):
    vd.optimize(pipe, config)
    try:
        return generate(pipe, **kw)
    finally:
        vd.restore(pipe)


def test_schedule_closed_form():
    """T1 = floor(fraction * n): 20 steps at 0.4 -> steps 0..7; SDXL's aggressive pool: conv below floor(0.16 * n)."""
    assert [raunet_phase(s, 20, 0.4, CONV) for s in range(20)] == [CONV] * 8 + [None] * 12
    assert [raunet_phase(s, 20, 0.4, POOL, 0.16) for s in range(20)] == [CONV] * 3 + [POOL] * 5 + [None] * 12
    assert [raunet_phase(s, 20, 0.4, POOL, 0.16, has_conv=False) for s in range(20)] == [POOL] * 8 + [None] * 12
    assert [raunet_phase(s, 5, 0.0, CONV) for s in range(5)] == [None] * 5
    assert [raunet_phase(s, 5, 1.0, CONV) for s in range(5)] == [CONV] * 5


@pytest.mark.parametrize("size", [(32, 32), (24, 40)])
def test_inactive_settings_are_bit_identical(pipe, size):
    """fraction 0 and MSW-MSA off: the RAU-Net hooks are installed but never switch: the plain images, bit for
    bit."""
    plain = generate(pipe, size=size)
    got = with_technique(pipe, HiDiffusion(fraction=0.0, aggressive_fraction=0.0, msw_msa=False), size=size)
    assert torch.equal(got, plain)


def spy_downsampler(pipe):
    """Record (step, CFG branch, output width) of every call of the level-0 downsampler, and the plan's call steps."""
    seen, plan = [], []

    def hook(module, args, out):
        context = pipe.denoise_context
        plan[:] = context.call_steps
        seen.append((context.step, context.cfg_branch, out.shape[-1]))
    return seen, plan, pipe.unet.down_blocks[0].downsamplers[0].register_forward_hook(hook)


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "heun"])
@pytest.mark.parametrize("split", [False, True])
def test_raunet_switches_at_the_planned_step(pipe, sampler, split):
    """digits at 32x32 (latent 16): the level-0 downsampler outputs ceil(16 / 4) = 4 columns for steps < floor(0.5 *
    5) = 2, then 8 (stride 2); every evaluation of the plan (Heun: two per step but the last) and both calls of
    split CFG see their step's switch."""
    configs = [HiDiffusion(fraction=0.5)] + ([vd.accel.SplitCFG()] if split else [])
    vd.optimize(pipe, *configs)
    seen, plan, handle = spy_downsampler(pipe)
    try:
        generate(pipe, steps=5, sampler=sampler)
    finally:
        handle.remove()
        vd.restore(pipe)
    per_call = 2 if split else 1
    assert [s for s, _, _ in seen] == [s for s in plan for _ in range(per_call)]
    assert [w for _, _, w in seen] == [4 if s < 2 else 8 for s, _, _ in seen]
    if sampler == "heun":
        assert len(plan) == 9 and plan[:4] == [0, 0, 1, 1]
    if split:
        assert [b for _, b, _ in seen] == ["cond", "uncond"] * len(plan)


@pytest.mark.parametrize("sampler", SD_SAMPLERS)
@pytest.mark.parametrize("size", [(32, 32), (24, 40)])
def test_every_sampler_any_size(pipe, sampler, size):
    """Every sampler at 32x32 and at the non-square 24x40 (latent 12x20: windows of 6x10, RD to 3x5): finite
    images of the asked size that differ from the plain ones."""
    got = with_technique(pipe, HiDiffusion(), sampler=sampler, size=size, steps=3)
    assert got.shape == (2, 3, *size) and torch.isfinite(got).all()
    assert not torch.equal(got, generate(pipe, sampler=sampler, size=size, steps=3))


@pytest.mark.parametrize("size", [(40, 40), (48, 24), (56, 40)])
def test_sizes_the_grid_does_not_divide(pipe, size):
    """Latents 20x20, 24x12 and 28x20: odd window counts per level, RD to ceil(H / 4), windows padded."""
    got = with_technique(pipe, HiDiffusion(fraction=1.0), size=size, steps=2)
    assert got.shape == (2, 3, *size) and torch.isfinite(got).all()


def test_two_calls_are_two_fresh_calls(pipe):
    """Nothing survives a call: two calls in a row give what each gives on a fresh pipeline (same seeds), and the
    shift seed decides the images."""
    vd.optimize(pipe, HiDiffusion(fraction=0.5))
    try:
        first, second = generate(pipe), generate(pipe)
        third = generate(pipe, sampler="euler", steps=3)
    finally:
        vd.restore(pipe)
    assert torch.equal(first, second)
    assert torch.equal(third, with_technique(pipe, HiDiffusion(fraction=0.5), sampler="euler", steps=3))
    assert not torch.equal(first, with_technique(pipe, HiDiffusion(fraction=0.5, seed=1)))


def test_restore_gives_back_the_plain_pipeline(pipe):
    before = generate(pipe)
    unet = pipe.unet
    assert not any("forward" in vars(m) or "layer" in vars(m) for m in unet.modules()) and "prepare" not in vars(unet)
    with_technique(pipe, HiDiffusion(raunet="pool"))
    assert not any("forward" in vars(m) or "layer" in vars(m) for m in unet.modules()) and "prepare" not in vars(unet)
    assert torch.equal(generate(pipe), before)


def test_direct_unet_calls_are_plain(pipe):
    """Outside a pipeline call the UNet is the plain UNet (no context: no switch, no windows)."""
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 7, 64, generator=g)
    plain = pipe.unet(x, 500.0, ctx)
    vd.optimize(pipe, HiDiffusion(fraction=1.0))
    try:
        assert torch.equal(pipe.unet(x, 500.0, ctx), plain)
    finally:
        vd.restore(pipe)


@pytest.mark.parametrize("guidance", [None, 0.0])
def test_img2img_and_unguided(pipe, guidance):
    image = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    kw = dict(image=image, strength=0.6, steps=5) if guidance is None else dict(guidance_scale=guidance)
    got = with_technique(pipe, HiDiffusion(fraction=0.5), **kw)
    assert got.shape == (2, 3, 32, 32) and torch.isfinite(got).all()
    assert not torch.equal(got, generate(pipe, **kw))


def test_pool_variant_on_digits(pipe):
    got = with_technique(pipe, HiDiffusion(raunet="pool", fraction=1.0), size=(24, 40))
    assert got.shape == (2, 3, 24, 40) and torch.isfinite(got).all()


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("kind", ["sd15", "sd2", "sdxl"])
def test_tiny_sd_and_sdxl_at_twice_their_size(kind, tmp_path):
    """The tiny diffusers fixtures (first attention level 1, no downsampler there: the pool variant, as SDXL) at 2x
    their native 32 px, square and non-square; the default setting changes the images, the inactive one does not."""
    from fixtures import saved_and_loaded, tiny_sd_pipeline
    _, ours, _ = saved_and_loaded(tiny_sd_pipeline(kind), str(tmp_path / kind))

    def run(size, config=None):
        if config is not None:
            vd.optimize(ours, config)
        try:
            return ours("a cat", num_inference_steps=3, height=size[0], width=size[1], output_type="pt",
                        generator=torch.Generator().manual_seed(0)).images
        finally:
            vd.restore(ours)
    for size in ((64, 64), (48, 80)):
        plain = run(size)
        got = run(size, HiDiffusion(fraction=1.0))
        assert got.shape == plain.shape and torch.isfinite(got).all() and not torch.equal(got, plain)
        assert torch.equal(run(size, HiDiffusion(fraction=0.0, msw_msa=False)), plain)


def test_dit_pipelines_are_refused():
    pipe = vd.Pipeline.from_pretrained("digits-dit")
    with pytest.raises(ValueError, match="hidiffusion fits UNet pipelines.*transformer"):
        vd.optimize(pipe, HiDiffusion())


@pytest.mark.parametrize("kwargs, field", [
    (dict(fraction=1.5), "fraction"), (dict(fraction=-0.1), "fraction"), (dict(fraction=float("nan")), "fraction"),
    (dict(fraction=True), "fraction"), (dict(aggressive_fraction=2.0), "aggressive_fraction"),
    (dict(raunet="dilated"), "raunet"), (dict(window_grid=(0, 2)), "window_grid"),
    (dict(window_grid=(2,)), "window_grid"), (dict(window_grid=(2, 2.5)), "window_grid"),
    (dict(msw_msa="yes"), "msw_msa"), (dict(seed=-1), "seed"),
])
def test_bad_fields_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"hidiffusion: {field} must"):
        HiDiffusion(**kwargs)


def test_specs_from_the_command_line():
    assert parse_technique("hidiffusion") == HiDiffusion()
    assert parse_technique("hidiffusion:fraction=0.6,window_grid=3/2,msw_msa=off") == \
        HiDiffusion(fraction=0.6, window_grid=(3, 2), msw_msa=False)
    with pytest.raises(ValueError, match="window_grid must be two integers"):
        parse_technique("hidiffusion:window_grid=0/2")


# ----------------------------------------------------------------------------------------------------------------
# the folder's settings, the pooled downsampler and re-dilation (what digits needs: README "High resolution")
# ----------------------------------------------------------------------------------------------------------------

def test_fields_left_unset_take_the_folder_then_the_reference(pipe):
    """digits' model_index.json sets fraction 1.0, pooled, redilate; a field given wins; a folder without the key
    gets the reference's 0.4 / dilated / no re-dilation."""
    assert HiDiffusion().resolved(pipe) == {"fraction": 1.0, "downsample": "pooled", "redilate": True}
    assert HiDiffusion(fraction=0.4, redilate=False).resolved(pipe) == \
        {"fraction": 0.4, "downsample": "pooled", "redilate": False}
    saved = pipe.defaults
    try:
        pipe.defaults = {}
        assert HiDiffusion().resolved(pipe) == {"fraction": 0.4, "downsample": "dilated", "redilate": False}
        pipe.defaults = {"hidiffusion": {"fraction": 2.0}}
        with pytest.raises(ValueError, match="_velodiff_defaults: hidiffusion: fraction must"):
            vd.optimize(pipe, HiDiffusion())
        pipe.defaults = {"hidiffusion": {"fractoin": 0.5}}
        with pytest.raises(ValueError, match=r"unknown keys \['fractoin'\]"):
            vd.optimize(pipe, HiDiffusion())
    finally:
        pipe.defaults = saved


def test_pooled_downsampler_is_the_native_conv_on_the_pooled_map(pipe):
    """downsample=pooled: the level-0 downsampler's output during the switch equals the native stride-2 conv on the
    2x2-averaged map (odd sizes: ceil mode); dilated: the reference's stride-4, dilation-2 conv."""
    conv = pipe.unet.down_blocks[0].downsamplers[0].conv
    seen = []
    handle = pipe.unet.down_blocks[0].downsamplers[0].register_forward_hook(
        lambda m, args, out: seen.append((args[0], out)) if pipe.denoise_context.step == 0 else None)
    try:
        for downsample in ("pooled", "dilated"):
            seen.clear()
            with_technique(pipe, HiDiffusion(downsample=downsample, redilate=False), steps=2, size=(24, 40))
            x, out = seen[0]
            if downsample == "pooled":
                expected = F.conv2d(F.avg_pool2d(x, 2, ceil_mode=True), conv.weight, conv.bias, stride=2, padding=1)
            else:
                expected = F.conv2d(x, conv.weight, conv.bias, stride=4, padding=2, dilation=2)
            assert out.shape[-2:] == (3, 5)
            torch.testing.assert_close(out, expected, rtol=0, atol=0)
    finally:
        handle.remove()


def test_redilation_factor_and_the_convs_it_touches(pipe):
    from velodiff.accel.highres.raunet import full_resolution_convs, redilation_factor
    assert [redilation_factor(s, (8, 8)) for s in [(8, 8), (16, 16), (12, 40), (24, 24), (32, 32), (9, 8)]] == \
        [1, 2, 2, 3, 4, 1]
    names = {id(m): n for n, m in pipe.unet.named_modules()}
    got = sorted(names[id(c)] for c in full_resolution_convs(pipe.unet, 0))
    expected = sorted(["conv_in", "conv_out", "up_blocks.0.upsamplers.0.conv"]
                      + [f"down_blocks.0.resnets.0.conv{i}" for i in (1, 2)]
                      + [f"up_blocks.1.resnets.{j}.conv{i}" for j in (0, 1) for i in (1, 2)])
    assert got == expected


def test_redilated_conv_runs_the_native_conv_on_each_sublattice(pipe):
    """At twice the size a conv with dilation 2 is the plain conv applied to each of the four interleaved
    sub-lattices (x[..., a::2, b::2]): checked on conv_in's output during the switch, and plain after it."""
    seen = []
    handle = pipe.unet.conv_in.register_forward_hook(
        lambda m, args, out: seen.append((pipe.denoise_context.step, args[0], out)))
    try:
        with_technique(pipe, HiDiffusion(fraction=0.5), steps=4, size=(32, 32))
    finally:
        handle.remove()
    conv = pipe.unet.conv_in
    for step, x, out in seen:
        if step < 2:
            for a in (0, 1):
                for b in (0, 1):
                    torch.testing.assert_close(out[..., a::2, b::2], conv._conv_forward(x[..., a::2, b::2],
                                               conv.weight, conv.bias), rtol=0, atol=1e-5)
        else:
            torch.testing.assert_close(out, F.conv2d(x, conv.weight, conv.bias, padding=1), rtol=0, atol=0)
    assert {s for s, _, _ in seen} == {0, 1, 2, 3}


def test_bad_new_fields_name_the_field():
    with pytest.raises(ValueError, match="hidiffusion: downsample must be one of dilated, pooled"):
        HiDiffusion(downsample="strided")
    with pytest.raises(ValueError, match="hidiffusion: redilate must be True or False"):
        HiDiffusion(redilate="yes")
    assert parse_technique("hidiffusion:downsample=pooled,redilate=on,fraction=1") == \
        HiDiffusion(downsample="pooled", redilate=True, fraction=1.0)


#: README "High resolution": hidiffusion with digits' settings at 32x32, accuracy by the 16x16 judge (prompted digit
#: and digit-like) measured on 500 images (bench/results/highres_digits_500.md); asserted on 100 other seeds
CLAIMED_ACCURACY_32 = 0.426


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_digits_at_32_draws_the_prompted_digit_as_claimed(pipe):
    """The README's claim, by the independent 16x16 judge, on seeds the measurement did not use; plain sampling
    at 32x32 scores 0 % here (repeated strokes), so the technique is what the test measures."""
    pytest.importorskip("sklearn")
    import numpy as np
    from claims import assert_accuracy_claim
    from velodiff.eval import DEFAULT_PROMPT, image_seeds, judge_highres
    labels = np.repeat(np.arange(10), 10)
    seeds = image_seeds(1, len(labels))
    vd.optimize(pipe, HiDiffusion())
    try:
        with torch.inference_mode():
            images = pipe([DEFAULT_PROMPT.format(d=int(d)) for d in labels], num_inference_steps=20,
                          sampler="dpmpp_2m", height=32, width=32, output_type="np",
                          generator=[torch.Generator().manual_seed(s) for s in seeds]).images
    finally:
        vd.restore(pipe)
    r = judge_highres(np.asarray(images), labels, n_boot=10, fd_boot=10)
    assert_accuracy_claim(int(round(r["accuracy"] * len(labels))), len(labels), CLAIMED_ACCURACY_32,
                          what="digits + hidiffusion at 32x32")


def test_cli_generates_at_32_with_hidiffusion(tmp_path, capsys):
    """`velodiff generate --height 32 --width 32 --optimize hidiffusion` writes the 32x32 image the API gives."""
    import numpy as np
    from PIL import Image
    from fixtures import run_cli
    code, out, err = run_cli(["generate", "--prompt", "a handwritten 3", "--height", "32", "--width", "32",
                              "--optimize", "hidiffusion", "--seed", "3", "--outdir", str(tmp_path)], capsys)
    assert code in (0, None), err
    png = np.asarray(Image.open(tmp_path / "000.png"))
    assert png.shape[:2] == (32, 32)
    pipe = quiet_pipeline("digits")
    vd.optimize(pipe, HiDiffusion())
    with torch.inference_mode():
        api = pipe("a handwritten 3", height=32, width=32, generator=torch.Generator().manual_seed(3),
                   num_inference_steps=20, output_type="np").images[0]
    assert np.abs(png[..., :3].astype(np.float64) - np.round(np.clip(api, 0, 1) * 255)).max() <= 1
