"""velodiff::cache_gate: CPU (and CUDA) kernels against the float64 reference (csrc/include/velodiff/cache_gate.h).

Every call runs the kernel on the device and the reference on CPU copies of the same buffers, then compares:
the decision, the valid index and every byte of both probe buffers exactly; the distance (state[1]) and the
accumulator (state[0]) within the format's relative 1e-5 (both kernels sum in float64, so they land far closer).
Thresholds are placed well away from the quantity they are compared with (half or twice it), so a decision can
only differ through a bug.
"""
import itertools
import math

import pytest
import torch

from velodiff.ops import reference as ref
from velodiff.ops.cache_gate import ACCUMULATE, FORCE_COMPUTE, STORE_ALWAYS, CacheGate, cache_gate

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"),
          pytest.param(torch.bfloat16, id="bf16")]
FLAG_SETS = [a | s | f for a, s, f in itertools.product((0, ACCUMULATE), (0, STORE_ALWAYS), (0, FORCE_COMPUTE))]
# Polynomials, highest degree first: none, degrees 0..4 (the last is TeaCache's published FLUX fit).
COEFFICIENTS = [(), (0.3,), (2.0, 0.05), (-1.5, 3.0, 0.01), (0.5, -0.2, 1.1, 0.02),
                (498.651651, -283.781631, 55.8554382, -3.82021401, 0.264230861)]
RTOL = 1e-5  # the format's bound on the distance for fp32 inputs; the kernels accumulate in float64


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits (NaN payloads and signed zeros included), on the CPU."""
    return t.detach().cpu().contiguous().view(torch.int32 if t.element_size() == 4 else torch.int16)


def _close(x: float, y: float, rtol: float = RTOL) -> bool:
    if math.isnan(y) or math.isinf(y):
        return math.isnan(x) if math.isnan(y) else x == y
    return abs(x - y) <= rtol * max(abs(y), 1e-30)


def gate_value(probe, stored, state, coefficients, flags) -> float:
    """The float64 quantity the threshold is compared with (the accumulated or plain rescaled distance), or NaN
    when there is no valid reference; only used to place thresholds away from it."""
    v = float(state[ref.GATE_VALID])
    if v not in (0.0, 1.0):
        return math.nan
    b = probe.shape[0]
    p = probe.detach().cpu().reshape(b, -1).double()
    s = stored[int(v)].detach().cpu().reshape(b, -1).double()
    num, den = (p - s).abs().sum(1), s.abs().sum(1)
    d = float(torch.where(den > 0, num / den.clamp_min(1e-300),
                          torch.where(num == 0, torch.zeros_like(num), torch.full_like(num, math.inf))).max())
    r = d
    if coefficients:
        r = 0.0
        for c in coefficients:
            r = r * d + c
    return float(state[ref.GATE_ACCUMULATOR]) + r if flags & ACCUMULATE else r


def threshold_for(value: float, compute: bool) -> float:
    """A threshold far from ``value`` on the side that makes the step compute (or reuse)."""
    if not math.isfinite(value):
        return 0.25
    if value <= 0:
        return 0.0 if compute else 1.0
    return value * (0.5 if compute else 2.0)


def run_both(probe, stored, state, threshold, coefficients=(), flags=0):
    """One call of the op on the device buffers and of the reference on CPU copies; compares everything and
    returns the decision."""
    p_ref, st_ref, s_ref = probe.detach().cpu().clone(), stored.detach().cpu().clone(), state.detach().cpu().clone()
    out = cache_gate(probe, stored, state, threshold, coefficients, flags)
    out_ref = ref.cache_gate(p_ref, st_ref, s_ref, threshold, coefficients, flags)
    assert out.dtype == torch.int32 and tuple(out.shape) == (1,) and out.device == probe.device
    got, want = state.detach().cpu(), s_ref
    ctx = f"state {got.tolist()} vs reference {want.tolist()}"
    assert int(out.item()) == int(out_ref.item()) == int(want[ref.GATE_DECISION]), ctx
    assert float(got[ref.GATE_DECISION]) == float(want[ref.GATE_DECISION]), ctx
    assert _bits(got[ref.GATE_VALID]).item() == _bits(want[ref.GATE_VALID]).item(), ctx
    assert _close(float(got[ref.GATE_DISTANCE]), float(want[ref.GATE_DISTANCE])), ctx
    assert _close(float(got[ref.GATE_ACCUMULATOR]), float(want[ref.GATE_ACCUMULATOR])), ctx
    assert torch.equal(_bits(stored), _bits(st_ref)), "stored buffers differ from the reference's"
    assert torch.equal(_bits(probe), _bits(p_ref)), "probe must not change"
    return int(out.item())


def new_buffers(shape, dtype, device, g, valid=-1.0):
    """stored filled with random (non-zero) data in both buffers, and a fresh state with the given valid index."""
    stored = torch.randn((2,) + tuple(shape), generator=g).to(dtype).to(device)
    state = torch.tensor([0.0, 0.0, valid, 0.0], dtype=torch.float32, device=device)
    return stored, state


def rand(shape, dtype, device, g, scale=1.0):
    return (torch.randn(shape, generator=g) * scale).to(dtype).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [1, 2, 3, 7])
@pytest.mark.parametrize("size", [1, 5, 1000, 65537])
def test_shapes_match_reference(device, dtype, batch, size):
    """Awkward batch and per-sample sizes: first call (no reference), then reuse and compute decisions."""
    g = torch.Generator().manual_seed(batch * 100003 + size)
    shape = (batch, size)
    stored, state = new_buffers(shape, dtype, device, g)
    probe = rand(shape, dtype, device, g)
    assert run_both(probe, stored, state, 0.3) == 1  # nothing to compare with: computes, stores into buffer 0
    assert float(state[ref.GATE_VALID]) == 0.0
    for step, compute in enumerate([False, True, False, True]):
        probe = (probe.float() + rand(shape, torch.float32, device, g, 0.05 * (step + 1))).to(dtype)
        thr = threshold_for(gate_value(probe, stored, state, (), 0), compute)
        assert run_both(probe, stored, state, thr) == int(compute)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("flags", FLAG_SETS)
@pytest.mark.parametrize("coefficients", COEFFICIENTS, ids=lambda c: f"deg{len(c) - 1}" if c else "nopoly")
def test_state_evolution(device, dtype, flags, coefficients):
    """Consecutive calls with every flag combination and polynomial: valid-index flips, the accumulator, reuse
    and compute on both sides of the threshold, STORE_ALWAYS, FORCE_COMPUTE."""
    g = torch.Generator().manual_seed(flags * 31 + len(coefficients))
    shape = (3, 4, 9)
    stored, state = new_buffers(shape, dtype, device, g)
    probe = rand(shape, dtype, device, g)
    run_both(probe, stored, state, 0.2, coefficients, flags)
    pattern = [False, False, True, False, True, True, False, False]
    for step, compute in enumerate(pattern):
        probe = (probe.float() + rand(shape, torch.float32, device, g, 0.02 * (1 + step % 3))).to(dtype)
        thr = threshold_for(gate_value(probe, stored, state, coefficients, flags), compute)
        decided = run_both(probe, stored, state, thr, coefficients, flags)
        if flags & FORCE_COMPUTE:
            assert decided == 1


@pytest.mark.parametrize("device", DEVICES)
def test_store_always_and_valid_flip(device):
    """STORE_ALWAYS moves the reference to the newest probe on every call; without it a reused step keeps it."""
    g = torch.Generator().manual_seed(11)
    stored, state = new_buffers((2, 50), torch.float32, device, g)
    probes = [rand((2, 50), torch.float32, device, g) for _ in range(4)]
    run_both(probes[0], stored, state, 0.0)
    for i, p in enumerate(probes[1:], 1):
        before = float(state[ref.GATE_VALID])
        assert run_both(p, stored, state, 1e6, flags=STORE_ALWAYS) == 0
        assert float(state[ref.GATE_VALID]) == 1.0 - before
        assert torch.equal(stored[int(state[ref.GATE_VALID])], p)
    before = float(state[ref.GATE_VALID])
    assert run_both(probes[0], stored, state, 1e6) == 0
    assert float(state[ref.GATE_VALID]) == before  # reused, no STORE_ALWAYS: the reference stays


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_accumulator(device, dtype):
    """ACCUMULATE adds the rescaled distance while reusing and resets to 0 when a step computes."""
    g = torch.Generator().manual_seed(5)
    stored, state = new_buffers((2, 64), dtype, device, g)
    probe = rand((2, 64), dtype, device, g)
    run_both(probe, stored, state, 0.0, flags=ACCUMULATE | STORE_ALWAYS)
    total = 0.0
    for _ in range(3):
        probe = (probe.float() * 1.01).to(dtype)
        total += gate_value(probe, stored, state, (), STORE_ALWAYS)
        assert run_both(probe, stored, state, 1.0, flags=ACCUMULATE | STORE_ALWAYS) == 0
        assert _close(float(state[ref.GATE_ACCUMULATOR]), total, 1e-5)
    assert run_both(probe * 2, stored, state, 1e-6, flags=ACCUMULATE | STORE_ALWAYS) == 1
    assert float(state[ref.GATE_ACCUMULATOR]) == 0.0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", [1, 5, 1023, 1025, 16383, 16385, 40000])
def test_every_element_counts(device, dtype, size):
    """A probe equal to the stored one but for one element: the distance is that element's alone, wherever it
    sits (chunk and tile edges of both kernels)."""
    g = torch.Generator().manual_seed(size)
    stored, state = new_buffers((2, size), dtype, device, g)
    base = stored[0].clone()
    run_both(base, stored, state, 0.0)  # now buffer 0 holds `base`
    for j in sorted({0, size - 1, 1023 % size, 1024 % size, 16383 % size, 16384 % size, size // 2}):
        probe = base.clone()
        probe[1, j] = probe[1, j] + 3.0
        state[ref.GATE_VALID] = 0.0
        stored[0].copy_(base)
        run_both(probe, stored, state, 1e9)
        assert float(state[ref.GATE_DISTANCE]) > 0.0, f"element {j} was not summed"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(1, 2 * 1024 * 1024 + 3), (65537, 1)], ids=["grid-stride", "batch-65537"])
def test_large_grids(device, shape):
    """More per-sample tiles than the CUDA grid has blocks (grid-stride), and a batch beyond its y limit."""
    g = torch.Generator().manual_seed(2)
    stored, state = new_buffers(shape, torch.float32, device, g, valid=1.0)
    probe = rand(shape, torch.float32, device, g)
    run_both(probe, stored, state, threshold_for(gate_value(probe, stored, state, (), 0), False))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_guard(device, dtype):
    """0/0 (a probe identically zero, as FBCache's in-place first block gives) is distance 0, not NaN; x/0 with
    x > 0 is inf; a zero sample beside a changed one takes the changed one's distance."""
    g = torch.Generator().manual_seed(3)
    zeros = torch.zeros(3, 40, dtype=dtype, device=device)
    stored, state = new_buffers((3, 40), dtype, device, g)
    run_both(zeros, stored, state, 0.1)
    assert run_both(zeros.clone(), stored, state, 0.1) == 0  # 0/0 -> 0 < 0.1: reuse
    assert float(state[ref.GATE_DISTANCE]) == 0.0
    probe = rand((3, 40), dtype, device, g)
    assert run_both(probe, stored, state, 0.1, flags=STORE_ALWAYS) == 1  # x/0 -> inf
    assert float(state[ref.GATE_DISTANCE]) == math.inf
    mixed = (probe.float() * 1.5).to(dtype)
    mixed[1] = 0
    stored[int(state[ref.GATE_VALID])][1] = 0
    run_both(mixed, stored, state, 10.0)
    assert 0.0 < float(state[ref.GATE_DISTANCE]) < 1.0  # about 0.5: sample 1's 0/0 counts as 0, not NaN


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["nan-probe", "nan-probe-last-sample", "inf-probe", "inf-stored", "inf-both",
                                  "nan-stored", "nan-and-inf"])
@pytest.mark.parametrize("coefficients", [(), (0.5, 0.1), (0.2,)], ids=["nopoly", "deg1", "deg0"])
def test_nan_and_inf(device, dtype, case, coefficients):
    """Non-finite probes compute the same thing as the reference (NaN propagates through the max and computes;
    inf distances compute); the probe is stored bit for bit."""
    g = torch.Generator().manual_seed(7)
    stored, state = new_buffers((3, 33), dtype, device, g, valid=0.0)
    probe = rand((3, 33), dtype, device, g)
    if case == "nan-probe":
        probe[0, 5] = math.nan
    elif case == "nan-probe-last-sample":
        probe[2, 32] = math.nan
    elif case == "inf-probe":
        probe[1, 0] = math.inf
    elif case == "inf-stored":
        stored[0, 1, 7] = -math.inf
    elif case == "inf-both":
        probe[1, 7] = math.inf
        stored[0, 1, 7] = math.inf
    elif case == "nan-stored":
        stored[0, 2, 3] = math.nan
    else:
        probe[0, 1] = math.nan
        probe[2, 2] = math.inf
    for flags in (0, ACCUMULATE, STORE_ALWAYS):
        state[ref.GATE_VALID] = 0.0
        state[ref.GATE_ACCUMULATOR] = 0.25
        assert run_both(probe, stored, state, 0.5, coefficients, flags) == 1


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("valid", [-1.0, 0.5, 2.0, -0.0, 1.0, math.nan, math.inf])
def test_valid_index_encoding(device, valid):
    """state[2] is a buffer index only when exactly 0 or 1 (-0.0 is 0); anything else means no reference."""
    g = torch.Generator().manual_seed(9)
    stored, state = new_buffers((2, 20), torch.float32, device, g, valid=valid)
    probe = stored[1].clone() if valid == 1.0 else stored[0].clone()
    decided = run_both(probe, stored, state, 0.1)
    assert decided == (0 if valid in (0.0, 1.0) else 1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,scale", [(torch.float32, 1e-40), (torch.bfloat16, 1e-39), (torch.float16, 1e-6),
                                         (torch.float32, 1e37), (torch.bfloat16, 1e37), (torch.float16, 1e4)],
                         ids=["fp32-subnormal", "bf16-subnormal", "fp16-subnormal", "fp32-huge", "bf16-huge",
                              "fp16-huge"])
def test_extreme_magnitudes(device, dtype, scale):
    """Subnormal probes are summed, not flushed to zero; values near the dtype's maximum do not overflow."""
    g = torch.Generator().manual_seed(4)
    stored = (torch.randn(2, 2, 300, generator=g) * scale).to(dtype).to(device)
    state = torch.tensor([0.0, 0.0, 0.0, 0.0], device=device)
    probe = rand((2, 300), torch.float32, device, g, scale).to(dtype)
    run_both(probe, stored, state, threshold_for(gate_value(probe, stored, state, (), 0), True))
    assert 0.0 < float(state[ref.GATE_DISTANCE]) < math.inf


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_threshold_zero_always_computes(device, dtype):
    g = torch.Generator().manual_seed(1)
    stored, state = new_buffers((2, 30), dtype, device, g)
    probe = rand((2, 30), dtype, device, g)
    for flags in FLAG_SETS:
        assert run_both(probe, stored, state, 0.0, (), flags) == 1


def test_thread_count_does_not_change_the_result():
    """The CPU kernel splits each sample into fixed chunks and adds them in order: same bits for 1 or 2 threads."""
    g = torch.Generator().manual_seed(8)
    probe = torch.randn(3, 70001, generator=g)
    stored0 = torch.randn(2, 3, 70001, generator=g)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            stored, state = stored0.clone(), torch.tensor([0.0, 0.0, 1.0, 0.0])
            cache_gate(probe, stored, state, 0.5, (1.0, 0.1), ACCUMULATE)
            results.append((_bits(state), _bits(stored)))
    finally:
        torch.set_num_threads(threads)
    for s, st in results[1:]:
        assert torch.equal(s, results[0][0]) and torch.equal(st, results[0][1])


@pytest.mark.parametrize("dtype", DTYPES)
def test_portable_path_gives_the_same_bits(dtype, monkeypatch):
    """The CPU kernel's AVX2 path and its portable path (VELODIFF_CACHE_GATE_SCALAR=1) sum the same lanes in the
    same order: identical state and buffers, also for sizes that are no multiple of 8 or of a chunk."""
    g = torch.Generator().manual_seed(10)
    for shape in [(3, 5), (2, 16387), (1, 40003)]:
        probe = rand(shape, dtype, "cpu", g)
        stored0 = rand((2,) + shape, dtype, "cpu", g)
        results = []
        for scalar in ("0", "1"):
            monkeypatch.setenv("VELODIFF_CACHE_GATE_SCALAR", scalar)
            stored, state = stored0.clone(), torch.tensor([0.0, 0.0, 0.0, 0.0])
            cache_gate(probe, stored, state, 0.5, (1.0, 0.1), ACCUMULATE)
            results.append((_bits(state), _bits(stored)))
        assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    monkeypatch.setenv("VELODIFF_CACHE_GATE_SCALAR", "1")
    stored, state = new_buffers((2, 1001), dtype, "cpu", g, valid=1.0)
    run_both(rand((2, 1001), dtype, "cpu", g), stored, state, 0.3)


@pytest.mark.parametrize("device", DEVICES)
def test_cache_gate_class(device):
    """CacheGate.step on the native op: the first step computes, an unchanged probe is reused."""
    g = torch.Generator().manual_seed(6)
    gate = CacheGate()
    probe = rand((2, 3, 8), torch.float16, device, g)
    assert gate.step(probe, 0.1) is True
    assert gate.last_distance == math.inf
    assert gate.step(probe.clone(), 0.1) is False
    assert gate.last_distance == 0.0
    assert gate.step(probe * 2, 0.1) is True  # the reference is still the first probe: |2p - p| / |p| = 1
    assert gate.last_distance == 1.0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("flags,coefficients", [(0, ()), (ACCUMULATE | STORE_ALWAYS, (1.0, -0.5, 0.2)),
                                                (FORCE_COMPUTE, (0.3,))])
def test_opcheck(device, dtype, flags, coefficients):
    g = torch.Generator().manual_seed(12)
    stored, state = new_buffers((2, 3, 5), dtype, device, g, valid=1.0)
    probe = rand((2, 3, 5), dtype, device, g)
    torch.library.opcheck(torch.ops.velodiff.cache_gate.default,
                          (probe, stored, state, 0.5, list(coefficients), flags))


@pytest.mark.cuda
def test_cuda_graph_capture():
    """The CUDA op does no host sync: a captured call replays with new probes and follows the reference."""
    device = "cuda"
    g = torch.Generator().manual_seed(13)
    shape = (2, 4, 257)
    stored, state = new_buffers(shape, torch.float16, device, g)
    probe = rand(shape, torch.float16, device, g)
    st_ref, s_ref = stored.cpu().clone(), state.cpu().clone()
    probes = [(probe.float() + rand(shape, torch.float32, device, g, 0.01 * k)).half() for k in range(6)]
    cache_gate(probe, stored.clone(), state.clone(), 0.05, (1.0, 0.0), ACCUMULATE)  # warm-up outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = cache_gate(probe, stored, state, 0.05, (1.0, 0.0), ACCUMULATE)
    for p in probes:
        probe.copy_(p)
        graph.replay()
        out_ref = ref.cache_gate(p.cpu(), st_ref, s_ref, 0.05, (1.0, 0.0), ACCUMULATE)
        torch.cuda.synchronize()
        assert int(out.item()) == int(out_ref.item())
        assert torch.equal(_bits(stored), _bits(st_ref))
        assert _close(float(state[1]), float(s_ref[1])) and float(state[2]) == float(s_ref[2])


# --- bad input: a clear exception naming the argument, from the wrapper and from the op itself ---

def _valid():
    g = torch.Generator().manual_seed(1)
    probe = torch.randn(2, 3, 4, generator=g)
    return dict(probe=probe, stored=torch.randn(2, 2, 3, 4, generator=g), state=torch.tensor([0.0, 0.0, 0.0, 0.0]),
                threshold=0.1, coefficients=[1.0, 0.0], flags=0)


BAD = [
    ("probe", lambda v: v["probe"].int(), TypeError),
    ("probe", lambda v: v["probe"].double(), TypeError),
    ("probe", lambda v: v["probe"].transpose(1, 2), ValueError),
    ("probe", lambda v: torch.randn(0, 3, 4), ValueError),
    ("stored", lambda v: v["stored"].half(), (TypeError, ValueError)),
    ("stored", lambda v: v["stored"][:1], ValueError),
    ("stored", lambda v: v["stored"].reshape(2, 2, 12), ValueError),
    ("stored", lambda v: torch.randn(2, 2, 4, 3).transpose(2, 3), ValueError),
    ("state", lambda v: v["state"].double(), (TypeError, ValueError)),
    ("state", lambda v: v["state"][:3], ValueError),
    ("state", lambda v: torch.zeros(8)[::2], ValueError),
    ("threshold", lambda v: -0.5, ValueError),
    ("threshold", lambda v: math.nan, ValueError),
    ("threshold", lambda v: math.inf, ValueError),
    ("coefficients", lambda v: [0.1] * 9, ValueError),
    ("coefficients", lambda v: [1.0, math.nan], ValueError),
    ("coefficients", lambda v: [math.inf], ValueError),
    ("flags", lambda v: 8, ValueError),
    ("flags", lambda v: -1, ValueError),
]


@pytest.mark.parametrize("name,make,exc", BAD, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(BAD)])
def test_bad_input_names_the_argument(name, make, exc):
    v = _valid()
    v[name] = make(v)
    with pytest.raises(exc, match=name):
        cache_gate(**v)
    # The native op checks too (its errors name the argument), for callers that bypass the wrapper.
    with pytest.raises((TypeError, ValueError, RuntimeError), match=name):
        torch.ops.velodiff.cache_gate(v["probe"], v["stored"], v["state"], float(v["threshold"]),
                                      list(v["coefficients"]), v["flags"])


def test_shared_memory_is_refused():
    """The op writes stored and state: buffers that overlap the probe or each other are refused (the wrapper's
    call reaches the op's check)."""
    v = _valid()
    with pytest.raises(ValueError, match="stored"):
        cache_gate(v["stored"][0], v["stored"], v["state"], 0.1)
    big = torch.randn(2 * 24 + 4)
    stored = big[:48].view(2, 2, 3, 4)
    state = big[44:48]  # the last 4 floats of stored
    with pytest.raises(ValueError, match="state"):
        cache_gate(v["probe"], stored, state, 0.1)
    with pytest.raises(ValueError, match="state"):
        torch.ops.velodiff.cache_gate(v["probe"], stored, state, 0.1, [], 0)
    # Disjoint views of one allocation are fine.
    cache_gate(v["probe"], stored, big[48:52], 0.1)


@pytest.mark.cuda
def test_cuda_device_mismatch_is_refused():
    v = _valid()
    probe = v["probe"].cuda()
    with pytest.raises(ValueError, match="stored"):
        cache_gate(probe, v["stored"], v["state"].cuda(), 0.1)
    with pytest.raises(ValueError, match="state"):
        cache_gate(probe, v["stored"].cuda(), v["state"], 0.1)
    with pytest.raises((ValueError, RuntimeError), match="state"):
        torch.ops.velodiff.cache_gate(probe, v["stored"].cuda(), v["state"], 0.1, [], 0)
