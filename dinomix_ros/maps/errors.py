"""The errors a keyframe map raises, in memory and on disk.

Import them from :mod:`dinomix_ros.maps.keyframes`, the module users work with (it re-exports every class here);
they are defined here so that the table, its validation and its storage share them without importing each other.
All are :class:`ValueError` subclasses; those about a missing map or keyframe also subclass the matching built-in.
"""

from __future__ import annotations

__all__ = [
    "KeyframeNotFoundError",
    "MapConflictError",
    "MapError",
    "MapFormatError",
    "MapLockedError",
    "MapMismatchError",
    "MapNotFoundError",
]


class MapError(ValueError):
    """A keyframe map or an argument given to it is invalid."""


class MapFormatError(MapError):
    """A map on disk is unreadable: wrong format or version, corrupted, truncated or inconsistent files."""


class MapMismatchError(MapError):
    """A map was built by a different model than the one in use (fingerprint ids differ)."""


class MapConflictError(MapError):
    """The map on disk was changed by another writer since this object loaded or last saved it."""


class MapLockedError(MapError, TimeoutError):
    """Another process held the map's lock for longer than the timeout."""


class MapNotFoundError(MapError, FileNotFoundError):
    """No map at the given path (no directory, or no manifest.json in it)."""


class KeyframeNotFoundError(MapError, LookupError):
    """A keyframe id is not in the map."""
