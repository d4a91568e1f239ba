"""An embedded Redis server on a loopback port with persistence off.

Uses ``redis-server`` from PATH (Debian package ``redis-server``; the README setup
installs it when running as root).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from types import TracebackType

from streamtrain.services.paths import cache_dir
from streamtrain.services.process import ManagedProcess, ServiceError, free_port, port_in_use


def redis_binary() -> str:
    path = shutil.which("redis-server")
    if path is None:
        raise ServiceError(
            "redis-server not found on PATH: install it (`sudo apt-get install -y redis-server`, "
            "or `brew install redis`), or run the README setup as root, which installs it"
        )
    return path


class EmbeddedRedis:
    """``with EmbeddedRedis() as r: redis.Redis.from_url(r.url).ping()``"""

    def __init__(self, port: int | None = None, host: str = "127.0.0.1", log_dir: Path | None = None) -> None:
        self.host = host
        self.port = port or free_port(host)
        self._log_path = (log_dir or cache_dir() / "logs") / f"redis-{self.port}.log"
        self._process: ManagedProcess | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def start(self, timeout_s: float = 15.0) -> "EmbeddedRedis":
        if port_in_use(self.host, self.port):
            raise ServiceError(
                f"cannot start redis: {self.host}:{self.port} is already in use; "
                "choose another port (--port) or leave it unset to pick a free one"
            )
        argv = [redis_binary(), "--port", str(self.port), "--bind", self.host, "--save", "",
                "--appendonly", "no", "--protected-mode", "yes", "--daemonize", "no"]
        self._process = ManagedProcess("redis", argv, self._log_path)
        self._process.start(self._ping, timeout_s)
        return self

    def _ping(self) -> bool:
        import redis

        try:
            return bool(redis.Redis(host=self.host, port=self.port, socket_timeout=0.5).ping())
        except redis.RedisError:
            return False

    def stop(self) -> None:
        if self._process:
            self._process.stop()
            self._process = None

    def __enter__(self) -> "EmbeddedRedis":
        return self.start() if self._process is None else self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
