"""QuantizedLinear and the per-layer quantizers against float64 math and against each other."""
import pytest
import torch

from velodiff.ops import reference
from velodiff.quant import QuantizedLinear
from velodiff.quant.svdquant import LayerStats, quantize_layer, smoothing_factor


def _layer_data(n=96, k=200, rows=512, outliers=4, seed=0):
    """A random linear layer and inputs with a few outlier channels (as diffusion activations have)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) / k ** 0.5
    b = torch.randn(n, generator=g) * 0.1
    x = torch.randn(rows, k, generator=g)
    idx = torch.randperm(k, generator=g)[:outliers]
    x[:, idx] *= 20.0
    return w, b, x


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("method", ["svdquant", "naive-w4a4", "w8a8"])
def test_forward_matches_dequantized_weight(method):
    """The kernels compute Q(x/lambda) Q(R)^T + branch; with activations exactly representable (integers in
    [-Q, Q] per group whose absmax is Q), that equals x @ dequantized_weight^T."""
    w, b, x = _layer_data()
    stats = LayerStats(absmax=x.abs().amax(0), sample=x[:128])
    layer = quantize_layer(w, b, method, stats if method == "svdquant" else None, rank=16, alphas=(0.0,))
    g = torch.Generator().manual_seed(1)
    qmax = 127 if method == "w8a8" else 7
    xi = torch.randint(-qmax, qmax + 1, (33, 200), generator=g).float()
    xi[:, ::64] = float(qmax)  # every group's absmax is exactly qmax, so scale 1 and exact codes
    if layer.smooth is not None:
        layer.smooth.fill_(1.0)
    y = layer(xi)
    ref = xi.double() @ layer.dequantized_weight().double().T + b.double()
    assert _rel(y, ref) < 1e-5


def test_svdquant_beats_naive_and_w8a8_is_best_on_outlier_inputs():
    w, b, x = _layer_data()
    stats = LayerStats(absmax=x.abs().amax(0), sample=x[:256])
    ref = x.double() @ w.double().T + b.double()
    errs = {}
    for method in ("svdquant", "naive-w4a4", "w8a8"):
        layer = quantize_layer(w, b, method, stats, rank=32)
        errs[method] = _rel(layer(x[256:]), ref[256:])
    assert errs["svdquant"] < 0.5 * errs["naive-w4a4"], errs
    assert errs["w8a8"] < errs["svdquant"], errs
    assert errs["naive-w4a4"] < 0.5, errs  # the baseline itself is a working quantizer


def test_svdquant_full_rank_is_near_exact():
    """rank = min(N, K): the branch is the whole weight, the residual ~0, only the branch's dtype rounding is
    left."""
    w, b, x = _layer_data(n=48, k=64)
    layer = quantize_layer(w, b, "svdquant", LayerStats(x.abs().amax(0), x[:64]), rank=48)
    assert _rel(layer(x), x.double() @ w.double().T + b.double()) < 1e-4


def test_smoothing_factor_formula():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(8, 5, generator=g, dtype=torch.float64)
    xmax = torch.rand(5, generator=g, dtype=torch.float64) + 0.1
    lam = smoothing_factor(xmax, w, 0.5)
    raw = xmax.sqrt() / w.abs().amax(0).sqrt()
    assert torch.allclose(lam, raw / raw.log().mean().exp())
    assert torch.allclose(smoothing_factor(xmax, w, 1.0).log().mean(), torch.zeros((), dtype=torch.float64),
                          atol=1e-12)


def test_lora_append_strength_and_exact_removal():
    w, b, x = _layer_data(n=64, k=130)
    layer = quantize_layer(w, b, "svdquant", LayerStats(x.abs().amax(0), x[:64]), rank=16, alphas=(0.5,))
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    y0 = layer(x)
    g = torch.Generator().manual_seed(5)
    a1, b1 = torch.randn(4, 130, generator=g) * 0.1, torch.randn(64, 4, generator=g) * 0.1
    a2, b2 = torch.randn(8, 130, generator=g) * 0.1, torch.randn(64, 8, generator=g) * 0.1
    layer.add_lora("one", a1, b1, strength=0.7)
    layer.add_lora("two", a2, b2, strength=1.3)
    expected = y0.double() + 0.7 * (x.double() @ a1.double().T) @ b1.double().T \
        + 1.3 * (x.double() @ a2.double().T) @ b2.double().T
    assert _rel(layer(x), expected) < 1e-5
    layer.set_lora_strength("one", 0.0)
    assert _rel(layer(x), y0.double() + 1.3 * (x.double() @ a2.double().T) @ b2.double().T) < 1e-5
    layer.remove_lora("one")
    assert layer.loras == {"two": (16, 8)}
    layer.remove_lora("two")
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert torch.equal(layer(x), y0)
    with pytest.raises(KeyError, match="no LoRA named 'two'"):
        layer.remove_lora("two")
    with pytest.raises(ValueError, match="down must be"):
        layer.add_lora("bad", torch.randn(4, 129), torch.randn(64, 4))


def test_lora_on_layer_without_branch():
    w, b, x = _layer_data(n=32, k=64)
    layer = quantize_layer(w, b, "naive-w4a4", None)
    y0 = layer(x)
    g = torch.Generator().manual_seed(6)
    a, bb = torch.randn(4, 64, generator=g), torch.randn(32, 4, generator=g)
    layer.add_lora("l", a, bb, strength=0.5)
    assert _rel(layer(x), y0.double() + 0.5 * (x.double() @ a.double().T) @ bb.double().T) < 1e-5
    layer.remove_lora("l")
    assert layer.lora_down is None and torch.equal(layer(x), y0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_layer(dtype):
    w, b, x = _layer_data(n=64, k=128)
    stats = LayerStats(x.abs().amax(0), x[:128])
    layer32 = quantize_layer(w, b, "svdquant", stats, rank=16, alphas=(0.5,))
    layer16 = quantize_layer(w, b, "svdquant", stats, rank=16, alphas=(0.5,), dtype=dtype)
    assert layer16.wscales.dtype == dtype and layer16.smooth.dtype == torch.float32
    y16 = layer16(x.to(dtype))
    assert y16.dtype == dtype
    assert _rel(y16, layer32(x)) < (2e-2 if dtype == torch.bfloat16 else 5e-3)


def test_bad_construction():
    with pytest.raises(ValueError, match="bits"):
        QuantizedLinear(8, 8, bits=3)
    with pytest.raises(ValueError, match="method"):
        QuantizedLinear(8, 8, method="gptq")
    layer = QuantizedLinear(8, 8)
    with pytest.raises(ValueError, match=r"\[\.\.\., 8\]"):
        layer(torch.randn(2, 9))


def test_weight_bytes_are_a_quarter_of_fp16_plus_overheads():
    layer = QuantizedLinear(1280, 1280, bits=4, rank=32, smooth=True, dtype=torch.float16)
    fp16 = 1280 * 1280 * 2 + 1280 * 2
    ratio = layer.weight_bytes() / fp16
    # int4 0.25 + fp16 group scales 1/64 + rank-32 branch 2 * 32 / 1280 + smooth/bias/scales
    expected = 0.25 + 1 / 64 + 2 * 32 / 1280
    assert abs(ratio - expected) < 0.01, ratio
    assert reference.qgemm_padded_k(1280) == 1280


def test_randomized_svd_matches_exact_truncation():
    """Large layers use a seeded randomized range finder; its rank-r approximation error must match the exact
    truncated SVD's (Eckart-Young optimum) and be reproducible."""
    from velodiff.quant.svdquant import truncated_svd
    g = torch.Generator().manual_seed(7)
    # a weight with a decaying spectrum, as trained weights have, large enough for the randomized path
    n, k, r = 2048, 640, 32
    u = torch.linalg.qr(torch.randn(n, k, generator=g))[0]
    v = torch.linalg.qr(torch.randn(k, k, generator=g))[0]
    spectrum = torch.logspace(0, -3, k)
    w = (u * spectrum) @ v.T
    assert w.numel() > 1 << 20
    uu, ss, vh = truncated_svd(w, r)
    err = float((w.double() - (uu * ss) @ vh).norm())
    optimum = float(spectrum[r:].double().norm())
    assert err <= 1.01 * optimum, (err, optimum)
    again = truncated_svd(w, r)
    assert torch.equal(again[0], uu) and torch.equal(again[1], ss)


@pytest.mark.parametrize("approximate,name", [("none", "gelu"), ("tanh", "gelu_tanh")])
def test_fused_gelu_epilogue_equals_module_gelu(approximate, name):
    from velodiff.models.feedforward import GELU
    w, b, x = _layer_data(n=96, k=128)
    module = GELU(128, 96, approximate=approximate)
    module.proj = quantize_layer(w, b, "svdquant", LayerStats(x.abs().amax(0), x[:64]), rank=8, alphas=(0.5,))
    unfused = module(x)
    module.proj.fused_activation = name
    fused = module(x)
    assert _rel(fused, unfused) < 1e-5
    # a proj fusing another activation than the module's is not taken for it: the module applies its own on top
    module.proj.fused_activation = "gelu" if name == "gelu_tanh" else "gelu_tanh"
    assert _rel(module(x), torch.nn.functional.gelu(module.proj(x), approximate=approximate)) < 1e-6
    with pytest.raises(ValueError, match="fused_activation"):
        QuantizedLinear(8, 8, fused_activation="relu")


def test_dit_quantization_fuses_the_mlp_gelu(tmp_path):
    import velodiff as vd
    pipe = vd.Pipeline.from_pretrained("digits-dit")
    vd.quant.quantize(pipe, vd.quant.NaiveW4A4(), progress=False)
    fused = {n: m.fused_activation for n, m in pipe.transformer.named_modules() if isinstance(m, QuantizedLinear)}
    assert {n for n, a in fused.items() if a != "none"} == {f"transformer_blocks.{i}.ff.net.0.proj" for i in range(6)}
    assert set(fused.values()) == {"none", "gelu_tanh"}
    out = vd.quant.save_quantized(pipe, str(tmp_path / "q"))
    loaded = vd.Pipeline.from_pretrained(out)
    assert loaded.transformer.transformer_blocks[0].ff.net[0].proj.fused_activation == "gelu_tanh"


@pytest.mark.parametrize("method", ["svdquant", "w8a8"])
def test_cpu_weight_pack_is_kept_and_follows_weight_changes(method):
    """On the CPU the layer packs its weights for the GEMM once (velodiff::qgemm_pack) and reuses the pack; an
    in-place edit of a weight, a replaced tensor and a run under inference mode give the unpacked GEMM's result."""
    from velodiff.ops import qgemm, quantize_act
    w, b, x = _layer_data()
    stats = LayerStats(absmax=x.abs().amax(0), sample=x[:128])
    layer = quantize_layer(w, b, method, stats if method == "svdquant" else None, rank=8, alphas=(0.5,))

    def unpacked():
        qx, ascales, lora_act = quantize_act(x, layer.smooth, layer.lora_down, layer.bits)
        return qgemm(qx, ascales, layer.qweight, layer.wscales, layer.bias,
                     lora_act if layer.lora_down is not None else None, layer.lora_up, layer.lora_scales,
                     bits=layer.bits)
    with torch.no_grad():
        assert torch.equal(layer(x), unpacked())
        pack = layer.__dict__.get("_packed")
        layer(x)
        assert layer.__dict__.get("_packed") is pack  # reused
        layer.wscales.mul_(1.5)  # in place: the version counter moves
        assert torch.equal(layer(x), unpacked())
        layer.bias = torch.randn_like(layer.bias)  # a new tensor
        assert torch.equal(layer(x), unpacked())
    with torch.inference_mode():
        frozen = quantize_layer(w, b, method, stats if method == "svdquant" else None, rank=8, alphas=(0.5,))
        layer = frozen
        assert torch.equal(layer(x), unpacked())
