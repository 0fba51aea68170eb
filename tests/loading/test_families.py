"""Family detection and config inference at real SD1.5 / SD2.1 / SDXL / refiner sizes (meta tensors)."""
import pytest
import torch
import loading_fixtures  # noqa: F401  (sets HF_HUB_OFFLINE)

from velodiff.loading import (CheckpointError, TEXT_ENCODER_PREFIXES, convert_text_encoder, convert_unet,
                              default_text_encoder_configs, default_unet_config, default_vae_config, detect_family,
                              infer_text_encoder_config, infer_unet_config, infer_vae_config,
                              text_encoder_to_original, unet_to_original, vae_to_original)

FAMILIES = ["sd1", "sd2", "sdxl", "sdxl_refiner"]
#: parameter counts of the released UNets (research notes section 1.1, counted on the meta device)
UNET_PARAMS_M = {"sd1": 859.5, "sd2": 865.9, "sdxl": 2567.5}


def _meta_unet(cfg):
    from diffusers import UNet2DConditionModel
    with torch.device("meta"):
        return UNet2DConditionModel(**{k: v for k, v in cfg.items() if not k.startswith("_")})


def _meta_clip(cfg):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    cls = CLIPTextModelWithProjection if "CLIPTextModelWithProjection" in cfg["architectures"] else CLIPTextModel
    with torch.device("meta"):
        return cls(CLIPTextConfig(**cfg))


@pytest.fixture(scope="module", params=FAMILIES)
def real_size_file(request):
    """A meta-tensor single file with each family's released shapes, built from our default configs."""
    from diffusers import AutoencoderKL
    family = request.param
    unet = _meta_unet(default_unet_config(family))
    vcfg = default_vae_config(family)
    with torch.device("meta"):
        vae = AutoencoderKL(**{k: v for k, v in vcfg.items() if not k.startswith("_")})
    sd = {**unet_to_original(unet.state_dict(), unet.config), **vae_to_original(vae.state_dict(), vae.config)}
    for name, cfg in default_text_encoder_configs(family).items():
        prefix, kind = TEXT_ENCODER_PREFIXES[family][name]
        if family == "sd2":  # the released file holds all 24 OpenCLIP-H blocks and the projection
            cfg = {**cfg, "num_hidden_layers": 24, "architectures": ["CLIPTextModelWithProjection"],
                   "projection_dim": 1024}
        sd.update(text_encoder_to_original(_meta_clip(cfg).state_dict(), prefix=prefix, kind=kind))
    return family, sd, unet


def test_unet_parameter_counts(real_size_file):
    family, _, unet = real_size_file
    if family in UNET_PARAMS_M:
        assert sum(p.numel() for p in unet.parameters()) / 1e6 == pytest.approx(UNET_PARAMS_M[family], abs=0.05)


def test_detect_family(real_size_file):
    family, sd, _ = real_size_file
    assert detect_family(sd) == family
    unet_only = {k: v for k, v in sd.items() if k.startswith("model.diffusion_model.")}
    assert detect_family(unet_only) == family  # by the cross-attention width
    assert detect_family({k: tuple(v.shape) for k, v in unet_only.items()}) == family


def test_inferred_configs_equal_the_defaults(real_size_file):
    family, sd, _ = real_size_file
    assert infer_unet_config(sd, family) == default_unet_config(family)
    assert infer_vae_config(sd, family) == default_vae_config(family)
    for name, cfg in default_text_encoder_configs(family).items():
        prefix, kind = TEXT_ENCODER_PREFIXES[family][name]
        inferred = infer_text_encoder_config(sd, family, name, prefix, kind)
        assert inferred == cfg, name
        te = convert_text_encoder(sd, inferred, prefix=prefix, kind=kind)
        assert set(te) == {("text_model." + k if not k.startswith(("text_model.", "text_projection")) else k)
                           for k in _meta_clip(cfg).state_dict()}, name
    unet_keys = set(_meta_unet(default_unet_config(family)).state_dict())
    assert set(convert_unet(sd, default_unet_config(family))) == unet_keys


def test_inpainting_unet_keeps_nine_input_channels():
    cfg = {**default_unet_config("sd1"), "in_channels": 9}
    unet = _meta_unet(cfg)
    sd = unet_to_original(unet.state_dict(), unet.config)
    assert detect_family(sd) == "sd1"
    assert infer_unet_config(sd, "sd1")["in_channels"] == 9


@pytest.mark.parametrize("keys, family", [
    (["x_embedder.proj.weight", "y_embedder.embedding_table.weight", "blocks.0.adaLN_modulation.1.weight"], "dit"),
    (["t_block.1.weight", "blocks.0.scale_shift_table", "y_embedder.y_proj.fc1.weight"], "pixart"),
])
def test_detect_transformer_families(keys, family):
    assert detect_family(keys) == family


def test_detect_refuses_diffusers_and_unknown_files():
    with pytest.raises(CheckpointError, match=r"u\.safetensors.*diffusers-format"):
        detect_family(["down_blocks.0.resnets.0.conv1.weight"], source="u.safetensors")
    with pytest.raises(CheckpointError, match=r"w\.safetensors.*not a recognised.*'foo'"):
        detect_family(["foo", "bar"], source="w.safetensors")


@pytest.mark.parametrize("family", ["dit", "pixart"])
def test_transformer_families_at_real_size(family):
    """DiT-XL/2-256 and PixArt-XL-2-1024-MS: 675 M / 611 M parameters, detected and configured from shapes."""
    from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel
    from velodiff.loading import (DIT_CONFIG, PIXART_CONFIG, convert_dit, convert_pixart, dit_to_original,
                                  infer_transformer_config, pixart_to_original)
    ref = DIT_CONFIG if family == "dit" else PIXART_CONFIG
    cls = DiTTransformer2DModel if family == "dit" else PixArtTransformer2DModel
    with torch.device("meta"):
        model = cls(**{k: v for k, v in ref.items() if not k.startswith("_")})
    sd = (dit_to_original if family == "dit" else pixart_to_original)(model.state_dict())
    sd["pos_embed"] = torch.empty(1, (ref["sample_size"] // 2) ** 2, 1152, device="meta")
    params = sum(v.numel() for k, v in sd.items() if k != "pos_embed") / 1e6
    assert params == pytest.approx(675 if family == "dit" else 611, abs=5)  # DiT, PixArt-alpha papers
    assert detect_family(sd) == family
    assert infer_transformer_config(sd, family) == ref
    assert set((convert_dit if family == "dit" else convert_pixart)(sd)) == set(model.state_dict())
