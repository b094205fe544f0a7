"""The documented scale-out recipe (docs/scale-out.md), run as written: its nginx block in front of two `wmdeploy serve` replicas
sharing one real Redis, all on 127.0.0.1.

The nginx configuration is taken from docs/scale-out.md itself (only the upstream addresses and the listen port
are replaced), so the snippet a user copies is the one tested: the session id in the path and the
`X-Sequence-Id` header pin a session to one replica, WebSockets pass through, and when a replica dies the
next one serves its sessions from Redis, bit for bit.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from _redis_server import RedisServer
from _serve_server import ProcessServer, free_port

pytest.importorskip("redis")
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
for _tool, _package, _found in (("redis-server", "redis-server", shutil.which("redis-server")),
                                ("nginx", "nginx-light", NGINX)):
    if _found is None:
        pytest.skip(f"{_tool} is not installed (apt-get install {_package}; .ci/run does it)", allow_module_level=True)

RECIPE = Path(__file__).resolve().parent.parent / "docs" / "scale-out.md"  # the documented recipe, as written


def readme_nginx_block() -> str:
    text = RECIPE.read_text()
    blocks = re.findall(r"```nginx\n(.*?)```", text, re.S)
    assert len(blocks) == 1, "docs/scale-out.md should hold exactly one nginx block (the scale-out recipe)"
    return blocks[0]


def nginx_conf(block: str, listen: int, upstreams: list[str], tmp: Path) -> str:
    """The recipe's block with our addresses, inside the minimal main/events/http frame nginx needs."""
    servers = re.findall(r"^\s*server \d+\.\d+\.\d+\.\d+:\d+ (.*);", block, re.M)
    assert servers, "the recipe's upstream lists its replicas as `server HOST:PORT ...;`"
    params = servers[0]
    block = re.sub(r"^(\s*)server \d+\.\d+\.\d+\.\d+:\d+ .*;\n", "", block, flags=re.M)
    ours = "".join(f"    server {u} {params};\n" for u in upstreams)
    block = block.replace("upstream wmdeploy {\n", "upstream wmdeploy {\n" + ours, 1)
    assert "listen 80;" in block
    block = block.replace("listen 80;", f"listen 127.0.0.1:{listen};")
    user = "user root;\n" if os.geteuid() == 0 else ""  # workers must reach the temp folders below
    temps = "".join(f"    {k}_temp_path {tmp / k};\n" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return (f"{user}worker_processes 1;\npid {tmp / 'nginx.pid'};\nerror_log {tmp / 'error.log'};\n"
            f"events {{ worker_connections 256; }}\nhttp {{\n{temps}"
            f"    log_format wm '$request_method $uri $upstream_addr $status $http_x_sequence_id';\n"
            f"    access_log {tmp / 'access.log'} wm;\n{block}}}\n")


@pytest.fixture(scope="module")
def balanced(rt_lstm_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    tmp = tmp_path_factory.mktemp("balancer")
    redis_srv = RedisServer(tmp)
    replicas: list[ProcessServer] = []
    nginx = None
    try:
        for _ in range(2):
            replicas.append(ProcessServer(rt_lstm_path, "--name", "lm", "--persist", redis_srv.url,
                                          "--batch-window-ms", "1", log=tmp / "replicas.log"))
        port = free_port()
        conf = tmp / "nginx.conf"
        conf.write_text(nginx_conf(readme_nginx_block(), port, [r.url.removeprefix("http://") for r in replicas], tmp))
        check = subprocess.run([NGINX, "-t", "-p", str(tmp), "-c", str(conf)], capture_output=True, text=True)
        assert check.returncode == 0, check.stderr
        nginx = subprocess.Popen([NGINX, "-p", str(tmp), "-c", str(conf), "-g", "daemon off;"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 20
        while True:
            try:
                if httpx.get(url + "/v2/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and nginx.poll() is None, (tmp / "error.log").read_text()
            time.sleep(0.05)
        yield {"url": url, "replicas": replicas, "log": tmp / "access.log"}
    finally:
        if nginx is not None:
            nginx.terminate()
            nginx.wait(timeout=10)
        for r in replicas:
            r.kill()
        redis_srv.kill()


def upstreams_of(log: Path, pattern: str) -> list[str]:
    """The replica nginx sent each request whose path matches ``pattern`` to, in order."""
    lines = [ln.split() for ln in log.read_text().splitlines()]
    return [ln[2] for ln in lines if re.search(pattern, ln[1])]


def test_v2_sequences_follow_their_header_and_a_websocket_passes(balanced, rt_lstm):
    """KServe v2 carries the sequence id in the body: clients also send it as X-Sequence-Id, which the
    recipe's map hashes, so every request of a sequence reaches one replica and sequences spread."""
    ws_sync = pytest.importorskip("websockets.sync.client")
    url, log = balanced["url"], balanced["log"]
    rng = np.random.default_rng(12)
    # 32 sequences: a consistent hash over two replicas (their points set by random ports) puts all 8 of an earlier
    # list on one replica about once in 128 runs (CI saw it); 32 leave that at 2**-31
    seqs = [4242 + 7 * i for i in range(32)]
    local = {q: rt_lstm.stream() for q in seqs}
    with httpx.Client(timeout=30) as c:
        for k in range(3):
            for q in seqs:
                tokens = rng.integers(0, 16, size=(1, 3), dtype=np.int64)
                body = {"inputs": [{"name": "tokens", "shape": [1, 3], "datatype": "INT64",
                                    "data": tokens.ravel().tolist()}],
                        "parameters": {"sequence_id": q, "sequence_start": k == 0, "sequence_end": k == 2}}
                r = c.post(url + "/v2/models/lm/infer", json=body, headers={"X-Sequence-Id": str(q)})
                assert r.status_code == 200, r.text
                out = next(o for o in r.json()["outputs"] if o["name"] == "logits")
                np.testing.assert_array_equal(np.array(out["data"], np.float32).reshape(out["shape"]),
                                              local[q].step(tokens=tokens)["logits"])
        assert c.post(url + "/v1/sessions", json={"id": "lbws"}).status_code == 201
    time.sleep(0.2)  # nginx writes its access log line after the answer
    lines = [ln.split() for ln in log.read_text().splitlines() if " /v2/models/lm/infer " in ln]
    home = {q: {ln[2] for ln in lines if ln[-1] == str(q)} for q in seqs}
    assert all(len(h) == 1 for h in home.values()), home  # one replica for the whole of each sequence
    assert len(set.union(*home.values())) == 2  # the header spreads sequences over both
    twin = rt_lstm.stream()
    with ws_sync.connect(url.replace("http", "ws") + "/v1/sessions/lbws/stream") as ws:
        for k in range(3):
            tokens = [[k + 1, k + 2]]
            ws.send(json.dumps({"inputs": {"tokens": tokens}}))
            answer = json.loads(ws.recv(timeout=30))
            assert answer["steps"] == k + 1, answer
            np.testing.assert_array_equal(np.array(answer["outputs"]["logits"], np.float32),
                                          twin.step(tokens=np.array(tokens))["logits"])


def test_sessions_stay_on_one_replica_and_survive_its_death(balanced, rt_lstm):
    url, log = balanced["url"], balanced["log"]
    rng = np.random.default_rng(11)
    sids = [f"lb{i}" for i in range(32)]  # 8 landed all on one replica about once in 128 runs (see above)
    chunks = {s: [rng.integers(0, 16, size=(1, int(rng.integers(1, 4))), dtype=np.int64) for _ in range(6)]
              for s in sids}
    local = {s: rt_lstm.stream() for s in sids}
    with httpx.Client(timeout=30) as c:
        for s in sids:
            assert c.post(url + "/v1/sessions", json={"id": s}).status_code == 201
        for j in range(3):
            for s in sids:
                r = c.post(f"{url}/v1/sessions/{s}/step", json={"inputs": {"tokens": chunks[s][j].tolist()}})
                assert r.status_code == 200, r.text
                np.testing.assert_array_equal(np.array(r.json()["outputs"]["logits"], np.float32),
                                              local[s].step(tokens=chunks[s][j])["logits"])
        time.sleep(0.2)  # nginx writes its access log line after the answer
        home = {s: set(upstreams_of(log, f"^/v1/sessions/{s}/step$")) for s in sids}
        assert all(len(h) == 1 for h in home.values()), home  # affinity: the path's id picks one replica
        assert len(set.union(*home.values())) == 2  # and the hash spreads sessions over both
        # a replica dies with no shutdown: nginx passes the next requests on, the other serves from Redis
        dead = balanced["replicas"][0]
        dead.kill()
        for j in range(3, 6):
            for s in sids:
                r = c.post(f"{url}/v1/sessions/{s}/step", json={"inputs": {"tokens": chunks[s][j].tolist()}})
                assert r.status_code == 200, r.text
                assert r.json()["steps"] == j + 1
                np.testing.assert_array_equal(np.array(r.json()["outputs"]["logits"], np.float32),
                                              local[s].step(tokens=chunks[s][j])["logits"])
