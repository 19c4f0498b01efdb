"""A Milvus Lite server in a process of its own, for fleet tests: robots (the test, node and CLI processes) reach it by
URI as they reach a Milvus server, and a test can stop it and start it again on the same port and data.

Milvus Lite's engine is single-writer per collection (its own documentation), so the server runs with one gRPC worker:
requests of several clients interleave one at a time, as a Milvus server orders them. A Lite data directory is
locked by the process that opens it, so only this server process opens it.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["LiteServer", "free_port"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiteServer:
    """``python -m milvus_lite server`` on 127.0.0.1 (see the module docstring); ``uri`` is its address."""

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None
        self.log = self.data_dir.parent / f"{self.data_dir.name}.server.log"

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120.0) -> LiteServer:
        """Start it and wait until it answers."""
        from pymilvus import MilvusClient

        logging.getLogger("pymilvus").setLevel(logging.CRITICAL)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "milvus_lite", "server", "--data-dir", str(self.data_dir), "--host",
                 "127.0.0.1", "--port", str(self.port), "--max-workers", "1"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Milvus Lite server exited with {self.proc.returncode}: "
                                   f"{self.log.read_text()[-2000:]}")
            try:
                client = MilvusClient(self.uri, timeout=2, dedicated=True)
                client.list_collections()
                client.close()
                return self
            except Exception:
                if time.monotonic() > deadline:
                    self.stop()
                    raise TimeoutError(f"Milvus Lite server on {self.uri} did not answer within {timeout} s")
                time.sleep(0.2)

    def stop(self) -> None:
        """SIGINT (a clean shutdown that keeps the data), then SIGKILL if it lingers."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)

    def __enter__(self) -> LiteServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
