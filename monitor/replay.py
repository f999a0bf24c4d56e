"""``latentwatch replay``: feed a recorded signature file to a running sidecar at a chosen rate."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

from collectors.record import encode
from collectors.sinks import FileReadStats, read_file


def replay(path: Path, url: str, rate: float, batch: int = 100, limit: int | None = None,
           timeout: float = 30.0) -> dict[str, int]:
    """POST the file's records to ``url`` (``…/ingest``) in batches, at ``rate`` records/s (0 = as fast as possible)."""
    stats = FileReadStats()
    sent = accepted = corrupt = 0
    pending: list[bytes] = []
    started = time.monotonic()

    def flush() -> None:
        nonlocal accepted, corrupt
        if not pending:
            return
        req = urllib.request.Request(url, data=b"".join(pending), method="POST",
                                     headers={"Content-Type": "application/octet-stream"})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            answer = json.loads(resp.read())
        accepted += answer["accepted"]
        corrupt += answer["corrupt"]
        pending.clear()

    for rec in read_file(path, stats):
        if limit is not None and sent >= limit:
            break
        pending.append(encode(rec))
        sent += 1
        if len(pending) >= batch:
            flush()
            if rate > 0:
                ahead = sent / rate - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)
    flush()
    return {"sent": sent, "accepted": accepted, "corrupt_in_file": stats.corrupt, "refused_by_sidecar": corrupt}
