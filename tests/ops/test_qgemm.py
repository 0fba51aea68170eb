"""velodiff::quantize_act and velodiff::qgemm: CPU (and CUDA) kernels against the pure-PyTorch reference.

Integer parts (codes, scales) must be bit-exact; every GEMM output element within the bound that fp32
accumulation, the fp32 activation and one rounding to the output dtype allow around the float64 reference
(qgemm_error_bound below, derived there).
"""
import contextlib
import itertools
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import velodiff
from velodiff.ops import qgemm, qgemm_pack, quantize_act
from velodiff.ops import reference as ref

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BITS = [4, 8]
MS, KS, NS = [1, 3, 77, 256], [64, 100, 320, 1000], [1, 17, 64, 130]
ACTIVATIONS = list(ref.QACTIVATIONS)


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


# --- the per-element error bound of a GEMM output --------------------------------------------------------------
#
# Every implementation computes, per output element (csrc/include/velodiff/qgemm.h),
#   acc = sum_g fl(ascale[m,g] wscale[n,g]) dot_g + bias[n] + sum_r fl(lora_act[m,r] lora_scales[r]) lora_up[n,r]
#   y   = T(act(acc))
# in fp32 (unit roundoff u = 2^-24), from the same input numbers as the float64 reference. The integer group dots
# dot_g are exact (|dot_g| < 2^22, so float(dot_g) is exact too; the s8 / e4m3 tensor-core paths scale them by
# powers of two that are undone exactly). So the error has three sources:
#  1. Accumulation. Let t_1..t_n be the exact terms: the ng group terms ascale * wscale * dot_g, the bias and the R
#     rank terms lora_act * lora_scales * lora_up; n = ng + [bias] + R. Each term is formed with at most two
#     roundings (fl(ascale * wscale), then its product with dot_g; fl(lora_act * lora_scales), then its product
#     with lora_up; an FMA saves the second) and is then added to the running sum, in some order (CPU: groups,
#     bias, ranks; CUDA: groups, ranks, bias), one rounding per addition, the first being exact (0 + t). So each
#     term is multiplied by at most n + 1 factors (1 + delta), |delta| <= u, and (Higham, Accuracy and Stability
#     of Numerical Algorithms, 2nd ed., Lemma 3.1 and section 3.1)
#         |acc32 - acc| <= gamma_{n+1} * sum_i |t_i|  =: E,     gamma_k = k u / (1 - k u).
#  2. The activation in fp32: |act32(acc32) - act(acc)| <= L * E + e_act(acc), with L = sup |act'| (1 for none,
#     1.1290 for both GELUs, 1.0999 for SiLU) and e_act the evaluation error of each implementation's formula
#     (ACTIVATION_ERROR below, derived there).
#  3. One rounding to the output dtype T, to nearest even: |T(v) - v| <= u_T |v| + eta_T, with u_T its unit
#     roundoff and eta_T half its subnormal spacing (float32 outputs are not rounded again: u_T = eta_T = 0).
# Together, with p = L * E + e_act(acc) and y* = act(acc) in float64:
#     |y - y*| <= p + u_T (|y*| + p) + eta_T  (+ (n + 4) * tiny_fp32 for products that underflow or are flushed).
# No constant is a safety factor: each is the one derived; only e_act's terms of second order in u (below 1e-13
# relative) are dropped. Over this file's CPU cases the largest error / bound is 0.99 for float16 and bfloat16
# (the output rounding dominates) and 0.18-0.86 for float32, depending on the activation.
U32 = 2.0 ** -24
LIPSCHITZ = {"none": 1.0, "gelu": 1.1290, "gelu_tanh": 1.1290, "silu": 1.0999}

# e_act(x) <= u * (c_y |act(x)| + c_x |x| + c_0) + eps_x |x|, as (c_y, c_x, c_0, eps_x), first order in u, per
# implementation and activation. "k ulp" of a function is a relative error of at most 2 k u.
#  CPU (csrc/kernels/cpu/qgemm.cpp, glibc, no fast-math):
#   gelu      0.5f * v * erfc(v * -c): the argument carries 2u (the constant, the product), which erfc amplifies by
#             |z erfc'(z) / erfc(z)|; times |act|, that is sqrt(2) z^2 e^(-z^2) / sqrt(pi) <= 0.2936, so 0.59 u
#             absolute; erfcf's own error, 4 ulp (at most 3.13 ulp measured over every float 2^-12 <= |z| <= 10.1
#             on glibc 2.36), and the last product: c_y = 2 * 4 + 1.
#   gelu_tanh v / (1 + expf(-2 w)), w = c1 (v + c2 v^3): w carries 7u (two constants, five operations, no
#             cancellation: v and c2 v^3 have one sign), amplified in the result by sigma(-2w) * 2|w|;
#             7 * max |v| sigma(2w) sigma(-2w) 2|w| = 7 * 0.2543 = 1.8 absolute; expf 1 ulp (0.502 measured) scaled
#             by sigma(-2w) <= 1, the addition and the division: c_y = 2 + 2.
#   silu      v / (1 + expf(-v)): expf 1 ulp, the addition, the division: c_y = 4.
#  CUDA (csrc/kernels/cuda/qgemm_device.cuh, activate(), built with --use_fast_math):
#   gelu      0.5f * v * (1 + erff(v * c)): erff is 2 ulp (CUDA math API), and for v < 0 the sum 1 + erff cancels, so
#             its error is absolute: 0.5 |v| * 4u |erf| -> c_x = 2; the argument's 2u gives 0.5 |v| * 2u |z| erf'(z)
#             <= 0.59 u; the rounding of the sum and of the last product: c_y = 2.
#   gelu_tanh 0.5f * v * (1 + tanhf(w)): fast math maps tanhf to __tanhf (MUFU.TANH in the SASS), of maximum
#             relative error 2^-11 (CUDA programming guide, intrinsic functions), hence eps_x = 0.5 * 2^-11: far
#             above fp32 rounding; w's 7u give 0.5 |v| 7u sech^2(w) |w| <= 1.57 u |v|; c_y = 2 as for gelu.
#   silu      v / (1 + __expf(-v)): fast division 2 ulp, __expf 2 + floor(1.173 |v|) ulp (same guide) scaled by
#             sigma(-v), whose |v| part times |act| is 2.346 u v^2 sigma(v) sigma(-v) <= 1.03 u absolute; the
#             addition: c_y = 4 + 1 + 4.
ACTIVATION_ERROR = {
    "cpu": {"none": (0, 0, 0, 0.0), "gelu": (9, 0, 0.59, 0.0), "gelu_tanh": (4, 0, 1.8, 0.0), "silu": (4, 0, 0, 0.0)},
    "cuda": {"none": (0, 0, 0, 0.0), "gelu": (2, 2, 0.59, 0.0), "gelu_tanh": (2, 1.6, 0, 0.5 * 2.0 ** -11),
             "silu": (9, 0, 1.03, 0.0)},
}


def exact_accumulator(args, bits):
    """float64, exactly as the reference sums it: (acc [M, N] before the activation, sum of |terms| [M, N], n)."""
    cx = ref.unpack_codes(args["qx"], bits).double()
    cw = ref.unpack_codes(args["qw"], bits).double()
    groups = args["ascales"].shape[1]
    acc = torch.zeros(cx.shape[0], cw.shape[0], dtype=torch.float64)
    mag = torch.zeros_like(acc)
    for g in range(groups):
        sl = slice(g * ref.QGROUP, (g + 1) * ref.QGROUP)
        scale = args["ascales"][:, g].double()[:, None] * args["wscales"][:, g].double()[None, :]
        t = (cx[:, sl] @ cw[:, sl].T) * scale
        acc += t
        mag += t.abs()
    n = groups
    if args["bias"] is not None:
        acc += args["bias"].double()[None, :]
        mag += args["bias"].double().abs()[None, :]
        n += 1
    if args["lora_act"] is not None and args["lora_act"].shape[1] > 0:
        la = args["lora_act"].double()
        if args["lora_scales"] is not None:
            la = la * args["lora_scales"].double()[None, :]
        lu = args["lora_up"].double()
        acc += la @ lu.T
        mag += la.abs() @ lu.abs().T
        n += la.shape[1]
    return acc, mag, n


def activate64(acc, activation):
    """The activation in float64, as the reference applies it."""
    f = {"none": lambda v: v, "gelu": torch.nn.functional.gelu, "silu": torch.nn.functional.silu,
         "gelu_tanh": lambda v: torch.nn.functional.gelu(v, approximate="tanh")}[activation]
    return f(acc)


def qgemm_error_bound(acc, mag, n, dtype, activation, device):
    """Largest |y - act(acc)| that the arithmetic allows for each element (derivation above)."""
    k = n + 1
    e_acc = (k * U32 / (1 - k * U32)) * mag
    y = activate64(acc, activation)
    c_y, c_x, c_0, eps_x = ACTIVATION_ERROR[device][activation]
    p = LIPSCHITZ[activation] * e_acc + U32 * (c_y * y.abs() + c_x * acc.abs() + c_0) + eps_x * acc.abs()
    u_out = 0.0 if dtype == torch.float32 else torch.finfo(dtype).eps / 2
    eta_out = 0.0 if dtype == torch.float32 else torch.finfo(dtype).smallest_normal * u_out
    return p + u_out * (y.abs() + p) + eta_out + (n + 4) * torch.finfo(torch.float32).smallest_normal


def assert_within_bound(y, args, bits, activation, device, what=""):
    """Every element of the GEMM output y within qgemm_error_bound of the float64 reference; returns the largest
    error / bound ratio (how much of the bound the arithmetic used)."""
    acc, mag, n = exact_accumulator(args, bits)
    exact = activate64(acc, activation)
    bound = qgemm_error_bound(acc, mag, n, y.dtype, activation, device)
    err = (y.detach().cpu().double() - exact).abs()
    ratio = err / bound
    worst = int(ratio.argmax()) if ratio.numel() else 0
    assert bool((err <= bound).all()), (
        f"{what}: {int((err > bound).sum())} of {err.numel()} elements outside the bound; worst "
        f"[{worst // y.shape[1]}, {worst % y.shape[1]}]: |error| {err.flatten()[worst]:.3e} = "
        f"{ratio.flatten()[worst]:.3g} x bound, expected {exact.flatten()[worst]:.6e}")
    return float(ratio.max()) if ratio.numel() else 0.0


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
    """Runs one GEMM on `device` and checks every element against the bound; returns the largest error / bound."""
    with one_thread():
        args = make_gemm(m, k, n, r, dtype, bits, bias=bias, lora_scales=lora_scales, seed=seed)
    y = qgemm(**to(args, device), bits=bits, activation=activation)
    assert y.dtype == dtype and y.shape == (m, n) and y.device.type == device
    with one_thread():
        return assert_within_bound(y, args, bits, activation, device, what=str((m, k, n, r, dtype, bits, activation)))


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


# --- the bound itself: computed around the reference's own value, and sharp enough to catch small bugs ----------

@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_bound_is_centred_on_the_reference(dtype, activation):
    """exact_accumulator sums exactly as ref.qgemm does, so the bound is taken around the reference's value."""
    for r, bias in [(0, False), (16, True)]:
        args = make_gemm(9, 200, 11, r, dtype, 4, bias=bias, seed=r)
        acc, _, n = exact_accumulator(args, 4)
        assert n == 4 + bias + r
        expect = ref.qgemm(**args, bits=4, activation=ref.QACTIVATIONS[activation])
        assert torch.equal(activate64(acc, activation).to(dtype), expect)


def ulps_up(v, k):
    """v moved k representable float32 values towards +inf."""
    for _ in range(k):
        v = torch.nextafter(v, torch.tensor(math.inf))
    return v


@pytest.mark.parametrize("device", DEVICES)
def test_bound_catches_a_scale_off_by_a_few_ulp(device):
    """One row's group scale 8 ulp too large (a scale rounded through a narrower type, or taken from a neighbour
    that differs in its last bits) moves its outputs by 8-16 u relative, more than the bound allows for one group
    (2u): every output of that row fails, while the old relative Frobenius tolerance (1e-3) sees nothing."""
    args = make_gemm(6, 64, 40, 0, torch.float32, 4, bias=False, seed=21)
    y = qgemm(**to(args, device), bits=4)
    assert_within_bound(y, args, 4, "none", device)
    bad = dict(args, ascales=args["ascales"].clone())
    bad["ascales"][2, 0] = ulps_up(bad["ascales"][2, 0], 8)
    assert rel(y, ref.qgemm(**bad, bits=4)) <= 1e-3
    with pytest.raises(AssertionError, match=r"40 of 240 elements outside the bound"):
        assert_within_bound(y, bad, 4, "none", device)


@pytest.mark.parametrize("device", DEVICES)
def test_bound_catches_a_dropped_rank(device):
    """A low-rank branch missing one rank of small weight (a LoRA at strength 1e-3, say) is invisible to the old
    relative Frobenius tolerance but not to the per-element bound."""
    args = make_gemm(37, 320, 45, 16, torch.float32, 4, seed=22)
    args["lora_scales"][5] = 1e-3
    y = qgemm(**to(args, device), bits=4, activation="gelu")
    assert_within_bound(y, args, 4, "gelu", device)
    bad = dict(args, lora_scales=args["lora_scales"].clone())
    bad["lora_scales"][5] = 0  # the reference without rank 5
    assert rel(y, ref.qgemm(**bad, bits=4, activation=1)) <= 1e-3
    with pytest.raises(AssertionError, match="outside the bound"):
        assert_within_bound(y, bad, 4, "gelu", device)


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
    # the integer sums are identical; only the fp32 rounding of the folds differs (then one output rounding), so
    # both paths are within the bound of every element
    assert_within_bound(fast_y, args, bits, "gelu", "cpu", what="AVX2 path")
    assert_within_bound(slow_y, args, bits, "gelu", "cpu", what="scalar path")


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k,n,r", [(1, 64, 5, 0), (13, 200, 37, 16), (25, 1280, 17, 32), (100, 320, 48, 3)])
def test_vnni_path_gives_the_avx2_bits(monkeypatch, bits, dtype, m, k, n, r):
    """VELODIFF_CPU_ISA=avx512 (the AVX-512VNNI micro-kernel, 12-row tiles: M not a multiple of 12 reaches the
    padded rows) and avx2: the same integer group dots folded in the same order, so identical outputs."""
    if velodiff.info()["cpu_kernel_paths"]["qgemm"] != "avx512vnni":
        pytest.skip("this CPU has no AVX-512VNNI")
    args = make_gemm(m, k, n, r, dtype, bits, seed=m + n)
    outs = {}
    for isa in ("avx512", "avx2"):
        monkeypatch.setenv("VELODIFF_CPU_ISA", isa)
        outs[isa] = qgemm(**args, bits=bits, activation="silu")
    assert torch.equal(outs["avx512"], outs["avx2"])
    assert_within_bound(outs["avx512"], args, bits, "silu", "cpu", what="VNNI path")


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k,n,r,bias", [(1, 64, 5, 0, False), (13, 200, 37, 16, True), (50, 1280, 33, 32, True)])
def test_prepacked_weights_give_the_same_bits(monkeypatch, bits, dtype, m, k, n, r, bias):
    """qgemm(..., packed=qgemm_pack(...)) skips the repacking and gives the unpacked call's bits, on each path; a
    pack made on another path is ignored (same bits again)."""
    args = make_gemm(m, k, n, r, dtype, bits, bias=bias, seed=m + k)
    paths = ["avx2", "avx512"] if velodiff.info()["cpu_kernel_paths"]["qgemm"] == "avx512vnni" else [None]
    packs = {}
    for isa in paths:
        if isa is not None:
            monkeypatch.setenv("VELODIFF_CPU_ISA", isa)
        packs[isa] = qgemm_pack(args["qw"], args["wscales"], args["bias"], args["lora_up"], bits)
        assert packs[isa].dtype == torch.uint8 and packs[isa].dim() == 1
        plain = qgemm(**args, bits=bits, activation="gelu_tanh")
        for pack in packs.values():  # this path's pack, and (second path) the other one's, which is ignored
            assert torch.equal(qgemm(**args, bits=bits, activation="gelu_tanh", packed=pack), plain)


def test_prepacked_weights_bad_input():
    args = make_gemm(8, 128, 16, 4, torch.float32, 8)
    pack = qgemm_pack(args["qw"], args["wscales"], args["bias"], args["lora_up"], 8)
    if pack.numel() == 0:
        pytest.skip("the portable path packs nothing")
    other = make_gemm(8, 128, 24, 4, torch.float32, 8)  # N 24, not 16
    with pytest.raises(RuntimeError, match="packed was made for bits=8 N=16 Kp=128 R=4.*N=24"):
        qgemm(**other, bits=8, packed=pack)
    garbage = torch.randint(0, 256, (pack.numel(),), generator=gen(3), dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="packed is not a weight pack"):
        qgemm(**args, bits=8, packed=garbage)
    with pytest.raises(RuntimeError, match="packed is not a weight pack"):
        qgemm(**args, bits=8, packed=pack[:10])
    with pytest.raises(TypeError, match="packed must be"):
        qgemm(**args, bits=8, packed=pack.to(torch.int8))
    with pytest.raises(ValueError, match="packed must be 1-D"):
        qgemm(**args, bits=8, packed=pack.view(1, -1))
    with pytest.raises(TypeError, match="qw must be"):
        qgemm_pack(args["qw"].float(), args["wscales"], None, None, 8)
    with pytest.raises(ValueError, match="lora_up must have shape"):
        qgemm_pack(args["qw"], args["wscales"], None, args["lora_up"][:3], 8)


def test_bad_cpu_isa_is_refused(monkeypatch):
    args = make_gemm(4, 64, 8, 0, torch.float32, 8)
    monkeypatch.setenv("VELODIFF_CPU_ISA", "avx1024")
    with pytest.raises(RuntimeError, match="VELODIFF_CPU_ISA must be portable, avx2, avx512 or avx512bf16"):
        qgemm(**args, bits=8)
    x, s, ld = make_act(4, 64, 0, torch.float32, False)
    with pytest.raises(RuntimeError, match="VELODIFF_CPU_ISA must be"):
        quantize_act(x, s, ld, 8)


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
