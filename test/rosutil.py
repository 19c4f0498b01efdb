"""Node-test helpers on top of :mod:`dinomix_ros.ros.session`: a domain id per test, paced bag replay, stamps and
memory of node processes."""

from __future__ import annotations

import itertools
import os
import random
from collections.abc import Callable
from pathlib import Path

from dinomix_ros.ros import session
from dinomix_ros.ros.conversions import diagnostic_values, msg_class, time_to_ns
from dinomix_ros.ros.session import RosClient

__all__ = ["REPO_CONFIG", "NodeProcess", "RosClient", "diagnostic_values", "next_domain_id", "replay_bag",
           "rss_mib", "stamp_ns"]


def _domain_range() -> range:
    """Domain ids this test run may use: DINOMIX_TEST_DOMAINS="FIRST-LAST" (e.g. to keep concurrent test runs on one
    machine apart), else 1..100."""
    text = os.environ.get("DINOMIX_TEST_DOMAINS", "1-100")
    first, last = (int(v) for v in text.split("-"))
    if not 0 <= first <= last <= 232:
        raise ValueError(f"DINOMIX_TEST_DOMAINS={text!r}: expected FIRST-LAST within 0-232")
    return range(first, last + 1)


_DOMAINS = _domain_range()
_domains = itertools.count(random.Random(os.getpid()).randrange(len(_DOMAINS)))


class NodeProcess(session.NodeProcess):
    """:class:`dinomix_ros.ros.session.NodeProcess` whose localizer runs in float32 unless a test sets
    ``model.dtype``: ``auto`` measures bfloat16 against float32 on CPUs with native bfloat16 (AVX512-BF16, AMX) and
    may pick either on a loaded machine, and tests compare the node's descriptors with their own float32 ones."""

    @classmethod
    def localizer(cls, log_dir: Path, domain_id: int, params: dict[str, object] | None = None,
                  **kwargs: object) -> NodeProcess:
        return super().localizer(log_dir, domain_id, {"model.dtype": "float32", **(params or {})}, **kwargs)


def stamp_ns(msg: object) -> int:
    """Header stamp in nanoseconds."""
    return time_to_ns(msg.header.stamp)


def rss_mib(process: NodeProcess) -> float:
    """Resident memory of a node process in MiB (Linux)."""
    for line in Path(f"/proc/{process.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {process.proc.pid}")


def next_domain_id() -> int:
    """A domain id per test (1..100), so a leftover node never answers another test."""
    return _DOMAINS[next(_domains) % len(_DOMAINS)]


def replay_bag(client: RosClient, bag: Path, *, after_image: Callable[[str, int], Callable[[], bool]] | None = None,
               timeout: float = 60.0) -> list[tuple[str, int]]:
    """Publish a bag's messages (their raw CDR bytes) in bag order, like ``ros2 bag play`` but paced.

    After each image message, ``after_image(topic, header_stamp_ns)`` gives a predicate the client spins on (e.g.
    "the node published matches for this stamp"), so no frame is dropped by a busy node. Returns the images
    published as (topic, stamp_ns).
    """
    from dinomix_ros.maps.sources.bags import IMAGE_TYPES, open_reader

    sent: list[tuple[str, int]] = []
    with open_reader(bag) as reader:
        pubs = {c.topic: client.publisher(msg_class(c.msgtype), c.topic, depth=100) for c in reader.connections}
        for conn in reader.connections:
            if conn.msgtype in IMAGE_TYPES:
                client.wait_for_subscribers(pubs[conn.topic])
        for conn, _, raw in reader.messages():
            pubs[conn.topic].publish(bytes(raw))
            if conn.msgtype in IMAGE_TYPES:
                stamp = stamp_ns(reader.deserialize(raw, conn.msgtype))
                sent.append((conn.topic, stamp))
                if after_image is not None and not client.spin_until(after_image(conn.topic, stamp), timeout):
                    raise TimeoutError(f"no answer to the image {conn.topic} @ {stamp} within {timeout} s")
            else:
                client.executor.spin_once(timeout_sec=0)
    return sent


REPO_CONFIG = Path(__file__).resolve().parents[1] / "config" / "localize.yaml"
