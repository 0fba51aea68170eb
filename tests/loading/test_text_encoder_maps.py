"""Single-file text encoders: CLIP-L (prefix strip) and OpenCLIP (fused qkv, transposed projection)."""
import pytest
import torch
from loading_fixtures import assert_same_state_dict, clip_config_dict, tiny_clip

from velodiff.loading import (CheckpointError, convert_text_encoder, fit_clip_keys, load_state_dict_into,
                              text_encoder_to_original)

IDS = torch.tensor([[0, 5, 9, 17, 2, 1, 1]])


def _classic(sd):
    return {("text_model." + k if not k.startswith(("text_model.", "text_projection")) else k): v
            for k, v in sd.items()}


def _load(model_cls_proj, sd, source):
    fresh = tiny_clip(with_projection=model_cls_proj, initializer_range=0.7)
    return load_state_dict_into(fresh, fit_clip_keys(sd, fresh), source=source)


@pytest.mark.parametrize("prefix", ["cond_stage_model.transformer.", "conditioner.embedders.0.transformer."])
def test_clip_l_matches_diffusers(prefix):
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint
    te = tiny_clip()
    orig = text_encoder_to_original(te.state_dict(), prefix=prefix, kind="clip")
    orig[prefix + "text_model.embeddings.position_ids"] = torch.arange(77)[None]  # as in real files
    assert prefix + "text_model.encoder.layers.0.self_attn.q_proj.weight" in orig
    ours = convert_text_encoder(orig, clip_config_dict(te), prefix=prefix, kind="clip")
    ref = {k: v for k, v in convert_ldm_clip_checkpoint(orig).items() if not k.endswith("position_ids")}
    assert_same_state_dict(ours, ref)
    model = _load(False, ours, "clip.safetensors")
    with torch.no_grad():
        assert torch.equal(model(IDS).last_hidden_state, te(IDS).last_hidden_state)


@pytest.mark.parametrize("prefix, projection", [("cond_stage_model.model.", False),
                                                ("conditioner.embedders.1.model.", True),
                                                ("conditioner.embedders.0.model.", True)])
def test_open_clip_matches_diffusers(prefix, projection):
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    te = tiny_clip(with_projection=projection)
    orig = text_encoder_to_original(te.state_dict(), prefix=prefix, kind="open_clip")
    h = te.config.hidden_size
    assert orig[prefix + "transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * h, h)
    assert (prefix + "text_projection" in orig) == projection
    if projection:
        assert torch.equal(orig[prefix + "text_projection"], te.text_projection.weight.t())
    ours = convert_text_encoder(orig, clip_config_dict(te), prefix=prefix, kind="open_clip")
    assert_same_state_dict(ours, convert_open_clip_checkpoint(te, orig, prefix=prefix))
    assert_same_state_dict(text_encoder_to_original(ours, prefix=prefix, kind="open_clip"), orig)
    model = _load(projection, ours, "openclip.safetensors")
    with torch.no_grad():
        a, b = model(IDS), te(IDS)
    key = "text_embeds" if projection else "last_hidden_state"
    assert torch.equal(a[key], b[key])


def test_sd2_extra_layer_and_projection_are_dropped():
    """SD2 files carry OpenCLIP-H's last block and projection; diffusers' SD2 text encoder has neither."""
    prefix = "cond_stage_model.model."
    full = tiny_clip(with_projection=True, num_hidden_layers=4)
    orig = text_encoder_to_original(full.state_dict(), prefix=prefix, kind="open_clip")
    orig[prefix + "logit_scale"] = torch.tensor(4.6)
    cfg = {**clip_config_dict(full), "architectures": ["CLIPTextModel"], "num_hidden_layers": 3}
    ours = convert_text_encoder(orig, cfg, prefix=prefix, kind="open_clip")
    assert not any(".layers.3." in k or "projection" in k for k in ours)
    model = _load(False, ours, "sd2.safetensors")
    with torch.no_grad():
        want = full(IDS, output_hidden_states=True).hidden_states[-2]
        got = model(IDS, output_hidden_states=True).hidden_states[-1]
    assert torch.equal(got, want)  # the penultimate layer SD2 conditions on


def test_unknown_open_clip_key_is_named():
    prefix = "cond_stage_model.model."
    te = tiny_clip()
    orig = text_encoder_to_original(te.state_dict(), prefix=prefix, kind="open_clip")
    orig[prefix + "transformer.resblocks.0.mystery.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"f\.safetensors.*resblocks\.0\.mystery\.weight"):
        convert_text_encoder(orig, clip_config_dict(te), prefix=prefix, kind="open_clip", source="f.safetensors")
    with pytest.raises(CheckpointError, match=r"f\.safetensors.*no text-encoder weights under 'nowhere\.'"):
        convert_text_encoder(orig, clip_config_dict(te), prefix="nowhere.", kind="clip", source="f.safetensors")
