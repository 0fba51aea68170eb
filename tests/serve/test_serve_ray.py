"""The server as a Ray Serve application on a local Ray instance: 2 CPU replicas behind Ray's HTTP proxy answer the
same API, with the same images as one engine; a replica killed mid-load is restarted by Ray and no request is lost
(the client retries what the dead replica dropped)."""
import concurrent.futures
import time

import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")

from fixtures import free_port  # noqa: E402
from velodiff.serve.config import ServeConfig  # noqa: E402
from velodiff.serve.ray import build_ray_app  # noqa: E402

URL = "/v1/images/generations"


def replicas():
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["name"].startswith("SERVE_REPLICA::velodiff"))


@pytest.fixture(scope="module")
def cluster():
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_ray_app(ServeConfig(max_batch=4, max_wait_ms=20), num_replicas=2), route_prefix="/",
                  name="velodiff")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def post_with_retries(client, body, attempts=20):
    """What a client of a replicated service does: retry a request the service dropped (a dead replica)."""
    for attempt in range(attempts):
        try:
            r = client.post(URL, json=body)
            if r.status_code == 200:
                return r.json(), attempt
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"no answer after {attempts} attempts: {body}")


def test_two_replicas_same_api_same_images(cluster):
    from fixtures import quiet_pipeline
    from velodiff.serve.engine import Engine
    from velodiff.serve.config import parse_request
    assert len(replicas()) == 2
    with httpx.Client(base_url=cluster, timeout=120) as c:
        assert c.get("/health").json()["status"] == "ok"
        assert c.get("/v1/models").json()["data"][0]["id"] == "digits"
        body = {"prompt": "a handwritten 9", "seed": 4, "steps": 5}
        answers = [c.post(URL, json=body).json()["data"] for _ in range(4)]  # spread over both replicas
        assert "velodiff_images_total" in c.get("/metrics").text
    config = ServeConfig(max_batch=4, max_wait_ms=20)
    engine = Engine(quiet_pipeline("digits"), config)
    try:
        from velodiff.serve.app import png_b64
        local = engine.submit(parse_request(body, config, engine.model)).future.result(60)
    finally:
        engine.stop()
    assert all(a == [{"b64_json": png_b64(local[0])}] for a in answers)


def test_no_request_is_lost_when_a_replica_dies(cluster):
    bodies = [{"prompt": f"a handwritten {k % 10}", "seed": k, "steps": 12} for k in range(24)]
    with httpx.Client(base_url=cluster, timeout=120) as c, concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(post_with_retries, c, b) for b in bodies]
        while sum(f.done() for f in futures) < 4:
            time.sleep(0.05)
        victim = replicas()[0]
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        results = [f.result(300) for f in futures]
    assert all(len(data["data"]) == 1 and data["data"][0]["b64_json"] for data, _ in results)
    deadline = time.time() + 120
    while (len(replicas()) < 2 or victim in replicas()) and time.time() < deadline:
        time.sleep(0.5)
    assert len(replicas()) == 2 and victim not in replicas()  # Ray started a new replica
