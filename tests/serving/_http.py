"""HTTP helpers of the serving tests (the `deis-fast serve` subprocess and the Ray Serve proxy answer alike)."""
from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port: int, body, timeout: float = 60.0) -> tuple[int, dict, bytes]:
    """POST /generate with a JSON body (a dict, or a raw string for malformed-body tests): (status, headers, body)."""
    data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/generate", data=data, method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()
