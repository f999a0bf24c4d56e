"""latentwatch collectors: the in-process tap that turns sampled requests into signature records.

Importing the package is light (no torch): the record format, sampling and sinks load at once, the
tap and the site resolution (which need torch) on first use, so the monitor process never imports torch.
"""

from __future__ import annotations

import importlib

from collectors.record import Record, RecordError, decode, encode
from collectors.sampling import Sampler
from collectors.sinks import FileSink, QueueSink, Sink, read_file

_LAZY = {
    "Tap": "collectors.tap", "TapStats": "collectors.tap", "Site": "collectors.sites",
    "SiteError": "collectors.sites", "available": "collectors.sites", "default_sites": "collectors.sites",
    "resolve": "collectors.sites",
}

__all__ = [
    "FileSink", "QueueSink", "Record", "RecordError", "Sampler", "Sink", "Site", "SiteError", "Tap",
    "TapStats", "available", "decode", "default_sites", "encode", "read_file", "resolve",
]


def __getattr__(name: str) -> object:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'collectors' has no attribute {name!r}")
