"""Keyframe maps: the in-memory table, its on-disk format, search over it, and building it from bags and folders.

Import the modules themselves (``dinomix_ros.maps.keyframes``, ...): this package imports nothing on its own, so that
reading a manifest or a bag's topics does not load torch or faiss.
"""
