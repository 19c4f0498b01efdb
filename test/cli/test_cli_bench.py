"""``dinomix bench`` (in-process through main()): JSON on stdout; only float32/float16/bfloat16 are dtypes."""

from __future__ import annotations

import json

import pytest
import torch
from cliutil import run_error

from dinomix_ros.cli.main import main


def test_bench_prints_json(capsys) -> None:
    assert main(["bench", "--variants", "vits14", "--dtypes", "float32", "--device", "cpu", "--batch-size", "2",
                 "--iters", "2", "--warmup", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    entry = result["results"][0]
    assert result["environment"]["torch"] == torch.__version__
    assert entry["variant"] == "dinov2_vits14" and entry["latency_224"]["n"] == 2
    assert entry["throughput"]["images_per_s"] > 0


def test_bench_refuses_unknown_dtypes_before_running(capsys: pytest.CaptureFixture,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    message = run_error(capsys, caplog, "bench", "--variants", "vits14", "--dtypes", "float32,fp16", "--device", "cpu")
    assert message == "--dtypes holds fp16; expected a comma-separated list of auto, float32, float16, bfloat16"
