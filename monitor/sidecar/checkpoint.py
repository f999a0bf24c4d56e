"""Drift state that survives restarts: the analyzer's windows and alarm state, the sidecar's counters and
the source's reading position, in one file written atomically.

Written from the source thread between two batches (so the position and the windows agree: every record
before the position is in the state, none after it) every ``checkpoint.interval_seconds`` and once more at
SIGTERM after the last drain. The file is a safetensors file (arrays, no pickle) with a JSON header:
``version``, the ``baseline_sha256`` it was made with, the analyzer's fields, the sidecar's counters and the
source position (file: identity and offset, see :mod:`monitor.sidecar.file_source`; Kafka: the next offset
per partition). Written to a temporary file, fsynced, renamed over the old one, and the directory fsynced:
a crash leaves either the old or the new checkpoint, never a torn one.

On start, a checkpoint of another version or another baseline is ignored (logged): windows of an old
baseline mean nothing against a new one.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("latentwatch.sidecar")
VERSION = 1
KEY = "latentwatch_checkpoint"


def save(path: Path, baseline_sha256: str, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    """Write atomically: temporary file, fsync, rename, fsync of the directory."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = json.dumps({"version": VERSION, "baseline_sha256": baseline_sha256, **meta}, allow_nan=False)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp), metadata={KEY: header})
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load(path: Path, baseline_sha256: str) -> tuple[dict[str, Any], dict[str, np.ndarray]] | None:
    """The checkpoint's (header, arrays), or None when there is none usable (missing, unreadable, another
    version or another baseline: logged)."""
    from safetensors import SafetensorError, safe_open
    from safetensors.numpy import load_file

    path = Path(path)
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="numpy") as f:
            header = json.loads((f.metadata() or {})[KEY])
        arrays = load_file(str(path))
    except (SafetensorError, OSError, ValueError, KeyError) as exc:
        log.warning("checkpoint %s is unreadable (%s); starting with empty windows", path, exc)
        return None
    if header.get("version") != VERSION:
        log.warning("checkpoint %s has version %s, this build reads %s; starting with empty windows",
                    path, header.get("version"), VERSION)
        return None
    if header.get("baseline_sha256") != baseline_sha256:
        log.warning("checkpoint %s was made with another baseline; starting with empty windows", path)
        return None
    return header, arrays
