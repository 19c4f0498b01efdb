"""Fault suite, through a real node: a handful of malformed images on its camera topics and hostile maps behind its
``~/load_map`` service. The node stays alive, counts each bad image, answers each load with success=false and the
reason, keeps its current map (it still matches against it), and its memory stays < 1 GiB above its steady state
(``VmHWM`` of the node process, reset before the images: :mod:`memprobe`)."""

from __future__ import annotations

import shutil
from pathlib import Path

from diagnostic_msgs.msg import DiagnosticArray
from hostile_images import Compressed, Raw, good_jpeg, hostile_messages
from hostile_maps import ROWS, hostile_kinds, make_map, random_weights
from memprobe import GIB, reset_peak, status_kib
from rosutil import NodeProcess, RosClient, diagnostic_values, next_domain_id
from sensor_msgs.msg import CompressedImage, Image, PointCloud2
from std_srvs.srv import Trigger

NODE = "/dinomix_localizer"
RAW, COMPRESSED = "/camera/image_raw", "/camera/image_raw/compressed"
IMAGE_KINDS = ("png 30000x30000 grey8, all rows", "jpeg sof 65535x65535", "jpeg truncated + eoi appended",
               "jpeg 5000 app segments", "raw 20000x20000 mono16, 16 bytes", "png ztxt bomb 256 MiB")
MAP_KINDS = {"chunk is a FIFO": "is a FIFO", "chunk links outside": "is a symbolic link",
             "metadata edited": "changed after it was written", "chunk NaN (resealed)": "contains NaN",
             "manifest nested 100000 deep": "levels deep", "csv field of 200k characters (resealed)": "field larger"}


def _ros_message(msg: object, stamp_s: int) -> Image | CompressedImage:
    if isinstance(msg, Compressed):
        out = CompressedImage(format=msg.format, data=msg.data)
    else:
        assert isinstance(msg, Raw)
        out = Image(height=msg.height, width=msg.width, encoding=msg.encoding, step=msg.step,
                    is_bigendian=msg.is_bigendian, data=msg.data)
    out.header.stamp.sec = stamp_s
    out.header.frame_id = "camera"
    return out


def test_a_running_node_survives_bad_images_and_hostile_maps(tmp_path: Path, fault_probe) -> None:
    map_path = make_map(tmp_path / "node.dinomap", random_weights().fingerprint.to_dict())
    messages = dict(hostile_messages())
    domain = next_domain_id()
    node = NodeProcess.localizer(tmp_path, domain, params={
        "model.random_weights": True, "map.path": str(map_path), "cameras.topics": [RAW, COMPRESSED],
        "diagnostics.period_s": 0.2})
    client = RosClient(domain)
    pid = node.proc.pid
    try:
        matches = client.collect(PointCloud2, f"{NODE}/matches")
        diagnostics = client.collect(DiagnosticArray, "/diagnostics")
        raw, compressed = client.publisher(Image, RAW), client.publisher(CompressedImage, COMPRESSED)
        client.wait_for_subscribers(raw)
        client.wait_for_subscribers(compressed)

        def bad_count() -> int:
            return int(diagnostic_values(diagnostics[-1][1])["bad_images"]) if diagnostics else -1

        def matched(sec: int):
            return lambda: any(m.header.stamp.sec == sec for _, m in matches)

        compressed.publish(_ros_message(Compressed(good_jpeg(seed=1)), 10))  # steady state: one frame processed
        assert client.spin_until(matched(10), 60.0), node.log[-3000:]
        steady_kib = status_kib("VmRSS", pid)
        exact = reset_peak(pid)  # where the kernel refuses, VmHWM stays the lifetime peak: a stricter bound
        for i, kind in enumerate(IMAGE_KINDS, start=1):
            msg = messages[kind]
            (raw if isinstance(msg, Raw) else compressed).publish(_ros_message(msg, 100 + i))
            expected_bad = i if kind != "png ztxt bomb 256 MiB" else i - 1  # a valid 1x1 image with a hostile extra
            counted = client.spin_until(lambda n=expected_bad, k=kind: bad_count() >= n and (
                k != "png ztxt bomb 256 MiB" or matched(100 + i)()), 60.0)
            fault_probe("malformed image (node)", kind, crashed=not node.alive(), hung=not counted)
            assert counted and node.alive(), f"{kind}: {node.log[-3000:]}"
        peak_mib = (status_kib("VmHWM", pid) - steady_kib) / 1024
        print(f"\nnode peak memory above steady state over {len(IMAGE_KINDS)} bad images: {peak_mib:.1f} MiB "
              f"({'since the reset' if exact else 'lifetime peak'})")
        assert peak_mib * 2**20 < GIB

        good = map_path.with_name("node.good")
        for kind, fragment in MAP_KINDS.items():
            outside = tmp_path / "outside" / kind.replace(" ", "_")
            outside.mkdir(parents=True)
            name, damage, _ = next(k for k in hostile_kinds(outside) if k[0] == kind)
            map_path.rename(good)  # the node's open files of the loaded map stay valid
            shutil.copytree(good, map_path, symlinks=True)
            damage(map_path, outside)
            try:
                answer = client.call(Trigger, f"{NODE}/load_map", timeout=60.0)
                hung = False
            except TimeoutError:
                answer, hung = None, True
            fault_probe("hostile map (node)", kind, crashed=not node.alive(), hung=hung)
            assert not hung and node.alive(), f"{kind}: {node.log[-3000:]}"
            assert not answer.success and "keeping the current map" in answer.message, answer.message
            assert fragment in answer.message, answer.message
            shutil.rmtree(map_path)
            good.rename(map_path)
        compressed.publish(_ros_message(Compressed(good_jpeg(seed=2)), 500))  # still matching the old map
        assert client.spin_until(matched(500), 60.0)
        cloud = next(m for _, m in matches if m.header.stamp.sec == 500)
        assert cloud.width > 0  # candidates from the map loaded at start
        loaded = client.call(Trigger, f"{NODE}/load_map")
        assert loaded.success and f"loaded {ROWS} keyframes" in loaded.message, loaded.message
        assert node.alive()
    finally:
        client.close()
        assert node.stop() == 0, node.log[-3000:]
    assert bad_count() == len(IMAGE_KINDS) - 1
