"""Auth: with --api-key, every protected route (all of /v1 and /api, /tokenize and /detokenize, as the server's own
/openapi.json lists them, streaming variants included, and the API calls of the web page)
refuses a missing or wrong key with 401; the page, /health, /metrics and /static stay open;
and the key never appears in the server's logs (debug level, after every test of this server)."""

from __future__ import annotations

import re

import httpx

from rillet.server.errors import TOKENIZER_PATHS
from support.reliability import MAIN_KEY

BODIES = {
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    "/v1/completions": {"prompt": "hi", "max_tokens": 2},
    "/api/chat": {"messages": [{"role": "user", "content": "hi"}], "options": {"num_predict": 2}},
    "/api/generate": {"prompt": "hi", "options": {"num_predict": 2}},
    "/api/show": {"model": "x"},
    "/tokenize": {"prompt": "hi"},
    "/detokenize": {"tokens": [1, 2]},
}
STREAMING = ("/v1/chat/completions", "/v1/completions", "/api/chat", "/api/generate")


def bad_authorizations(key: str) -> list[dict[str, str]]:
    return [{}, {"Authorization": "Bearer wrong-key"}, {"Authorization": f"Bearer {key[:-1]}"},
            {"Authorization": f"Bearer {key}x"}, {"Authorization": key}, {"Authorization": f"Basic {key}"},
            {"Authorization": "Bearer x"}, {"X-API-Key": key}, {"Authorization": f"Bearer {key.upper()}"}]


def protected_requests(server, model: str) -> list[tuple[str, str, dict | None]]:
    spec = httpx.get(server.url + "/openapi.json", timeout=30).json()
    out = []
    for path, ops in spec["paths"].items():
        assert path.startswith(("/v1/", "/api/")) or path in TOKENIZER_PATHS, path  # every API route is protected
        concrete = path.replace("{model_id}", model)
        for method in ops:
            body = BODIES.get(path)
            out.append((method.upper(), concrete, body))
            if path in STREAMING:
                out.append((method.upper(), concrete, {**body, "stream": True}))
    page = httpx.get(server.url + "/static/app.js", timeout=30).text
    for path in re.findall(r'fetch\("(/[^"]+)"', page):  # the web page's API calls
        out.append(("POST" if path in BODIES else "GET", path, BODIES.get(path)))
    return out


def test_every_protected_route_needs_the_key_and_the_key_is_never_logged(main_server):
    server = main_server
    good = {"Authorization": f"Bearer {MAIN_KEY}"}
    model = httpx.get(server.url + "/v1/models", headers=good, timeout=30).json()["data"][0]["id"]
    routes = protected_requests(server, model)
    assert len({p for _, p, _ in routes}) >= 10, routes
    assert ("GET", "/v1/models", None) in routes and ("POST", "/v1/chat/completions", BODIES[
        "/v1/chat/completions"]) in routes  # the page's calls were found
    checked = 0
    with httpx.Client(base_url=server.url, timeout=60) as client:
        for method, path, body in routes:
            for headers in bad_authorizations(MAIN_KEY):
                r = client.request(method, path, json=body, headers=headers)
                assert r.status_code == 401, (method, path, headers, r.status_code, r.text[:200])
                assert r.headers["www-authenticate"] == "Bearer"
                error = r.json()["error"]
                if path.startswith("/api/"):  # Ollama's error shape: a string
                    assert "API key" in error
                else:
                    assert error["code"] == "invalid_api_key" and error["type"] == "authentication_error"
                checked += 1
            r = client.request(method, path, json=body, headers=good)
            assert r.status_code != 401 and r.status_code < 500, (method, path, r.status_code, r.text[:200])
        # open: the page itself, its static files, health and metrics; CORS preflights are not auth'd
        for path in ("/", "/static/app.js", "/health", "/metrics"):
            assert client.get(path).status_code == 200, path
        for path in ("/v1/", "/v1/nope", "/api/nope"):  # unknown protected paths: 401 before 404
            assert client.get(path).status_code == 401, path
        # the key in a query string is not a way in (and the path logged has no query)
        assert client.get(f"/v1/models?api_key={MAIN_KEY}").status_code == 401
    log = server.log_path.read_text(errors="replace")
    assert "/v1/models" in log and "DEBUG" in log  # the log does record requests in detail
    assert MAIN_KEY not in log, [line for line in log.splitlines() if MAIN_KEY in line][:3]
    print(f"auth: {checked} refused requests over {len(routes)} route variants, all 401; key absent from "
          f"{len(log.splitlines())} log lines")
