"""latentwatch collectors: the in-process tap that turns sampled requests into signature records."""

from collectors.record import Record, RecordError, decode, encode
from collectors.sampling import Sampler
from collectors.sinks import FileSink, QueueSink, Sink, read_file
from collectors.sites import Site, SiteError, available, default_sites, resolve
from collectors.tap import Tap, TapStats

__all__ = [
    "FileSink", "QueueSink", "Record", "RecordError", "Sampler", "Sink", "Site", "SiteError", "Tap",
    "TapStats", "available", "decode", "default_sites", "encode", "read_file", "resolve",
]
