"""Progress bars for long loops: tqdm when enabled, a silent stand-in otherwise."""

from __future__ import annotations

from typing import Any

__all__ = ["progress_bar"]


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int | None, desc: str, enabled: bool, unit: str = "img") -> Any:
    """A tqdm bar (``total`` None or 0: unknown length) or, when disabled, an object with the same update/close."""
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total or None, desc=desc, unit=unit, dynamic_ncols=True)
