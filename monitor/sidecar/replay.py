"""``latentwatch replay``: feed a recorded signature file to a running sidecar (``POST /ingest``) or to a
Kafka topic (through the tap's :class:`~collectors.kafka_sink.KafkaSink`) at a chosen rate.

Each body carries an ``Idempotency-Key`` (a random per-run nonce and the body's index, so a second replay
of the same file is analyzed again) and is retried, with the same key,
when the sidecar cannot be reached, restarts (503) or is still analyzing it (409): the sidecar answers a
body it has already analyzed without analyzing it again, so a replay through sidecar restarts counts
every record exactly once."""

from __future__ import annotations

import http.client
import json
import secrets
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
           timeout: float = 30.0, skip: int = 0, sink: Any = None, token: str | None = None,
           retry_seconds: float = 60.0) -> dict[str, int]:
    """POST the file's records to ``url`` (``…/ingest``, the sidecar's ingest listener, with the bearer
    ``token``) in batches, at ``rate`` records/s (0 = as fast as possible), after skipping the first ``skip``;
    with ``sink`` (a Kafka sink), write them there instead. A body that gets no answer, 503 or 409 is
    retried with backoff for up to ``retry_seconds``."""
    stats = FileReadStats()
    sent = accepted = corrupt = retries = 0
    nonce = secrets.token_hex(8)
    pending: list[Record] = []
    started = time.monotonic()

    def flush() -> None:
        nonlocal accepted, corrupt, retries
        if pending and sink is not None:
            for rec in pending:
                sink.write(rec)
        elif pending:
            body = b"".join(encode(r) for r in pending)
            headers = {"Content-Type": "application/octet-stream", "Idempotency-Key": f"{nonce}-{sent}"}
            if token:
                headers["Authorization"] = f"Bearer {token}"
            deadline, wait = time.monotonic() + retry_seconds, 0.2
            while True:
                req = urllib.request.Request(url, data=body, method="POST", headers=headers)
                try:
                    with urllib.request.urlopen(req, timeout=timeout) as resp:
                        answer = json.loads(resp.read())
                    break
                except urllib.error.HTTPError as exc:
                    try:
                        reason = json.loads(exc.read()).get("error", exc.reason)
                    except ValueError:
                        reason = exc.reason
                    if exc.code not in (409, 503) or time.monotonic() + wait > deadline:
                        raise ReplayError(f"the sidecar answered {exc.code}: {reason}") from exc
                except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
                    if time.monotonic() + wait > deadline:
                        reason = getattr(exc, "reason", exc)
                        raise ReplayError(f"cannot reach {url} for {retry_seconds:g} s: {reason}") from exc
                retries += 1
                time.sleep(wait)
                wait = min(wait * 2, 5.0)
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
    return {"sent": sent, "accepted": accepted, "corrupt_in_file": stats.corrupt, "refused_by_sidecar": corrupt,
            "retries": retries}
