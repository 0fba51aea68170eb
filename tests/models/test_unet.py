"""velodiff's UNet2DConditionModel against diffusers' with identical weights (fp32 CPU, relative error <= TOL).

Tiny SD 1.5-, SD 2.1- and SDXL-like configs; awkward latent sizes; timesteps as numbers, 0-d and [B] tensors.
The full-size random-weight checks are in test_unet_fullsize.py.
"""
import copy
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from velodiff.models.transformer_2d import Transformer2DModel  # noqa: E402
from velodiff.models.unet import UNet2DConditionModel  # noqa: E402

# Relative Frobenius error allowed against diffusers, fp32 (u = 2^-24 = 6e-8). Where both run the same operations in
# the same order the outputs are bit-identical (most cases below); where the order differs (channels-last layout,
# odd latent sizes, only_cross_attention) the measured error is at most 1.1e-6, ~20 u after a few dozen layers.
# The bound is ~2.3x that. (The blueprint's fp32 1e-5 let through the scale of every attention layer off by 1e-4:
# measured 4.7e-6 .. 9.9e-6 on these configs; one layer's scale off by 1e-4 gives 0.9e-6 .. 3.2e-6.)
TOL = 2.5e-6

SD15_TINY = dict(block_out_channels=(32, 64), layers_per_block=2, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16, attention_head_dim=4,
                 norm_num_groups=8, sample_size=16)
SD15_TINY_3LEVEL = dict(block_out_channels=(16, 32, 32), layers_per_block=1,
                        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                        cross_attention_dim=12, attention_head_dim=2, norm_num_groups=4)
SD21_TINY = dict(block_out_channels=(32, 64), layers_per_block=1,
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=24,
                 attention_head_dim=(2, 4), use_linear_projection=True, upcast_attention=True, norm_num_groups=8)
SDXL_TINY = dict(block_out_channels=(16, 32, 48), layers_per_block=2,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=24,
                 attention_head_dim=(2, 4, 6), use_linear_projection=True, transformer_layers_per_block=(1, 2, 3),
                 addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=6 * 8 + 20, norm_num_groups=8)
CONFIGS = {"sd15": SD15_TINY, "sd15-3level": SD15_TINY_3LEVEL, "sd21": SD21_TINY, "sdxl": SDXL_TINY}


def rel(a, b):
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())


def pair(config, seed=0):
    from diffusers import UNet2DConditionModel as DUNet
    torch.manual_seed(seed)
    theirs = DUNet(**config).eval()
    ours = UNet2DConditionModel.from_config(dict(theirs.config)).eval()
    missing, unexpected = ours.load_state_dict(theirs.state_dict(), strict=True)
    assert not missing and not unexpected
    return theirs, ours


def inputs(config, batch, h, w, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.get("in_channels", 4), h, w, generator=g)
    ctx = torch.randn(batch, 7, config["cross_attention_dim"], generator=g)
    kw = {}
    if config.get("addition_embed_type") == "text_time":
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, 20, generator=g),
                                   "time_ids": torch.tensor([[64.0, 48.0, 0.0, 8.0, 64.0, 64.0]]).repeat(batch, 1)}
    return x, ctx, kw


@pytest.fixture(scope="module")
def pairs():
    return {name: pair(cfg) for name, cfg in CONFIGS.items()}


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("batch,h,w", [(1, 16, 16), (2, 8, 24), (3, 13, 9), (2, 5, 7)])
def test_unet_matches_diffusers(pairs, name, batch, h, w):
    theirs, ours = pairs[name]
    x, ctx, kw = inputs(CONFIGS[name], batch, h, w)
    with torch.no_grad():
        for t in (0, 999, 437.25):
            assert rel(ours(x, t, ctx, **kw), theirs(x, t, ctx, **kw).sample) <= TOL, (name, t)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_channels_last_matches_diffusers(pairs, name):
    theirs, ours = pairs[name]
    ours = copy.deepcopy(ours).to(memory_format=torch.channels_last)
    assert ours.channels_last and not pairs[name][1].channels_last
    for batch, h, w in [(2, 16, 16), (1, 11, 6)]:
        x, ctx, kw = inputs(CONFIGS[name], batch, h, w)
        with torch.no_grad():
            out = ours(x, 250, ctx, **kw)
            assert out.is_contiguous()
            assert rel(out, theirs(x, 250, ctx, **kw).sample) <= TOL


@pytest.mark.parametrize("name", ["sd15", "sdxl"])
def test_tensor_timesteps_match_diffusers(pairs, name):
    theirs, ours = pairs[name]
    x, ctx, kw = inputs(CONFIGS[name], 3, 16, 16)
    with torch.no_grad():
        for t in (torch.tensor(981), torch.tensor([1.0, 500.0, 999.0]), torch.tensor([17])):
            out = ours(x, t, ctx, **kw)
            assert out.shape == x.shape and out.dtype == x.dtype
            assert rel(out, theirs(x, t, ctx, **kw).sample) <= TOL


def test_variants_match_diffusers():
    """The less common knobs: only_cross_attention, per-block layers and cross dims, no mid block, conv
    kernels, center_input_sample, resnet_out_scale_factor (which diffusers ignores for these
    block types), LCM's time_cond_proj_dim and an inpainting 9-channel
    input."""
    cfg = dict(block_out_channels=(16, 32), layers_per_block=(1, 2), cross_attention_dim=(12, 12), attention_head_dim=2,
               down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
               up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), only_cross_attention=(True, False),
               mid_block_type=None, norm_num_groups=4, conv_in_kernel=5, conv_out_kernel=1, in_channels=9,
               center_input_sample=True, resnet_out_scale_factor=2.0, time_cond_proj_dim=6, mid_block_scale_factor=1)
    from diffusers import UNet2DConditionModel as DUNet
    torch.manual_seed(0)
    theirs = DUNet(**cfg).eval()
    ours = UNet2DConditionModel.from_config(dict(theirs.config)).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    g = torch.Generator().manual_seed(3)
    x, ctx, tc = torch.randn(2, 9, 10, 6, generator=g), torch.randn(2, 5, 12, generator=g), torch.randn(2, 6, generator=g)
    with torch.no_grad():
        assert rel(ours(x, 10, ctx, timestep_cond=tc), theirs(x, 10, ctx, timestep_cond=tc).sample) <= TOL


def test_only_cross_attention_everywhere_matches_diffusers():
    """A bool only_cross_attention reaches the down and up blocks but not the mid block, as in diffusers."""
    cfg = {**SD15_TINY_3LEVEL, "only_cross_attention": True}
    theirs, ours = pair(cfg)
    x, ctx, _ = inputs(cfg, 2, 8, 8)
    with torch.no_grad():
        assert rel(ours(x, 3, ctx), theirs(x, 3, ctx).sample) <= TOL


def test_encoder_attention_mask_and_controlnet_residuals_match_diffusers(pairs):
    theirs, ours = pairs["sd15"]
    x, ctx, kw = inputs(SD15_TINY, 2, 16, 16)
    mask = torch.tensor([[1, 1, 1, 0, 0, 1, 0], [1, 0, 1, 1, 1, 1, 1]])
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        skips_shapes = [tuple(s.shape) for s in _skip_shapes(ours, x, ctx)]
        down = [torch.randn(s, generator=g) for s in skips_shapes]
        mid = torch.randn(2, 64, 8, 8, generator=g)
        ref = theirs(x, 300, ctx, encoder_attention_mask=mask, down_block_additional_residuals=tuple(down),
                     mid_block_additional_residual=mid).sample
        out = ours(x, 300, ctx, encoder_attention_mask=mask, down_block_additional_residuals=down,
                   mid_block_additional_residual=mid)
    assert rel(out, ref) <= TOL


def _skip_shapes(unet, x, ctx):
    shapes = [torch.empty(x.shape[0], unet.conv_in.out_channels, *x.shape[2:])]
    h = unet.conv_in(x)
    emb = unet._time_embedding(1, x.shape[0], x.device, x.dtype, None)
    for block in unet.down_blocks:
        h, res = block(h, emb, ctx)
        shapes.extend(res)
    return shapes


@pytest.mark.parametrize("linear", [False, True])
def test_transformer_2d_matches_diffusers(linear):
    from diffusers.models.transformers.transformer_2d import Transformer2DModel as DT
    torch.manual_seed(0)
    theirs = DT(2, 8, in_channels=16, num_layers=2, cross_attention_dim=12, norm_num_groups=4,
                use_linear_projection=linear).eval()
    ours = Transformer2DModel(2, 8, in_channels=16, num_layers=2, cross_attention_dim=12, norm_num_groups=4,
                              use_linear_projection=linear).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x, ctx = torch.randn(2, 16, 5, 7), torch.randn(2, 3, 12)
    with torch.no_grad():
        ref = theirs(x, ctx).sample
        out = ours(x, ctx)
        assert out.is_contiguous()  # an NCHW caller gets NCHW back
        assert rel(out, ref) <= TOL
        out = ours(x.contiguous(memory_format=torch.channels_last), ctx)
        assert out.is_contiguous(memory_format=torch.channels_last)
        assert rel(out, ref) <= TOL


def test_json_config_round_trip_matches_diffusers():
    """A config.json (lists, every diffusers key, "_" keys) builds the same model."""
    import json
    theirs, _ = pair(SDXL_TINY)
    config = json.loads(theirs.to_json_string())
    assert isinstance(config["block_out_channels"], list) and "_class_name" in config
    ours = UNet2DConditionModel.from_config(config).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x, ctx, kw = inputs(SDXL_TINY, 2, 8, 8)
    with torch.no_grad():
        assert rel(ours(x, 1, ctx, **kw), theirs(x, 1, ctx, **kw).sample) <= TOL


def test_config_is_kept_and_checked():
    unet = UNet2DConditionModel.from_config({"_class_name": "UNet2DConditionModel", **SD15_TINY})
    assert unet.config.block_out_channels == (32, 64) and unet.config.attention_head_dim == 4
    assert "_class_name" not in unet.config
    direct = UNet2DConditionModel(**SD15_TINY)
    assert direct.config.cross_attention_dim == 16 and direct.config.in_channels == 4
    with pytest.raises(ValueError, match="class_embed_type"):
        UNet2DConditionModel.from_config({**SD15_TINY, "class_embed_type": "timestep"})
    UNet2DConditionModel.from_config({**SD15_TINY, "class_embed_type": None, "dual_cross_attention": False})
    with pytest.raises(ValueError, match="no_such_key"):
        UNet2DConditionModel.from_config({**SD15_TINY, "no_such_key": 1})
    with pytest.raises(ValueError, match="down_block_types"):
        UNet2DConditionModel(**{**SD15_TINY, "down_block_types": ("SimpleCrossAttnDownBlock2D", "DownBlock2D")})
    with pytest.raises(ValueError, match="attention_head_dim"):
        UNet2DConditionModel(**{**SD15_TINY, "attention_head_dim": (2, 4, 8)})


def test_bad_inputs_are_named(pairs):
    _, ours = pairs["sdxl"]
    x, ctx, kw = inputs(SDXL_TINY, 2, 8, 8)
    with pytest.raises(ValueError, match="added_cond_kwargs"):
        ours(x, 1, ctx)
    with pytest.raises(ValueError, match="sample"):
        ours(x[:, :3], 1, ctx, **kw)
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        ours(x, 1, ctx[:1], **kw)
    with pytest.raises(ValueError, match="timestep"):
        ours(x, torch.ones(3), ctx, **kw)
    bad = {"text_embeds": torch.randn(2, 19), "time_ids": kw["added_cond_kwargs"]["time_ids"]}
    with pytest.raises(ValueError, match="projection_class_embeddings_input_dim"):
        ours(x, 1, ctx, added_cond_kwargs=bad)


def test_half_precision_input_keeps_dtype(pairs):
    _, ours = pairs["sd15"]
    x, ctx, _ = inputs(SD15_TINY, 1, 8, 8)
    with torch.no_grad():
        out = ours(x.to(torch.bfloat16), 5, ctx)
    assert out.dtype == torch.bfloat16
    assert rel(out.float(), ours(x, 5, ctx)) < 3e-2
