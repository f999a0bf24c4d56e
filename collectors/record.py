"""One signature on the wire: the :class:`Record` and its versioned binary encoding.

Binary layout (all integers little-endian), format version 1::

    offset  size  field
    0       4     magic  b"LWSR"
    4       1     format version (1)
    5       1     flags (0; reserved)
    6       2     reserved (0)
    8       4     H: header length in bytes   (<= MAX_HEADER)
    12      4     P: payload length in bytes  (<= MAX_PAYLOAD)
    16      H     header: UTF-8 JSON object (fields below)
    16+H    P     payload: the arrays, back to back, in header order, C order, little-endian
    16+H+P  4     CRC-32 (zlib) of bytes [0, 16+H+P)

Header fields: ``schema`` (1), ``model`` (model name, a bounded label), ``fingerprint`` (model
fingerprint, see :mod:`collectors.fingerprint`), ``ts`` (unix seconds), ``key`` (hex hash of the request
key; the key itself never leaves the process), ``n_tokens``, ``meta`` (at most 16 short string pairs),
``text`` (only when the operator enabled it, else absent) and ``arrays``: a list of
``{"site", "name", "dtype" ("f4"|"f2"), "shape"}``.

Arrays per site: ``mean``, ``last`` and ``wmax`` (pooled activations, ``[d]``; ``wmax`` is the windowed
max of :mod:`collectors.signature`, absent from records written before it existed, which still decode),
``norm`` (``[2]``: mean and last token L2 norm) for activation sites; ``heads`` (``[n_heads, 4]``, see
:data:`STAT_NAMES`) for attention sites.

:func:`decode` accepts arbitrary bytes and either returns a :class:`Record` or raises
:class:`RecordError` with the reason; it never reads past the buffer and allocates at most the
buffer's size.
"""

from __future__ import annotations

import math
import re
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

STAT_NAMES = ("entropy", "first_token_mass", "mean_distance", "max_weight")  # columns of a site's "heads"
MAGIC = b"LWSR"
VERSION = 1
SCHEMA = 1
PREFIX = struct.Struct("<4sBBHII")
MAX_HEADER = 1 << 20
MAX_PAYLOAD = 64 << 20
MAX_ARRAYS = 4096
MAX_META = 16
MAX_TEXT = 65536
_DTYPES = {"f4": np.dtype("<f4"), "f2": np.dtype("<f2")}
_META_KEY = re.compile(r"^[a-z_][a-z0-9_]{0,31}$")
_NAME = re.compile(r"^[A-Za-z0-9_.:/\-]{1,200}$")


class RecordError(ValueError):
    """Bytes or fields that are not a valid record."""


@dataclass
class Record:
    """One sampled request's signature plus its envelope."""

    model: str
    fingerprint: str
    key: str
    n_tokens: int
    sites: dict[str, dict[str, np.ndarray]]
    ts: float = 0.0
    meta: dict[str, str] = field(default_factory=dict)
    text: str | None = None

    def site_dims(self) -> dict[str, dict[str, tuple[int, ...]]]:
        """``{site: {array: shape}}``: what a probe or baseline checks before using the record."""
        return {s: {n: tuple(a.shape) for n, a in arrays.items()} for s, arrays in self.sites.items()}

    def is_finite(self) -> bool:
        """False if any array holds NaN or infinity (the monitor counts such records as invalid)."""
        return all(bool(np.isfinite(a).all()) for arrays in self.sites.values() for a in arrays.values())

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (arrays as nested lists) for debugging and tests."""
        out: dict[str, Any] = {
            "schema": SCHEMA,
            "model": self.model,
            "fingerprint": self.fingerprint,
            "ts": self.ts,
            "key": self.key,
            "n_tokens": self.n_tokens,
            "meta": dict(self.meta),
            "sites": {s: {n: a.tolist() for n, a in arrays.items()} for s, arrays in self.sites.items()},
        }
        if self.text is not None:
            out["text"] = self.text
        return out

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Record:
        """Inverse of :meth:`to_json`; validates like :func:`decode`."""
        if not isinstance(obj, dict) or obj.get("schema") != SCHEMA:
            raise RecordError(f"not a schema-{SCHEMA} record object")
        try:
            sites = {
                str(s): {str(n): np.asarray(v, dtype=np.float32) for n, v in arrays.items()}
                for s, arrays in obj["sites"].items()
            }
            rec = cls(
                model=obj["model"], fingerprint=obj["fingerprint"], key=obj["key"],
                n_tokens=obj["n_tokens"], sites=sites, ts=obj.get("ts", 0.0),
                meta=obj.get("meta", {}), text=obj.get("text"),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise RecordError(f"malformed record object: {exc}") from exc
        _validate_fields(rec)
        return rec


_VALID_NAMES: set[str] = set()  # model names and fingerprints already checked (a handful per stream)


def _check_name(field_name: str, value: object) -> None:
    if value in _VALID_NAMES:
        return
    if not isinstance(value, str) or not _NAME.match(value):
        raise RecordError(f"field {field_name!r} must be a short name of [A-Za-z0-9_.:/-], got {value!r:.80}")
    if len(_VALID_NAMES) < 4096:
        _VALID_NAMES.add(value)


def _validate_fields(rec: Record, sites: bool = True) -> None:
    _check_name("model", rec.model)
    _check_name("fingerprint", rec.fingerprint)
    if not isinstance(rec.key, str) or not _NAME.match(rec.key):
        raise RecordError(f"field 'key' must be a short name of [A-Za-z0-9_.:/-], got {rec.key!r:.80}")
    if not isinstance(rec.n_tokens, int) or isinstance(rec.n_tokens, bool) or not 0 <= rec.n_tokens < 2**31:
        raise RecordError(f"n_tokens must be a non-negative int, got {rec.n_tokens!r:.40}")
    if not isinstance(rec.ts, (int, float)) or isinstance(rec.ts, bool) or not math.isfinite(rec.ts):
        raise RecordError("ts must be a finite number")
    if not isinstance(rec.meta, dict) or len(rec.meta) > MAX_META:
        raise RecordError(f"meta must be a dict of at most {MAX_META} entries")
    for k, v in rec.meta.items():
        if not isinstance(k, str) or not _META_KEY.match(k):
            raise RecordError(f"meta key {k!r:.40} must match {_META_KEY.pattern}")
        if not isinstance(v, str) or len(v) > 128:
            raise RecordError(f"meta value for {k!r} must be a string of at most 128 characters")
    if rec.text is not None and (not isinstance(rec.text, str) or len(rec.text) > MAX_TEXT):
        raise RecordError(f"text must be a string of at most {MAX_TEXT} characters")
    if not sites:
        return
    if not isinstance(rec.sites, dict):
        raise RecordError("sites must be a dict")
    for site, arrays in rec.sites.items():
        if not isinstance(site, str) or not _NAME.match(site) or not isinstance(arrays, dict):
            raise RecordError(f"bad site entry {site!r:.80}")
        for name in arrays:
            if not isinstance(name, str) or not _NAME.match(name):
                raise RecordError(f"bad array name {name!r:.80} at site {site!r}")


def encode(rec: Record, *, half: bool = False) -> bytes:
    """Encode ``rec`` (arrays as float32, or float16 with ``half=True``)."""
    _validate_fields(rec)
    dtype_code = "f2" if half else "f4"
    specs, flat = [], []
    for site, arrays in rec.sites.items():
        for name, arr in arrays.items():
            a = np.asarray(arr)
            specs.append({"site": site, "name": name, "dtype": dtype_code, "shape": list(a.shape)})
            flat.append(a.ravel())
    # one conversion for the whole payload (float16 conversion is slow per call)
    header: dict[str, Any] = {
        "schema": SCHEMA, "model": rec.model, "fingerprint": rec.fingerprint, "ts": float(rec.ts),
        "key": rec.key, "n_tokens": int(rec.n_tokens), "meta": rec.meta, "arrays": specs,
    }
    if rec.text is not None:
        header["text"] = rec.text
    try:
        hbytes = orjson.dumps(header)  # fields validated above; orjson is several times faster than json
    except orjson.JSONEncodeError as exc:  # e.g. a lone surrogate in text
        raise RecordError(f"record header cannot be encoded: {exc}") from exc
    payload = np.concatenate(flat).astype(_DTYPES[dtype_code]).tobytes() if flat else b""
    if len(hbytes) > MAX_HEADER or len(payload) > MAX_PAYLOAD:
        raise RecordError("record too large to encode")
    body = PREFIX.pack(MAGIC, VERSION, 0, 0, len(hbytes), len(payload)) + hbytes + payload
    return body + struct.pack("<I", zlib.crc32(body))


def frame_length(prefix: bytes) -> int:
    """Total encoded length announced by a record's first 16 bytes (used to read streams)."""
    if len(prefix) < PREFIX.size:
        raise RecordError(f"truncated record: {len(prefix)} bytes, need at least {PREFIX.size}")
    magic, version, flags, reserved, hlen, plen = PREFIX.unpack_from(prefix)
    if magic != MAGIC:
        raise RecordError(f"bad magic {magic!r}: not a latentwatch record")
    if version != VERSION:
        raise RecordError(f"unsupported record format version {version} (this build reads {VERSION})")
    if flags or reserved:  # zero in version 1: anything else is a torn or foreign write, not a length to wait for
        raise RecordError(f"reserved prefix bytes are not zero (flags {flags}, reserved {reserved})")
    if hlen > MAX_HEADER or plen > MAX_PAYLOAD:
        raise RecordError(f"record announces {hlen} header / {plen} payload bytes, over the limits")
    return PREFIX.size + hlen + plen + 4


def decode(data: bytes | bytearray | memoryview) -> Record:
    """Decode one record; raise :class:`RecordError` (never anything else) on any bad input."""
    try:
        return _decode(bytes(data))
    except RecordError:
        raise
    except Exception as exc:  # last line of defence: untrusted bytes must never escape as other errors
        raise RecordError(f"undecodable record: {type(exc).__name__}: {exc}") from exc


def _decode(data: bytes) -> Record:
    total = frame_length(data[: PREFIX.size])
    if len(data) != total:
        raise RecordError(f"record length {len(data)} does not match the {total} bytes it announces")
    _, _, _, _, hlen, plen = PREFIX.unpack_from(data)
    (crc,) = struct.unpack_from("<I", data, total - 4)
    if zlib.crc32(data[: total - 4]) != crc:
        raise RecordError("checksum mismatch: record is corrupt")
    try:
        header = orjson.loads(data[PREFIX.size : PREFIX.size + hlen])
    except orjson.JSONDecodeError as exc:
        raise RecordError(f"record header is not UTF-8 JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise RecordError("record header is not a JSON object")
    if header.get("schema") != SCHEMA:
        raise RecordError(f"unsupported record schema {header.get('schema')!r} (this build reads {SCHEMA})")
    specs = header.get("arrays")
    if not isinstance(specs, list) or len(specs) > MAX_ARRAYS:
        raise RecordError("record header 'arrays' must be a list of at most 4096 entries")
    start = PREFIX.size + hlen
    layout = _layout(specs, plen)
    dtype = layout.dtype
    if dtype is not None:  # the usual case: convert the whole payload at once, arrays are views of it
        whole = np.frombuffer(data, dtype=dtype, count=plen // dtype.itemsize, offset=start).astype(np.float32)
        sites = {site: {name: whole[a:b] if len(shape) == 1 else whole[a:b].reshape(shape)
                        for name, a, b, shape in arrays}
                 for site, arrays in layout.sites.items()}
    else:
        sites = {site: {name: np.frombuffer(data, dtype=dt, count=count, offset=start + off).reshape(shape)
                        .astype(np.float32) for name, count, shape, dt, off in arrays}
                 for site, arrays in layout.mixed.items()}
    meta = header.get("meta", {})
    rec = Record(
        model=header.get("model"), fingerprint=header.get("fingerprint"), key=header.get("key"),
        n_tokens=header.get("n_tokens"), sites=sites, ts=header.get("ts", 0.0), meta=meta,
        text=header.get("text"),
    )
    _validate_fields(rec, sites=False)  # site and array names were checked with the layout
    return rec


@dataclass
class _Layout:
    """Where each array of a record lies in its payload (validated once per distinct header layout)."""

    dtype: np.dtype | None  # the payload's single dtype, or None when arrays mix dtypes
    sites: dict[str, list[tuple[str, int, int, list[int]]]]  # name, first and end element, shape
    mixed: dict[str, list[tuple[str, int, list[int], np.dtype, int]]]  # name, elements, shape, dtype, byte offset


_LAYOUTS: dict[bytes, _Layout] = {}  # a model's records all share one layout: validate it once


def _layout(specs: list, plen: int) -> _Layout:
    key = orjson.dumps(specs) + plen.to_bytes(8, "little")
    cached = _LAYOUTS.get(key)
    if cached is not None:
        return cached
    entries = []
    offset = 0
    seen: set[tuple[str, str]] = set()
    for spec in specs:
        if not isinstance(spec, dict):
            raise RecordError("array spec is not an object")
        dtype = _DTYPES.get(spec.get("dtype"))
        shape = spec.get("shape")
        if dtype is None:
            raise RecordError(f"unsupported array dtype {spec.get('dtype')!r:.20}")
        if (not isinstance(shape, list) or len(shape) > 4
                or not all(isinstance(n, int) and not isinstance(n, bool) and 0 <= n <= plen for n in shape)):
            raise RecordError(f"bad array shape {shape!r:.60}")
        nbytes = math.prod(shape) * dtype.itemsize  # Python ints: no overflow
        if offset + nbytes > plen:
            raise RecordError("arrays run past the end of the payload")
        site, name = spec.get("site"), spec.get("name")
        if not isinstance(site, str) or not isinstance(name, str):
            raise RecordError("array spec needs string 'site' and 'name'")
        if not _NAME.match(site) or not _NAME.match(name):
            raise RecordError(f"bad site or array name {site!r:.80}/{name!r:.80}")
        if (site, name) in seen:
            raise RecordError(f"duplicate array {site}/{name}")
        seen.add((site, name))
        entries.append((site, name, dtype, shape, offset, nbytes))
        offset += nbytes
    if offset != plen:
        raise RecordError(f"payload has {plen - offset} bytes not described by the header")
    dtypes = {e[2] for e in entries}
    single = dtypes.pop() if len(dtypes) == 1 else None
    sites: dict[str, list] = {}
    mixed: dict[str, list] = {}
    for site, name, dtype, shape, off, nbytes in entries:
        if single is not None:
            first = off // single.itemsize
            sites.setdefault(site, []).append((name, first, first + nbytes // single.itemsize, shape))
        else:
            mixed.setdefault(site, []).append((name, nbytes // dtype.itemsize, shape, dtype, off))
    layout = _Layout(single, sites, mixed)
    if len(_LAYOUTS) >= 64:  # bounded: hostile or very varied inputs only cost validation time
        _LAYOUTS.clear()
    _LAYOUTS[key] = layout
    return layout
