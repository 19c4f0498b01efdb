"""Helpers of the command-line tests: run ``dinomix`` in-process and read its stdout, or its one error line."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from dinomix_ros.cli.main import main

DATA = Path(__file__).resolve().parents[1] / "data"
MODEL = ["--random-weights", "--device", "cpu", "--dtype", "float32", "--batch-size", "4", "--quiet"]


def run(capsys: pytest.CaptureFixture, *argv: str | Path) -> tuple[int, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().out


def run_json(capsys: pytest.CaptureFixture, *argv: str | Path) -> dict:
    code, out = run(capsys, *argv)
    assert code == 0, out
    return json.loads(out)


def run_error(capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture, *argv: str | Path) -> str:
    """The one ERROR line of a command that must exit with code 2 and print nothing on stdout."""
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="dinomix"):
        code, stdout = run(capsys, *argv)
    assert code == 2 and stdout == ""
    (record,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    return record.getMessage()
