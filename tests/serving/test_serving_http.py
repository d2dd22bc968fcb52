"""`deis-fast serve` as a user runs it: a subprocess on 127.0.0.1, real HTTP requests (concurrent ones among them),
PNG and .npy answers, bad requests (4xx, one line, the server keeps serving), cancellation when the client goes
away, and SIGTERM draining the requests in flight."""
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

pytest.importorskip("starlette", reason="deis-fast serve needs the [serve] extra (starlette)")
pytest.importorskip("uvicorn", reason="deis-fast serve needs the [serve] extra (uvicorn)")
pytest.importorskip("prometheus_client", reason="deis-fast serve needs the [serve] extra (prometheus-client)")

from _http import free_port, post  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))




def _get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


class Server:
    def __init__(self, *args: str):
        self.port = free_port()
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen([sys.executable, "-m", "deis_fast", "serve", "--port", str(self.port),
                                      "--threads", "1", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"deis-fast serve exited: {self.proc.stdout.read()}")
            try:
                if _get(self.port, "/health")[0] == 200:
                    return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("deis-fast serve did not answer /health within 60 s")

    def metric(self, name: str) -> float:
        text = _get(self.port, "/metrics")[1].decode()
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.stdout.read()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import shutil
    tuned = tmp_path_factory.mktemp("tuned")
    for name in ("digits_nfe5.json", "flow_nfe5.json"):
        shutil.copy(os.path.join(ROOT, "benchmarks", "tuned", name), tuned / name)
    (tuned / "broken.json").write_text("{not json")
    s = Server("--max-batch", "16", "--max-queue", "64", "--max-nfe", "50", "--tuned-dir", str(tuned))
    yield s
    s.stop()


def test_png_for_two_seeds_same_seed_same_bytes(server):
    answers = {}
    for seed in (1, 2, 1):
        status, headers, body = post(server.port, {"seed": seed, "method": "tab3", "nfe": 8})
        assert status == 200 and headers["content-type"] == "image/png" and body[:8] == b"\x89PNG\r\n\x1a\n"
        assert headers["x-deis-fast-nfe"] == "8" and headers["x-deis-fast-seeds"] == str(seed)
        answers.setdefault(seed, []).append(body)
    assert answers[1][0] == answers[1][1]            # same seed: the same bytes
    assert answers[1][0] != answers[2][0]            # another seed: another image
    status, _, body = post(server.port, {"seed": 1, "num": 3, "nfe": 8, "upscale": 2})
    assert status == 200 and body[16:24] == (48).to_bytes(4, "big") + (16).to_bytes(4, "big")  # 3 side by side


def test_a_tuned_file_from_the_tuned_dir(server):
    status, headers, body = post(server.port, {"seed": 4, "tuned": "digits_nfe5.json"})
    assert status == 200 and headers["x-deis-fast-nfe"] == "5" and body[:4] == b"\x89PNG"


def test_concurrent_requests_each_equal_the_request_alone(server):
    bodies = [{"seed": 10 + i, "method": ["tab3", "ddim", "dpmpp2", "unipc3"][i % 4], "nfe": [5, 8, 10][i % 3],
               "format": "npy"} for i in range(16)]
    alone = [np.load(io.BytesIO(post(server.port, b)[2])) for b in bodies]
    results = [None] * len(bodies)

    def client(i):
        results[i] = post(server.port, bodies[i])
    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert server.metric("deis_fast_batch_rows_bucket{le=\"1.0\"}") < server.metric("deis_fast_batch_rows_count")
    for (status, headers, body), ref in zip(results, alone):
        assert status == 200 and headers["content-type"] == "application/x-npy"
        x = np.load(io.BytesIO(body))
        assert x.shape == (1, 1, 8, 8)
        # within the digits U-Net's batch-size noise (tests/serving/test_serving_engine.py measures it, ~2e-5)
        assert np.abs(x - ref).max() <= 1e-4 * np.abs(ref).max()


BAD = [("not json", 400, "must be JSON"),
       ({"method": "nope"}, 400, "unknown method"),
       ({"nfe": 0}, 400, "nfe must be an integer from 1 to 50"),
       ({"nfe": 500}, 400, "from 1 to 50"),
       ({"num": 17}, 400, "at most 16 rows"),
       ({"shape": [1, 7, 7]}, 400, "cannot take shape"),
       ({"tuned": "x.json"}, 400, "does not exist"),
       ({"tuned": "broken.json"}, 400, "cannot read a tuned file"),
       ({"tuned": "flow_nfe5.json"}, 400, "tune again for this model's schedule"),
       ({"tuned": "../digits_nfe5.json"}, 400, "name of a file in the server's --tuned-dir"),
       ({"class": 3}, 400, "unconditional"),
       ({"seed": "one"}, 400, "'seed' must be an integer"),
       ({"colour": "red"}, 400, "unknown field 'colour'"),
       ({"format": "gif"}, 400, "'format' must be one of")]


def test_bad_requests_get_a_4xx_with_one_line_and_the_server_goes_on(server):
    ok_before = post(server.port, {"seed": 3, "nfe": 5})[2]
    for body, code, msg in BAD:
        status, headers, data = post(server.port, body)
        err = json.loads(data)["error"]
        assert status == code and msg in err and "\n" not in err, (body, status, err)
    assert _get(server.port, "/nope")[0] == 404
    assert post(server.port, {"seed": 3, "nfe": 5})[2] == ok_before
    assert server.metric('deis_fast_requests_total{status="bad_request"}') >= len(BAD)
    health = json.loads(_get(server.port, "/health")[1])
    assert health["status"] == "ok" and health["model"] == "digits" and health["shape"] == [1, 8, 8]


def test_a_client_that_disconnects_cancels_its_request(server):
    # three big requests keep the engine busy (16 rows each: one at a time), the fourth waits in the queue ...
    busy = [threading.Thread(target=post, args=(server.port, {"seed": i, "num": 16, "nfe": 50})) for i in range(3)]
    for t in busy:
        t.start()
    before = server.metric('deis_fast_requests_total{status="cancelled"}')
    body = json.dumps({"seed": 99, "num": 16, "nfe": 50}).encode()
    with socket.create_connection(("127.0.0.1", server.port)) as s:   # ... and its client goes away
        s.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        time.sleep(0.3)
    for t in busy:
        t.join(120)
    deadline = time.time() + 30
    while server.metric('deis_fast_requests_total{status="cancelled"}') <= before and time.time() < deadline:
        time.sleep(0.2)
    assert server.metric('deis_fast_requests_total{status="cancelled"}') == before + 1


def test_sigterm_drains_requests_in_flight():
    s = Server("--max-batch", "16")
    results = []
    threads = [threading.Thread(target=lambda i=i: results.append(post(s.port, {"seed": i, "num": 16, "nfe": 40})))
               for i in range(3)]
    for t in threads:
        t.start()
    deadline = time.time() + 30
    while time.time() < deadline:
        h = json.loads(_get(s.port, "/health")[1])
        if h["active"] + h["queue"] >= 2:
            break
        time.sleep(0.05)
    s.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(120)
    s.proc.wait(60)
    assert [r[0] for r in results] == [200, 200, 200]      # every request in flight got its answer
    assert s.proc.returncode in (0, -signal.SIGTERM)       # uvicorn re-raises the signal after its shutdown
