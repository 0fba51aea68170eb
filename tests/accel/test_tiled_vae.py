"""``tiled_vae`` (``vd.accel.TiledVAE``, :mod:`velodiff.models.vae_tiling`): tiled encode / decode equal the untiled
VAE, ours and diffusers' (same random weights), for tile sizes that do and do not divide the image, non-square
sizes, batch 2 and every dtype; diffusers' own ``enable_tiling`` does not (its seams are measured); a pipeline
with the technique gives the untiled images; restore gives the plain VAE back; bad fields are refused.

Bounds (max |tiled - untiled| / max |untiled|, measured on the two models below):
- float64: tiled equals untiled to 2.2e-15 (decode and encode): the tiling is exact, and a wrong halo, a
  per-tile statistic or a padding inside the image would show at 1e-3 or more. Bound FP64_TOL = 2e-14.
- float32: at most 1.6e-6 (decode 1.62e-6, encode mean / logvar 1.63e-6), i.e. a few float32 ulps carried
  through ~25 layers, from the GroupNorm statistics (float64 here, float32 in torch) and the convs' summation
  order on tiles. Bound FP32_TOL = 5e-6. Ours untiled is diffusers' bit for bit (0.0) on decode and within 1.2e-6
  on encode. The tiled fp32 decode is no farther from the float64 one than the untiled fp32 decode.
- float16 / bfloat16: the tiled result's error against the float64 VAE is at most 1.25x + 2 ulp of the untiled
  result's own error in that dtype (measured ratios 0.82-1.0).
- the digits pipeline at 48x48 (tiles of 16): max |tiled - untiled| 3.2e-6 (text2img) and 2.4e-6 (img2img) on
  its [0, 1] images. Bound PIPE_TOL = 1e-5.
diffusers' ``enable_tiling`` on the same weights (latent tiles of 4, 25 % overlap) moves the decode by 0.81 of the
output range (5.7 absolute): per-tile GroupNorm statistics and blending, the seams tiled_vae does not have.
"""
import copy

import pytest
import torch

import velodiff as vd
from velodiff.accel import TiledVAE, parse_technique
from velodiff.models.vae import AutoencoderKL
from velodiff.models.vae_tiling import GroupStats, groupnorm_with_stats, tiled_decode, tiled_encode

from fixtures import quiet_pipeline

FP64_TOL = 2e-14
FP32_TOL = 5e-6
PIPE_TOL = 1e-5


def vae_config(block_out_channels, layers_per_block, norm_num_groups, **kw):
    n = len(block_out_channels)
    return dict(block_out_channels=tuple(block_out_channels), down_block_types=("DownEncoderBlock2D",) * n,
                up_block_types=("UpDecoderBlock2D",) * n, layers_per_block=layers_per_block, latent_channels=4,
                norm_num_groups=norm_num_groups, sample_size=32, **kw)


CONFIGS = {
    # SD's layout in miniature: factor 8, 2 layers per block, channel changes (1x1 shortcuts), mid attention
    "sd-like-f8": vae_config((8, 16, 32, 32), 2, 4),
    # factor 4, no quant convs, no mid attention, 2 groups
    "f4-no-quant-no-attn": vae_config((8, 16, 16), 1, 2, use_quant_conv=False, use_post_quant_conv=False,
                                      mid_block_add_attention=False),
}


def build(config):
    """diffusers' AutoencoderKL with random weights (GroupNorm affines and biases perturbed too) and ours with the
    same state dict."""
    from diffusers import AutoencoderKL as DiffusersVAE
    torch.manual_seed(0)
    theirs = DiffusersVAE(**config).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ours = AutoencoderKL.from_config(dict(theirs.config)).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours, theirs


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def vaes(request):
    return build(CONFIGS[request.param])


def rel_max(a, b):
    """max |a - b| / max |b|, in float64."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max())


def latents(batch, h, w, seed=1, dtype=torch.float32):
    return torch.randn(batch, 4, h, w, generator=torch.Generator().manual_seed(seed)).to(dtype)


def image(batch, h, w, seed=2, dtype=torch.float32):
    return (torch.rand(batch, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1).to(dtype)


# tile sizes in image pixels: 16 (the smallest for factor 8), 24 and 40 (divide neither side), 56
DECODE_CASES = [(2, 5, 7, 16), (2, 5, 7, 24), (1, 9, 4, 40), (2, 6, 11, 56)]
ENCODE_CASES = [(2, 37, 50, 16), (1, 40, 56, 24), (2, 64, 33, 40), (1, 23, 71, 56)]


@pytest.mark.parametrize("batch,h,w,tile", DECODE_CASES)
def test_decode_equals_untiled_ours_and_diffusers(vaes, batch, h, w, tile):
    ours, theirs = vaes
    z = latents(batch, h, w)
    with torch.no_grad():
        plain = ours.decode(z)
        oracle = theirs.decode(z).sample
    tiled = tiled_decode(ours, z, tile)
    assert tiled.shape == plain.shape == oracle.shape and tiled.dtype == torch.float32
    assert rel_max(plain, oracle) <= FP32_TOL  # ours untiled is diffusers' (bit-identical today)
    assert rel_max(tiled, oracle) <= FP32_TOL
    assert rel_max(tiled, plain) <= FP32_TOL


@pytest.mark.parametrize("batch,h,w,tile", ENCODE_CASES)
def test_encode_equals_untiled_ours_and_diffusers(vaes, batch, h, w, tile):
    ours, theirs = vaes
    x = image(batch, h, w)
    with torch.no_grad():
        plain = ours.encode(x)
        oracle = theirs.encode(x).latent_dist
    tiled = tiled_encode(ours, x, tile)
    assert tiled.mean.shape == oracle.mean.shape
    for got, want in ((tiled.mean, oracle.mean), (tiled.logvar, oracle.logvar), (tiled.mean, plain.mean),
                      (tiled.logvar, plain.logvar)):
        assert rel_max(got, want) <= FP32_TOL


@pytest.mark.parametrize("tile", [16, 24])
def test_float64_tiling_is_exact(vaes, tile):
    """In float64 the rounding is 1e-16, so anything a tile does differently from the whole image would show."""
    ours = copy.deepcopy(vaes[0]).double()
    z, x = latents(2, 5, 7, dtype=torch.float64), image(2, 37, 50, dtype=torch.float64)
    with torch.no_grad():
        plain_dec, plain_enc = ours.decode(z), ours.encode(x)
    tiled_enc = tiled_encode(ours, x, tile)
    assert rel_max(tiled_decode(ours, z, tile), plain_dec) <= FP64_TOL
    assert rel_max(tiled_enc.mean, plain_enc.mean) <= FP64_TOL
    assert rel_max(tiled_enc.logvar, plain_enc.logvar) <= FP64_TOL


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_no_worse_than_untiled(vaes, dtype):
    ours = vaes[0]
    exact = copy.deepcopy(ours).double()
    low = copy.deepcopy(ours).to(dtype)
    z, x = latents(2, 5, 7), image(2, 37, 50)
    ulp = torch.finfo(dtype).eps
    with torch.no_grad():
        want_dec, want_enc = exact.decode(z.double()), exact.encode(x.double()).mean
        plain_dec, plain_enc = low.decode(z.to(dtype)), low.encode(x.to(dtype)).mean
    tiled_dec = tiled_decode(low, z.to(dtype), 24)
    tiled_enc = tiled_encode(low, x.to(dtype), 24).mean
    assert tiled_dec.dtype == dtype and tiled_enc.dtype == dtype
    assert rel_max(tiled_dec, want_dec) <= 1.25 * rel_max(plain_dec, want_dec) + 2 * ulp
    assert rel_max(tiled_enc, want_enc) <= 1.25 * rel_max(plain_enc, want_enc) + 2 * ulp


def test_diffusers_enable_tiling_has_seams_ours_does_not():
    """diffusers' tiling (overlapping tiles, per-tile GroupNorm statistics, linear blend) moves the decode by
    0.81 of the output range here; ours stays within FP32_TOL. The number is the issue's comparison."""
    ours, theirs = build(CONFIGS["sd-like-f8"])
    z = latents(1, 12, 16)  # sample_size 32 -> diffusers' latent tiles of 4, overlap 25 %
    with torch.no_grad():
        plain = theirs.decode(z).sample
        theirs.enable_tiling()
        seamed = theirs.decode(z).sample
        theirs.disable_tiling()
    ours_tiled = tiled_decode(ours, z, 32)
    diffusers_gap, ours_gap = rel_max(seamed, plain), rel_max(ours_tiled, plain)
    assert ours_gap <= FP32_TOL
    assert diffusers_gap > 1e3 * FP32_TOL, diffusers_gap


def test_group_stats_match_whole_tensor_float64():
    """Chan's merge over uneven tiles of data with a large offset gives the whole tensor's mean and variance."""
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(2, 6, 13, 9, generator=g, dtype=torch.float64) * 0.01 + 1e4).float()
    stats = GroupStats(2, 3, torch.device("cpu"))
    for r0, r1 in ((0, 5), (5, 6), (6, 13)):
        for c0, c1 in ((0, 2), (2, 9)):
            stats.add(x[:, :, r0:r1, c0:c1])
    mean, var = stats.mean_var()
    whole = x.double().reshape(2, 3, -1)
    torch.testing.assert_close(mean, whole.mean(-1), rtol=1e-15, atol=0)
    torch.testing.assert_close(var, whole.var(-1, unbiased=False), rtol=1e-9, atol=0)
    norm = torch.nn.GroupNorm(3, 6, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(6, generator=g))
        norm.bias.copy_(torch.randn(6, generator=g))
        y = x[:, :, :4, :4] - 1e4
        want = norm.double()(y.double())
    got = groupnorm_with_stats(norm, y, *GroupStats_of(y, 3))
    assert rel_max(got, want) <= 1e-6


def GroupStats_of(x, groups):
    stats = GroupStats(x.shape[0], groups, x.device)
    stats.add(x)
    return stats.mean_var()


# ------------------------------------------------------------------------------------------------------------
# the technique
# ------------------------------------------------------------------------------------------------------------

class VAEPipe:
    """The least a technique needs of a pipeline: a ``vae`` and the restore hook list."""

    def __init__(self, vae):
        self.vae, self._restore_hooks, self._applied = vae, [], []


def test_technique_tiles_large_inputs_and_restores():
    ours = build(CONFIGS["sd-like-f8"])[0]
    pipe = VAEPipe(ours)
    z, x = latents(2, 6, 9), image(2, 45, 70)
    small_z, small_x = latents(1, 2, 3), image(1, 16, 20)
    with torch.no_grad():
        plain_dec, plain_enc = ours.decode(z), ours.encode(x).mean
        plain_small_dec, plain_small_enc = ours.decode(small_z), ours.encode(small_x).mean
    vd.optimize(pipe, TiledVAE(tile_size=16))
    assert "decode" in vars(ours) and "encode" in vars(ours)
    with torch.no_grad():
        assert rel_max(ours.decode(z), plain_dec) <= FP32_TOL
        assert rel_max(ours.encode(x).mean, plain_enc) <= FP32_TOL
    with pytest.raises(ValueError, match="z must have shape"):
        ours.decode(torch.randn(1, 3, 4, 4))
    vd.restore(pipe)
    assert "decode" not in vars(ours) and "encode" not in vars(ours)
    # an image no larger than one tile runs untiled: bit-identical
    vd.optimize(pipe, TiledVAE(tile_size=24, encode=False))
    assert "encode" not in vars(ours)
    with torch.no_grad():
        assert torch.equal(ours.decode(small_z), plain_small_dec)
        assert torch.equal(ours.encode(small_x).mean, plain_small_enc)
    vd.restore(pipe)
    assert "decode" not in vars(ours)


@pytest.mark.parametrize("kwargs,match", [
    (dict(tile_size=0), "tile_size must be positive"),
    (dict(tile_size=-16), "tile_size must be positive"),
    (dict(tile_size=float("nan")), "tile_size must be an integer"),
    (dict(tile_size=32.5), "tile_size must be an integer"),
    (dict(tile_size=True), "tile_size must be an integer"),
    (dict(decode=False, encode=False), "tile nothing"),
    (dict(offload="yes"), "offload must be True or False"),
])
def test_bad_fields(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TiledVAE(**kwargs)


def test_bad_specs_and_fit():
    with pytest.raises(ValueError, match="tile_size"):
        parse_technique("tiled_vae:tile_size=nan")
    assert parse_technique("tiled_vae:tile_size=64,encode=false") == TiledVAE(tile_size=64, encode=False)
    pipe = VAEPipe(build(CONFIGS["sd-like-f8"])[0])
    with pytest.raises(ValueError, match="at least 2 latent pixels = 16 image pixels"):
        vd.optimize(pipe, TiledVAE(tile_size=15))
    with pytest.raises(ValueError, match="vae is"):
        vd.optimize(VAEPipe(torch.nn.Identity()), TiledVAE())
    vd.optimize(pipe, TiledVAE(tile_size=16))
    with pytest.raises(ValueError, match="already replaced"):
        vd.optimize(pipe, TiledVAE(tile_size=32))
    vd.restore(pipe)


@pytest.fixture(scope="module")
def digits():
    return quiet_pipeline("digits")


def test_digits_pipeline_48px_text2img_and_img2img(digits):
    """digits (VAE factor 2) at 48x48 with 16-pixel tiles: 9 tiles per decode / encode; the images are the
    untiled ones."""
    def run(**kw):
        gens = [torch.Generator().manual_seed(i) for i in range(2)]
        return digits(["a 3", "a 7"], num_inference_steps=3, height=48, width=48, generator=gens,
                      output_type="pt", **kw).images
    init = torch.rand(1, 3, 48, 48, generator=torch.Generator().manual_seed(5))
    plain, plain_i2i = run(), run(image=init, strength=0.6)
    vd.optimize(digits, TiledVAE(tile_size=16))
    try:
        tiled, tiled_i2i = run(), run(image=init, strength=0.6)
    finally:
        vd.restore(digits)
    assert (plain - tiled).abs().max() <= PIPE_TOL
    assert (plain_i2i - tiled_i2i).abs().max() <= PIPE_TOL
    assert "decode" not in vars(digits.vae)
