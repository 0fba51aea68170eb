"""DiTTransformer2DModel against diffusers' DiTTransformer2DModel with the same weights (fp32, relative <= TOL)."""
import inspect

import pytest
import torch
import torch.nn.functional as F

from velodiff.models.attention import set_attention_backend
from velodiff.models.dit import DiTTransformer2DModel
from velodiff.models.dit_common import PatchEmbed, sincos_2d_pos_embed

CONFIGS = {
    # DiT-XL/2 layout in miniature: learned sigma (out = 2 * in), 1000 classes + null (the pipeline's null = 1000).
    "xl_like": dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
                    sample_size=8, patch_size=2, num_embeds_ada_norm=1000),
    # Awkward: odd token grid (5 x 5), 3 heads of 12, out_channels defaulted, affine MLP norm, exact GELU.
    "awkward": dict(num_attention_heads=3, attention_head_dim=12, in_channels=3, out_channels=None, num_layers=1,
                    sample_size=10, patch_size=2, num_embeds_ada_norm=7, norm_elementwise_affine=True,
                    norm_eps=1e-6, activation_fn="gelu", attention_bias=False),
    # patch 1, one head, fp32-upcast attention flag, geglu MLP.
    "patch1": dict(num_attention_heads=1, attention_head_dim=16, in_channels=2, out_channels=4, num_layers=2,
                   sample_size=6, patch_size=1, num_embeds_ada_norm=5, upcast_attention=True, activation_fn="geglu"),
}


# Relative Frobenius error allowed against diffusers, fp32 (u = 6e-8): the same operations in the same order give
# bit-identical outputs (measured 0 in most cases below); another attention kernel (the math backend) measured at
# most 1.3e-7, a few u. The bound is ~8x that, still 10x tighter than the blueprint's fp32 1e-5.
TOL = 1e-6


def rel(a, b):
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())


def pair(cfg, seed=0):
    from diffusers import DiTTransformer2DModel as DDiT
    torch.manual_seed(seed)
    theirs = DDiT(**cfg).eval()
    ours = DiTTransformer2DModel(**cfg).eval()
    missing, unexpected = ours.load_state_dict(theirs.state_dict(), strict=True)
    assert not missing and not unexpected
    return ours, theirs


def reference_any_shape(theirs, x, t, y):
    """diffusers' DiT forward built from its own modules, with an unpatchify that keeps H != W (diffusers'
    forward assumes a square token grid)."""
    p, c = theirs.config.patch_size, theirs.out_channels
    h, w = x.shape[-2] // p, x.shape[-1] // p
    s = theirs.pos_embed(x)
    for block in theirs.transformer_blocks:
        s = block(s, timestep=t, class_labels=y)
    cond = theirs.transformer_blocks[0].norm1.emb(t, y, hidden_dtype=s.dtype)
    shift, scale = theirs.proj_out_1(F.silu(cond)).chunk(2, dim=1)
    s = theirs.proj_out_2(theirs.norm_out(s) * (1 + scale[:, None]) + shift[:, None])
    s = s.reshape(-1, h, w, p, p, c).permute(0, 5, 1, 3, 2, 4)
    return s.reshape(-1, c, h * p, w * p)


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("batch", [1, 3])
@torch.no_grad()
def test_dit_matches_diffusers(name, batch):
    cfg = CONFIGS[name]
    ours, theirs = pair(cfg)
    n = cfg["num_embeds_ada_norm"]
    g = torch.Generator().manual_seed(batch)
    s = cfg["sample_size"]
    x = torch.randn(batch, cfg["in_channels"], s, s, generator=g)
    for t in ([0, 999, 500][:batch], [37.5, 1.0, 250.25][:batch]):
        t = torch.tensor(t)
        y = torch.tensor([n, 0, n - 1][:batch])  # null class, first, last
        out = ours(x, t, y)
        ref = theirs(x, t, y).sample
        assert out.shape == (batch, theirs.out_channels, s, s)
        assert rel(out, ref) <= TOL


@pytest.mark.parametrize("hw", [(12, 12), (4, 4)])
@torch.no_grad()
def test_dit_other_square_sizes_match_diffusers(hw):
    ours, theirs = pair(CONFIGS["xl_like"])
    x = torch.randn(2, 4, *hw)
    t, y = torch.tensor([10, 900]), torch.tensor([3, 1000])
    assert rel(ours(x, t, y), theirs(x, t, y).sample) <= TOL


@pytest.mark.parametrize("name,hw", [("xl_like", (8, 12)), ("xl_like", (6, 4)), ("awkward", (10, 6)),
                                     ("patch1", (3, 7))])
@torch.no_grad()
def test_dit_non_square_matches_diffusers_modules(name, hw):
    cfg = CONFIGS[name]
    ours, theirs = pair(cfg)
    x = torch.randn(2, cfg["in_channels"], *hw)
    t, y = torch.tensor([10, 900]), torch.tensor([cfg["num_embeds_ada_norm"], 1])
    out = ours(x, t, y)
    assert out.shape == (2, theirs.out_channels, *hw)
    assert rel(out, reference_any_shape(theirs, x, t, y)) <= TOL


@torch.no_grad()
def test_dit_scalar_timestep_and_math_backend():
    ours, theirs = pair(CONFIGS["xl_like"])
    x = torch.randn(2, 4, 8, 8)
    y = torch.tensor([5, 1000])
    ref = theirs(x, torch.tensor([321, 321]), y).sample
    assert rel(ours(x, 321, y), ref) <= TOL
    assert rel(ours(x, torch.tensor(321), y), ref) <= TOL
    assert rel(ours(x, torch.tensor([321]), y), ref) <= TOL
    assert set_attention_backend(ours, "math") == 2
    assert rel(ours(x, 321, y), ref) <= TOL


@torch.no_grad()
def test_dit_bf16_close_to_fp32():
    ours, _ = pair(CONFIGS["xl_like"])
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.tensor([3, 1000])
    ref = ours(x, t, y)
    out = ours.to(torch.bfloat16)(x.bfloat16(), t, y)
    assert out.dtype == torch.bfloat16
    assert rel(out.float(), ref) <= 3e-2


def test_pos_embed_matches_diffusers():
    from diffusers.models.embeddings import get_2d_sincos_pos_embed
    for (h, w, base, scale) in [(4, 4, 4, 1.0), (3, 5, 4, 0.5), (6, 2, 8, 2.0), (1, 7, 3, 1.0)]:
        ref = get_2d_sincos_pos_embed(24, (h, w), base_size=base, interpolation_scale=scale).float()
        assert torch.equal(sincos_2d_pos_embed(24, h, w, base, scale), ref)
    with pytest.raises(ValueError, match="multiple of 4"):
        sincos_2d_pos_embed(22, 2, 2, 2)


def test_meta_build_then_assign_load_rebuilds_pos_table():
    cfg = CONFIGS["awkward"]
    ours, theirs = pair(cfg)
    with torch.device("meta"):
        lazy = DiTTransformer2DModel(**cfg)
    lazy.load_state_dict(theirs.state_dict(), strict=True, assign=True)
    assert not lazy.pos_embed.pos_embed.is_meta
    assert torch.equal(lazy.pos_embed.pos_embed, ours.pos_embed.pos_embed)
    x, t, y = torch.randn(1, 3, 10, 10), torch.tensor([5]), torch.tensor([7])
    with torch.no_grad():
        assert rel(lazy(x, t, y), theirs(x, t, y).sample) <= TOL


def test_dit_bad_inputs_are_named():
    ours = DiTTransformer2DModel(**CONFIGS["awkward"])
    x, t, y = torch.randn(2, 3, 10, 10), torch.tensor([1, 2]), torch.tensor([0, 7])
    with pytest.raises(ValueError, match="class_labels"):
        ours(x, t, torch.tensor([0, 8]))
    with pytest.raises(ValueError, match="class_labels"):
        ours(x, t, torch.tensor([0, -1]))
    with pytest.raises(ValueError, match="class_labels"):
        ours(x, t, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="class_labels"):
        ours(x, t, torch.tensor([0]))
    with pytest.raises(ValueError, match="hidden_states"):
        ours(torch.randn(2, 4, 10, 10), t, y)
    with pytest.raises(ValueError, match="patch_size"):
        ours(torch.randn(2, 3, 10, 9), t, y)
    with pytest.raises(ValueError, match="timestep"):
        ours(x, torch.tensor([1, 2, 3]), y)
    with pytest.raises(ValueError, match="norm_type"):
        DiTTransformer2DModel(norm_type="ada_norm", num_layers=1)
    with pytest.raises(ValueError, match="activation_fn"):
        DiTTransformer2DModel(activation_fn="swiglu", num_layers=1, num_attention_heads=1, attention_head_dim=8)


def hub_style_config(**tiny):
    """facebook/DiT-XL-2-256 ``transformer/config.json`` (a legacy Transformer2DModel config), sizes shrunk."""
    cfg = {"_class_name": "Transformer2DModel", "_diffusers_version": "0.12.0.dev0",
           "activation_fn": "gelu-approximate", "attention_bias": True, "attention_head_dim": 72,
           "cross_attention_dim": None, "dropout": 0.0, "in_channels": 4, "norm_elementwise_affine": False,
           "norm_num_groups": 32, "norm_type": "ada_norm_zero", "num_attention_heads": 16,
           "num_embeds_ada_norm": 1000, "num_layers": 28, "num_vector_embeds": None, "only_cross_attention": False,
           "out_channels": 8, "patch_size": 2, "sample_size": 32, "upcast_attention": False,
           "use_linear_projection": False}
    cfg.update(tiny)
    return cfg


def test_dit_from_config():
    cfg = hub_style_config(num_layers=1, num_attention_heads=2, attention_head_dim=8, sample_size=8)
    model = DiTTransformer2DModel.from_config(cfg)
    assert model.config.num_layers == 1 and model.config["out_channels"] == 8
    assert model.config.norm_eps == 1e-5  # default filled in, as diffusers does
    assert "_class_name" not in model.config
    assert model.out_channels == 8 and len(model.transformer_blocks) == 1
    with pytest.raises(ValueError, match="cross_attention_dim"):
        DiTTransformer2DModel.from_config({**cfg, "cross_attention_dim": 768})
    with pytest.raises(ValueError, match="frobnicate"):
        DiTTransformer2DModel.from_config({**cfg, "frobnicate": 1})
    with pytest.raises(ValueError, match="norm_type"):
        DiTTransformer2DModel.from_config({**cfg, "norm_type": "layer_norm"})


def test_dit_from_config_matches_diffusers_from_config():
    from diffusers import DiTTransformer2DModel as DDiT
    cfg = hub_style_config(num_layers=1, num_attention_heads=2, attention_head_dim=8, sample_size=8)
    torch.manual_seed(0)
    theirs = DDiT.from_config({k: v for k, v in cfg.items() if k in DiTTransformer2DModel.from_config(cfg).config})
    ours = DiTTransformer2DModel.from_config(cfg)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.tensor([1000, 4])
    with torch.no_grad():
        assert rel(ours(x, t, y), theirs(x, t, y).sample) <= TOL


def test_patch_embed_table_is_not_in_state_dict():
    pe = PatchEmbed(8, 2, 4, 16)
    assert set(pe.state_dict()) == {"proj.weight", "proj.bias"}


@pytest.mark.slow
@torch.no_grad()
def test_dit_xl2_random_weights_match_diffusers():
    """DiT-XL/2 size (28 x 1152, 16 heads, learned sigma) at a 32 x 32 latent, one set of weights shared."""
    from diffusers import DiTTransformer2DModel as DDiT
    cfg = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
               sample_size=32, patch_size=2, num_embeds_ada_norm=1000)
    torch.manual_seed(0)
    theirs = DDiT(**cfg).eval()
    with torch.device("meta"):
        ours = DiTTransformer2DModel(**cfg)
    ours.load_state_dict(theirs.state_dict(), strict=True, assign=True)  # the same tensors, not copies
    assert ours.proj_out_2.weight.data_ptr() == theirs.proj_out_2.weight.data_ptr()
    x = torch.randn(2, 4, 32, 32)
    t, y = torch.tensor([999, 250]), torch.tensor([207, 1000])
    out, ref = ours(x, t, y), theirs(x, t, y).sample
    assert out.shape == (2, 8, 32, 32)
    assert torch.isfinite(ref).all()
    err = rel(out, ref)
    print(f"DiT-XL/2 32x32 random weights: relative error {err:.3e}")
    assert err <= 1e-4


def test_dit_defaults_follow_diffusers():
    from diffusers import DiTTransformer2DModel as DDiT

    def defaults(fn):
        return {k: p.default for k, p in inspect.signature(fn).parameters.items()
                if p.default is not inspect.Parameter.empty}
    assert defaults(DiTTransformer2DModel.__init__) == defaults(DDiT.__init__)
