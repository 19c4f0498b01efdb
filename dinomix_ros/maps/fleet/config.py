"""The fleet settings (node parameters ``fleet.*``, CLI flags ``--fleet-*``) and the names they derive.

A fleet map lives in one Milvus collection per model (:func:`default_collection`); its descriptors are a vector field
named after the model (:func:`vector_field`) and every row carries a marker field named after it
(:func:`model_field`) that every read filters on, so a robot running another model addresses fields the collection
does not have, and the server itself refuses its writes and reads (see :mod:`dinomix_ros.maps.fleet.store`).
ROS-free and pymilvus-free: importing this module never imports pymilvus.
"""

from __future__ import annotations

import json
import os
import re
import socket
from dataclasses import dataclass
from typing import Any, ClassVar

from dinomix_ros.settings import SettingError, check, setting

__all__ = ["INDEX_TYPES", "LITE_INDEX_TYPES", "FleetConfig", "default_collection", "display_uri", "model_field",
           "robot_id", "token_of", "vector_field"]

#: Vector index types a new collection may be given (the server builds them).
INDEX_TYPES = ("FLAT", "HNSW", "IVF_FLAT", "IVF_SQ8", "IVF_PQ", "GPU_CAGRA", "GPU_IVF_PQ", "GPU_IVF_FLAT",
               "AUTOINDEX")
#: Those Milvus Lite 3.2 builds (it accepts the others at creation, then fails when it first builds the index).
LITE_INDEX_TYPES = ("FLAT", "HNSW", "IVF_FLAT", "IVF_SQ8", "AUTOINDEX")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,254}")  # Milvus collection and field names
_ROBOT = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_URI_SCHEMES = ("http://", "https://", "tcp://", "grpc://")


@dataclass(frozen=True)
class FleetConfig:
    """Where the fleet's shared map is and what this robot does with it (see the README, "Fleet maps")."""

    SETTINGS_GROUP: ClassVar[str] = "fleet"
    FLAG_PREFIX: ClassVar[str] = "fleet-"

    uri: str = setting("", "Milvus holding the fleet's shared map: a server or cluster (http://host:19530) or a "
                           "Milvus Lite file (a path ending in .db: embedded, one process at a time); empty: no fleet",
                       reconfigure=True)
    token_env: str = setting("MILVUS_TOKEN", "environment variable holding the server's token (user:password or an "
                                             "API key; not a parameter: parameters are readable by anyone on the ROS "
                                             "graph); unset or empty: no authentication", reconfigure=True)
    collection: str = setting("", "collection of the shared map; empty: dinomix_<model fingerprint id>, one "
                                  "collection per model", reconfigure=True)
    robot: str = setting("", "this robot's id in the fleet (letters, digits, _ . -; at most 64): pushed keyframes "
                             "are keyed robot/map/keyframe id; empty: the host name", reconfigure=True)
    push: bool = setting(True, "push the keyframes recorded here to the fleet after each successful local save "
                               "(what is left, e.g. while the server is down, is retried every "
                               "fleet.retry_period_s)", reconfigure=True)
    pull_at_configure: bool = setting(True, "pull the fleet's keyframes of the region around fleet.pull_center "
                                            "into the local map at configure", reconfigure=True)
    pull_center: str = setting("", "centre of the region pulled at configure: 'x,y' or 'x,y,frame' (frame 'map' "
                                   "when left out) or 'gps:lat,lon'; empty: configure pulls only when "
                                   "fleet.pull_radius_m is 0 (the whole collection). ~/pull_fleet_map pulls around "
                                   "the robot's latest pose, else here", reconfigure=True)
    pull_radius_m: float = setting(0.0, "radius of the pulled region in metres (horizontal, or great-circle for "
                                        "gps:); 0: no region, the whole collection", min=0.0, max=2e7,
                                   reconfigure=True)
    pull_max_keyframes: int = setting(10000, "most keyframes one pull adds (the nearest to the centre first; about "
                                             "23 kB each in RAM with 4096-d float16 descriptors and 400 ORB "
                                             "features)",
                                      min=1, max=10_000_000, reconfigure=True)
    batch_rows: int = setting(64, "keyframes per request to the server", min=1, max=4096, reconfigure=True)
    timeout_s: float = setting(10.0, "timeout of each request to the server in seconds", positive=True, max=3600.0,
                               reconfigure=True)
    retry_period_s: float = setting(30.0, "while keyframes wait to be pushed, retry every this many seconds",
                                    positive=True, max=86400.0, reconfigure=True)
    index_type: str = setting("FLAT", "vector index of a new collection: exact FLAT, or an approximate index for a "
                                      "large fleet map (Milvus Lite builds FLAT, HNSW, IVF_FLAT, IVF_SQ8, AUTOINDEX)",
                              choices=INDEX_TYPES, reconfigure=True)
    index_params: str = setting("{}", "JSON build parameters of fleet.index_type for a new collection, e.g. "
                                      "{\"M\": 32, \"efConstruction\": 200} for HNSW", reconfigure=True)

    def __post_init__(self) -> None:
        check(self)
        if self.uri and not (self.uri.startswith(_URI_SCHEMES) or self.uri.endswith(".db")):
            raise SettingError("fleet.uri", f"fleet.uri must be a Milvus server (http://host:19530) or a Milvus Lite "
                                            f"file ending in .db, got {self.uri!r}")
        if self.uri.endswith(".db") and self.index_type not in LITE_INDEX_TYPES:
            raise SettingError("fleet.index_type", f"fleet.index_type {self.index_type} is not built by Milvus Lite (a "
                                                   f".db fleet.uri): use one of {', '.join(LITE_INDEX_TYPES)}")
        if self.collection and not _NAME.fullmatch(self.collection):
            raise SettingError("fleet.collection", "fleet.collection must be a Milvus collection name (a letter or _, "
                                                   f"then letters, digits, _), got {self.collection!r}")
        if self.robot and not _ROBOT.fullmatch(self.robot):
            raise SettingError("fleet.robot", "fleet.robot must be 1-64 letters, digits, '_', '.' or '-', got "
                                              f"{self.robot!r}")
        if self.token_env and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.token_env):
            raise SettingError("fleet.token_env", f"fleet.token_env must name an environment variable, got "
                                                  f"{self.token_env!r}")
        if self.pull_center:
            from dinomix_ros.maps.fleet.region import parse_center

            try:
                parse_center(self.pull_center, self.pull_radius_m or 1.0)
            except ValueError as exc:
                raise SettingError("fleet.pull_center", f"fleet.pull_center: {exc}") from None
        try:
            params = json.loads(self.index_params)
        except ValueError as exc:
            raise SettingError("fleet.index_params", f"fleet.index_params is not JSON: {exc}") from None
        if not isinstance(params, dict):
            raise SettingError("fleet.index_params", f"fleet.index_params must be a JSON object, got {params!r}")

    @property
    def enabled(self) -> bool:
        """Whether a fleet is configured (``uri`` set)."""
        return bool(self.uri)

    def index_parameters(self) -> dict[str, Any]:
        return json.loads(self.index_params)


def robot_id(config: FleetConfig) -> str:
    """``config.robot``, or the host name made into a robot id (other characters become ``_``)."""
    if config.robot:
        return config.robot
    return re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname())[:64] or "robot"


def token_of(config: FleetConfig) -> str:
    """The token in the environment variable ``config.token_env`` ("" when unset)."""
    return os.environ.get(config.token_env, "") if config.token_env else ""


def _model_suffix(fingerprint: dict[str, Any]) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", str(fingerprint["id"]))


def default_collection(fingerprint: dict[str, Any]) -> str:
    """The collection of a model's fleet map: ``dinomix_`` + its fingerprint id (``-`` -> ``_``)."""
    return f"dinomix_{_model_suffix(fingerprint)}"[:255]


def vector_field(fingerprint: dict[str, Any]) -> str:
    """The descriptor field of a model: ``descriptor_`` + its fingerprint id (``-`` -> ``_``)."""
    return f"descriptor_{_model_suffix(fingerprint)}"[:255]


def model_field(fingerprint: dict[str, Any]) -> str:
    """The model's marker field: ``model_`` + its fingerprint id (``-`` -> ``_``), true on every row of its
    collection and required by every read's filter."""
    return f"model_{_model_suffix(fingerprint)}"[:255]


def display_uri(uri: str) -> str:
    """``uri`` for logs and diagnostics, with any ``user:password@`` replaced by ``***@``."""
    return re.sub(r"(://)[^/@]*@", r"\1***@", uri)
