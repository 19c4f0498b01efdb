"""The errors of keyframe maps (in memory and on disk) and of searching them.

Map errors are also importable from :mod:`dinomix_ros.maps.keyframes`, the module users work with; they are defined
here so that the table, its validation and its storage share them without importing each other, and so that the
mask builders need neither torch nor faiss. All are :class:`ValueError` subclasses; those about a missing map or
keyframe also subclass the matching built-in. Search errors derive from :class:`PlaceIndexError`, so a caller can
catch every bad input to a search at once.
"""

from __future__ import annotations

__all__ = [
    "DescriptorError",
    "EmptyIndexError",
    "IndexConfigError",
    "IndexFormatError",
    "KeyframeNotFoundError",
    "MaskError",
    "PlaceIndexError",
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


# ---------------------------------------------------------------------------------------------------- search


class PlaceIndexError(ValueError):
    """Base class of the errors raised by :mod:`dinomix_ros.maps.index` and :mod:`dinomix_ros.maps.masks`."""


class IndexConfigError(PlaceIndexError):
    """An unknown or inconsistent kind, backend, device or index parameter."""


class DescriptorError(PlaceIndexError):
    """Descriptors or queries with the wrong shape, dtype, or non-finite values."""


class MaskError(PlaceIndexError):
    """An ``allowed`` mask (or a filter input) with the wrong dtype or shape."""


class EmptyIndexError(PlaceIndexError):
    """A search on an index that holds no descriptors yet."""


class IndexFormatError(PlaceIndexError):
    """Bytes that are not a faiss index :class:`~dinomix_ros.maps.index.PlaceIndex` can load."""
