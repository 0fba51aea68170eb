"""velodiff::quantize_act and velodiff::qgemm: CPU (and CUDA) kernels against the pure-PyTorch reference.

Integer parts (codes, scales) must be bit-exact; GEMM outputs within a relative Frobenius error of 1e-3 (float32,
float16) or 1e-2 (bfloat16) of the float64 reference.
"""
import contextlib
import itertools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from velodiff.ops import qgemm, quantize_act
from velodiff.ops import reference as ref

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BITS = [4, 8]
MS, KS, NS = [1, 3, 77, 256], [64, 100, 320, 1000], [1, 17, 64, 130]
ACTIVATIONS = list(ref.QACTIVATIONS)
TOL = {torch.float32: 1e-3, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def rel(a, b):
    """Relative Frobenius error of a against b. The denominator has a floor of 1e-6 per element: a few outputs
    can all be ~0 (GELU of a very negative value, where the float64 reference itself rounds 1 + erf(x) to 0)."""
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-6 * max(1, b.numel()) ** 0.5))


@contextlib.contextmanager
def one_thread():
    """Inputs and references are many small torch ops: one intra-op thread makes them much faster (and immune to
    a busy machine); the kernels under test keep torch's default thread count."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def make_act(m, k, r, dtype, smooth, seed=0):
    """x [M, K] in dtype, smooth float32 [K] in [0.25, 4) or None, lora_down [K, R] in dtype or None (CPU)."""
    g = gen(seed)
    x = torch.randn(m, k, generator=g).to(dtype)
    s = torch.exp2(torch.rand(k, generator=g) * 4 - 2) if smooth else None
    ld = (torch.randn(k, r, generator=g) / k ** 0.5).to(dtype) if r > 0 else None
    return x, s, ld


def make_weights(n, k, bits, dtype, seed=1):
    """Quantized random weights: qw packed [N, Kp/2 | Kp], wscales [N, Kp/64] in dtype."""
    w = torch.randn(n, k, generator=gen(seed))
    codes, scales = ref.quantize_groups(w, bits)
    return ref.pack_codes(codes, bits), scales.to(dtype)


def make_gemm(m, k, n, r, dtype, bits, *, bias=True, lora_scales=True, seed=0):
    """Reference-quantized activations and weights plus the optional fp operands, all on the CPU."""
    x, s, ld = make_act(m, k, r, dtype, True, seed)
    qx, ascales, lora_act = ref.quantize_act(x, s, ld, bits)
    qw, wscales = make_weights(n, k, bits, dtype, seed + 1)
    g = gen(seed + 2)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    lu = torch.randn(n, r, generator=g).to(dtype) if r > 0 else None
    ls = torch.randn(r, generator=g) if r > 0 and lora_scales else None
    return dict(qx=qx, ascales=ascales, qw=qw, wscales=wscales, bias=b, lora_act=lora_act if r > 0 else None,
                lora_up=lu, lora_scales=ls)


def to(d, device):
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in d.items()}


def check_quantize(device, m, k, r, dtype, bits, smooth, seed=0):
    with one_thread():
        x, s, ld = make_act(m, k, r, dtype, smooth, seed)
        eqx, eas, ela = ref.quantize_act(x, s, ld, bits)
    qx, ascales, lora_act = quantize_act(*(None if t is None else t.to(device) for t in (x, s, ld)), bits=bits)
    kp = ref.qgemm_padded_k(k)
    assert qx.device.type == device and ascales.device.type == device and lora_act.device.type == device
    assert qx.dtype == (torch.uint8 if bits == 4 else torch.int8)
    assert qx.shape == (m, kp // 2 if bits == 4 else kp)
    assert ascales.dtype == torch.float32 and ascales.shape == (m, kp // 64)
    assert torch.equal(qx.cpu(), eqx), "codes must be bit-exact"
    assert torch.equal(ascales.cpu(), eas), "scales must be bit-exact"
    assert lora_act.dtype == torch.float32 and lora_act.shape == (m, r)
    if r > 0:
        assert rel(lora_act, ela) <= 1e-5


def check_gemm(device, m, k, n, r, dtype, bits, activation, *, bias=True, lora_scales=True, seed=0):
    with one_thread():
        args = make_gemm(m, k, n, r, dtype, bits, bias=bias, lora_scales=lora_scales, seed=seed)
        expect = ref.qgemm(**args, bits=bits, activation=ref.QACTIVATIONS[activation])
    y = qgemm(**to(args, device), bits=bits, activation=activation)
    assert y.dtype == dtype and y.shape == (m, n) and y.device.type == device
    assert rel(y, expect) <= TOL[dtype], (m, k, n, r, dtype, bits, activation)


# --- against the reference -------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("smooth,r", [(False, 0), (True, 16), (True, 32)])
def test_quantize_act_matches_reference(device, m, k, dtype, bits, smooth, r):
    check_quantize(device, m, k, r, dtype, bits, smooth)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m,k,n", list(itertools.product(MS, KS, NS)))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", BITS)
def test_qgemm_shapes(device, m, k, n, dtype, bits):
    # the options vary with the shape so that every shape meets some of them (all combinations: next test)
    i = MS.index(m) + KS.index(k) + NS.index(n)
    r = [0, 16, 32][i % 3]
    check_gemm(device, m, k, n, r, dtype, bits, ACTIVATIONS[i % 4], bias=i % 2 == 0, lora_scales=i % 5 != 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("r,lora_scales", [(0, False), (16, False), (16, True), (32, True)])
def test_qgemm_options(device, dtype, bits, activation, bias, r, lora_scales):
    check_gemm(device, 37, 200, 45, r, dtype, bits, activation, bias=bias, lora_scales=lora_scales, seed=3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits,bound", [(4, 0.25), (8, 0.02)])
def test_end_to_end_close_to_float_matmul(device, bits, bound):
    """quantize_act + qgemm approximates x W^T + b (a sanity bound on the quantization error itself)."""
    g = gen(11)
    x, w, b = torch.randn(64, 320, generator=g), torch.randn(96, 320, generator=g), torch.randn(96, generator=g)
    qw, ws = make_weights(96, 320, bits, torch.float32, seed=12)
    w = ref.unpack_codes(qw, bits).float() * ws.repeat_interleave(64, 1)  # the weights as quantized
    qx, asc, _ = quantize_act(x.to(device), bits=bits)
    y = qgemm(qx, asc, qw.to(device), ws.to(device), b.to(device), bits=bits)
    assert rel(y, x @ w.T + b) <= bound


# --- CUDA: every 4-bit tensor-core path, every CTA tile -------------------------------------------------------

TENSOR_PATHS = ["auto", "s4", "s8", "e4m3", "wgmma-s8", "wgmma-e4m3", "wgmma-s8-128", "wgmma-e4m3-128"]


def cuda_capability():
    major, minor = torch.cuda.get_device_capability()
    return major * 10 + minor


def path_skip_reason(path):
    """Why the tensor-core path `path` cannot run on this GPU and build, or None when it can."""
    cc = cuda_capability()
    if path == "s4" and cc >= 90:
        return f"sm_{cc} has no int4 tensor cores"
    if path == "e4m3" and cc < 89:
        return f"sm_{cc} has no FP8 tensor cores"
    if path.startswith("wgmma") and cc != 90:
        return f"sm_{cc} has no warpgroup MMA"
    from velodiff import _C
    if path.startswith("wgmma") and "90a" not in _C.build_info().get("cuda_archs", ""):
        return "this build has no sm_90a code (VELODIFF_CUDA_ARCHS=90a)"
    return None


def skip_unless_path_runs(path):
    reason = path_skip_reason(path)
    if reason is not None:
        pytest.skip(reason)


@pytest.mark.cuda
@pytest.mark.parametrize("path", TENSOR_PATHS)
@pytest.mark.parametrize("m,k,n", list(itertools.product([1, 77, 256], [64, 128, 1000], [17, 130])))
@pytest.mark.parametrize("dtype", DTYPES)
def test_qgemm_tensor_paths(monkeypatch, path, m, k, n, dtype):
    """VELODIFF_QGEMM_TC picks the tensor-core instruction of the 4-bit GEMM; each one gives the reference."""
    skip_unless_path_runs(path)
    monkeypatch.setenv("VELODIFF_QGEMM_TC", path)
    i = m + k + n
    check_gemm("cuda", m, k, n, [0, 16, 32][i % 3], dtype, 4, ACTIVATIONS[i % 4], bias=i % 2 == 0)


def tile_shapes():
    """(M, N) whose grid makes the launcher pick each CTA tile (BM = 128, 64, 32: the largest tile whose grid
    still covers every multiprocessor once), for the GPU at hand."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    n = 640  # 5 column tiles
    m128 = -(-sms // 5) * 128 + 3          # >= sms CTAs of 128 rows, a ragged last tile
    m64 = (-(-sms // 5) - 1) * 64 + 64 + 5  # < sms CTAs of 128 rows, >= sms of 64
    assert -(-m64 // 128) * 5 < sms <= -(-m64 // 64) * 5
    return [(m128, n), (m64, n), (100, n)]


@pytest.mark.cuda
@pytest.mark.parametrize("path", TENSOR_PATHS)
@pytest.mark.parametrize("tile", [0, 1, 2], ids=["bm128", "bm64", "bm32"])
@pytest.mark.parametrize("bits", BITS)
def test_qgemm_cta_tiles(monkeypatch, path, tile, bits):
    """Large M: the 128- and 64-row CTA tiles (the shape tests above only reach the 32-row tile)."""
    if bits == 8 and path not in ("auto", "s8"):
        pytest.skip("8-bit GEMMs always run on the s8 path")
    skip_unless_path_runs(path)
    monkeypatch.setenv("VELODIFF_QGEMM_TC", path)
    m, n = tile_shapes()[tile]
    check_gemm("cuda", m, 320, n, 32, torch.bfloat16, bits, "gelu", seed=tile)


def runnable_paths():
    return [path for path in TENSOR_PATHS if path_skip_reason(path) is None]


@pytest.mark.cuda
@pytest.mark.parametrize("m,k,n", [(77, 1000, 130), (300, 320, 640), (1, 128, 17)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_qgemm_tensor_paths_bit_identical(monkeypatch, m, k, n, dtype):
    """Every tensor-core path gets the exact integer group dots (the s8 and e4m3 unpackings scale them by powers
    of two, undone exactly) and rounds the scaling in the same order, so all paths give the same bits. This
    catches an operand-layout mismatch or an inexact FP8 accumulation that the tolerance of the reference
    tests could hide."""
    args = to(make_gemm(m, k, n, 32, dtype, 4, bias=True, seed=m + n), "cuda")
    outs = {}
    for path in runnable_paths():
        monkeypatch.setenv("VELODIFF_QGEMM_TC", path)
        outs[path] = qgemm(**args, bits=4, activation="gelu")
    first = next(iter(outs))
    for path, y in outs.items():
        assert torch.equal(y, outs[first]), (path, first, rel(y, outs[first]))


@pytest.mark.cuda
def test_qgemm_tensor_path_errors(monkeypatch):
    args = to(make_gemm(8, 64, 8, 0, torch.float16, 4), "cuda")
    for path in ("int3", "wgmma-s8-32", "wgmma"):
        monkeypatch.setenv("VELODIFF_QGEMM_TC", path)
        with pytest.raises(ValueError, match=f"VELODIFF_QGEMM_TC={path}: expected auto, s4, s8, e4m3, wgmma-s8 or "
                                             "wgmma-e4m3"):
            qgemm(**args, bits=4)
    cc = cuda_capability()
    bad = ["s4"] if cc >= 90 else ["e4m3"] if cc < 89 else []
    if cc != 90:
        bad += ["wgmma-s8", "wgmma-e4m3", "wgmma-e4m3-128"]
    for path in bad:
        monkeypatch.setenv("VELODIFF_QGEMM_TC", path)
        with pytest.raises(ValueError, match=f"VELODIFF_QGEMM_TC={path}"):
            qgemm(**args, bits=4)


# --- the portable path gives the results of the AVX2 path ------------------------------------------------------

@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_scalar_fallback_matches(monkeypatch, bits, dtype):
    x, s, ld = make_act(45, 200, 16, dtype, True, seed=5)
    args = make_gemm(45, 200, 37, 16, dtype, bits, seed=6)
    fast_q = quantize_act(x, s, ld, bits)
    fast_y = qgemm(**args, bits=bits, activation="gelu")
    monkeypatch.setenv("VELODIFF_QGEMM_SCALAR", "1")
    slow_q = quantize_act(x, s, ld, bits)
    slow_y = qgemm(**args, bits=bits, activation="gelu")
    assert torch.equal(fast_q[0], slow_q[0]) and torch.equal(fast_q[1], slow_q[1])
    assert rel(fast_q[2], slow_q[2]) <= 1e-6
    # the integer sums are identical; only the fp32 rounding of the folds differs (then one output rounding)
    assert rel(fast_y, slow_y) <= {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}[dtype]
    assert rel(slow_y, ref.qgemm(**args, bits=bits, activation=1)) <= TOL[dtype]


# --- format and rounding edge cases ----------------------------------------------------------------------------

def test_pack_unpack_round_trip():
    g = gen(7)
    codes = torch.randint(-8, 8, (5, 256), generator=g, dtype=torch.int8)
    packed = ref.pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 128)
    assert torch.equal(ref.unpack_int4(packed), codes)
    raw = torch.randint(0, 256, (3, 64), generator=g, dtype=torch.uint8)
    assert torch.equal(ref.pack_int4(ref.unpack_int4(raw)), raw)
    # element 2j in the low nibble of byte j, two's complement
    two = torch.tensor([[-1, 3, 7, -8]], dtype=torch.int8)
    assert ref.pack_int4(two).tolist() == [[0x3F, 0x87]]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_half_way_values_round_to_even(device, bits, dtype):
    """v / s lands exactly on k + 0.5: codes round half to even, as torch.round does."""
    q = 7 if bits == 4 else 127
    halves = torch.arange(-q, q, dtype=torch.float32) + 0.5  # -Q + 0.5 .. Q - 0.5 (|v| <= amax), all exact
    # group of 64 with amax = Q * 0.5 exactly (so s = 0.5): half-way values v = 0.5 * (k + 0.5) plus one amax
    group = torch.full((64,), 0.5 * q)
    n = min(63, halves.numel())
    group[:n] = 0.5 * halves[torch.linspace(0, halves.numel() - 1, n).round().long()]
    x = torch.stack([group, -group]).to(dtype)  # every value is exact in fp16 and bf16 too
    assert torch.equal(x.float().abs().amax(1), torch.full((2,), 0.5 * q))
    qx, asc, _ = quantize_act(x.to(device), bits=bits)
    eqx, eas, _ = ref.quantize_act(x, None, None, bits)
    assert torch.equal(asc.cpu(), eas) and torch.equal(asc.cpu(), torch.full((2, 1), 0.5))
    assert torch.equal(qx.cpu(), eqx)
    codes = ref.unpack_codes(qx.cpu(), bits).float()
    v = x.float() / 0.5
    assert torch.equal(codes, torch.round(v).clamp(-q - 1, q))
    # explicitly: 0.5 -> 0, 1.5 -> 2, 2.5 -> 2, -2.5 -> -2, -3.5 -> -4
    ties = v[0, :n]
    expect_even = torch.where(torch.remainder(torch.floor(ties), 2) == 0, torch.floor(ties), torch.ceil(ties))
    assert torch.equal(codes[0, :n], expect_even.clamp(-q - 1, q))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", BITS)
def test_zero_group_and_padding(device, bits):
    """An all-zero group inside random data has scale 0 and codes 0; padding codes (k >= K) are 0."""
    x, s, ld = make_act(6, 300, 8, torch.float16, True, seed=9)
    x[2, 64:128] = 0
    x[4, 256:] = 0  # the last, partial group
    qx, asc, la = quantize_act(x.to(device), s.to(device), ld.to(device), bits=bits)
    eqx, eas, _ = ref.quantize_act(x, s, ld, bits)
    assert torch.equal(qx.cpu(), eqx) and torch.equal(asc.cpu(), eas)
    codes = ref.unpack_codes(qx.cpu(), bits)
    assert asc[2, 1].item() == 0 and asc[4, 4].item() == 0
    assert not codes[2, 64:128].any() and not codes[4, 256:].any()
    assert not codes[:, 300:].any(), "padding codes must be 0"
    assert (asc.cpu() > 0).sum() == 6 * 5 - 2


@pytest.mark.parametrize("device", DEVICES)
def test_empty_rows(device):
    x = torch.randn(0, 100, device=device)
    qx, asc, la = quantize_act(x, None, torch.randn(100, 4, device=device), bits=4)
    assert qx.shape == (0, 64) and asc.shape == (0, 2) and la.shape == (0, 4)
    qw, ws = make_weights(5, 100, 4, torch.float32)
    y = qgemm(qx, asc, qw.to(device), ws.to(device), lora_act=la, lora_up=torch.randn(5, 4, device=device))
    assert y.shape == (0, 5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", BITS)
def test_deterministic(device, bits):
    args = to(make_gemm(77, 320, 130, 16, torch.bfloat16, bits, seed=4), device)
    assert torch.equal(qgemm(**args, bits=bits, activation="silu"), qgemm(**args, bits=bits, activation="silu"))


# --- torch.library contract ------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", BITS)
def test_opcheck(device, bits):
    x, s, ld = make_act(5, 100, 8, torch.float16, True, seed=2)
    torch.library.opcheck(torch.ops.velodiff.quantize_act.default, (x.to(device), s.to(device), ld.to(device), bits))
    torch.library.opcheck(torch.ops.velodiff.quantize_act.default, (x.to(device), None, None, bits))
    a = to(make_gemm(5, 100, 7, 8, torch.float16, bits, seed=2), device)
    torch.library.opcheck(torch.ops.velodiff.qgemm.default,
                          (a["qx"], a["ascales"], a["qw"], a["wscales"], a["bias"], a["lora_act"], a["lora_up"],
                           a["lora_scales"], bits, 2))
    torch.library.opcheck(torch.ops.velodiff.qgemm.default,
                          (a["qx"], a["ascales"], a["qw"], a["wscales"], None, None, None, None, bits, 0))


# --- bad input: a clear exception naming the argument, from the wrappers and from the ops themselves -----------

def _valid_quantize():
    x, s, ld = make_act(4, 100, 8, torch.float16, True, seed=1)
    return dict(x=x, smooth=s, lora_down=ld, bits=4)


BAD_QUANTIZE = [
    ("x", lambda v: v["x"].double(), TypeError),
    ("x", lambda v: v["x"].int(), TypeError),
    ("x", lambda v: v["x"].reshape(2, 2, 100), ValueError),
    ("x", lambda v: v["x"].reshape(-1), ValueError),
    ("x", lambda v: torch.randn(100, 4).half().T, ValueError),
    ("smooth", lambda v: v["smooth"].half(), TypeError),
    ("smooth", lambda v: v["smooth"][:-1], ValueError),
    ("smooth", lambda v: torch.rand(200)[::2], ValueError),
    ("lora_down", lambda v: v["lora_down"].float(), TypeError),
    ("lora_down", lambda v: v["lora_down"][:-1], ValueError),
    ("lora_down", lambda v: v["lora_down"].reshape(-1), ValueError),
    ("lora_down", lambda v: torch.randn(8, 100).half().T, ValueError),
    ("bits", lambda v: 5, ValueError),
    ("bits", lambda v: 2, ValueError),
]


@pytest.mark.parametrize("name,make,exc", BAD_QUANTIZE, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(BAD_QUANTIZE)])
def test_quantize_act_bad_input_names_the_argument(name, make, exc):
    v = _valid_quantize()
    v[name] = make(v)
    with pytest.raises(exc, match=name):
        quantize_act(**v)
    with pytest.raises((TypeError, ValueError, RuntimeError), match=name):
        torch.ops.velodiff.quantize_act(v["x"], v["smooth"], v["lora_down"], v["bits"])


def _valid_gemm(bits=4):
    return dict(**make_gemm(4, 100, 6, 8, torch.bfloat16, bits, seed=1), bits=bits, activation="none")


BAD_GEMM = [
    ("qx", lambda v: v["qx"].to(torch.int8), TypeError),
    ("qx", lambda v: v["qx"][:, :-1], ValueError),
    ("qx", lambda v: v["qx"].reshape(-1), ValueError),
    ("qx", lambda v: torch.zeros(64, 4, dtype=torch.uint8).T, ValueError),
    ("ascales", lambda v: v["ascales"].double(), TypeError),
    ("ascales", lambda v: v["ascales"][:-1], ValueError),
    ("ascales", lambda v: torch.rand(2, 4).T, ValueError),
    ("qw", lambda v: v["qw"].to(torch.int8), TypeError),
    ("qw", lambda v: v["qw"][:, :-1], ValueError),
    ("qw", lambda v: torch.zeros(64, 6, dtype=torch.uint8).T, ValueError),
    ("wscales", lambda v: v["wscales"].to(torch.int32), TypeError),
    ("wscales", lambda v: v["wscales"][:-1], ValueError),
    ("wscales", lambda v: torch.rand(2, 6).to(torch.bfloat16).T, ValueError),
    ("bias", lambda v: v["bias"].float(), TypeError),
    ("bias", lambda v: v["bias"][:-1], ValueError),
    ("lora_act", lambda v: v["lora_act"].half(), TypeError),
    ("lora_act", lambda v: v["lora_act"][:-1], ValueError),
    ("lora_act", lambda v: torch.randn(8, 4).T, ValueError),
    ("lora_up", lambda v: v["lora_up"].float(), TypeError),
    ("lora_up", lambda v: v["lora_up"][:, :-1], ValueError),
    ("lora_up", lambda v: None, ValueError),  # lora_act without lora_up
    ("lora_scales", lambda v: v["lora_scales"].double(), TypeError),
    ("lora_scales", lambda v: v["lora_scales"][:-1], ValueError),
    ("bits", lambda v: 5, ValueError),
    ("bits", lambda v: 8, TypeError),  # 4-bit packed operands with bits=8
]


def _raw_gemm(v):
    return torch.ops.velodiff.qgemm(v["qx"], v["ascales"], v["qw"], v["wscales"], v["bias"], v["lora_act"],
                                    v["lora_up"], v["lora_scales"], v["bits"],
                                    ref.QACTIVATIONS.get(v["activation"], 7))


@pytest.mark.parametrize("name,make,exc", BAD_GEMM, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(BAD_GEMM)])
def test_qgemm_bad_input_names_the_argument(name, make, exc):
    v = _valid_gemm()
    v[name] = make(v)
    match = "qx" if name == "bits" and v["bits"] == 8 else name
    with pytest.raises(exc, match=match):
        qgemm(**v)
    with pytest.raises((TypeError, ValueError, RuntimeError), match=match):
        _raw_gemm(v)


def test_qgemm_bad_activation_and_lora_pairing():
    v = _valid_gemm()
    with pytest.raises(ValueError, match="activation"):
        qgemm(**{**v, "activation": "relu"})
    with pytest.raises(TypeError, match="activation"):
        qgemm(**{**v, "activation": 1})
    with pytest.raises((ValueError, RuntimeError), match="activation"):
        _raw_gemm({**v, "activation": "relu"})
    with pytest.raises((ValueError, RuntimeError), match="activation"):
        torch.ops.velodiff.qgemm(v["qx"], v["ascales"], v["qw"], v["wscales"], None, None, None, None, 4, -1)
    for drop in ("lora_act", "lora_up"):
        with pytest.raises(ValueError, match="lora_act and lora_up"):
            qgemm(**{**v, drop: None, "lora_scales": None})
        with pytest.raises((ValueError, RuntimeError), match="lora_act and lora_up"):
            _raw_gemm({**v, drop: None, "lora_scales": None})
    with pytest.raises(ValueError, match="lora_scales"):
        qgemm(**{**v, "lora_act": None, "lora_up": None})
    with pytest.raises((ValueError, RuntimeError), match="lora_scales"):
        _raw_gemm({**v, "lora_act": None, "lora_up": None})


def test_bits_must_be_an_int():
    with pytest.raises(TypeError, match="bits"):
        quantize_act(torch.randn(2, 64), bits=4.0)
    with pytest.raises(TypeError, match="bits"):
        qgemm(**{**_valid_gemm(), "bits": True})


# --- random valid shapes ---------------------------------------------------------------------------------------

@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(m=st.integers(1, 40), k=st.integers(1, 300), n=st.integers(1, 40), r=st.integers(0, 8),
       dtype=st.sampled_from(DTYPES), bits=st.sampled_from(BITS), smooth=st.booleans(),
       activation=st.sampled_from(ACTIVATIONS), bias=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_random_valid_arguments(m, k, n, r, dtype, bits, smooth, activation, bias, seed):
    check_quantize("cpu", m, k, r, dtype, bits, smooth, seed=seed)
    check_gemm("cpu", m, k, n, r, dtype, bits, activation, bias=bias, seed=seed)
