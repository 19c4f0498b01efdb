"""Progress bars for long loops: tqdm when enabled, a silent stand-in otherwise.

A bar closed while an exception propagates (``close()`` in a ``finally`` block) is erased, so an error message is
never followed by a stale "0%" bar.
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["progress_bar"]


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


class _Bar:
    """A tqdm bar that is erased when closed during an exception."""

    def __init__(self, total: int | None, desc: str, unit: str) -> None:
        from tqdm import tqdm

        self._bar: Any = tqdm(total=total or None, desc=desc, unit=unit, dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        self._bar.update(n)

    def close(self) -> None:
        if self._bar is None:
            return
        if sys.exc_info()[0] is not None:  # closing from a finally block on the way out of an error: erase it
            self._bar.leave = False
        self._bar.close()
        self._bar = None


def progress_bar(total: int | None, desc: str, enabled: bool, unit: str = "img") -> Any:
    """A progress bar (``total`` None or 0: unknown length) or, when disabled, an object with the same update/close.

    Close it in a ``finally`` block: ``close()`` while an exception propagates erases the bar.
    """
    if not enabled:
        return _NoBar()
    return _Bar(total, desc, unit)
