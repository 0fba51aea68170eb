"""PixArtTransformer2DModel against diffusers' PixArtTransformer2DModel with the same weights (fp32, rel <= TOL)."""
import inspect

import pytest
import torch

from velodiff.models.attention import set_attention_backend
from velodiff.models.pixart import PixArtTransformer2DModel

CONFIGS = {
    # PixArt-alpha 1024-MS in miniature: sample_size 128 -> micro-conditions on and interpolation_scale 2 by
    # default; T5-width captions projected to D (D = 24, a multiple of 3 for the size embedders).
    "alpha": dict(num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=8, num_layers=2,
                  sample_size=128, patch_size=2, cross_attention_dim=24, caption_channels=20),
    # PixArt-sigma: no micro-conditions, explicit interpolation_scale, 3 heads of 8.
    "sigma": dict(num_attention_heads=3, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
                  sample_size=16, patch_size=2, cross_attention_dim=24, caption_channels=20,
                  use_additional_conditions=False, interpolation_scale=0.5),
    # Awkward: no caption projection (context read directly, width 10), patch 1, odd channels, affine norms,
    # micro-conditions forced on at a small sample size, exact GELU, no attention bias, upcast flag.
    "awkward": dict(num_attention_heads=1, attention_head_dim=12, in_channels=3, out_channels=None, num_layers=1,
                    sample_size=5, patch_size=1, cross_attention_dim=10, caption_channels=None,
                    use_additional_conditions=True, norm_elementwise_affine=True, norm_eps=1e-5,
                    activation_fn="gelu", attention_bias=False, upcast_attention=True),
}
LATENTS = {"alpha": (16, 16), "sigma": (16, 16), "awkward": (5, 5)}


# Relative Frobenius error allowed against diffusers, fp32 (u = 6e-8): the same operations in the same order give
# bit-identical outputs (measured 0 in most cases below); another attention kernel (the math backend) measured at
# most 1.3e-7, a few u. The bound is ~8x that, still 10x tighter than the blueprint's fp32 1e-5.
TOL = 1e-6


def rel(a, b):
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())


def pair(cfg, seed=0):
    from diffusers import PixArtTransformer2DModel as DPixArt
    torch.manual_seed(seed)
    theirs = DPixArt(**cfg).eval()
    ours = PixArtTransformer2DModel(**cfg).eval()
    missing, unexpected = ours.load_state_dict(theirs.state_dict(), strict=True)
    assert not missing and not unexpected
    return ours, theirs


def inputs(cfg, batch, hw, length=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg["in_channels"], *hw, generator=g)
    ctx = torch.randn(batch, length, cfg["caption_channels"] or cfg["cross_attention_dim"], generator=g)
    res = torch.tensor([[1024.0, 768.0], [512.0, 512.0], [896.0, 1152.0]][:batch])
    ar = res[:, :1] / res[:, 1:]
    return x, ctx, {"resolution": res, "aspect_ratio": ar}


def padding_mask(batch, length):
    """1 keep / 0 drop, with real padding: sample 0 keeps 4 tokens, sample 2 keeps 1."""
    m = torch.ones(batch, length)
    m[0, 4:] = 0
    if batch > 2:
        m[2, 1:] = 0
    return m


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("masked", [False, True])
@torch.no_grad()
def test_pixart_matches_diffusers(name, batch, masked):
    cfg = CONFIGS[name]
    ours, theirs = pair(cfg)
    x, ctx, cond = inputs(cfg, batch, LATENTS[name], seed=batch)
    mask = padding_mask(batch, ctx.shape[1]) if masked else None
    for t in (torch.tensor([0, 999, 500][:batch]), torch.tensor([37.5, 1.0, 250.25][:batch])):
        out = ours(x, ctx, t, added_cond_kwargs=cond, encoder_attention_mask=mask)
        ref = theirs(x, ctx, t, added_cond_kwargs=cond, encoder_attention_mask=mask).sample
        assert out.shape == (batch, theirs.out_channels, *LATENTS[name])
        assert rel(out, ref) <= TOL


@torch.no_grad()
def test_padding_mask_actually_masks():
    """Changing a dropped caption token changes nothing; changing a kept one changes the output."""
    ours, _ = pair(CONFIGS["sigma"])
    x, ctx, _ = inputs(CONFIGS["sigma"], 3, (16, 16))
    mask = padding_mask(3, ctx.shape[1])
    base = ours(x, ctx, 500, encoder_attention_mask=mask)
    poked = ctx.clone()
    poked[0, 5] += 10.0
    poked[2, 3] += 10.0
    assert torch.allclose(ours(x, poked, 500, encoder_attention_mask=mask), base, rtol=0, atol=1e-6)
    assert not torch.allclose(ours(x, poked, 500), ours(x, ctx, 500), atol=1e-3)
    poked[0, 1] += 10.0
    assert not torch.allclose(ours(x, poked, 500, encoder_attention_mask=mask)[0], base[0], atol=1e-3)


@pytest.mark.parametrize("kind", ["bool", "all_dropped", "bias3d"])
@torch.no_grad()
def test_pixart_mask_forms_match_diffusers(kind):
    ours, theirs = pair(CONFIGS["alpha"])
    x, ctx, cond = inputs(CONFIGS["alpha"], 3, (16, 16))
    mask = padding_mask(3, ctx.shape[1])
    if kind == "bool":
        mask = mask.bool()
    elif kind == "all_dropped":
        mask[1] = 0  # diffusers' -10000 bias makes the row attend uniformly; no NaN
    else:
        mask = ((1 - mask) * -10000.0)[:, None, :]
    t = torch.tensor([3, 400, 999])
    out = ours(x, ctx, t, added_cond_kwargs=cond, encoder_attention_mask=mask)
    ref = theirs(x, ctx, t, added_cond_kwargs=cond, encoder_attention_mask=mask).sample
    assert torch.isfinite(out).all()
    assert rel(out, ref) <= TOL


@pytest.mark.parametrize("name,hw", [("alpha", (8, 24)), ("sigma", (12, 6)), ("awkward", (3, 7))])
@torch.no_grad()
def test_pixart_non_square_matches_diffusers(name, hw):
    cfg = CONFIGS[name]
    ours, theirs = pair(cfg)
    x, ctx, cond = inputs(cfg, 2, hw)
    mask = padding_mask(2, ctx.shape[1])
    t = torch.tensor([20, 980])
    out = ours(x, ctx, t, added_cond_kwargs=cond, encoder_attention_mask=mask)
    assert out.shape == (2, theirs.out_channels, *hw)
    assert rel(out, theirs(x, ctx, t, added_cond_kwargs=cond, encoder_attention_mask=mask).sample) <= TOL


@torch.no_grad()
def test_pixart_sigma_condition_forms_and_math_backend():
    ours, theirs = pair(CONFIGS["sigma"])
    assert not ours.use_additional_conditions
    x, ctx, _ = inputs(CONFIGS["sigma"], 2, (16, 16))
    ref = theirs(x, ctx, torch.tensor([640, 640])).sample
    none_cond = {"resolution": None, "aspect_ratio": None}  # what diffusers' sigma pipeline passes
    assert rel(ours(x, ctx, 640), ref) <= TOL
    assert rel(ours(x, ctx, torch.tensor([640]), added_cond_kwargs=none_cond), ref) <= TOL
    assert set_attention_backend(ours, "math") == 4
    assert rel(ours(x, ctx, 640), ref) <= TOL


@torch.no_grad()
def test_pixart_bf16_close_to_fp32():
    ours, _ = pair(CONFIGS["alpha"])
    x, ctx, cond = inputs(CONFIGS["alpha"], 2, (16, 16))
    t, mask = torch.tensor([10, 900]), padding_mask(2, ctx.shape[1])
    ref = ours(x, ctx, t, cond, mask)
    out = ours.to(torch.bfloat16)(x.bfloat16(), ctx.bfloat16(), t, cond, mask)
    assert out.dtype == torch.bfloat16
    assert rel(out.float(), ref) <= 3e-2


def test_pixart_defaults_follow_diffusers():
    from diffusers import PixArtTransformer2DModel as DPixArt
    for cfg in CONFIGS.values():
        ours, theirs = pair(cfg)
        assert ours.use_additional_conditions == theirs.use_additional_conditions
        assert ours.pos_embed.interpolation_scale == theirs.pos_embed.interpolation_scale
        assert ours.pos_embed.base_size == theirs.pos_embed.base_size
        assert torch.equal(ours.pos_embed.pos_embed, theirs.pos_embed.pos_embed)
    theirs_defaults = {k: p.default for k, p in inspect.signature(DPixArt.__init__).parameters.items()
                       if p.default is not inspect.Parameter.empty}
    ours_defaults = {k: p.default for k, p in inspect.signature(PixArtTransformer2DModel.__init__).parameters.items()
                     if p.default is not inspect.Parameter.empty}
    assert ours_defaults == theirs_defaults


def test_pixart_bad_inputs_are_named():
    cfg = CONFIGS["alpha"]
    ours = PixArtTransformer2DModel(**cfg)
    x, ctx, cond = inputs(cfg, 2, (16, 16))
    with pytest.raises(ValueError, match="added_cond_kwargs"):
        ours(x, ctx, 5)
    with pytest.raises(ValueError, match="aspect_ratio"):
        ours(x, ctx, 5, added_cond_kwargs={"resolution": cond["resolution"]})
    with pytest.raises(ValueError, match="resolution"):
        ours(x, ctx, 5, added_cond_kwargs={"resolution": cond["resolution"][:1], "aspect_ratio": cond["aspect_ratio"]})
    with pytest.raises(ValueError, match="encoder_attention_mask"):
        ours(x, ctx, 5, cond, torch.ones(2, 6))
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        ours(x, ctx[..., :-1], 5, cond)
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        ours(x, ctx[:1], 5, cond)
    with pytest.raises(ValueError, match="timestep"):
        ours(x, ctx, torch.tensor([1, 2, 3]), cond)
    with pytest.raises(ValueError, match="hidden_states"):
        ours(torch.randn(2, 4, 15, 16), ctx, 5, cond)
    with pytest.raises(ValueError, match="multiple of 3"):
        PixArtTransformer2DModel(num_attention_heads=1, attention_head_dim=8, num_layers=1, cross_attention_dim=8,
                                 use_additional_conditions=True)
    with pytest.raises(ValueError, match="cross_attention_dim"):
        PixArtTransformer2DModel(num_attention_heads=1, attention_head_dim=12, num_layers=1, cross_attention_dim=8,
                                 caption_channels=16)
    with pytest.raises(ValueError, match="attention_type"):
        PixArtTransformer2DModel(num_layers=1, attention_type="gated")
    with pytest.raises(ValueError, match="norm_type"):
        PixArtTransformer2DModel(num_layers=1, norm_type="ada_norm_zero")


def hub_style_config(**tiny):
    """PixArt-Sigma-XL-2-1024-MS ``transformer/config.json`` (legacy Transformer2DModel keys kept), shrunk."""
    cfg = {"_class_name": "PixArtTransformer2DModel", "_diffusers_version": "0.28.0.dev0",
           "activation_fn": "gelu-approximate", "attention_bias": True, "attention_head_dim": 72,
           "attention_type": "default", "caption_channels": 4096, "cross_attention_dim": 1152,
           "double_self_attention": False, "dropout": 0.0, "in_channels": 4, "interpolation_scale": 2,
           "norm_elementwise_affine": False, "norm_eps": 1e-06, "norm_num_groups": 32, "norm_type": "ada_norm_single",
           "num_attention_heads": 16, "num_embeds_ada_norm": 1000, "num_layers": 28, "num_vector_embeds": None,
           "only_cross_attention": False, "out_channels": 8, "patch_size": 2, "sample_size": 128,
           "upcast_attention": False, "use_additional_conditions": False, "use_linear_projection": False}
    cfg.update(tiny)
    return cfg


def test_pixart_from_config():
    cfg = hub_style_config(num_layers=1, num_attention_heads=2, attention_head_dim=12, cross_attention_dim=24,
                           caption_channels=20)
    model = PixArtTransformer2DModel.from_config(cfg)
    assert model.config.interpolation_scale == 2 and model.config["caption_channels"] == 20
    assert not model.use_additional_conditions
    assert "_class_name" not in model.config and "use_linear_projection" not in model.config
    with pytest.raises(ValueError, match="double_self_attention"):
        PixArtTransformer2DModel.from_config({**cfg, "double_self_attention": True})
    with pytest.raises(ValueError, match="frobnicate"):
        PixArtTransformer2DModel.from_config({**cfg, "frobnicate": 1})

    from diffusers import PixArtTransformer2DModel as DPixArt
    torch.manual_seed(0)
    theirs = DPixArt.from_config(dict(model.config))
    model.load_state_dict(theirs.state_dict(), strict=True)
    x, ctx, _ = inputs(model.config, 2, (16, 16))
    with torch.no_grad():
        assert rel(model(x, ctx, 77), theirs(x, ctx, torch.tensor([77, 77])).sample) <= TOL


@pytest.mark.slow
@torch.no_grad()
def test_pixart_xl2_random_weights_match_diffusers():
    """PixArt-alpha XL-2 1024-MS size (28 x 1152, 16 heads, T5 4096 captions, micro-conditions) at a 32 x 32
    latent with 120 padded caption tokens, one set of weights shared."""
    from diffusers import PixArtTransformer2DModel as DPixArt
    cfg = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
               sample_size=128, patch_size=2, cross_attention_dim=1152, caption_channels=4096)
    torch.manual_seed(0)
    theirs = DPixArt(**cfg).eval()
    with torch.device("meta"):
        ours = PixArtTransformer2DModel(**cfg)
    ours.load_state_dict(theirs.state_dict(), strict=True, assign=True)
    assert ours.proj_out.weight.data_ptr() == theirs.proj_out.weight.data_ptr()
    x, ctx, cond = inputs(cfg, 2, (32, 32), length=120)
    mask = torch.ones(2, 120)
    mask[0, 17:] = 0
    mask[1, 60:] = 0
    t = torch.tensor([999, 250])
    out = ours(x, ctx, t, added_cond_kwargs=cond, encoder_attention_mask=mask)
    ref = theirs(x, ctx, t, added_cond_kwargs=cond, encoder_attention_mask=mask).sample
    assert torch.isfinite(ref).all()
    err = rel(out, ref)
    print(f"PixArt-alpha XL-2 32x32 random weights: relative error {err:.3e}")
    assert err <= 1e-4
