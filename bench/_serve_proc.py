"""What the serving benches share: the 2 x 1024 LSTM LM they serve, a ``wmdeploy serve`` subprocess on a
free loopback port, one raw keep-alive HTTP/1.1 connection (a Python HTTP client would cost more per
request than the server does, and the client shares the machine's cores with it), and the load driver
every wire's sessions run under (warm-up, one clock for all, one request or ``depth`` in flight each)."""
from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

ZOO = "lstm_lm_2x1024"


def export_zoo(path: Path) -> None:
    import torch  # noqa: PLC0415

    from wmdeploy.exporter import export  # noqa: PLC0415
    from wmdeploy.models.zoo import build  # noqa: PLC0415

    torch.manual_seed(0)
    export(build(ZOO), path, verify=False)  # untrained weights: the cost is the same


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metric(text: str, name: str, default: float = float("nan")) -> float:
    """One unlabelled sample of a Prometheus text page."""
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else default


class Server:
    """``wmdeploy serve MODEL --name lm`` on free ports (HTTP, and gRPC with ``grpc=True``), ready on return."""

    def __init__(self, model: Path, *extra: str, grpc: bool = False, start_timeout_s: float = 90) -> None:
        import httpx  # noqa: PLC0415

        self.port = free_port()
        self.grpc_port = free_port() if grpc else None
        self.url = f"http://127.0.0.1:{self.port}"
        args = [sys.executable, "-m", "wmdeploy", "serve", str(model), "--name", "lm", "--port", str(self.port),
                "--log-level", "warning", *(["--grpc-port", str(self.grpc_port)] if grpc else []), *extra]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + start_timeout_s
        while True:
            try:
                if httpx.get(self.url + "/v2/health/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.proc.kill()
                raise RuntimeError(f"wmdeploy serve did not start: {' '.join(args)}")
            time.sleep(0.05)

    def metrics(self) -> str:
        import httpx  # noqa: PLC0415

        return httpx.get(self.url + "/metrics").text

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


class Conn:
    """One keep-alive HTTP/1.1 connection to 127.0.0.1."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.r, self.w = reader, writer

    @classmethod
    async def open(cls, port: int) -> "Conn":
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def request(self, method: bytes, path: str, body: bytes = b"",
                      headers: dict[str, str] | None = None) -> tuple[int, dict[bytes, bytes], bytes]:
        """``(status, lower-cased headers, body)``."""
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items()).encode()
        self.w.write(b"%s %s HTTP/1.1\r\nHost: bench\r\nContent-Length: %d\r\n%s\r\n"
                     % (method, path.encode(), len(body), extra) + body)
        head = await self.r.readuntil(b"\r\n\r\n")
        fields = dict(line.split(b":", 1) for line in head.split(b"\r\n")[1:] if b":" in line)
        fields = {k.strip().lower(): v.strip() for k, v in fields.items()}
        return int(head[9:12]), fields, await self.r.readexactly(int(fields.get(b"content-length", b"0")))

    async def post_json(self, path: str, obj: Any = None, method: bytes = b"POST") -> tuple[int, bytes]:
        body = b"" if obj is None else json.dumps(obj, separators=(",", ":")).encode()
        status, _, answer = await self.request(method, path, body, {"Content-Type": "application/json"})
        return status, answer

    def close(self) -> None:
        self.w.close()


async def drive(sessions: int, steps: int, warmup: int,
                step: Callable[[int, int, bool], Awaitable[Any]], depth: int = 1) -> tuple[float, list[float]]:
    """Every session runs ``warmup + steps`` requests; the clock starts once all are warm. ``step`` either
    completes its request (returns None) or writes it and returns the future of its answer, in which case a
    session keeps up to ``depth`` requests in flight. A latency is from a request's start to its answer."""
    lat: list[float] = []
    go, warm = asyncio.Event(), [0]
    total = warmup + steps

    async def run(i: int) -> None:
        inflight: list[tuple[float, Any, bool]] = []

        async def settle(n: int) -> None:
            while len(inflight) > n:
                t0, answer, timed = inflight.pop(0)
                if answer is not None:
                    await answer
                if timed:
                    lat.append(time.perf_counter() - t0)

        for k in range(total):
            if k == warmup:
                await settle(0)
                warm[0] += 1
                await go.wait()
            await settle(depth - 1)
            t0 = time.perf_counter()
            inflight.append((t0, await step(i, k, k == total - 1), k >= warmup))
        await settle(0)

    tasks = [asyncio.create_task(run(i)) for i in range(sessions)]
    while warm[0] < sessions:
        for t in tasks:
            if t.done() and t.exception() is not None:
                raise t.exception()  # type: ignore[misc]
        await asyncio.sleep(0.005)
    go.set()
    t0 = time.perf_counter()
    await asyncio.gather(*tasks)
    return time.perf_counter() - t0, lat
