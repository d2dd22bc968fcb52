"""Ray Serve: a local Ray on 127.0.0.1 with 2 replicas of the digits engine behind Ray's HTTP proxy; requests reach
both replicas and each answers as `deis-fast serve` does."""
import json
import os
import threading
import time

import pytest

pytest.importorskip("ray.serve", reason="the Ray Serve deployment needs the [ray] extra (ray[serve])")
pytest.importorskip("starlette", reason="the Ray Serve deployment needs the [serve] extra (starlette)")
pytest.importorskip("prometheus_client", reason="the Ray Serve deployment needs the [serve] extra")

from _http import free_port, post  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))




@pytest.mark.slow
def test_two_replicas_behind_rays_http_proxy_both_serve():
    import ray
    from ray import serve

    from deis_fast.serving.ray_serve import deployment
    t0 = time.time()      # bounded: Ray start (~10 s here), at most 120 s of request rounds, 60 s per request
    port = free_port()
    env = {"PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    ray.init(address="local", num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False, runtime_env={"env_vars": env})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(deployment("digits", num_replicas=2, num_cpus=1, threads=1, max_batch=16), name="deis_fast",
                  route_prefix="/")
        pids, answers = set(), {}
        deadline = time.time() + 120
        while len(pids) < 2 and time.time() < deadline:
            results = []
            threads = [threading.Thread(target=lambda i=i: results.append((i, post(port, {"seed": i % 2, "nfe": 8}))))
                       for i in range(12)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            for i, (status, headers, body) in results:
                assert status == 200 and headers["content-type"] == "image/png", (status, body[:200])
                pids.add(headers["x-deis-fast-pid"])
                answers.setdefault(i % 2, set()).add(body)
        assert len(pids) == 2, f"only replica(s) {pids} answered"
        assert all(len(v) == 1 for v in answers.values()) and answers[0] != answers[1]  # same seed, same PNG
        status, _, body = post(port, {"nfe": 0})
        assert status == 400 and "from 1 to 100" in json.loads(body)["error"]
        print(f"ray serve test: {time.time() - t0:.1f} s")
    finally:
        serve.shutdown()
        ray.shutdown()
