"""The errors of map search: :mod:`dinomix_ros.maps.index`, its backends and :mod:`dinomix_ros.maps.masks`.

All are ValueErrors under :class:`PlaceIndexError`, so a caller can catch every bad input to a search at once. They
live in a module of their own so that the mask builders need neither torch nor faiss.
"""

from __future__ import annotations

__all__ = [
    "PlaceIndexError",
    "IndexConfigError",
    "DescriptorError",
    "MaskError",
    "EmptyIndexError",
    "IndexFormatError",
]


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
