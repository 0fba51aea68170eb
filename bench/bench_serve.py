"""Load test of ``velodiff serve`` (issue 17): throughput and latency with dynamic batching on and off.

A server process (``velodiff serve --model digits``) per setup; 16 client threads (httpx) send 200 requests in
all (one image each, 20 steps, distinct prompts and seeds), as fast as the answers come. Setups: batching on
(``--max-batch 8 --max-wait-ms 20``, batches padded to 8 images) and off (``--max-batch 1``: one request at a
time). The setups alternate over ``--rounds`` rounds (on, off, off, on, ...). Per setup: requests per second (the
median over rounds with min and max), p50 / p95 / p99 latency over all requests, and the speed-up of batching
taken within each round. Every response is checked: status 200 and a decodable 16x16 PNG; with batching on, each
image is compared byte for byte with the answer a lone request gets from a fresh engine of the same configuration
(none may differ), and lost (non-200) responses are counted.

  python bench/bench_serve.py [--requests 200] [--clients 16] [--rounds 2]
Writes <out>/serve_load_digits.{json,md}.
"""
from __future__ import annotations

import base64
import concurrent.futures
import io
import os
import socket
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import check_ranges, load_average, write_results  # noqa: E402

from velodiff.commands.args import Parser  # noqa: E402

SETUPS = {"batching on": ["--max-batch", "8", "--max-wait-ms", "20"], "batching off": ["--max-batch", "1"]}
STEPS = 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bodies(count: int):
    return [{"prompt": f"a handwritten {k % 10}", "seed": k, "steps": STEPS} for k in range(count)]


def start_server(flags):
    import httpx
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "velodiff.cli", "serve", "--port", str(port), "--max-queue", "256",
                             *flags], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(url + "/health").status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the server did not start")


def load(url: str, requests, clients: int):
    """(wall seconds, [(status, latency, payload)]) of sending ``requests`` from ``clients`` threads."""
    import httpx
    results = [None] * len(requests)
    with httpx.Client(base_url=url, timeout=600, limits=httpx.Limits(max_connections=clients)) as c:
        def send(i):
            t0 = time.perf_counter()
            r = c.post("/v1/images/generations", json=requests[i])
            results[i] = (r.status_code, time.perf_counter() - t0, r.json() if r.status_code == 200 else r.text)
        c.post("/v1/images/generations", json={"prompt": "warm up", "steps": STEPS})
        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(clients) as pool:
            list(pool.map(send, range(len(requests))))
        return time.perf_counter() - t0, results


def check(results) -> dict:
    from PIL import Image
    lost = sum(1 for status, _, _ in results if status != 200)
    bad = 0
    for status, _, payload in results:
        if status == 200:
            try:
                im = Image.open(io.BytesIO(base64.b64decode(payload["data"][0]["b64_json"])))
                bad += im.size != (16, 16)
            except Exception:
                bad += 1
    return {"lost": lost, "undecodable": bad}


def lone_answers(requests):
    """What a lone request gets from an engine configured as the batching server (pad to 8)."""
    import velodiff as vd
    from velodiff.serve.app import png_b64
    from velodiff.serve.config import ServeConfig, parse_request
    from velodiff.serve.engine import Engine
    config = ServeConfig(max_batch=8, max_wait_ms=20)
    engine = Engine(vd.Pipeline.from_pretrained("digits"), config)
    try:
        return [png_b64(engine.submit(parse_request(b, config, engine.model)).future.result(120)[0])
                for b in requests]
    finally:
        engine.stop()


def percentile(values, q):
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def main(argv=None):
    p = Parser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args(argv)
    check_ranges("bench_serve.py", [("--requests", args.requests, 1, 100000), ("--clients", args.clients, 1, 256),
                                    ("--rounds", args.rounds, 1, 20)])
    requests = bodies(args.requests)
    load_before = load_average()
    throughput = {name: [] for name in SETUPS}
    latencies = {name: [] for name in SETUPS}
    problems = {name: {"lost": 0, "undecodable": 0, "differing": 0} for name in SETUPS}
    batched_payloads = []
    for r in range(args.rounds):
        order = list(SETUPS) if r % 2 == 0 else list(SETUPS)[::-1]
        for name in order:
            proc, url = start_server(SETUPS[name])
            try:
                seconds, results = load(url, requests, args.clients)
            finally:
                proc.terminate()
                proc.wait(60)
            throughput[name].append(len(requests) / seconds)
            latencies[name] += [lat for status, lat, _ in results if status == 200]
            for key, value in check(results).items():
                problems[name][key] += value
            if name == "batching on":
                batched_payloads.append([payload["data"][0]["b64_json"] if status == 200 else None
                                         for status, _, payload in results])
            print(f"round {r + 1} {name}: {len(requests) / seconds:.2f} requests/s", flush=True)
    lone = lone_answers(requests)
    problems["batching on"]["differing"] = sum(a != b for payloads in batched_payloads for a, b in zip(payloads, lone))
    speedups = [on / off for on, off in zip(throughput["batching on"], throughput["batching off"])]
    rows = []
    for name in SETUPS:
        lat = latencies[name]
        rows.append({"setup": name, "flags": " ".join(SETUPS[name]),
                     "requests/s": {"median": statistics.median(throughput[name]), "min": min(throughput[name]),
                                    "max": max(throughput[name])},
                     "p50 s": percentile(lat, 0.5), "p95 s": percentile(lat, 0.95), "p99 s": percentile(lat, 0.99),
                     "speed-up": None if name == "batching off" else
                     {"median": statistics.median(speedups), "min": min(speedups), "max": max(speedups)},
                     **problems[name]})
    note = (f"digits, {args.requests} requests (1 image, {STEPS} steps, guidance 3) from {args.clients} client threads "
            f"per run, {args.rounds} rounds alternating the setups, a fresh server process per run; requests/s "
            f"median (min-max) over rounds; latencies over all runs of a setup; speed-up: batching on / off within "
            f"each round. differing: batched answers not byte-equal to a lone request's (of {args.rounds} x "
            f"{args.requests}).")
    write_results("serve_load_digits", rows, ["setup", "flags", "requests/s", "p50 s", "p95 s", "p99 s", "speed-up",
                                              "lost", "undecodable", "differing"], args.out, note=note,
                  extra={"load_before": load_before, "load_after": load_average(), "throughput": throughput})
    for row in rows:
        print(row)


if __name__ == "__main__":
    main()
