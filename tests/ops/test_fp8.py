"""velodiff::quantize_fp8 and velodiff::fp8_gemm: the reference against a closed-form oracle, the CPU (and CUDA)
kernels against the reference.

- Encoding: an independent float64 oracle (every finite value of the format from its bit fields, the nearest one
  with ties to the even code, csrc/include/velodiff/fp8.h's saturation / NaN / inf rule) checks
  reference.encode_fp8 on ties, subnormals, boundaries and specials; the kernels' codes and scales must equal the
  reference's bit for bit.
- GEMM: every output element within the bound fp32 accumulation allows around the float64 reference (test_qgemm's
  qgemm_error_bound: the products are exact, so the same derivation holds with K + 3 roundings in the chain: K - 1
  additions, the scale product, the scaling, the bias).
"""
import itertools
import math

import pytest
import torch

from velodiff.ops import fp8_gemm, quantize_fp8
from velodiff.ops import reference as ref

from fixtures import FP8_SPEC as SPEC, fp8_finite_values as finite_values, fp8_special_inputs as special_inputs
from test_qgemm import activate64, one_thread, qgemm_error_bound

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FORMATS = ["e4m3", "e5m2"]
ACTIVATIONS = list(ref.QACTIVATIONS)


# --- the oracle -------------------------------------------------------------------------------------------------

def oracle_code(v: float, fmt: str) -> int:
    """The code of float v by the stated rule, by search over every finite value."""
    nan_code = {"e4m3": 0x7F, "e5m2": 0x7E}[fmt]
    sign = 0x80 if math.copysign(1.0, v) < 0 else 0
    if math.isnan(v):
        return sign | nan_code
    if math.isinf(v):
        return sign | (nan_code if fmt == "e4m3" else 0x7C)
    table = finite_values(fmt)
    a = abs(v)
    top = max(table, key=table.get)
    if a >= table[top]:
        return sign | top
    best = min(table, key=lambda c: (abs(table[c] - a), c & 1))  # nearest, ties to the even code
    return sign | best


@pytest.mark.parametrize("fmt", FORMATS)
def test_reference_encoding_matches_the_oracle(fmt):
    v = special_inputs(fmt)
    got = ref.encode_fp8(v, fmt).view(torch.uint8).tolist()
    want = [oracle_code(float(x), fmt) for x in v.tolist()]
    bad = [(float(x), g, w) for x, g, w in zip(v.tolist(), got, want) if g != w]
    assert not bad, f"{len(bad)} of {len(want)} codes differ, e.g. (value, got, want) {bad[:5]}"


@pytest.mark.parametrize("fmt", FORMATS)
def test_decoding_is_exact(fmt):
    codes = torch.arange(256, dtype=torch.uint8).view(ref.FP8_DTYPES[fmt])
    values = codes.double()
    for code, want in finite_values(fmt).items():
        assert values[code] == want and values[code | 0x80] == -want


# --- quantize_fp8 -------------------------------------------------------------------------------------------------

def make_x(m, k, dtype, seed=0, specials=False, spread=2.0):
    """Random rows with outliers (normal times log-normal magnitudes, exp(spread * N(0, 1)): ~2^-12..2^12 for
    spread 2); a zero row; with ``specials`` a row holding a NaN and one holding an inf."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.exp(torch.randn(m, k, generator=g) * spread)
    if m > 2 and k > 0:
        x[1] = 0
    if specials and m > 3 and k > 1:
        x[2, k // 2] = math.nan
        x[3, k - 1] = -math.inf
    return x.to(dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m,k", [(1, 1), (3, 7), (5, 64), (17, 300), (64, 1000), (4, 0), (0, 5)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_quantize_matches_reference(device, m, k, dtype, fmt):
    x = make_x(m, k, dtype, seed=m * 1000 + k, specials=True)
    want_codes, want_scales = ref.quantize_fp8(x, fmt)
    codes, scales = quantize_fp8(x.to(device), fmt)
    assert codes.dtype == ref.FP8_DTYPES[fmt] and codes.shape == (m, k) and codes.device.type == device
    assert scales.dtype == torch.float32 and scales.shape == (m,)
    assert torch.equal(codes.cpu().view(torch.uint8), want_codes.view(torch.uint8)), "codes must be bit-exact"
    torch.testing.assert_close(scales.cpu(), want_scales, rtol=0, atol=0, equal_nan=True)  # bit-exact


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantize_round_trip_error(fmt):
    """Each finite element comes back within half a step of the format at its magnitude (relative 2^-(m+1) for
    normals, half the smallest subnormal times the scale below them)."""
    x = make_x(33, 257, torch.float32, seed=5)
    codes, scales = quantize_fp8(x, fmt)
    back = codes.double() * scales.double()[:, None]
    _, m_bits, bias = SPEC[fmt]
    step = scales.double()[:, None] * 2.0 ** (1 - bias - m_bits) / 2
    bound = torch.maximum(x.double().abs() * 2.0 ** -(m_bits + 1), step) * (1 + 1e-6)
    assert bool(((back - x.double()).abs() <= bound).all())
    assert bool((codes.float().abs().amax(dim=1)[scales > 0] == ref.FP8_MAX[fmt]).all())


def test_quantize_zero_and_special_rows():
    x = make_x(6, 16, torch.float32, specials=True)
    codes, scales = quantize_fp8(x)
    assert scales[1] == 0 and bool((codes[1].view(torch.uint8) == 0).all())
    assert scales[2].isnan() and bool(codes[2].float().isnan().all())  # a NaN anywhere: the row is NaN
    assert scales[3].isinf()  # an inf: finite elements 0, the inf NaN (inf / inf)
    assert codes[3, 15].float().isnan() and bool((codes[3, :15].float() == 0).all())


# --- fp8_gemm ------------------------------------------------------------------------------------------------------

def make_gemm(m, k, n, fmt_a, fmt_w, out_dtype, bias=True, seed=0):
    """Quantized operands with outliers (outputs stay inside float16's range), a bias in out_dtype."""
    with one_thread():
        a, ascales = ref.quantize_fp8(make_x(m, k, torch.float32, seed=seed, spread=1.0), fmt_a)
        w, wscales = ref.quantize_fp8(make_x(n, k, torch.float32, seed=seed + 1, spread=1.0) / max(k, 1) ** 0.5,
                                      fmt_w)
    g = torch.Generator().manual_seed(seed + 2)
    b = torch.randn(n, generator=g).to(out_dtype) if bias else None
    return dict(a=a, ascales=ascales, w=w, wscales=wscales, bias=b)


def assert_gemm_within_bound(y, args, activation, device, what=""):
    a, w = args["a"].double(), args["w"].double()
    scale = args["ascales"].double()[:, None] * args["wscales"].double()[None, :]
    acc = (a @ w.T) * scale
    mag = (a.abs() @ w.abs().T) * scale
    if args["bias"] is not None:
        acc = acc + args["bias"].double()[None, :]
        mag = mag + args["bias"].double().abs()[None, :]
    exact = activate64(acc, activation)
    bound = qgemm_error_bound(acc, mag, a.shape[1] + 3, y.dtype, activation, device)
    err = (y.cpu().double() - exact).abs()
    assert bool((err <= bound).all()), f"{what}: {int((err > bound).sum())} of {err.numel()} outside the bound"
    return float((err / bound).max()) if err.numel() else 0.0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m,k,n", list(itertools.product([1, 5, 12, 13, 77], [1, 31, 64, 130], [1, 16, 17, 40])))
@pytest.mark.parametrize("out_dtype", DTYPES)
def test_gemm_shapes(device, m, k, n, out_dtype):
    args = make_gemm(m, k, n, "e4m3", "e4m3", out_dtype, seed=m + 7 * k + 31 * n)
    y = fp8_gemm(**{key: None if t is None else t.to(device) for key, t in args.items()}, out_dtype=out_dtype)
    assert y.dtype == out_dtype and y.shape == (m, n) and y.device.type == device
    assert_gemm_within_bound(y, args, "none", device, str((m, k, n, out_dtype)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fmt_a,fmt_w", list(itertools.product(FORMATS, FORMATS)))
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("bias", [False, True])
def test_gemm_options(device, fmt_a, fmt_w, activation, bias):
    args = make_gemm(29, 200, 37, fmt_a, fmt_w, torch.bfloat16, bias=bias, seed=3)
    y = fp8_gemm(**{key: None if t is None else t.to(device) for key, t in args.items()}, out_dtype=torch.bfloat16,
                 activation=activation)
    assert_gemm_within_bound(y, args, activation, device, str((fmt_a, fmt_w, activation, bias)))


@pytest.mark.parametrize("isa", ["portable", "avx512bf16"])
def test_gemm_paths_within_bound(monkeypatch, isa):
    """Both CPU paths (forced with VELODIFF_CPU_ISA) keep within the bound on a long K; on a CPU without
    AVX-512 BF16 the second runs the portable path again."""
    monkeypatch.setenv("VELODIFF_CPU_ISA", isa)
    args = make_gemm(40, 2560, 50, "e4m3", "e4m3", torch.float32, seed=11)
    y = fp8_gemm(**args, out_dtype=torch.float32)
    ratio = assert_gemm_within_bound(y, args, "none", "cpu", isa)
    assert ratio < 0.5  # the bound is a worst case; random signs stay far inside it


def test_gemm_bound_catches_a_one_percent_scale_error():
    """The bound is sharp enough to see a scale 1 % off (its width at K = 512 is ~0.1 % of a typical output)."""
    args = make_gemm(16, 512, 16, "e4m3", "e4m3", torch.float32, bias=False, seed=2)
    y = fp8_gemm(**args, out_dtype=torch.float32)
    wrong = dict(args, ascales=args["ascales"] * 1.01)
    with pytest.raises(AssertionError):
        assert_gemm_within_bound(y, wrong, "none", "cpu")


def test_gemm_close_to_float_matmul():
    """End to end: quantize both operands, multiply: relative error of e4m3 W8A8 against the float product."""
    g = torch.Generator().manual_seed(0)
    x, wt = torch.randn(64, 512, generator=g), torch.randn(96, 512, generator=g) / 512 ** 0.5
    a, asc = quantize_fp8(x)
    w, wsc = quantize_fp8(wt)
    y = fp8_gemm(a, asc, w, wsc, out_dtype=torch.float32)
    want = x.double() @ wt.double().T
    rel = float((y.double() - want).norm() / want.norm())
    assert rel < 0.05  # two e4m3 roundings of relative RMS ~2^-5 / sqrt(3) each, summed over K: ~2.6 % expected


def test_gemm_nan_rows_propagate():
    x = make_x(6, 16, torch.float32, specials=True)
    a, asc = quantize_fp8(x)
    w, wsc = quantize_fp8(make_x(5, 16, torch.float32, seed=1))
    y = fp8_gemm(a, asc, w, wsc, out_dtype=torch.float32)
    assert bool(y[2].isnan().all()) and bool(y[3].isnan().all())
    assert bool((y[1] == 0).all()) and bool(y[[0, 4, 5]].isfinite().all())


# --- fp8_gemm with 4-bit weights (W4A8: indices into a 16-entry e4m3 table) ------------------------------------

def make_w4_gemm(m, k, n, out_dtype, seed=0):
    """Activation codes as make_gemm; weights as 4-bit indices into a random table of 16 finite e4m3 codes (any
    table works, not only a format's), packed two per byte; ``decoded`` holds the weight codes for the bound."""
    g = torch.Generator().manual_seed(seed)
    args = make_gemm(m, k, n, "e4m3", "e4m3", out_dtype, seed=seed)
    table = ref.encode_fp8(torch.randn(16, generator=g) * 4, "e4m3")
    indices = torch.randint(0, 16, (n, k), generator=g)
    wscales = torch.rand(n, generator=g) / max(k, 1) ** 0.5 + 1e-3
    args.update(w=ref.pack_nibbles(indices), wscales=wscales, w_table=table)
    return args, table.float()[indices]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (5, 31, 17), (13, 64, 16), (12, 130, 40), (77, 257, 33)])
@pytest.mark.parametrize("out_dtype", DTYPES)
def test_w4_gemm_matches_the_decoded_product(device, m, k, n, out_dtype):
    args, decoded = make_w4_gemm(m, k, n, out_dtype, seed=m + k + n)
    y = fp8_gemm(**{key: None if t is None else t.to(device) for key, t in args.items()}, out_dtype=out_dtype)
    assert y.shape == (m, n) and y.dtype == out_dtype
    assert_gemm_within_bound(y, dict(args, w=decoded), "none", device, str((m, k, n)))
    # the reference decodes the same way
    want = ref.fp8_gemm(args["a"], args["ascales"], args["w"], args["wscales"], args["bias"], torch.float64, 0,
                        args["w_table"])
    assert_gemm_within_bound(want, dict(args, w=decoded), "none", "cpu", "reference")


@pytest.mark.parametrize("isa", ["portable", "avx512bf16"])
@pytest.mark.parametrize("activation", ["none", "gelu_tanh"])
def test_w4_gemm_paths(monkeypatch, isa, activation):
    monkeypatch.setenv("VELODIFF_CPU_ISA", isa)
    args, decoded = make_w4_gemm(30, 1001, 45, torch.bfloat16, seed=5)
    y = fp8_gemm(**args, out_dtype=torch.bfloat16, activation=activation)
    assert_gemm_within_bound(y, dict(args, w=decoded), activation, "cpu", isa)


def test_w4_gemm_equals_the_fp8_gemm_of_its_decoded_weight():
    """Decoding through the table then multiplying is the same arithmetic as FP8 codes (same kernel path): equal."""
    args, decoded = make_w4_gemm(20, 96, 24, torch.float32, seed=9)
    y4 = fp8_gemm(**args, out_dtype=torch.float32)
    y8 = fp8_gemm(**dict(args, w=ref.encode_fp8(decoded, "e4m3"), w_table=None), out_dtype=torch.float32)
    assert torch.equal(y4, y8)


def test_w4_gemm_bad_arguments():
    args, _ = make_w4_gemm(4, 9, 3, torch.float32)
    with pytest.raises(ValueError, match=r"w must have shape \[N, 5\]"):
        fp8_gemm(**dict(args, w=args["w"][:, :4].contiguous()))
    with pytest.raises(TypeError, match="w must be uint8"):
        fp8_gemm(**dict(args, w=args["w"].view(torch.float8_e4m3fn)))
    with pytest.raises(ValueError, match="w_table must have shape"):
        fp8_gemm(**dict(args, w_table=args["w_table"][:8]))
    with pytest.raises(TypeError, match="w_table must be"):
        fp8_gemm(**dict(args, w_table=args["w_table"].float()))
    a = args
    with pytest.raises(ValueError, match=r"fp8_gemm: w must have shape \[N, 5\]"):
        torch.ops.velodiff.fp8_gemm(a["a"], a["ascales"], a["w"][:, :4].contiguous(), a["wscales"], None,
                                    torch.float32, 0, a["w_table"])
    with pytest.raises(TypeError, match="fp8_gemm: w_table must be"):
        torch.ops.velodiff.fp8_gemm(a["a"], a["ascales"], a["w"], a["wscales"], None, torch.float32, 0,
                                    a["w_table"].view(torch.uint8))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    """Schemas, fake (meta) implementations and autograd registration agree with the kernels (torch.compile and
    CUDA graphs see through the ops)."""
    x = make_x(5, 70, torch.bfloat16, seed=4).to(device)
    # test_schema compares tensors with a multiplication torch lacks for float8 (inputs and outputs here); the rest
    # runs
    no_schema = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(torch.ops.velodiff.quantize_fp8.default, (x, "e4m3"), test_utils=no_schema)
    torch.library.opcheck(torch.ops.velodiff.quantize_fp8.default, (x, "e5m2"), test_utils=no_schema)
    args = {k: None if t is None else t.to(device) for k, t in make_gemm(5, 70, 9, "e4m3", "e5m2", torch.float16,
                                                                           seed=4).items()}
    torch.library.opcheck(torch.ops.velodiff.fp8_gemm.default,
                          (args["a"], args["ascales"], args["w"], args["wscales"], args["bias"], torch.float16, 3),
                          test_utils=no_schema)
    w4, _ = make_w4_gemm(5, 71, 9, torch.bfloat16, seed=4)
    w4 = {k: None if t is None else t.to(device) for k, t in w4.items()}
    torch.library.opcheck(torch.ops.velodiff.fp8_gemm.default,
                          (w4["a"], w4["ascales"], w4["w"], w4["wscales"], None, torch.bfloat16, 0, w4["w_table"]),
                          test_utils=no_schema)


# --- bad input --------------------------------------------------------------------------------------------------

def test_bad_arguments_name_the_argument():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="format"):
        quantize_fp8(x, "e3m4")
    with pytest.raises(TypeError, match="x must be"):
        quantize_fp8(x.to(torch.int32))
    with pytest.raises(ValueError, match="x must be 2-D"):
        quantize_fp8(x[None])
    a, asc = quantize_fp8(x)
    w, wsc = quantize_fp8(torch.randn(3, 8))
    with pytest.raises(TypeError, match="a must be"):
        fp8_gemm(a.view(torch.uint8), asc, w, wsc)
    with pytest.raises(ValueError, match=r"w must have shape \[N, 8\]"):
        fp8_gemm(a, asc, quantize_fp8(torch.randn(3, 9))[0], wsc)
    with pytest.raises(ValueError, match="wscales must have shape"):
        fp8_gemm(a, asc, w, wsc[:2])
    with pytest.raises(TypeError, match="bias must be"):
        fp8_gemm(a, asc, w, wsc, bias=torch.zeros(3, dtype=torch.float16), out_dtype=torch.float32)
    with pytest.raises(TypeError, match="out_dtype"):
        fp8_gemm(a, asc, w, wsc, out_dtype=torch.int8)
    with pytest.raises(ValueError, match="activation"):
        fp8_gemm(a, asc, w, wsc, activation="relu")


def test_native_op_checks_too():
    """The C++ glue refuses what the wrapper would (a caller of torch.ops.velodiff directly)."""
    a, asc = quantize_fp8(torch.randn(4, 8))
    with pytest.raises(TypeError, match="fp8_gemm: w must be float8"):
        torch.ops.velodiff.fp8_gemm(a, asc, torch.zeros(3, 8, dtype=torch.uint8), torch.ones(3), None,
                                    torch.float32, 0)
    with pytest.raises(ValueError, match="quantize_fp8: format"):
        torch.ops.velodiff.quantize_fp8(torch.randn(2, 2), "e2m1")


@pytest.mark.parametrize("isa", ["portable", "avx512"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernel_encoding_matches_the_oracle(monkeypatch, isa, fmt, dtype):
    """The kernels' own encoder on every tie, subnormal and boundary of the format: a row whose maximum is the
    format's largest value has scale 1, so its codes are encode(x) itself (both CPU paths; the second falls back to
    the first on a CPU without AVX-512). Values not representable in ``dtype`` are rounded to it first."""
    monkeypatch.setenv("VELODIFF_CPU_ISA", isa)
    v = special_inputs(fmt)
    v = v[torch.isfinite(v) & (v.abs() <= ref.FP8_MAX[fmt])].to(dtype)
    row = torch.cat([torch.tensor([ref.FP8_MAX[fmt]], dtype=dtype), v])[None]
    codes, scales = quantize_fp8(row, fmt)
    assert float(scales[0]) == 1.0
    want = [oracle_code(float(x), fmt) for x in row[0].float().tolist()]
    assert codes[0].view(torch.uint8).tolist() == want
