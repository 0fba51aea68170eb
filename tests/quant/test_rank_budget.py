"""SVDQuant under a memory budget: the largest uniform rank that fits, and the quantized model it gives."""
import pytest
import torch

import velodiff as vd
from fixtures import digits_unet_inputs
from velodiff.quant import QuantConfig, QuantizedLinear, select_layers
from velodiff.quant.rank_budget import quantized_bytes, rank_for_budget

BUDGET = 0.45


def _fp16_bytes(model):
    return 2 * sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def budgeted(tmp_path_factory):
    config = QuantConfig("svdquant", rank=8, layers="all", memory_budget=BUDGET, calibration_images=2,
                         calibration_steps=3, alphas=(0.25, 0.5))
    pipe = vd.Pipeline.from_pretrained("digits")
    pipe.set_progress_bar_config(disable=True)
    report = vd.quant.quantize(pipe, config, progress=False)
    out = vd.quant.save_quantized(pipe, str(tmp_path_factory.mktemp("q") / "budget"), dtype=torch.float32)
    return pipe, report, out


def test_budget_is_met_by_the_largest_rank_that_fits(budgeted):
    pipe, report, _ = budgeted
    original = vd.Pipeline.from_pretrained("digits").unet
    fp16 = _fp16_bytes(original)
    layers = [m for m in pipe.unet.modules() if isinstance(m, QuantizedLinear)]
    ranks = {0 if m.lora_down is None else m.lora_down.shape[1] for m in layers}
    total = _fp16_bytes(pipe.unet) + sum(m.weight_bytes(float_bytes=2) for m in layers)  # 16-bit storage
    rank = report["rank"]
    assert ranks == {rank} and 0 < rank < 8, ranks
    assert total <= BUDGET * fp16 and report["model_ratio"] == pytest.approx(total / fp16, abs=1e-4)
    # one rank more would not fit (counted independently: the fp16 bytes of what stays unquantized + the layers)
    chosen = select_layers(original, layers="all")
    layer_fp16 = sum(2 * sum(p.numel() for p in m.parameters()) for m in chosen.values())
    assert fp16 - layer_fp16 + quantized_bytes(chosen, rank + 1) > BUDGET * fp16


def test_budget_checkpoint_round_trip(budgeted):
    pipe, _, out = budgeted
    loaded = vd.Pipeline.from_pretrained(out)
    x, t, e = digits_unet_inputs((700.0, 80.0))
    assert torch.equal(loaded.unet(x, t, e), pipe.unet(x, t, e))


def test_rank_for_budget_edges():
    unet = vd.Pipeline.from_pretrained("digits").unet
    layers = select_layers(unet, layers="all")
    fp16, layer_fp16 = _fp16_bytes(unet), sum(2 * sum(p.numel() for p in m.parameters()) for m in layers.values())
    ratio = lambda r: (fp16 - layer_fp16 + quantized_bytes(layers, r)) / fp16  # noqa: E731
    assert rank_for_budget(layers, 32, 10.0, fp16, layer_fp16) == 32  # everything fits
    assert rank_for_budget(layers, 32, ratio(5), fp16, layer_fp16) == 5  # exactly at rank 5's bytes
    assert rank_for_budget(layers, 32, ratio(5) - 1e-9, fp16, layer_fp16) == 4
    assert rank_for_budget(layers, 32, ratio(0), fp16, layer_fp16) == 0  # smoothing alone
    with pytest.raises(ValueError, match=r"memory_budget=0.2 cannot be met: .* 0\.3\d\dx its fp16 bytes"):
        rank_for_budget(layers, 32, 0.2, fp16, layer_fp16)


def test_budget_below_rank_zero_is_refused_before_any_work():
    with pytest.raises(ValueError, match=r"memory_budget=0.2 cannot be met"):
        vd.quant.quantize(vd.Pipeline.from_pretrained("digits"),
                          QuantConfig("svdquant", layers="all", memory_budget=0.2), progress=False)


@pytest.mark.parametrize("kwargs,match", [
    (dict(method="w8a8", rank=0, memory_budget=0.5), "svdquant only"),
    (dict(memory_budget=0), "fraction > 0"),
    (dict(memory_budget="half"), "fraction > 0"),
])
def test_budget_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuantConfig(**kwargs)
