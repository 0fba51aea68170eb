"""DiT and PixArt single files: key maps checked by round trips and by an independent original-DiT forward."""
import math

import pytest
import torch
import torch.nn.functional as F
from loading_fixtures import assert_same_state_dict, randomize, seeded

from velodiff.loading import (CheckpointError, convert_dit, convert_pixart, convert_single_file_to_diffusers,
                              detect_family, dit_to_original, infer_transformer_config, load_state_dict_into,
                              pixart_to_original, read_safetensors, split_single_file, write_safetensors)

DIT = dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2, sample_size=8,
           patch_size=2, num_embeds_ada_norm=10)
PIXART = dict(num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=8, num_layers=2, sample_size=8,
              patch_size=2, cross_attention_dim=24, caption_channels=12, use_additional_conditions=True,
              interpolation_scale=1)


def _dit():
    from diffusers import DiTTransformer2DModel
    seeded()
    model = randomize(DiTTransformer2DModel(**DIT)).eval()
    with torch.no_grad():  # diffusers' DiT holds one embedder copied into every block (as converted ones do)
        shared = model.transformer_blocks[0].norm1.emb.state_dict()
        for block in model.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(shared)
    return model


def _pixart():
    from diffusers import PixArtTransformer2DModel
    seeded()
    return randomize(PixArtTransformer2DModel(**PIXART)).eval()


def _original_file(model, to_original, path):
    sd = to_original(model.state_dict())
    sd["pos_embed"] = model.pos_embed.pos_embed.clone()  # the originals store the fixed sin-cos table
    if "caption_projection.linear_1.weight" in model.state_dict():
        sd["y_embedder.y_embedding"] = torch.randn(4, PIXART["caption_channels"])
    write_safetensors(sd, path)
    return read_safetensors(path)


def _original_dit_forward(sd, x, t, y, heads, patch, eps):
    """facebookresearch/DiT ``DiT.forward`` on an original-layout state dict (timm attention, adaLN-Zero).

    The timestep features use diffusers' formula (``downscale_freq_shift=1``), a known diffusers deviation,
    so that this checks the weight layout only."""
    lin = lambda h, name: F.linear(h, sd[name + ".weight"], sd[name + ".bias"])  # noqa: E731
    h = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=patch)
    b, d, gh, gw = h.shape
    h = h.flatten(2).transpose(1, 2) + sd["pos_embed"]
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / (half - 1))
    args = t.float()[:, None] * freqs[None]
    tf = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    c = lin(F.silu(lin(tf, "t_embedder.mlp.0")), "t_embedder.mlp.2") + sd["y_embedder.embedding_table.weight"][y]
    mod = lambda h, shift, scale: F.layer_norm(h, (d,), eps=eps) * (1 + scale[:, None]) + shift[:, None]  # noqa
    n_blocks = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(n_blocks):
        p = f"blocks.{i}."
        sm, cm, gm, sf, cf, gf = lin(F.silu(c), p + "adaLN_modulation.1").chunk(6, dim=1)
        a = mod(h, sm, cm)
        qkv = lin(a, p + "attn.qkv").reshape(b, -1, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2]).transpose(1, 2).reshape(b, -1, d)
        h = h + gm[:, None] * lin(att, p + "attn.proj")
        m = lin(F.gelu(lin(mod(h, sf, cf), p + "mlp.fc1"), approximate="tanh"), p + "mlp.fc2")
        h = h + gf[:, None] * m
    shift, scale = lin(F.silu(c), "final_layer.adaLN_modulation.1").chunk(2, dim=1)
    h = lin(mod(h, shift, scale), "final_layer.linear")
    out_ch = h.shape[-1] // patch ** 2
    h = h.reshape(b, gh, gw, patch, patch, out_ch)
    return torch.einsum("nhwpqc->nchpwq", h).reshape(b, out_ch, gh * patch, gw * patch)


def test_dit_matches_the_original_forward(tmp_path):
    from diffusers import DiTTransformer2DModel
    model = _dit()
    sd = _original_file(model, dit_to_original, tmp_path / "dit.safetensors")
    assert detect_family(sd) == "dit"
    cfg = infer_transformer_config(sd, "dit", {"attention_head_dim": 8, "num_attention_heads": 2})
    assert {k: cfg[k] for k in DIT} == DIT
    fresh = DiTTransformer2DModel(**{k: v for k, v in cfg.items() if not k.startswith("_")}).eval()
    load_state_dict_into(fresh, convert_dit(sd), source="dit.safetensors")
    assert_same_state_dict(fresh.state_dict(), model.state_dict())
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.tensor([1, 10])
    with torch.no_grad():
        got = fresh(x, timestep=t, class_labels=y).sample
        want = _original_dit_forward(sd, x, t, y, heads=2, patch=2, eps=fresh.config.norm_eps)
    # an independent fp32 computation (different op order and attention kernel): a wrong map is O(1) off
    assert (got - want).norm() / want.norm() < 1e-4


def test_dit_diverged_block_embedders_are_refused():
    sd = _dit().state_dict()
    sd["transformer_blocks.1.norm1.emb.class_embedder.embedding_table.weight"] = torch.zeros(11, 16)
    with pytest.raises(CheckpointError, match=r"transformer_blocks\.1\.norm1\.emb\.class_embedder.*block 0"):
        dit_to_original(sd, source="d")


def test_pixart_round_trip_and_folder(tmp_path):
    from diffusers import PixArtTransformer2DModel
    model = _pixart()
    sd = _original_file(model, pixart_to_original, tmp_path / "pixart.safetensors")
    assert detect_family(sd) == "pixart"
    h = PIXART["num_attention_heads"] * PIXART["attention_head_dim"]
    assert sd["blocks.0.cross_attn.kv_linear.weight"].shape == (2 * h, h)
    assert torch.equal(sd["blocks.0.cross_attn.kv_linear.weight"][:h],
                       model.state_dict()["transformer_blocks.0.attn2.to_k.weight"])
    assert_same_state_dict(convert_pixart(sd), model.state_dict())
    heads = {"transformer": {"attention_head_dim": 12, "num_attention_heads": 2}}
    parts = split_single_file(sd, configs=heads)
    assert {k: parts["transformer"].config[k] for k in PIXART} == PIXART
    written = convert_single_file_to_diffusers(tmp_path / "pixart.safetensors", tmp_path / "out",
                                               configs=heads)
    assert written == {"transformer": ["diffusers", "PixArtTransformer2DModel"]}
    loaded = PixArtTransformer2DModel.from_pretrained(tmp_path / "out" / "transformer").eval()
    assert_same_state_dict(loaded.state_dict(), model.state_dict())
    x, t, ehs = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 5, PIXART["caption_channels"])
    cond = {"resolution": torch.tensor([[64.0, 64.0]]), "aspect_ratio": torch.tensor([[1.0]])}
    with torch.no_grad():  # weights are bit-identical (above); diffusers' own save/from_pretrained round trip
        got = loaded(x, ehs, timestep=t, added_cond_kwargs=cond).sample  # moves outputs by ~4e-7, so compare
        want = model(x, ehs, timestep=t, added_cond_kwargs=cond).sample  # at the fp32 bound
    assert (got - want).norm() / want.norm() < 1e-5


def test_unknown_transformer_key_is_named():
    sd = pixart_to_original(_pixart().state_dict())
    sd["blocks.0.attn.q_norm.weight"] = torch.ones(12)
    with pytest.raises(CheckpointError, match=r"p\.pth.*blocks\.0\.attn\.q_norm\.weight"):
        convert_pixart(sd, source="p.pth")
