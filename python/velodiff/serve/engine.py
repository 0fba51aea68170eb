"""The engine: one thread owns the pipeline (and the GPU or CPU); requests wait in a bounded queue and are run in
dynamic batches.

Batching: the oldest waiting request opens a batch; requests with the same settings (:attr:`ImageRequest.batch_key`:
size, steps, sampler, guidance, LoRA strengths, techniques) join it, oldest first, until it holds ``max_batch``
images or the first request has waited ``max_wait_ms``. Each image keeps its own prompt, negative prompt and
generator (image i of a request with seed s draws from ``torch.Generator().manual_seed(s + i)``), so a batch is the
same computation as its requests run one by one; with ``pad_batches`` every batch also has the same shape, which
makes the images bit for bit independent of their company (see :class:`velodiff.serve.config.ServeConfig`).

Faults: an exception in a batch fails that batch's requests only; a request whose client went away is dropped
from the queue, and a running batch whose requests are all cancelled stops at its next step. ``stop(drain=True)``
refuses new requests and finishes the queued ones.
"""
from __future__ import annotations

import collections
import concurrent.futures
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch

from velodiff.serve.config import ImageRequest, ServeConfig

#: upper bounds (seconds) of the latency histogram's buckets
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class QueueFull(RuntimeError):
    """The queue holds ``max_queue`` requests; ``retry_after`` estimates the seconds until there is room."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class EngineStopped(RuntimeError):
    """The engine is draining or stopped and takes no new requests."""


class Cancelled(Exception):
    """The request was cancelled (its client went away)."""


@dataclass
class Job:
    """A request in the engine: ``future`` gets the list of PIL images (or an exception); ``progress(step,
    total)`` is called from the engine thread after every denoiser call of its batch."""

    request: ImageRequest
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    progress: Optional[Callable[[int, int], None]] = None
    enqueued: float = field(default_factory=time.monotonic)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()
        self.future.cancel()


def _settle(job: Job, result=None, error: Optional[BaseException] = None) -> bool:
    """Give the job its result or error unless its client cancelled it meanwhile; False when it was cancelled."""
    try:
        if error is not None:
            job.future.set_exception(error)
        else:
            job.future.set_result(result)
        return True
    except concurrent.futures.InvalidStateError:
        return False


def model_facts(pipe) -> Dict[str, Any]:
    """What requests are checked against: native (height, width), the size multiple, the largest side, whether the
    model is class-conditional (and its classes), the sampler names, the loaded LoRAs."""
    from velodiff.pipelines.base import max_size_factor
    from velodiff.sampling import SAMPLERS
    native = pipe.native_size
    native = (native, native) if isinstance(native, int) else tuple(native)
    class_conditional = hasattr(pipe, "transformer_fn") and not hasattr(pipe, "conditioning")
    multiple = pipe.vae_scale_factor
    if hasattr(pipe, "transformer"):
        multiple *= pipe.transformer.config.patch_size
    return {"native": native, "multiple": multiple,
            "max_side": int(max_size_factor() * min(native)) // multiple * multiple,
            "class_conditional": class_conditional,
            "num_classes": int(pipe.transformer.config.num_embeds_ada_norm) if class_conditional else 0,
            "samplers": tuple(SAMPLERS), "loras": tuple(pipe.loras)}


class Metrics:
    """Counters for ``/metrics`` (read under the engine's lock)."""

    def __init__(self):
        self.batch_sizes = collections.Counter()          # images in a batch (padding excluded) -> batches
        self.latency_counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0
        self.requests = collections.Counter()             # outcome -> requests
        self.images_total = 0
        self.recent = collections.deque()                 # (time, images) of the last minute

    def finished(self, latency: float, outcome: str) -> None:
        self.requests[outcome] += 1
        if outcome == "ok":
            i = next((k for k, b in enumerate(LATENCY_BUCKETS) if latency <= b), len(LATENCY_BUCKETS))
            self.latency_counts[i] += 1
            self.latency_sum += latency

    def images(self, count: int) -> None:
        now = time.monotonic()
        self.images_total += count
        self.recent.append((now, count))
        while self.recent and self.recent[0][0] < now - 60:
            self.recent.popleft()

    def images_per_second(self) -> float:
        now = time.monotonic()
        recent = [c for t, c in self.recent if t >= now - 60]
        return sum(recent) / 60.0 if recent else 0.0


class Engine:
    """Runs image requests on ``pipe`` in a worker thread (see the module docstring).

    Args:
        pipe: a velodiff pipeline (text-to-image or class-conditional), with its LoRAs loaded.
        config: the :class:`ServeConfig`.
    """

    def __init__(self, pipe, config: ServeConfig):
        self.pipe = pipe
        self.config = config
        self.model = model_facts(pipe)
        self.metrics = Metrics()
        self._queue: "collections.deque[Job]" = collections.deque()
        self._lock = threading.Condition()
        self._accepting = True
        self._stopping = False
        self._batch_seconds = collections.deque(maxlen=20)
        self._running = 0
        pipe.set_progress_bar_config(disable=True)
        self._thread = threading.Thread(target=self._loop, name="velodiff-engine", daemon=True)
        self._thread.start()

    # --- the caller's side --------------------------------------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        with self._lock:
            return len(self._queue)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def accepting(self) -> bool:
        return self._accepting and self.alive

    def submit(self, request: ImageRequest, progress: Optional[Callable[[int, int], None]] = None) -> Job:
        """Queue a request; QueueFull when ``max_queue`` requests wait, EngineStopped when draining."""
        job = Job(request, progress=progress)
        with self._lock:
            if not self.accepting:
                raise EngineStopped("the server is shutting down; send the request to another replica")
            if len(self._queue) >= self.config.max_queue:
                self.metrics.requests["rejected"] += 1
                raise QueueFull(f"the queue is full ({self.config.max_queue} requests wait); retry later",
                                self._retry_after())
            self._queue.append(job)
            self._lock.notify_all()
        return job

    def _retry_after(self) -> int:
        per_batch = sum(self._batch_seconds) / len(self._batch_seconds) if self._batch_seconds else 1.0
        batches = len(self._queue) / max(1, self.config.max_batch)
        return max(1, math.ceil(per_batch * batches))

    def stop(self, drain: bool = True, timeout: Optional[float] = None) -> None:
        """Refuse new requests; with ``drain`` finish the queued ones first, else fail them. Joins the thread."""
        with self._lock:
            self._accepting = False
            if not drain:
                while self._queue:
                    _settle(self._queue.popleft(), error=EngineStopped("the server stopped"))
            self._stopping = True
            self._lock.notify_all()
        self._thread.join(timeout)

    # --- the engine thread ------------------------------------------------------------------------------------------

    def _next_batch(self) -> Optional[List[Job]]:
        """Wait for a batch: the oldest job and compatible ones (see the module docstring). None when stopping and
        the queue is empty."""
        with self._lock:
            while True:
                self._drop_cancelled()
                if self._queue:
                    head = self._queue[0]
                    deadline = head.enqueued + self.config.max_wait_ms / 1000.0
                    batch = self._compatible(head)
                    images = sum(j.request.n for j in batch)
                    if images >= self.config.max_batch or time.monotonic() >= deadline or self._stopping:
                        for job in batch:
                            self._queue.remove(job)
                        return batch
                    self._lock.wait(max(0.0, deadline - time.monotonic()))
                elif self._stopping:
                    return None
                else:
                    self._lock.wait()

    def _drop_cancelled(self) -> None:
        for job in [j for j in self._queue if j.cancelled.is_set()]:
            self._queue.remove(job)
            self.metrics.finished(0.0, "cancelled")

    def _compatible(self, head: Job) -> List[Job]:
        batch, images = [], 0
        for job in self._queue:
            if job.request.batch_key == head.request.batch_key and images + job.request.n <= self.config.max_batch:
                batch.append(job)
                images += job.request.n
        return batch

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            started = time.monotonic()
            try:
                images = self._run(batch)
            except BaseException as exc:  # fails this batch only; the loop goes on
                for job in batch:
                    _settle(job, error=exc if isinstance(exc, Exception) else RuntimeError(str(exc)))
                    self.metrics.finished(0.0, "cancelled" if isinstance(exc, Cancelled) else "failed")
                if not isinstance(exc, Exception):
                    raise
                continue
            finally:
                self._batch_seconds.append(time.monotonic() - started)
            offset = 0
            with self._lock:
                self.metrics.batch_sizes[len(images)] += 1
                self.metrics.images(len(images))
            for job in batch:
                result = images[offset:offset + job.request.n]
                offset += job.request.n
                if job.cancelled.is_set() or not _settle(job, result=result):
                    self.metrics.finished(0.0, "cancelled")
                    continue
                self.metrics.finished(time.monotonic() - job.enqueued, "ok")

    def _run(self, batch: List[Job]) -> list:
        """One pipeline call for the batch's images (padded to ``max_batch`` with ``pad_batches``)."""
        first = batch[0].request
        prompts, negatives, labels, generators = [], [], [], []
        for job in batch:
            r = job.request
            for i in range(r.n):
                prompts.append(r.prompt)
                negatives.append(r.negative_prompt)
                labels.append(r.class_label)
                generators.append(torch.Generator().manual_seed(r.seed + i))
        real = len(generators)
        if self.config.pad_batches:
            for _ in range(self.config.max_batch - real):  # rows that only keep the batch's shape fixed
                prompts.append(prompts[0])
                negatives.append(negatives[0])
                labels.append(labels[0])
                generators.append(torch.Generator().manual_seed(0))
        total = len(self.pipe.make_plan(first.sampler, first.steps)[1].calls)  # denoiser calls: progress events

        def callback(i, call, state):
            if all(job.cancelled.is_set() for job in batch):
                raise Cancelled("every request of the batch was cancelled")
            for job in batch:
                if job.progress is not None and not job.cancelled.is_set():
                    job.progress(i + 1, total)

        kwargs = dict(num_inference_steps=first.steps, generator=generators, output_type="pil", callback=callback,
                      sampler=first.sampler, guidance_scale=first.guidance, height=first.height, width=first.width)
        if first.lora:
            kwargs["lora_scales"] = dict(first.lora)
        from velodiff.accel import applied, parse_technique
        with applied(self.pipe, *[parse_technique(s) for s in first.optimize]), torch.inference_mode():
            if first.class_label is not None:
                out = self.pipe(labels, **kwargs)
            else:
                if first.negative_prompt is not None:
                    kwargs["negative_prompt"] = negatives
                out = self.pipe(prompts, **kwargs)
        return out.images[:real]

    def metrics_text(self) -> str:
        """The Prometheus text exposition of the engine's counters."""
        m = self.metrics
        with self._lock:
            lines = ["# HELP velodiff_queue_depth Requests waiting in the engine's queue.",
                     "# TYPE velodiff_queue_depth gauge", f"velodiff_queue_depth {len(self._queue)}",
                     "# HELP velodiff_batch_images Images per batch (padding excluded).",
                     "# TYPE velodiff_batch_images histogram"]
            cumulative = 0
            for size in range(1, self.config.max_batch + 1):
                cumulative += m.batch_sizes.get(size, 0)
                lines.append(f'velodiff_batch_images_bucket{{le="{size}"}} {cumulative}')
            lines += [f'velodiff_batch_images_bucket{{le="+Inf"}} {cumulative}',
                      f"velodiff_batch_images_sum {sum(k * v for k, v in m.batch_sizes.items())}",
                      f"velodiff_batch_images_count {cumulative}",
                      "# HELP velodiff_request_seconds Time from queueing to the images, of answered requests.",
                      "# TYPE velodiff_request_seconds histogram"]
            cumulative = 0
            for bound, count in zip(LATENCY_BUCKETS, m.latency_counts):
                cumulative += count
                lines.append(f'velodiff_request_seconds_bucket{{le="{bound}"}} {cumulative}')
            cumulative += m.latency_counts[-1]
            lines += [f'velodiff_request_seconds_bucket{{le="+Inf"}} {cumulative}',
                      f"velodiff_request_seconds_sum {m.latency_sum:.6f}",
                      f"velodiff_request_seconds_count {cumulative}",
                      "# HELP velodiff_requests_total Requests by outcome.", "# TYPE velodiff_requests_total counter"]
            for outcome in ("ok", "failed", "cancelled", "rejected"):
                lines.append(f'velodiff_requests_total{{outcome="{outcome}"}} {m.requests.get(outcome, 0)}')
            lines += ["# HELP velodiff_images_total Images generated.", "# TYPE velodiff_images_total counter",
                      f"velodiff_images_total {m.images_total}",
                      "# HELP velodiff_images_per_second Images generated per second over the last minute.",
                      "# TYPE velodiff_images_per_second gauge",
                      f"velodiff_images_per_second {m.images_per_second():.6f}"]
        return "\n".join(lines) + "\n"
