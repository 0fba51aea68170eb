"""AutoencoderTiny (TAESD) against diffusers' AutoencoderTiny with identical weights (fp32 CPU, relative error
<= 1e-5)."""
import inspect

import pytest
import torch

from velodiff.models.taesd import AutoencoderTiny, convert_original_taesd_state_dict

TOL = 1e-5


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def tiny(ch=16, latent_channels=4, **kw):
    return dict(encoder_block_out_channels=(ch,) * 4, decoder_block_out_channels=(ch,) * 4,
                latent_channels=latent_channels, **kw)


CONFIGS = {
    "taesd-default": {},
    "taesd-16ch-latent": tiny(latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609),
    "3-stages-silu-bilinear": dict(encoder_block_out_channels=(8, 8, 8), decoder_block_out_channels=(12, 12, 12),
                                   num_encoder_blocks=(1, 2, 1), num_decoder_blocks=(2, 1, 1), act_fn="silu",
                                   upsample_fn="bilinear"),
}


def pair(config):
    from diffusers import AutoencoderTiny as DAutoencoderTiny
    torch.manual_seed(0)
    theirs = DAutoencoderTiny(**config).eval()
    ours = AutoencoderTiny.from_config(dict(theirs.config)).eval()
    missing, unexpected = ours.load_state_dict(theirs.state_dict(), strict=True)
    assert not missing and not unexpected
    return ours, theirs


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def models(request):
    return pair(CONFIGS[request.param])


@pytest.mark.parametrize("hw", [(16, 16), (24, 40), (17, 33)], ids=lambda s: f"{s[0]}x{s[1]}")
@torch.no_grad()
def test_encode_matches_diffusers(models, hw):
    ours, theirs = models
    x = torch.rand(2, 3, *hw) * 2 - 1
    z = ours.encode(x)
    assert rel(z, theirs.encode(x).latents) <= TOL
    assert z.shape[1] == ours.config.latent_channels


@pytest.mark.parametrize("hw", [(2, 2), (5, 7), (4, 3)], ids=lambda s: f"{s[0]}x{s[1]}")
@torch.no_grad()
def test_decode_matches_diffusers(models, hw):
    ours, theirs = models
    z = torch.randn(2, ours.config.latent_channels, *hw) * 2
    out = ours.decode(z)
    f = ours.config.upsampling_scaling_factor ** (len(ours.config.decoder_block_out_channels) - 1)
    assert out.shape == (2, 3, hw[0] * f, hw[1] * f)
    assert rel(out, theirs.decode(z).sample) <= TOL


@torch.no_grad()
def test_forward_and_latent_scaling_match_diffusers(models):
    ours, theirs = models
    x = torch.rand(2, 3, 16, 24) * 2 - 1
    assert rel(ours(x), theirs(x).sample) <= TOL
    z = torch.randn(2, ours.config.latent_channels, 3, 4) * 4
    assert torch.equal(ours.scale_latents(z), theirs.scale_latents(z))
    assert torch.equal(ours.unscale_latents(z), theirs.unscale_latents(z))


def test_state_dict_keys_and_shapes_equal_diffusers(models):
    ours, theirs = models
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}


def test_latent_conversion_follows_scaling_and_shift():
    z = torch.randn(1, 16, 3, 3)
    vae = AutoencoderTiny(**tiny(latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609))
    assert rel(vae.vae_to_latents(z), (z - 0.0609) * 1.5305) <= 1e-6
    assert rel(vae.latents_to_vae(z), z / 1.5305 + 0.0609) <= 1e-6
    plain = AutoencoderTiny(**tiny())
    z4 = torch.randn(1, 4, 3, 3)
    assert torch.equal(plain.vae_to_latents(z4), z4) and torch.equal(plain.latents_to_vae(z4), z4)


def test_config_defaults_equal_diffusers():
    from diffusers import AutoencoderTiny as DAutoencoderTiny
    ours = {k: p.default for k, p in inspect.signature(AutoencoderTiny.__init__).parameters.items() if k != "self"}
    theirs = {k: p.default for k, p in inspect.signature(DAutoencoderTiny.__init__).parameters.items() if k != "self"}
    assert ours == theirs


def test_from_saved_diffusers_config(tmp_path):
    import json

    from diffusers import AutoencoderTiny as DAutoencoderTiny
    DAutoencoderTiny(**tiny(ch=8)).save_config(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["block_out_channels"] == [8] * 4  # diffusers' derived copy of decoder_block_out_channels
    vae = AutoencoderTiny.from_config(config)
    assert vae.config.scaling_factor == 1.0 and vae.config.shift_factor == 0.0
    assert vae.config.decoder_block_out_channels == (8,) * 4
    with pytest.raises(ValueError, match="block_out_channels"):
        AutoencoderTiny.from_config(dict(config, block_out_channels=[16] * 4))
    with pytest.raises(ValueError, match="unsupported config key 'norm_type'"):
        AutoencoderTiny.from_config(dict(config, norm_type="group"))


@pytest.mark.parametrize("kw,match", [
    (dict(encoder_block_out_channels=(8, 16)), "encoder_block_out_channels"),
    (dict(decoder_block_out_channels=(8, 8, 16, 16), num_decoder_blocks=(1, 1, 1, 1)), "decoder_block_out_channels"),
    (dict(act_fn="tanh"), "act_fn"),
    (dict(upsample_fn="area"), "upsample_fn"),
    (dict(scaling_factor=-1.0), "scaling_factor"),
])
def test_bad_config_is_named(kw, match):
    with pytest.raises(ValueError, match=match):
        AutoencoderTiny(**kw)


def test_bad_inputs_name_the_argument():
    vae = AutoencoderTiny(**tiny(ch=8))
    with pytest.raises(ValueError, match="x must have shape"):
        vae.encode(torch.randn(1, 1, 8, 8))
    with pytest.raises(ValueError, match="z must have shape"):
        vae.decode(torch.randn(1, 16, 2, 2))


def test_original_taesd_keys_convert():
    """Original TAESD: encoder Sequential indices equal diffusers'; the decoder's start with a parameter-free Clamp,
    so original decoder index i is diffusers' i - 1."""
    ours, theirs = pair({})
    sd = theirs.state_dict()
    enc = {k[len("encoder.layers."):]: v for k, v in sd.items() if k.startswith("encoder.")}
    dec = {}
    for k, v in sd.items():
        if k.startswith("decoder."):
            index, rest = k[len("decoder.layers."):].split(".", 1)
            dec[f"{int(index) + 1}.{rest}"] = v
    # spot-check against the original layout: decoder "1" is conv(latent, 64), "3" the first Block
    assert dec["1.weight"].shape == (64, 4, 3, 3)
    assert "3.conv.0.weight" in dec and "0.weight" in enc and enc["0.weight"].shape == (64, 3, 3, 3)
    fresh = AutoencoderTiny()
    fresh.load_state_dict(convert_original_taesd_state_dict(enc, dec), strict=True)
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.equal(fresh.decode(fresh.encode(x)), theirs.decode(theirs.encode(x).latents).sample)
    with pytest.raises(ValueError, match="decoder"):
        convert_original_taesd_state_dict(decoder={"0.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="encoder"):
        convert_original_taesd_state_dict(encoder={"layers.0.weight": torch.zeros(1)})
