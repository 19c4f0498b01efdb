"""The fleet's shared keyframe map in Milvus: one collection per model, reached with pymilvus.

:class:`FleetStore` connects (a server or cluster by URI, or Milvus Lite embedded for a ``.db`` file), creates the
model's collection when it is missing (schema of :mod:`dinomix_ros.maps.fleet.records`, the vector index of
``fleet.index_type``, inner-product metric, strong consistency so a robot reads what it just wrote) and otherwise
checks that the collection is its model's. It upserts rows, pulls a region (:meth:`FleetStore.pull`: the server
filters the region's bounding box, the client keeps the circle, then the rows are fetched by key) and searches.

The model is enforced twice. The client refuses a collection whose ``dinomix.fingerprint`` property names another
model (:class:`FleetModelError`). And the server refuses on its own: the descriptors live in a field named after the
model (``descriptor_<fingerprint id>``) and every row carries a marker field named after it (``model_<fingerprint
id>``, true) in a schema without dynamic fields; every read here filters on the marker. So a writer of another model
sends fields the collection does not have and misses those it requires, a reader's filter and a search's vector
field name fields that do not exist, and Milvus rejects them (tested against Milvus Lite's server with raw gRPC
writes that skip this client's checks).

pymilvus is imported on first use (robots without a fleet need not install it). Failures become one-line
:class:`FleetError` s; :class:`FleetUnavailableError` means the server could not be reached (retry later). pymilvus
logs every failed request with a traceback (and an embedded Milvus Lite logs through gRPC the requests it does not
implement): their logs are limited to CRITICAL once this module connects, since each failure is reported here.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from dinomix_ros.maps.fleet.config import (
    FleetConfig, default_collection, display_uri, model_field, token_of, vector_field,
)
from dinomix_ros.maps.fleet.records import KEY_BYTES, SCALAR_FIELDS, PulledKeyframes
from dinomix_ros.maps.fleet.region import Region, quote

__all__ = ["FINGERPRINT_PROPERTY", "SCHEMA_VERSION", "FleetError", "FleetModelError", "FleetStore",
           "FleetUnavailableError"]

_logger = logging.getLogger(__name__)

FINGERPRINT_PROPERTY = "dinomix.fingerprint"
SCHEMA_PROPERTY = "dinomix.schema"
SCHEMA_VERSION = "1"
_SCAN_BATCH = 1000
_SCAN_FACTOR = 10  # a region pull reads the keys of at most this many times pull_max_keyframes rows


class FleetError(RuntimeError):
    """A fleet operation failed; the message is one line that says what to do."""


class FleetUnavailableError(FleetError):
    """The server could not be reached (down, no network, timed out): nothing changed, try again later."""


class FleetModelError(FleetError):
    """The collection holds another model's descriptors: this robot may neither push into nor pull from it."""


def _milvus() -> Any:
    """pymilvus, imported on first use, with its own logging limited to CRITICAL."""
    try:
        import pymilvus
    except ImportError as exc:
        raise FleetError(f"fleet maps need pymilvus ({exc}): pip install pymilvus==3.0.2 (and milvus-lite==3.2.2 "
                         "for an embedded .db file)") from None
    # milvus_lite and grpc._server: the embedded Lite server of a .db URI runs in this process and logs the
    # requests it does not implement (pymilvus then falls back) with tracebacks
    for name in ("pymilvus", "pymilvus.milvus_client", "milvus_lite", "grpc._server"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    return pymilvus


def _unreachable(exc: BaseException) -> bool:
    """Whether a pymilvus/gRPC error means the server could not be reached (rather than a refused request)."""
    import grpc

    code = getattr(exc, "code", None)
    if callable(code):  # a raw grpc.RpcError
        code = code()
    if isinstance(code, grpc.StatusCode):
        return code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED)
    name = type(exc).__name__
    return code == 2 or name in ("ConnectError", "MilvusUnavailableException", "ConnectionConfigException")


def _reason(exc: BaseException) -> str:
    text = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    return " ".join(str(text).split())[:300]


class FleetStore:
    """The fleet map of one model in one Milvus (see the module docstring).

    Args:
        config: where (``uri``, ``token_env``, ``collection``) and how (``timeout_s``, ``batch_rows``, the index of a
            new collection).
        fingerprint: the model of this robot (a map's ``fingerprint``).
    """

    def __init__(self, config: FleetConfig, fingerprint: dict[str, Any]) -> None:
        if not config.uri:
            raise FleetError("fleet.uri is empty: no fleet map to use")
        self.config = config
        self.fingerprint = dict(fingerprint)
        self.dim = int(fingerprint["descriptor_dim"])
        self.collection = config.collection or default_collection(fingerprint)
        self.vector = vector_field(fingerprint)
        self.marker = model_field(fingerprint)
        self.where = f"{display_uri(config.uri)} collection {self.collection}"
        self._client: Any = None

    # ------------------------------------------------------------------------------------------------ connection

    @property
    def connected(self) -> bool:
        return self._client is not None

    def connect(self) -> None:
        """Connect and open (or create) the model's collection; a no-op when connected.

        Raises:
            FleetUnavailableError: the server could not be reached.
            FleetModelError: the collection is another model's.
            FleetError: anything else (authentication, a collection not made by dinomix_ros ...).
        """
        if self._client is not None:
            return
        pymilvus = _milvus()
        timeout = self.config.timeout_s
        try:
            client = pymilvus.MilvusClient(uri=self.config.uri, token=token_of(self.config), timeout=timeout,
                                           dedicated=True)
        except Exception as exc:
            raise self._error("connect", exc) from None
        try:
            if not client.has_collection(self.collection, timeout=timeout):
                self._create(client, pymilvus)
            self._check(client.describe_collection(self.collection, timeout=timeout))
            state = client.get_load_state(self.collection, timeout=timeout).get("state")
            if "NotLoad" in str(state):
                client.load_collection(self.collection, timeout=timeout)
        except FleetError:
            client.close()
            raise
        except Exception as exc:
            client.close()
            raise self._error("open the collection", exc) from None
        self._client = client
        _logger.info("fleet: connected to %s", self.where)

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except Exception as exc:  # closing a dead channel: nothing left to do
                _logger.debug("fleet: closing the client: %s", exc)

    def _create(self, client: Any, pymilvus: Any) -> None:
        data_type = pymilvus.DataType
        schema = client.create_schema(auto_id=False, enable_dynamic_field=False,
                                      description="dinomix_ros fleet keyframe map")
        schema.add_field("key", data_type.VARCHAR, is_primary=True, max_length=KEY_BYTES)
        schema.add_field(self.vector, data_type.FLOAT_VECTOR, dim=self.dim)
        schema.add_field(self.marker, data_type.BOOL)
        for name, kind, params in SCALAR_FIELDS:
            schema.add_field(name, getattr(data_type, kind), **params)
        index = client.prepare_index_params()
        index.add_index(field_name=self.vector, index_type=self.config.index_type, metric_type="IP",
                        params=self.config.index_parameters())
        properties = {FINGERPRINT_PROPERTY: json.dumps(self.fingerprint, sort_keys=True),
                      SCHEMA_PROPERTY: SCHEMA_VERSION}
        try:
            client.create_collection(self.collection, schema=schema, index_params=index, consistency_level="Strong",
                                     properties=properties, timeout=self.config.timeout_s)
        except Exception:
            if not client.has_collection(self.collection, timeout=self.config.timeout_s):
                raise
            return  # another robot created it at the same moment: checked like any existing collection
        _logger.info("fleet: created %s (%s index, %d-d descriptors)", self.where, self.config.index_type, self.dim)

    def _check(self, described: dict) -> None:
        """Refuse a collection of another model, of another schema version, or not made by dinomix_ros."""
        props = described.get("properties") or {}
        text = props.get(FINGERPRINT_PROPERTY)
        if text is None:
            raise FleetError(f"{self.where} was not made by dinomix_ros (no {FINGERPRINT_PROPERTY} property): choose "
                             "another fleet.collection")
        try:
            theirs = json.loads(text)
        except ValueError:
            theirs = {"id": text}
        if not isinstance(theirs, dict) or theirs.get("id") != self.fingerprint["id"]:
            theirs = theirs if isinstance(theirs, dict) else {}
            raise FleetModelError(
                f"{self.where} holds descriptors of model {theirs.get('id')} ({theirs.get('architecture')}), but "
                f"this robot runs {self.fingerprint['id']} ({self.fingerprint.get('architecture')}): descriptors of "
                "different models are not comparable; leave fleet.collection empty (one collection per model)")
        if str(props.get(SCHEMA_PROPERTY)) != SCHEMA_VERSION:
            raise FleetError(f"{self.where} has fleet schema {props.get(SCHEMA_PROPERTY)}, this dinomix_ros reads "
                             f"{SCHEMA_VERSION}: update dinomix_ros or use another fleet.collection")
        fields = {f["name"]: f for f in described.get("fields", [])}
        dim = (fields.get(self.vector) or {}).get("params", {}).get("dim")
        if dim is None or int(dim) != self.dim or self.marker not in fields:
            raise FleetModelError(f"{self.where} has no {self.dim}-d field {self.vector} and marker {self.marker} "
                                  f"for this model's descriptors (found {sorted(fields)})")

    def _error(self, what: str, exc: BaseException) -> FleetError:
        if isinstance(exc, FleetError):
            return exc
        if _unreachable(exc):
            hint = ""
            if self.config.uri.endswith(".db") and what == "connect":
                hint = (" (a Milvus Lite .db is opened by one process at a time: for several, run `milvus-lite "
                        f"server --data-dir {self.config.uri}` and give them its http:// URI)")
            return FleetUnavailableError(f"fleet {self.where} unreachable ({what}): {_reason(exc)}{hint}")
        return FleetError(f"fleet {self.where}: {what} failed: {_reason(exc)}")

    def _call(self, what: str, call: Callable[[Any], Any]) -> Any:
        """``call(client)`` after connecting; errors become :class:`FleetError` (unreachable: the client is dropped
        and the next call reconnects)."""
        self.connect()
        try:
            return call(self._client)
        except Exception as exc:
            error = self._error(what, exc)
            if isinstance(error, FleetUnavailableError):
                self.close()
            raise error from None

    # ------------------------------------------------------------------------------------------------ operations

    def upsert(self, records: list[dict]) -> None:
        """Write rows (a row with an existing key replaces it)."""
        if records:
            self._call(f"push of {len(records)} keyframes",
                       lambda c: c.upsert(self.collection, records, timeout=self.config.timeout_s))

    def _only_mine(self, expr: str = "") -> str:
        """``expr`` restricted to this model's rows: the server refuses it when the marker field is not its own."""
        return f"{self.marker} == true" + (f" and ({expr})" if expr else "")

    def count(self) -> int:
        """Rows in the collection."""
        rows = self._call("count", lambda c: c.query(self.collection, filter=self._only_mine(),
                                                     output_fields=["count(*)"], timeout=self.config.timeout_s))
        return int(rows[0]["count(*)"])

    def _keys_filter(self, keys: list[str]) -> str:
        return self._only_mine(f"key in [{', '.join(map(quote, keys))}]")

    def existing(self, keys: list[str]) -> set[str]:
        """Which of ``keys`` are in the collection."""
        found: set[str] = set()
        for start in range(0, len(keys), self.config.batch_rows * 16):
            part = keys[start:start + self.config.batch_rows * 16]
            rows = self._call("key lookup", lambda c: c.query(self.collection, filter=self._keys_filter(part),
                                                              output_fields=["key"], timeout=self.config.timeout_s))
            found |= {r["key"] for r in rows}
        return found

    def region_keys(self, region: Region, limit: int, exclude: tuple[str, str] | None = None
                    ) -> tuple[list[str], np.ndarray]:
        """Keys of the keyframes in ``region``, nearest first (at most ``limit``), and their distances.

        The server filters the bounding box (and leaves out the rows of ``exclude`` = (robot, map uid): a robot's
        own map); the exact circle is applied here.
        """
        expr = region.box_filter()
        if exclude is not None:
            others = f"(robot != {quote(exclude[0])} or map_uid != {quote(exclude[1])})"
            expr = f"({expr}) and {others}" if expr else others
        expr = self._only_mine(expr)
        cap = limit if region.kind == "all" else limit * _SCAN_FACTOR
        fields = ["key"] + region.coordinate_fields()

        def scan(client: Any) -> list[dict]:
            rows: list[dict] = []
            it = client.query_iterator(self.collection, batch_size=_SCAN_BATCH, filter=expr, output_fields=fields,
                                       timeout=self.config.timeout_s)
            try:
                while len(rows) < cap and (batch := it.next()):
                    rows.extend(batch)
            finally:
                it.close()
            return rows[:cap]

        rows = self._call(f"scan of {region.describe()}", scan)
        if len(rows) >= cap and region.kind != "all":
            _logger.warning("fleet: the box around %s holds more than %d keyframes; pulled the nearest of the first "
                            "%d (raise fleet.pull_max_keyframes or use a smaller radius)", region.describe(), cap, cap)
        dist = region.distances(rows)
        order = [i for i in np.argsort(dist, kind="stable") if np.isfinite(dist[i])][:limit]
        return [rows[i]["key"] for i in order], dist[order]

    def fetch(self, keys: list[str]) -> list[dict]:
        """Whole rows (descriptor, scalars, features) of ``keys``, in ``keys`` order (missing keys left out)."""
        fields = ["key", self.vector] + [name for name, _, _ in SCALAR_FIELDS]
        got: dict[str, dict] = {}
        for start in range(0, len(keys), self.config.batch_rows):
            part = keys[start:start + self.config.batch_rows]
            rows = self._call(f"fetch of {len(part)} keyframes", lambda c: c.query(
                self.collection, filter=self._keys_filter(part), output_fields=fields, timeout=self.config.timeout_s))
            got.update((r["key"], dict(r)) for r in rows)
        return [got[k] for k in keys if k in got]

    def pull(self, region: Region, limit: int, own_robot: str, exclude: tuple[str, str] | None = None
             ) -> PulledKeyframes:
        """The keyframes of ``region`` (nearest first, at most ``limit``), ready to add to a local map."""
        keys, _ = self.region_keys(region, limit, exclude)
        return PulledKeyframes.from_records(self.fetch(keys), self.vector, self.dim, own_robot)

    def search(self, queries: np.ndarray, k: int, filter_expr: str = "", params: dict[str, Any] | None = None,
               output_fields: tuple[str, ...] = ("robot", "keyframe_id")) -> list[list[dict]]:
        """Top-``k`` keyframes per query by inner product, on the server: per query a list of
        ``{"key", "similarity", **output_fields}``, best first."""
        q = np.asarray(queries, dtype=np.float32).reshape(-1, self.dim)
        res = self._call(f"search of {q.shape[0]} queries", lambda c: c.search(
            self.collection, data=q.tolist(), anns_field=self.vector, limit=int(k),
            filter=self._only_mine(filter_expr), output_fields=list(output_fields),
            search_params={"metric_type": "IP", "params": params or {}}, timeout=self.config.timeout_s))
        return [[{"key": hit["key"], "similarity": float(hit["distance"]),
                  **{f: hit["entity"].get(f) for f in output_fields}} for hit in hits] for hits in res]
