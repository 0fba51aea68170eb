"""The stochastic similarity filter (closed-form counts, the skip probability's law) and the worker thread's queues
(same outputs as direct calls, errors handed over, the thread stopped)."""
import math
import threading
import time

import pytest
import torch

from fixtures import quiet_pipeline
from velodiff.stream import SimilarityFilter, StreamPipeline, StreamWorker, skip_probability


def with_cosine(v: torch.Tensor, c: float, seed: int = 1) -> torch.Tensor:
    """A vector whose cosine similarity with ``v`` is exactly ``c`` (up to rounding)."""
    w = torch.randn(v.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    u = v.double() / v.double().norm()
    w = w - (w * u).sum() * u
    w = w / w.norm()
    return (c * u + math.sqrt(1 - c * c) * w).float()


def test_skip_probability_closed_form():
    cos = torch.tensor([0.5, 0.98, 0.99, 0.995, 1.0])
    assert torch.allclose(skip_probability(cos, 0.98), torch.tensor([0.0, 0.0, 0.5, 0.75, 1.0]), atol=1e-5)
    assert torch.equal(skip_probability(cos, 1.0), torch.zeros(5))


@pytest.mark.parametrize("max_skip,count", [(0, 7), (3, 20), (10, 25)])
def test_identical_frames_are_skipped_up_to_max_skip_frame(max_skip, count):
    f = SimilarityFilter(threshold=0.98, max_skip_frame=max_skip)
    frame = torch.rand(3, 8, 8)
    decisions = [f.should_skip(frame) for _ in range(count)]
    # cosine 1 -> p = 1: every frame is skipped except the first and one after each run of max_skip skips
    processed = [i for i, d in enumerate(decisions) if not d]
    assert processed == list(range(0, count, max_skip + 1))
    assert (f.processed, f.skipped) == (len(processed), count - len(processed))


def test_unrelated_frames_are_never_skipped():
    f = SimilarityFilter(threshold=0.5)
    g = torch.Generator().manual_seed(0)
    assert not any(f.should_skip(torch.randn(3, 8, 8, generator=g)) for _ in range(50))


@pytest.mark.parametrize("threshold,cosine", [(0.9, 0.95), (0.98, 0.995), (0.5, 0.6)])
def test_skip_frequency_follows_the_probability(threshold, cosine):
    v = torch.rand(192) + 0.1
    w = with_cosine(v, cosine)
    f = SimilarityFilter(threshold=threshold, seed=3)
    trials, skips = 3000, 0
    for _ in range(trials):
        f.should_skip(v)           # processed: the reference
        skips += f.should_skip(w)  # compared with the reference
        f._reference = None        # next trial starts afresh (the draws go on)
    p = (cosine - threshold) / (1 - threshold)
    # binomial: 4.5 standard deviations (a false alarm about 1 in 150 000)
    assert abs(skips / trials - p) < 4.5 * math.sqrt(p * (1 - p) / trials)


def test_slow_drift_is_compared_with_the_last_processed_frame():
    """Each frame is within the threshold of its predecessor, but the filter compares with the last processed
    frame, so the drift adds up until a frame is processed."""
    base = torch.rand(192) + 0.1
    f = SimilarityFilter(threshold=0.9, max_skip_frame=1000)
    f.should_skip(base)
    drifted = [with_cosine(base, 1 - 0.001 * k, seed=k) for k in range(1, 200)]
    decisions = [f.should_skip(x) for x in drifted]
    assert not all(decisions)  # far enough from the reference (cosine < 0.9 by k = 100), a frame is processed


def test_stream_with_filter_repeats_the_previous_output():
    pipe = quiet_pipeline("digits")
    stream = StreamPipeline(pipe, [32, 45], prompt="a 3", similarity_threshold=0.98, max_skip_frame=2,
                            output_type="pt")
    frame = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0))
    outs = [stream.step(frame) for _ in range(7)]
    assert [o.skipped for o in outs] == [False, True, True, False, True, True, False]
    assert stream.model_calls == 1 + 3  # warm-up + one call per processed frame
    for k, o in enumerate(outs):
        if o.skipped:
            assert o.image is outs[k - 1].image and o.index == outs[k - 1].index
    assert stream.frames_in == 7 and (stream.filter.processed, stream.filter.skipped) == (3, 4)


@pytest.fixture(scope="module")
def digits():
    return quiet_pipeline("digits")


def test_worker_gives_the_outputs_of_direct_calls(digits):
    g = torch.Generator().manual_seed(0)
    frames = [torch.rand(3, 16, 16, generator=g) for _ in range(6)]
    direct = StreamPipeline(digits, [32, 45], prompt="a 3", output_type="pt")
    want = [direct.step(f) for f in frames] + direct.flush()
    worker = StreamWorker(StreamPipeline(digits, [32, 45], prompt="a 3", output_type="pt"), max_queue=2)
    for f in frames:
        worker.put(f)
    worker.stop(drain=True)
    got = []
    while (o := worker.get(timeout=60)) is not None:
        got.append(o)
    assert [o.index for o in got] == [o.index for o in want]
    assert all(torch.equal(a.image, b.image) for a, b in zip(got, want))
    assert not worker.running


def test_worker_hands_errors_over_and_stops(digits):
    worker = StreamWorker(StreamPipeline(digits, [32, 45]))
    worker.put(torch.rand(3, 16, 16))
    worker.put(torch.rand(3, 32, 32))  # a second size: the stream refuses it
    assert worker.get(timeout=60) is not None
    with pytest.raises(ValueError, match="stream runs at 16x16"):
        worker.get(timeout=60)
    worker._thread.join(10)
    assert not worker.running
    with pytest.raises(RuntimeError, match="stopped"):
        worker.put(torch.rand(3, 16, 16))


def test_worker_stop_ends_the_thread_and_latest_only_drops_stale_frames(digits):
    before = threading.active_count()
    stream = StreamPipeline(digits, [32, 45], output_type="latent")
    slow = stream.step

    def step(frame):
        time.sleep(0.05)
        return slow(frame)
    stream.step = step
    with StreamWorker(stream, max_queue=1, latest_only=True) as worker:
        for _ in range(20):
            worker.put(torch.rand(3, 16, 16))
        time.sleep(0.3)
    assert not worker.running and threading.active_count() == before
    assert stream.frames_in < 20  # frames replaced while the worker was busy were never run


def test_worker_bad_queue_size(digits):
    with pytest.raises(ValueError, match="max_queue"):
        StreamWorker(StreamPipeline(digits, [32, 45]), max_queue=0)
