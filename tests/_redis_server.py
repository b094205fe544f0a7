"""A real ``redis-server`` for the tests (Debian's package, installed by ``.ci/run``), on a free loopback port."""
from __future__ import annotations

import subprocess
import time
from pathlib import Path

from _serve_server import free_port


class RedisServer:
    """``redis-server`` on 127.0.0.1:PORT with its AOF in ``dir``; ``kill()`` is kill -9, ``start()`` again
    replays the AOF on the same port."""

    def __init__(self, directory: Path) -> None:
        self.dir, self.port = directory, free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
             "--save", "", "--appendonly", "yes", "--appendfsync", "always", "--protected-mode", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis  # noqa: PLC0415

        client, deadline = redis.Redis(port=self.port, socket_timeout=1), time.monotonic() + 20
        while True:
            try:
                if client.ping():
                    return
            except redis.exceptions.RedisError:  # refused, or still loading the AOF
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
