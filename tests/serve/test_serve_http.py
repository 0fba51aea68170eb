"""``velodiff serve``'s HTTP API against real clients (httpx) on a real uvicorn server on a free port: every
endpoint, batching that leaves every image bit for bit as a lone request makes it, back-pressure, bad requests that
never reach the engine, a failing batch, cancellation, server-sent progress, and a graceful shutdown of the CLI."""
import base64
import concurrent.futures
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from fixtures import free_port, quiet_pipeline  # noqa: E402
from velodiff.serve.config import ServeConfig  # noqa: E402
from velodiff.serve.server import build_app  # noqa: E402

URL = "/v1/images/generations"


class Server:
    """A uvicorn server of ``build_app(config, pipe)`` in a thread."""

    def __init__(self, config: ServeConfig, pipe):
        import uvicorn
        self.app, self.engine = build_app(config, pipe)
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def client(self, timeout=120):
        return httpx.Client(base_url=self.url, timeout=timeout)

    def close(self):
        self.server.should_exit = True
        self.thread.join(30)
        self.engine.stop()


@pytest.fixture(scope="module")
def digits():
    return quiet_pipeline("digits")


@pytest.fixture
def server(digits):
    s = Server(ServeConfig(max_batch=4, max_wait_ms=300, max_queue=8, max_steps=50), digits)
    yield s
    s.close()


def images_of(response) -> list:
    from PIL import Image
    assert response.status_code == 200, response.text
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(d["b64_json"])))) for d in response.json()["data"]]


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise KeyError(name)


def test_health_models_metrics(server):
    with server.client() as c:
        assert c.get("/health").json()["status"] == "ok"
        models = c.get("/v1/models").json()
        assert models["object"] == "list" and models["data"][0]["id"] == "digits"
        text = c.get("/metrics").text
        for name in ("velodiff_queue_depth", "velodiff_batch_images_count", "velodiff_request_seconds_count",
                     "velodiff_images_total", "velodiff_images_per_second"):
            assert name in text


def test_openai_response_and_the_pipeline(server, digits):
    with server.client() as c:
        r = c.post(URL, json={"prompt": "a handwritten 4", "n": 2, "seed": 11, "steps": 8, "size": "16x16"})
    got = images_of(r)
    assert len(got) == 2 and got[0].shape == (16, 16, 3) and isinstance(r.json()["created"], int)
    direct = digits(["a handwritten 4"] * 2, num_inference_steps=8,
                    generator=[torch.Generator().manual_seed(11), torch.Generator().manual_seed(12)],
                    output_type="np").images
    # the server ran the images in a batch of 4 rows (padded), the direct call in a batch of 2: fp32 rounding
    # apart (about 1e-6), so at most one 8-bit level after rounding
    for g, d in zip(got, direct):
        assert np.abs(g.astype(int) - np.round(d * 255).astype(int)).max() <= 1


@pytest.mark.parametrize("sampler", [None, "euler_a"])  # euler_a: step noise from each image's own generator
def test_batched_images_equal_lone_requests_bit_for_bit(server, sampler):
    bodies = [{"prompt": f"a handwritten {d}", "seed": 100 + d, "steps": 6, "n": 1 + d % 2} for d in range(5)]
    if sampler is not None:
        bodies = [dict(b, sampler=sampler) for b in bodies]
    with server.client() as c:
        alone = [c.post(URL, json=b).json()["data"] for b in bodies]
        batches_before = metric(c.get("/metrics").text, "velodiff_batch_images_count")
        with concurrent.futures.ThreadPoolExecutor(5) as pool:
            together = list(pool.map(lambda b: c.post(URL, json=b).json()["data"], bodies))
        batches = metric(c.get("/metrics").text, "velodiff_batch_images_count") - batches_before
    assert together == alone  # the base64 PNGs, byte for byte
    assert batches < len(bodies)  # and they were batched (7 images in batches of at most 4: 2 or 3 batches)


def test_bad_requests_never_reach_the_engine(server):
    cases = [({"prompt": "a 3", "size": "17x16"}, 400, "size"), ({"prompt": "a 3", "size": "4096x4096"}, 400, "size"),
             ({"prompt": "a 3", "n": 50}, 400, "n"), ({"prompt": "a 3", "sampler": "magic"}, 400, "sampler"),
             ({"prompt": "a 3", "steps": 0}, 400, "steps"), ({"prompt": "a 3", "guidance": "high"}, 400, "guidance"),
             ({"prompt": "a 3", "response_format": "url"}, 400, "response_format"),
             ({"prompt": "a 3", "model": "dall-e-3"}, 400, "model"), ({"prompt": "a 3", "colour": 1}, 400, "colour"),
             ({"prompt": "a 3", "lora": {"nope": 1}}, 400, "lora"),
             ({"prompt": "a 3", "optimize": ["deepcache"]}, 400, "optimize"),
             ({"prompt": "a 3", "class_label": 3}, 400, "class_label"), ({}, 400, "prompt"),
             ({"prompt": "a" * 5000}, 400, "prompt"), ({"prompt": "a" * (10 << 20)}, 413, None)]
    with server.client() as c:
        before = c.get("/metrics").text
        for body, status, param in cases:
            r = c.post(URL, content=json.dumps(body))
            assert r.status_code == status, (body if len(str(body)) < 200 else "10 MB prompt", r.text[:200])
            error = r.json()["error"]
            assert error["param"] == param and error["message"]
        assert c.post(URL, content=b"{not json").status_code == 400
        after = c.get("/metrics").text
    assert metric(before, "velodiff_images_total") == metric(after, "velodiff_images_total")
    assert server.engine.metrics.requests.get("failed", 0) == 0


def hold_engine(server):
    """Occupy the engine thread with a job that waits on the returned event (its progress callback blocks)."""
    from velodiff.serve.config import parse_request
    release, started = threading.Event(), threading.Event()

    def progress(step, total):
        started.set()
        release.wait(60)
    req = parse_request({"prompt": "a 1", "steps": 2}, server.engine.config, server.engine.model)
    job = server.engine.submit(req, progress)
    assert started.wait(30)
    return release, job


def test_full_queue_answers_429_with_retry_after(digits):
    s = Server(ServeConfig(max_batch=2, max_wait_ms=0, max_queue=1), digits)
    try:
        release, job = hold_engine(s)
        with s.client() as c, concurrent.futures.ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(c.post, URL, json={"prompt": "a 2", "steps": 2})
            deadline = time.time() + 10
            while s.engine.queue_depth < 1 and time.time() < deadline:
                time.sleep(0.01)
            r = c.post(URL, json={"prompt": "a 3", "steps": 2})
            assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
            assert "queue is full" in r.json()["error"]["message"]
            release.set()
            assert waiting.result(60).status_code == 200
        assert len(job.future.result(60)) == 1
    finally:
        s.close()


def test_a_failing_batch_fails_only_its_requests(server, monkeypatch):
    pipe = server.engine.pipe
    call = type(pipe).__call__

    def failing(self, *args, **kwargs):
        if kwargs.get("num_inference_steps") == 13:
            raise RuntimeError("injected failure")
        return call(self, *args, **kwargs)
    monkeypatch.setattr(type(pipe), "__call__", failing)
    with server.client() as c:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            bad = pool.submit(c.post, URL, json={"prompt": "a 5", "steps": 13})
            good = pool.submit(c.post, URL, json={"prompt": "a 5", "steps": 12})
        assert bad.result().status_code == 500 and "injected failure" in bad.result().json()["error"]["message"]
        assert good.result().status_code == 200
        assert c.post(URL, json={"prompt": "a 6", "steps": 3}).status_code == 200  # still serving


def test_a_client_that_disconnects_cancels_its_request(server):
    release, job = hold_engine(server)
    images_before = server.engine.metrics.images_total
    with pytest.raises(httpx.TimeoutException):
        with server.client(timeout=0.5) as c:
            c.post(URL, json={"prompt": "a 7", "steps": 2, "seed": 5})
    deadline = time.time() + 10  # the server notices the disconnect and marks the queued request cancelled
    while not any(j.cancelled.is_set() for j in list(server.engine._queue)) and time.time() < deadline:
        time.sleep(0.02)
    release.set()  # the engine moves on and drops the cancelled request from its queue
    deadline = time.time() + 10
    while server.engine.metrics.requests.get("cancelled", 0) < 1 and time.time() < deadline:
        time.sleep(0.02)
    assert server.engine.metrics.requests["cancelled"] >= 1
    job.future.result(30)
    assert server.engine.metrics.images_total == images_before + 1  # only the holding job's image was made


def test_server_sent_progress_events(server):
    with server.client() as c:
        with c.stream("POST", URL, json={"prompt": "a 8", "steps": 5, "stream": True}) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            text = "".join(r.iter_text())
    events = [(block.split("\n")[0][len("event: "):], json.loads(block.split("\n")[1][len("data: "):]))
              for block in text.strip().split("\n\n")]
    progress = [d for name, d in events if name == "progress"]
    assert [p["step"] for p in progress] == list(range(1, 6)) and all(p["total"] == 5 for p in progress)
    assert events[-1][0] == "result" and len(events[-1][1]["data"]) == 1


def test_per_request_lora_strengths(tmp_path):
    pipe = quiet_pipeline("digits")
    pipe.load_lora("digits-bold", strength=1.0)
    s = Server(ServeConfig(max_batch=2, max_wait_ms=0), pipe)
    try:
        body = {"prompt": "a handwritten 2", "steps": 6, "seed": 3}
        with s.client() as c:
            off = images_of(c.post(URL, json=dict(body, lora={"digits-bold": 0.0})))[0]
            on = images_of(c.post(URL, json=dict(body, lora={"digits-bold": 1.0})))[0]
            default = images_of(c.post(URL, json=body))[0]
        assert np.array_equal(on, default) and not np.array_equal(on, off)
        assert on.mean() > off.mean()  # the style thickens the strokes
    finally:
        s.close()


def test_allowed_techniques_and_class_conditional_models():
    pipe = quiet_pipeline("digits-dit")
    s = Server(ServeConfig(max_batch=2, max_wait_ms=0, allowed_optimize=("split_cfg",)), pipe)
    try:
        with s.client() as c:
            assert len(images_of(c.post(URL, json={"class_label": 3, "steps": 4, "optimize": ["split_cfg"]}))) == 1
            r = c.post(URL, json={"prompt": "a 3"})
            assert r.status_code == 400 and r.json()["error"]["param"] == "class_label"
        assert pipe.cfg_mode == "batched"  # the technique was undone after its batch
    finally:
        s.close()


def test_cli_shutdown_drains_the_open_requests(tmp_path):
    port = free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "velodiff.cli", "serve", "--port", str(port), "--max-batch", "2",
                             "--max-wait-ms", "0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                            text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline and proc.poll() is None, proc.stdout.read() if proc.poll() else "timeout"
            time.sleep(0.1)
        with httpx.Client(base_url=url, timeout=120) as c, concurrent.futures.ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(c.post, URL, json={"prompt": f"a {d}", "steps": 100, "seed": d}) for d in range(4)]
            deadline = time.time() + 30  # all four are in: the first batch of 2 runs, the other 2 wait in the queue
            while metric(c.get("/metrics").text, "velodiff_queue_depth") < 2 and time.time() < deadline:
                time.sleep(0.02)
            proc.send_signal(signal.SIGTERM)
            codes = [f.result().status_code for f in futures]
        assert codes == [200] * 4
        # uvicorn re-raises the signal once it has shut down, so the process ends as terminated by SIGTERM
        assert proc.wait(60) in (0, -signal.SIGTERM)
        assert "Application shutdown complete" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize("argv,message", [(["--port", "70000"], "--port 70000: must be from 0 to 65535"),
                                          (["--allow-optimize", "warp"], "--allow-optimize|--optimize warp"),
                                          (["--max-batch", "0"], "--max-batch: must be a positive integer"),
                                          (["--max-batch", "2", "--max-n", "4"],
                                           r"--max-n \(4\) cannot exceed --max-batch \(2\)")])
def test_cli_bad_flags(argv, message, capsys):
    import re

    from fixtures import run_cli
    code, out, err = run_cli(["serve"] + argv, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and re.search(message, err), err
