"""Tests for dinomix_ros.util.progress: a bar closed during an error is erased, a disabled bar prints nothing."""

from __future__ import annotations

import pytest

from dinomix_ros.util.progress import progress_bar


def test_a_bar_closed_while_an_error_propagates_is_erased(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(ValueError):
        bar = progress_bar(10, "describe", True)
        try:
            raise ValueError("image 0 is not an image")
        finally:
            bar.close()
    err = capsys.readouterr().err
    assert "0/10" in err  # it was drawn ...
    assert err.rstrip(" ").endswith("\r")  # ... and its line was cleared: nothing is left after the error message


def test_a_finished_bar_stays_and_a_disabled_bar_prints_nothing(capsys: pytest.CaptureFixture) -> None:
    bar = progress_bar(2, "describe", True)
    try:
        bar.update(2)
    finally:
        bar.close()
    err = capsys.readouterr().err
    assert err.endswith("\n") and "2/2" in err.splitlines()[-1].split("\r")[-1]  # the finished bar stays
    quiet = progress_bar(2, "describe", False)
    quiet.update(2)
    quiet.close()
    assert capsys.readouterr().err == ""
