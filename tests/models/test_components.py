"""Shared model components against diffusers' modules with the same weights (fp32, 1e-5 relative)."""
import pytest
import torch

from velodiff.models.attention import BACKENDS, Attention, attention, set_attention_backend
from velodiff.models.embeddings import TimestepEmbedding, Timesteps
from velodiff.models.feedforward import FeedForward
from velodiff.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D


def rel(a, b):
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())


def copy_into(ours, theirs):
    missing, unexpected = ours.load_state_dict(theirs.state_dict(), strict=True)
    assert not missing and not unexpected


def seeded(module_fn):
    torch.manual_seed(0)
    return module_fn()


@pytest.mark.parametrize("cross", [None, 12])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_attention_matches_diffusers(cross, bias, backend):
    from diffusers.models.attention_processor import Attention as DAttention
    theirs = seeded(lambda: DAttention(16, cross_attention_dim=cross, heads=2, dim_head=8, bias=bias))
    ours = Attention(16, cross_attention_dim=cross, heads=2, dim_head=8, bias=bias)
    copy_into(ours, theirs)
    ours.backend = backend
    x = torch.randn(3, 10, 16)
    ctx = torch.randn(3, 7, cross) if cross else None
    assert rel(ours(x, ctx), theirs(x, ctx)) <= 1e-5


def test_spatial_attention_with_group_norm_matches_diffusers():
    from diffusers.models.attention_processor import Attention as DAttention
    kw = dict(heads=1, dim_head=16, rescale_output_factor=1.0, eps=1e-6, norm_num_groups=4, residual_connection=True,
              bias=True)
    theirs = seeded(lambda: DAttention(16, upcast_softmax=True, _from_deprecated_attn_block=True, **kw))
    ours = Attention(16, **kw)
    copy_into(ours, theirs)
    x = torch.randn(2, 16, 5, 3)
    assert rel(ours(x), theirs(x)) <= 1e-5


def test_attention_mask_and_backends_agree():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, 5, 8, generator=g) for _ in range(3))
    mask = torch.rand(2, 1, 1, 5, generator=g) > 0.3
    mask[..., 0] = True
    assert rel(attention(q, k, v, mask=mask, backend="sdpa"), attention(q, k, v, mask=mask, backend="math")) <= 1e-5


def test_unknown_backend_is_named():
    q = torch.randn(1, 1, 2, 4)
    with pytest.raises(ValueError, match="nope"):
        attention(q, q, q, backend="nope")
    with pytest.raises(ValueError, match="nope"):
        set_attention_backend(Attention(4, heads=1, dim_head=4), "nope")
    assert {"sdpa", "math"} <= set(BACKENDS)


def test_set_attention_backend_per_layer():
    model = torch.nn.Sequential(Attention(8, heads=2, dim_head=4), Attention(8, heads=2, dim_head=4))
    assert set_attention_backend(model, "math", where=lambda name, m: name == "1") == 1
    assert [m.backend for m in model] == ["auto", "math"]


@pytest.mark.parametrize("flip,shift", [(True, 0), (False, 1)])
def test_timestep_embedding_matches_diffusers(flip, shift):
    from diffusers.models.embeddings import TimestepEmbedding as DTE, Timesteps as DT
    t = torch.tensor([0.0, 1.0, 37.5, 999.0])
    assert rel(Timesteps(32, flip, shift)(t), DT(32, flip, shift)(t)) <= 1e-6
    theirs = seeded(lambda: DTE(32, 64))
    ours = TimestepEmbedding(32, 64)
    copy_into(ours, theirs)
    e = torch.randn(4, 32)
    assert rel(ours(e), theirs(e)) <= 1e-5


@pytest.mark.parametrize("act", ["geglu", "gelu", "gelu-approximate"])
def test_feedforward_matches_diffusers(act):
    from diffusers.models.attention import FeedForward as DFF
    theirs = seeded(lambda: DFF(16, activation_fn=act))
    ours = FeedForward(16, activation_fn=act)
    copy_into(ours, theirs)
    x = torch.randn(2, 5, 16)
    assert rel(ours(x), theirs(x)) <= 1e-5


@pytest.mark.parametrize("cin,cout,temb", [(8, 8, 16), (8, 12, 16), (8, 12, None)])
def test_resnet_block_matches_diffusers(cin, cout, temb):
    from diffusers.models.resnet import ResnetBlock2D as DRB
    theirs = seeded(lambda: DRB(in_channels=cin, out_channels=cout, temb_channels=temb, groups=4))
    ours = ResnetBlock2D(cin, cout, temb_channels=temb, groups=4)
    copy_into(ours, theirs)
    x = torch.randn(2, cin, 6, 5)
    e = torch.randn(2, temb) if temb else None
    assert rel(ours(x, e), theirs(x, e)) <= 1e-5


@pytest.mark.parametrize("padding", [0, 1])
def test_down_and_upsample_match_diffusers(padding):
    from diffusers.models.downsampling import Downsample2D as DD
    from diffusers.models.upsampling import Upsample2D as DU
    theirs = seeded(lambda: DD(8, use_conv=True, padding=padding, name="op"))
    ours = Downsample2D(8, padding=padding)
    copy_into(ours, theirs)
    x = torch.randn(2, 8, 7, 6)
    assert rel(ours(x), theirs(x)) <= 1e-5
    theirs_u = seeded(lambda: DU(8, use_conv=True))
    ours_u = Upsample2D(8)
    copy_into(ours_u, theirs_u)
    assert rel(ours_u(x), theirs_u(x)) <= 1e-5
