"""Single-file (LDM / SGM) UNet + VAE key maps, against diffusers' own single-file loader as the oracle."""
import pytest
import torch
from loading_fixtures import assert_same_state_dict, original_yaml, tiny_unet, tiny_vae

from velodiff.loading import (CheckpointError, convert_unet, convert_vae, infer_unet_config, infer_vae_config,
                              read_safetensors, unet_to_original, vae_to_original, write_safetensors)

FAMILIES = ["sd1", "sd2", "sdxl"]


@pytest.fixture(scope="module", params=FAMILIES)
def single_file(request, tmp_path_factory):
    """A tiny family-shaped UNet + VAE, written by velodiff in the original layout, and diffusers' YAML."""
    family = request.param
    folder = tmp_path_factory.mktemp(family)
    unet, vae = tiny_unet(family), tiny_vae()
    sd = {**unet_to_original(unet.state_dict(), unet.config), **vae_to_original(vae.state_dict(), vae.config)}
    path = str(folder / "model.safetensors")
    write_safetensors(sd, path)
    return family, path, original_yaml(family, str(folder / "model.yaml")), unet, vae


def test_original_keys_look_original(single_file):
    family, path, _, _, _ = single_file
    keys = read_safetensors(path).keys()
    assert "model.diffusion_model.input_blocks.0.0.weight" in keys
    assert "model.diffusion_model.time_embed.0.weight" in keys
    assert "first_stage_model.decoder.up.0.block.0.conv1.weight" in keys
    assert "first_stage_model.encoder.mid.attn_1.q.weight" in keys
    assert ("model.diffusion_model.label_emb.0.0.weight" in keys) == (family == "sdxl")
    assert not any("down_blocks" in k for k in keys)


def test_diffusers_reads_our_single_file(single_file):
    """Our diffusers -> original map is what diffusers' from_single_file expects (checks the reverse map)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    _, path, yaml, unet, vae = single_file
    ref_unet = UNet2DConditionModel.from_single_file(path, original_config=yaml, local_files_only=True)
    ref_vae = AutoencoderKL.from_single_file(path, original_config=yaml, local_files_only=True)
    assert_same_state_dict(ref_unet.state_dict(), unet.state_dict())
    assert_same_state_dict(ref_vae.state_dict(), vae.state_dict())


def test_our_conversion_equals_diffusers(single_file):
    """Our original -> diffusers map gives exactly diffusers' converted state dict (forward map)."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
    family, path, _, unet, vae = single_file
    sd = read_safetensors(path)
    ours_unet = convert_unet(sd, unet.config, source=path)
    ours_vae = convert_vae(sd, vae.config, source=path)
    assert_same_state_dict(ours_unet, convert_ldm_unet_checkpoint(sd, dict(unet.config)))
    assert_same_state_dict(ours_vae, convert_ldm_vae_checkpoint(sd, dict(vae.config)))
    assert_same_state_dict(ours_unet, unet.state_dict())


def test_inferred_configs_build_the_same_model(single_file):
    """Structure inferred from the weights + the head counts (not in weights) rebuild the model exactly."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from velodiff.loading import load_state_dict_into
    family, path, _, unet, vae = single_file
    sd = read_safetensors(path)
    extra = {k: unet.config[k] for k in ("attention_head_dim", "norm_num_groups", "addition_time_embed_dim",
                                         "sample_size")}
    ucfg = infer_unet_config(sd, family, extra)
    for k in ("block_out_channels", "layers_per_block", "down_block_types", "up_block_types", "cross_attention_dim",
              "use_linear_projection", "in_channels", "out_channels"):
        want = unet.config[k]
        assert ucfg[k] == (list(want) if isinstance(want, tuple) else want), k
    rebuilt = UNet2DConditionModel(**{k: v for k, v in ucfg.items() if not k.startswith("_")})
    load_state_dict_into(rebuilt, convert_unet(sd, ucfg, source=path), source=path)
    assert_same_state_dict(rebuilt.state_dict(), unet.state_dict())
    if family == "sd1":  # one forward as a smoke check (weights equal and configs equal imply the rest)
        x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 3, unet.config.cross_attention_dim)
        with torch.no_grad():
            assert torch.equal(rebuilt(x, t, ctx).sample, unet(x, t, ctx).sample)
    vcfg = infer_vae_config(sd, family, {"norm_num_groups": vae.config.norm_num_groups})
    rebuilt_vae = AutoencoderKL(**{k: v for k, v in vcfg.items() if not k.startswith("_")})
    load_state_dict_into(rebuilt_vae, convert_vae(sd, vcfg, source=path), source=path)
    assert_same_state_dict(rebuilt_vae.state_dict(), vae.state_dict())


def test_unmapped_key_is_named(single_file):
    family, path, _, unet, _ = single_file
    sd = read_safetensors(path)
    sd["model.diffusion_model.input_blocks.99.0.in_layers.0.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*input_blocks\.99\.0\.in_layers\.0\.weight"):
        convert_unet(sd, unet.config, source=path)


def test_no_unet_or_vae(tmp_path):
    with pytest.raises(CheckpointError, match=r"x\.safetensors.*no UNet weights"):
        convert_unet({"foo.weight": torch.zeros(1)}, {"down_block_types": [], "up_block_types": []},
                     source="x.safetensors")
    with pytest.raises(CheckpointError, match=r"x\.safetensors.*no VAE weights"):
        convert_vae({"foo.weight": torch.zeros(1)}, {"down_block_types": []}, source="x.safetensors")


def test_ema_weights_of_a_training_checkpoint(single_file):
    from velodiff.loading import ema_unet_weights, split_single_file
    family, path, _, unet, _ = single_file
    sd = read_safetensors(path)
    raw = {k: v for k, v in sd.items() if k.startswith("model.diffusion_model.")}
    ema = {"model_ema." + "".join(k.split(".")[1:]): v + 1 for k, v in raw.items()}
    full = {**sd, **ema, "model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(7)}
    extra = {"unet": {"attention_head_dim": unet.config.attention_head_dim}}
    plain = split_single_file(full, family=family, configs=extra)["unet"].state_dict
    assert_same_state_dict(plain, unet.state_dict())
    averaged = split_single_file(full, family=family, configs=extra, use_ema=True)["unet"].state_dict
    assert_same_state_dict(averaged, {k: v + 1 for k, v in unet.state_dict().items()})
    with pytest.raises(CheckpointError, match=r"e\.ckpt.*no EMA copy.*model_ema\.diffusion_modelinput_blocks00weight"):
        ema_unet_weights(sd, source="e.ckpt")
