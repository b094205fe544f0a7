"""Real servers on 127.0.0.1 for the serve tests: uvicorn in a thread (shared model), or ``wmdeploy serve``
as a subprocess (for kill -9)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx


class ThreadServer:
    """``create_app(config)`` served by uvicorn in a daemon thread, on a socket bound before start (no port race)."""

    def __init__(self, config: Any, model: Any = None) -> None:
        import uvicorn  # noqa: PLC0415

        from wmdeploy.serve import create_app  # noqa: PLC0415

        self.app = create_app(config, model)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_config=None, access_log=False, log_level="warning",
                                                    lifespan="on", ws_max_size=config.max_request_bytes))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.01)

    @property
    def hostport(self) -> str:
        return f"127.0.0.1:{self.port}"

    def client(self, **kw: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, **{"timeout": 30, **kw})

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.sock.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ProcessServer:
    """``wmdeploy serve MODEL ARGS`` in a subprocess; ``kill()`` is kill -9."""

    def __init__(self, model: Path, *args: str, log: Path | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "wmdeploy", "serve", str(model), "--port", str(self.port), "--log-level",
               "warning", *args]
        self._log = open(log, "ab") if log else subprocess.DEVNULL
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=self._log)
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"wmdeploy serve exited with {self.proc.returncode}")
            try:
                if httpx.get(self.url + "/v2/health/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError("wmdeploy serve did not become ready")
            time.sleep(0.05)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self._close_log()

    def terminate(self, timeout: float = 30) -> int:
        """SIGTERM (an orderly stop); returns the exit status."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
        code = self.proc.wait(timeout=timeout)
        self._close_log()
        return code

    def _close_log(self) -> None:
        if self._log is not subprocess.DEVNULL and not self._log.closed:
            self._log.close()


class FaultyStore:
    """A server's own store with a fault switch (a disk that fills, a store that hangs): every write sleeps
    ``delay`` s, and raises ``fail`` while it is set (the next ``fail_times`` writes only, when that is set)."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.fail, self.fail_times, self.delay = inner, None, None, 0.0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def __contains__(self, key: object) -> bool:
        return key in self.inner

    def append(self, records: list[tuple[str, bytes | None]]) -> Any:
        if self.delay:
            time.sleep(self.delay)
        if self.fail is not None and self.fail_times != 0:
            if self.fail_times is not None:
                self.fail_times -= 1
            raise self.fail
        return self.inner.append(records)


def ws_generate(ws: Any, **body: Any) -> list[dict]:
    """Send one generation request on a ``/generate`` WebSocket; the messages up to ``done`` or ``error``."""
    import json  # noqa: PLC0415

    ws.send(json.dumps(body))
    messages = []
    while True:
        messages.append(json.loads(ws.recv(timeout=30)))
        if "done" in messages[-1] or "error" in messages[-1]:
            return messages
