"""SVDQuant under a memory budget: the rank allocation and the quantized model it gives."""
import pytest
import torch

import velodiff as vd
from velodiff.quant import QuantConfig, QuantizedLinear
from velodiff.quant.rank_budget import allocate_ranks


def _slots(seed, layers=5):
    g = torch.Generator().manual_seed(seed)
    slots = {}
    for i in range(layers):
        r = int(torch.randint(0, 9, (1,), generator=g))
        sigma = torch.rand(r, generator=g, dtype=torch.float64).sort(descending=True).values
        slots[f"l{i}"] = (sigma, float(torch.rand(1, generator=g)) * 10 + 1, int(torch.randint(10, 100, (1,), generator=g)))
    return slots


def _by_sorting(slots, excess):
    """The same allocation computed another way: every rank slot ranked by relative energy per byte, the
    cheapest ones dropped until enough bytes are gone."""
    order = sorted((float(s[i]) ** 2 / e / c, name, i) for name, (s, e, c) in slots.items() for i in range(len(s)))
    ranks = {name: len(s) for name, (s, _, _) in slots.items()}
    removed = 0
    for _, name, i in order:
        if removed >= excess:
            break
        assert ranks[name] == i + 1, "a layer always loses its last rank first"
        ranks[name] -= 1
        removed += slots[name][2]
    return ranks


@pytest.mark.parametrize("seed", range(20))
def test_allocation_drops_the_least_energy_per_byte(seed):
    slots = _slots(seed)
    total = sum(len(s) * c for s, _, c in slots.values())
    for excess in (0, 1, total // 3, total - 1, total):
        ranks = allocate_ranks(slots, excess)
        assert ranks == _by_sorting(slots, excess)
        removed = sum((len(slots[n][0]) - r) * slots[n][2] for n, r in ranks.items())
        assert removed >= excess
    with pytest.raises(ValueError, match="cannot be met"):
        allocate_ranks(slots, total + 1)


def test_allocation_prefers_the_layer_whose_rank_matters():
    """Layer a's spectrum is concentrated (its first rank holds most of its energy), b's is flat: at equal cost
    the budget keeps a's first rank and takes from b."""
    a = (torch.tensor([3.0, 0.1, 0.1]), 9.02 + 1.0, 10)
    b = (torch.tensor([1.0, 1.0, 1.0]), 3.0 + 1.0, 10)
    assert allocate_ranks({"a": a, "b": b}, 30) == {"a": 1, "b": 2}
    assert allocate_ranks({"a": a, "b": b}, 31) == {"a": 1, "b": 1}
    assert allocate_ranks({"a": a, "b": b}, 50) == {"a": 1, "b": 0}


@pytest.fixture(scope="module")
def budgeted(tmp_path_factory):
    config = QuantConfig("svdquant", rank=8, layers="all", memory_budget=0.45, calibration_images=2,
                         calibration_steps=3, alphas=(0.25, 0.5))
    pipe = vd.Pipeline.from_pretrained("digits")
    pipe.set_progress_bar_config(disable=True)
    report = vd.quant.quantize(pipe, config, progress=False)
    out = vd.quant.save_quantized(pipe, str(tmp_path_factory.mktemp("q") / "budget"), dtype=torch.float32)
    return pipe, report, out


def test_budget_is_met_with_mixed_ranks(budgeted):
    pipe, report, _ = budgeted
    layers = [m for m in pipe.unet.modules() if isinstance(m, QuantizedLinear)]
    ranks = [0 if m.lora_down is None else m.lora_down.shape[1] for m in layers]
    fp16 = 2 * sum(p.numel() for p in vd.Pipeline.from_pretrained("digits").unet.parameters())
    unquantized = 2 * sum(p.numel() for p in pipe.unet.parameters())  # what is still a parameter
    total = unquantized + sum(m.weight_bytes(float_bytes=2) for m in layers)
    assert total <= 0.45 * fp16 and report["model_ratio"] == pytest.approx(total / fp16, abs=1e-4)
    assert min(ranks) < max(ranks) == 8 and report["ranks"]["min"] == min(ranks)


def test_budget_checkpoint_round_trip(budgeted):
    pipe, _, out = budgeted
    loaded = vd.Pipeline.from_pretrained(out)
    g = torch.Generator().manual_seed(0)
    x, t, e = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([700.0, 80.0]), torch.randn(2, 16, 64, generator=g)
    assert torch.equal(loaded.unet(x, t, e), pipe.unet(x, t, e))


def test_budget_below_rank_zero_is_refused_before_any_work():
    with pytest.raises(ValueError, match=r"memory_budget=0.2 cannot be met: .* 0\.3\d\dx its fp16 bytes"):
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
