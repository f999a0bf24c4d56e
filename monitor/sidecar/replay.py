"""``latentwatch replay``: feed a recorded signature file to a running sidecar (``POST /ingest``) or to a
Kafka topic (through the tap's :class:`~collectors.kafka_sink.KafkaSink`) at a chosen rate."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from collectors.record import Record, encode
from collectors.sinks import FileReadStats, read_file


class ReplayError(RuntimeError):
    """The sidecar refused a batch (its one-line reason)."""


def replay(path: Path, url: str, rate: float, batch: int = 100, limit: int | None = None,
           timeout: float = 30.0, skip: int = 0, sink: Any = None, token: str | None = None) -> dict[str, int]:
    """POST the file's records to ``url`` (``…/ingest``, the sidecar's ingest listener, with the bearer
    ``token``) in batches, at ``rate`` records/s (0 = as fast as possible), after skipping the first ``skip``;
    with ``sink`` (a Kafka sink), write them there instead."""
    stats = FileReadStats()
    sent = accepted = corrupt = 0
    pending: list[Record] = []
    started = time.monotonic()

    def flush() -> None:
        nonlocal accepted, corrupt
        if pending and sink is not None:
            for rec in pending:
                sink.write(rec)
        elif pending:
            headers = {"Content-Type": "application/octet-stream"}
            if token:
                headers["Authorization"] = f"Bearer {token}"
            req = urllib.request.Request(url, data=b"".join(encode(r) for r in pending), method="POST",
                                         headers=headers)
            try:
                with urllib.request.urlopen(req, timeout=timeout) as resp:
                    answer = json.loads(resp.read())
            except urllib.error.HTTPError as exc:
                try:
                    reason = json.loads(exc.read()).get("error", exc.reason)
                except ValueError:
                    reason = exc.reason
                raise ReplayError(f"the sidecar answered {exc.code}: {reason}") from exc
            accepted += answer["accepted"]
            corrupt += answer.get("invalid", 0)
        pending.clear()

    for i, rec in enumerate(read_file(path, stats)):
        if i < skip:
            continue
        if limit is not None and sent >= limit:
            break
        pending.append(rec)
        sent += 1
        if len(pending) >= batch:
            flush()
            if rate > 0:
                ahead = sent / rate - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)
    flush()
    if sink is not None:
        sink.flush()
        return {"sent": sent, "acked": sink.acked, "dropped": sink.dropped, "corrupt_in_file": stats.corrupt}
    return {"sent": sent, "accepted": accepted, "corrupt_in_file": stats.corrupt, "refused_by_sidecar": corrupt}
