"""Input and output queues around a :class:`velodiff.stream.StreamPipeline` on a worker thread (StreamDiffusion's
I/O queues, section 3.3): capture and display run in the caller's thread while the denoiser runs in the worker.

``put(frame)`` queues a frame (blocking while the input queue is full, or, with ``latest_only=True``, replacing
the frames not yet taken: a live camera wants the newest frame, a folder wants every frame); ``get()`` returns the
next :class:`velodiff.stream.StreamOutput`. An exception in the worker is raised by the next ``get()`` and stops
the worker. ``stop()`` (or leaving the ``with`` block) ends the thread and joins it; frames still queued are
dropped unless ``drain=True``. The worker never outlives its stream: the thread is a daemon and ``stop`` joins it.
"""
from __future__ import annotations

import queue
import threading
import time
from typing import Optional

_STOP = object()


class StreamWorker:
    """Runs ``stream.step`` on frames from an input queue in a thread; outputs go to an output queue.

    Args:
        stream: the :class:`velodiff.stream.StreamPipeline` to drive (only the worker calls it while running).
        max_queue: the input queue's size (>= 1).
        latest_only: keep only the newest unprocessed frame (live sources).
        flush_on_stop: on a draining stop, also emit the results of the frames still in the stream batch.
    """

    def __init__(self, stream, max_queue: int = 8, latest_only: bool = False, flush_on_stop: bool = True):
        if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 1:
            raise ValueError(f"max_queue must be an integer >= 1, got {max_queue!r}")
        self.stream = stream
        self.latest_only = latest_only
        self.flush_on_stop = flush_on_stop
        self._inputs: "queue.Queue" = queue.Queue(maxsize=max_queue)
        self._outputs: "queue.Queue" = queue.Queue()
        self._error: Optional[BaseException] = None
        self._put_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="velodiff-stream", daemon=True)
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        try:
            while True:
                item = self._inputs.get()
                if item is _STOP:
                    break
                if isinstance(item, tuple) and item and item[0] is _STOP:  # draining stop
                    if self.flush_on_stop:
                        for out in self.stream.flush():
                            self._outputs.put(out)
                    break
                self._outputs.put(self.stream.step(item))
        except BaseException as exc:  # handed to the caller's next get()
            self._error = exc
        finally:
            self._outputs.put(_STOP)

    def put(self, frame, timeout: Optional[float] = None) -> None:
        """Queue a frame (see the module docstring); RuntimeError once the worker has stopped."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._put_lock:
            if self.latest_only:
                self._drop_queued()
            while True:  # in short waits, so that a worker that dies meanwhile is noticed
                if not self.running:
                    self._raise_error()
                    raise RuntimeError("the stream worker has stopped; start a new StreamWorker")
                wait = 0.1 if deadline is None else min(0.1, deadline - time.monotonic())
                if wait <= 0:
                    raise queue.Full
                try:
                    self._inputs.put(frame, timeout=wait)
                    return
                except queue.Full:
                    pass

    def _drop_queued(self) -> None:
        try:
            while True:
                self._inputs.get_nowait()
        except queue.Empty:
            pass

    def get(self, timeout: Optional[float] = None):
        """The next output (a :class:`velodiff.stream.StreamOutput`); None once the worker has finished and every
        output was taken; queue.Empty after ``timeout`` seconds; the worker's exception if it failed."""
        item = self._outputs.get(timeout=timeout)
        if item is _STOP:
            self._outputs.put(_STOP)  # later gets see the end too
            self._raise_error()
            return None
        return item

    def ready(self) -> list:
        """The outputs ready now, without waiting (the worker's exception if it failed)."""
        outputs = []
        while True:
            try:
                out = self.get(timeout=0)
            except queue.Empty:
                return outputs
            if out is None:
                return outputs
            outputs.append(out)

    def _raise_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def stop(self, drain: bool = False, timeout: Optional[float] = None) -> None:
        """End the worker: with ``drain`` after the queued frames (and the frames in the batch, with
        ``flush_on_stop``), else at once, dropping queued frames. Joins the thread."""
        if not drain:
            self._drop_queued()
        if self.running:
            self._inputs.put((_STOP,) if drain else _STOP)
        self._thread.join(timeout)

    def __enter__(self) -> "StreamWorker":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
