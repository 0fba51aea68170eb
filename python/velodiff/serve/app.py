"""The HTTP API over an :class:`velodiff.serve.engine.Engine` (FastAPI; run by uvicorn or Ray Serve).

* ``POST /v1/images/generations``: OpenAI's images request and response (``{"created", "data": [{"b64_json"}]}``)
  with velodiff's extensions (:mod:`velodiff.serve.config`); with ``"stream": true`` the answer is a stream of
  server-sent events: ``progress`` ``{"step", "total"}`` after every denoiser call, then ``result`` (the response
  body) or ``error``.
* ``GET /v1/models``, ``GET /health`` (503 while draining), ``GET /metrics`` (Prometheus text).

Errors are OpenAI-shaped (``{"error": {"message", "type", "param"}}``): 400 a bad field, 413 a body over the
server's limit (read no further), 429 a full queue (with ``Retry-After``), 503 a draining server, 500 a failed
batch. A client that disconnects cancels its request.
"""

import asyncio
import base64
import io
import json
import time
from typing import Any, Callable, Optional

from velodiff.serve.config import RequestError, parse_request
from velodiff.serve.engine import Cancelled, Engine, EngineStopped, QueueFull

#: how often a waiting handler checks whether its client went away (seconds)
DISCONNECT_POLL = 0.05


def _error(status: int, message: str, kind: str, param: Optional[str] = None, headers=None):
    from fastapi.responses import JSONResponse
    return JSONResponse({"error": {"message": message, "type": kind, "param": param}}, status_code=status,
                        headers=headers)


def png_b64(image) -> str:
    """A PIL image as base64 PNG text."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


async def _read_body(request, limit: int) -> Optional[bytes]:
    """The body, or None when it exceeds ``limit`` bytes (by its Content-Length or while reading)."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        return None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(get_engine: Callable[[], Engine], on_shutdown: Optional[Callable[[], None]] = None):
    """The FastAPI app; ``get_engine()`` returns the engine serving the request (a replica's own under Ray),
    ``on_shutdown`` runs when the server stops (after uvicorn has finished the open requests)."""
    import contextlib

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        if on_shutdown is not None:
            await asyncio.to_thread(on_shutdown)

    app = FastAPI(title="velodiff", lifespan=lifespan)

    @app.get("/health")
    async def health():
        engine = get_engine()
        if not engine.accepting:
            return _error(503, "the server is shutting down", "unavailable")
        return {"status": "ok", "queue_depth": engine.queue_depth}

    @app.get("/v1/models")
    async def models():
        engine = get_engine()
        return {"object": "list", "data": [{"id": engine.config.model_id, "object": "model", "created": 0,
                                            "owned_by": "velodiff"}]}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(get_engine().metrics_text(), media_type="text/plain; version=0.0.4")

    @app.post("/v1/images/generations")
    async def generations(request: Request):
        engine = get_engine()
        body = await _read_body(request, engine.config.max_body_bytes)
        if body is None:
            return _error(413, f"the request is larger than {engine.config.max_body_bytes} bytes", "invalid_request_error")
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            return _error(400, f"the body is not valid JSON: {e}", "invalid_request_error")
        try:
            req = parse_request(payload, engine.config, engine.model)
        except RequestError as e:
            return _error(400, str(e), "invalid_request_error", e.param)
        loop = asyncio.get_running_loop()
        events = asyncio.Queue()

        def progress(step: int, total: int) -> None:  # engine thread -> this request's event loop
            loop.call_soon_threadsafe(events.put_nowait, ("progress", {"step": step, "total": total}))
        try:
            job = engine.submit(req, progress if req.stream else None)
        except QueueFull as e:
            return _error(429, str(e), "rate_limit_error", headers={"Retry-After": str(e.retry_after)})
        except EngineStopped as e:
            return _error(503, str(e), "unavailable")
        result = asyncio.wrap_future(job.future)
        if req.stream:
            return StreamingResponse(_events(job, result, events), media_type="text/event-stream")
        while not result.done():
            done, _ = await asyncio.wait({result}, timeout=DISCONNECT_POLL)
            if not done and await request.is_disconnected():
                job.cancel()
                return _error(499, "the client closed the request", "cancelled")
        try:
            images = result.result()
        except (Cancelled, asyncio.CancelledError):
            return _error(499, "the request was cancelled", "cancelled")
        except EngineStopped as e:
            return _error(503, str(e), "unavailable")
        except Exception as e:  # the batch failed; the server keeps serving
            return _error(500, f"generation failed: {type(e).__name__}: {e}", "server_error")
        return JSONResponse(await asyncio.to_thread(_response, images))

    return app


def _response(images) -> dict:
    return {"created": int(time.time()), "data": [{"b64_json": png_b64(im)} for im in images]}


async def _events(job, result, events: "asyncio.Queue"):
    """Server-sent events of one request: progress, then the result or an error. Cancels the job when the client
    goes away (the generator is closed)."""
    def event(name: str, data: Any) -> bytes:
        return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()
    try:
        while True:
            getter = asyncio.ensure_future(events.get())
            done, _ = await asyncio.wait({getter, result}, return_when=asyncio.FIRST_COMPLETED)
            if getter in done:
                name, data = getter.result()
                yield event(name, data)
                continue
            getter.cancel()
            while not events.empty():
                name, data = events.get_nowait()
                yield event(name, data)
            try:
                images = result.result()
            except Exception as e:
                yield event("error", {"message": f"generation failed: {type(e).__name__}: {e}"})
                return
            yield event("result", await asyncio.to_thread(_response, images))
            return
    finally:
        if not result.done():
            job.cancel()
