"""Model-level LoRA on quantized layers: peft / older key styles, alpha / r, strength, exact removal."""
import pytest
import torch

import velodiff as vd
from velodiff.lora import LoraFormatError
from velodiff.quant import QuantConfig, QuantizedLinear


@pytest.fixture()
def unet():
    pipe = vd.Pipeline.from_pretrained("digits")
    vd.quant.quantize(pipe, QuantConfig("naive-w4a4", rank=0), progress=False)
    return pipe.unet


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([300.0, 700.0]), torch.randn(2, 16, 64, generator=g)


def _lora_state(unet, names, r=4, style="peft", alpha=None):
    g = torch.Generator().manual_seed(1)
    state = {}
    for n in names:
        m = unet.get_submodule(n)
        a = torch.randn(r, m.in_features, generator=g) * 0.3
        b = torch.randn(m.out_features, r, generator=g) * 0.3
        if style == "peft":
            state[f"unet.{n}.lora_A.weight"], state[f"unet.{n}.lora_B.weight"] = a, b
        else:
            state[f"unet.{n}.lora_down.weight"], state[f"unet.{n}.lora_up.weight"] = a, b
            if alpha is not None:
                state[f"unet.{n}.alpha"] = torch.tensor(float(alpha))
    return state


NAMES = ["mid_block.attentions.0.transformer_blocks.0.attn1.to_q",
         "up_blocks.1.attentions.1.transformer_blocks.0.ff.net.2"]


@pytest.mark.parametrize("style,alpha", [("peft", None), ("kohya", 2.0)])
def test_lora_changes_output_as_merged_weights_would(unet, style, alpha):
    x, t, e = _inputs()
    base_state = {k: v.clone() for k, v in unet.state_dict().items()}
    y0 = unet(x, t, e)
    state = _lora_state(unet, NAMES, style=style, alpha=alpha)
    assert vd.quant.add_lora(unet, state, "style", strength=0.8, prefix="unet.") == 2
    layer = unet.get_submodule(NAMES[0])
    scale = 0.8 * ((alpha or 4) / 4)
    assert torch.allclose(layer.lora_scales, torch.full((4,), scale))
    # a layer's output equals the quantized layer plus strength * alpha / r * B A x
    xin = torch.randn(5, layer.in_features)
    key = "unet." + NAMES[0] + (".lora_A.weight" if style == "peft" else ".lora_down.weight")
    a = state[key]
    b = state[key.replace("lora_A", "lora_B").replace("lora_down", "lora_up")]
    layer.set_lora_strength("style", 0.0)
    plain = layer(xin)
    layer.set_lora_strength("style", 0.8)
    assert torch.allclose(layer(xin), plain + scale * (xin @ a.T) @ b.T, atol=1e-5)
    assert not torch.allclose(unet(x, t, e), y0, atol=1e-4)
    assert vd.quant.remove_lora(unet, "style") == 2
    assert all(torch.equal(v, base_state[k]) for k, v in unet.state_dict().items())
    assert torch.equal(unet(x, t, e), y0)


def test_lora_errors(unet):
    state = _lora_state(unet, NAMES)
    with pytest.raises(LoraFormatError, match="match no layer"):
        vd.quant.add_lora(unet, state, "x")  # no prefix given
    plain = _lora_state(unet, NAMES)
    plain["unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight"] = torch.randn(4, 64)
    plain["unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k.lora_B.weight"] = torch.randn(64, 4)
    with pytest.raises(ValueError, match="not quantized"):
        vd.quant.add_lora(unet, plain, "x", prefix="unet.")
    assert not any(m.loras for m in unet.modules() if isinstance(m, QuantizedLinear))
    with pytest.raises(LoraFormatError, match="match no layer"):
        vd.quant.add_lora(unet, {"foo.weight": torch.randn(2)}, "x")
    with pytest.raises(KeyError, match="no layer carries"):
        vd.quant.remove_lora(unet, "nothing")
