"""One local Ray cluster and one rillet app (2 CPU replicas of the default model) per module."""

import os
import socket
import time

import pytest



def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_app():
    """Base URL of the app behind Ray Serve's HTTP proxy (the unit tests here need no Ray)."""
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'rillet[ray]')")
    serve = pytest.importorskip("ray.serve", reason="ray[serve] is not installed (pip install 'rillet[ray]')")
    from rillet.deploy.ray import OBJECT_STORE_BYTES, build_app

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=OBJECT_STORE_BYTES, log_to_driver=False,
             configure_logging=False)
    port = _free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        started = time.perf_counter()
        serve.run(build_app({"num_replicas": 2, "num_cpus": 1, "max_num_seqs": 8}), name="rillet", route_prefix="/")
        print(f"rillet on Ray Serve up in {time.perf_counter() - started:.1f}s")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
