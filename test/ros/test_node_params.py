"""Parameters: loaded from --params-file, declared with descriptions, validated when changed at run time."""

from __future__ import annotations

import time

import numpy as np

from rcl_interfaces.msg import Parameter, ParameterType, ParameterValue
from diagnostic_msgs.msg import DiagnosticArray
from rcl_interfaces.srv import DescribeParameters, GetParameters, SetParameters, SetParametersAtomically
from rosutil import REPO_CONFIG, NodeProcess, RosClient, diagnostic_values, next_domain_id

from dinomix_ros.ros.parameters import PARAMETERS
from dinomix_ros.maps.storage import save_map

NODE = "/dinomix_localizer"


def test_params_file_descriptions_and_runtime_changes(tmp_path) -> None:
    overrides = tmp_path / "robot.yaml"
    overrides.write_text(
        "dinomix_localizer:\n  ros__parameters:\n    mode: self_map\n    model:\n      random_weights: true\n"
        "    diagnostics:\n      period_s: 0.2\n"
        "    matching:\n      top_k: 7\n"
        "    cameras:\n      topics: ['/front/image_raw', '/rear/image_raw/compressed']\n")
    domain = next_domain_id()
    node = NodeProcess.localizer(tmp_path, domain, extra_ros_args=["--params-file", str(overrides)],
                                 params_file=REPO_CONFIG)
    client = RosClient(domain)
    try:
        diagnostics = client.collect(DiagnosticArray, "/diagnostics")
        assert node.wait_for_log("active: cameras", timeout=60), node.log
        names = list(PARAMETERS)
        got = client.call(GetParameters, f"{NODE}/get_parameters", GetParameters.Request(names=names)).values
        described = client.call(DescribeParameters, f"{NODE}/describe_parameters",
                                DescribeParameters.Request(names=names)).descriptors
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not client.node.get_subscriptions_info_by_topic("/front/image_raw"):
            client.spin_for(0.1)
        front = client.node.get_subscriptions_info_by_topic("/front/image_raw")
        rear = client.node.get_subscriptions_info_by_topic("/rear/image_raw/compressed")

        def set_param(name: str, value: ParameterValue):
            request = SetParameters.Request(parameters=[Parameter(name=name, value=value)])
            return client.call(SetParameters, f"{NODE}/set_parameters", request).results[0]

        ok = set_param("matching.min_similarity",
                       ParameterValue(type=ParameterType.PARAMETER_DOUBLE, double_value=0.8))
        bad_k = set_param("matching.top_k", ParameterValue(type=ParameterType.PARAMETER_INTEGER, integer_value=0))
        bad_scope = set_param("output.loop_closure_scope",
                              ParameterValue(type=ParameterType.PARAMETER_STRING, string_value="sometimes"))
        batch = SetParametersAtomically.Request(parameters=[  # one bad value: nothing of the batch applies
            Parameter(name="matching.min_similarity",
                      value=ParameterValue(type=ParameterType.PARAMETER_DOUBLE, double_value=0.3)),
            Parameter(name="output.loop_closure_scope",
                      value=ParameterValue(type=ParameterType.PARAMETER_STRING, string_value="sesion"))])
        atomic = client.call(SetParametersAtomically, f"{NODE}/set_parameters_atomically", batch).result
        read_only = set_param("model.dtype",
                              ParameterValue(type=ParameterType.PARAMETER_STRING, string_value="bfloat16"))
        nan = set_param("pose.buffer_s", ParameterValue(type=ParameterType.PARAMETER_DOUBLE, double_value=float("nan")))
        inf = set_param("cameras.min_period_s",
                        ParameterValue(type=ParameterType.PARAMETER_DOUBLE, double_value=float("inf")))
        since = time.monotonic()
        assert client.spin_until(lambda: any(t > since for t, _ in diagnostics), 10.0)
        in_use = diagnostic_values(diagnostics[-1][1])["min_similarity"]
    finally:
        client.close()
        assert node.stop() == 0, node.log[-3000:]
    values = dict(zip(names, got))
    assert values["mode"].string_value == "self_map"  # from the override file
    assert values["matching.top_k"].integer_value == 7
    assert list(values["cameras.topics"].string_array_value) == ["/front/image_raw", "/rear/image_raw/compressed"]
    assert values["matching.min_similarity"].double_value == PARAMETERS["matching.min_similarity"].default  # yaml
    for name, descriptor in zip(names, described):
        assert descriptor.description == PARAMETERS[name].spec.description, name
        assert descriptor.read_only == PARAMETERS[name].spec.reconfigure, name
    # no publisher yet: best effort with a reliable subscription standing by (camera_qos), both of the topic's type
    assert {e.topic_type for e in front} == {"sensor_msgs/msg/Image"} and len(front) == 2
    assert {e.topic_type for e in rear} == {"sensor_msgs/msg/CompressedImage"} and len(rear) == 2
    assert ok.successful
    assert not bad_k.successful and "matching.top_k out of range" in bad_k.reason  # the declared IntegerRange
    assert not bad_scope.successful and "must be one of session, all, got 'sometimes'" in bad_scope.reason
    assert not atomic.successful and "output.loop_closure_scope must be one of" in atomic.reason
    assert not read_only.successful and "read-only" in read_only.reason
    assert not nan.successful and "pose.buffer_s" in nan.reason
    assert not inf.successful and "cameras.min_period_s" in inf.reason
    assert float(in_use) == 0.8  # the matcher uses the accepted change, not the refused batch


def test_map_calibration_sets_min_similarity(tmp_path) -> None:
    from dinomix_ros.model.encoder import Encoder, EncoderConfig
    from dinomix_ros.maps.keyframes import KeyframeMap

    encoder = Encoder.from_random("vits14", 0, EncoderConfig(device="cpu", dtype="float32"))
    kmap = KeyframeMap.empty(encoder.fingerprint.to_dict(), metadata={"calibration": {"min_similarity": 0.8125}})
    kmap.add(encoder.describe([np.zeros((32, 32, 3), np.uint8)], "rgb8"), stamps_ns=[1], cameras="c", frame_ids="map")
    map_path = save_map(kmap, tmp_path / "calibrated.dinomap")
    domain = next_domain_id()
    node = NodeProcess.localizer(tmp_path, domain, params={"model.random_weights": True, "map.path": str(map_path)})
    client = RosClient(domain)
    try:
        assert node.wait_for_log("active: cameras", timeout=60), node.log
        got = client.call(GetParameters, f"{NODE}/get_parameters",
                          GetParameters.Request(names=["matching.min_similarity"])).values[0]
    finally:
        client.close()
        assert node.stop() == 0, node.log[-3000:]
    assert got.double_value == 0.8125
    assert "using the map's calibrated matching.min_similarity 0.8125" in node.log
