"""The vLLM tap's counters on vLLM's own ``/metrics``, labelled with vLLM's ``model_name``.

The tap runs in vLLM's engine process; ``/metrics`` is served by the API server process. The tap leaves its
counters in a small JSON file once a second (``<stats_dir>/tap-<pid>-<n>.json``, written atomically); this
module, loaded by vLLM as a ``vllm.stat_logger_plugins`` entry point in the API server, registers a
Prometheus collector that reads those files at scrape time (and any tap running in the same process, for
``VLLM_ENABLE_V1_MULTIPROCESSING=0``). The metric names are those of :mod:`collectors.metrics`
(``latentwatch_tap_requests_sampled_total``, ``..._process_dropped_total{stage}``, ``..._errors_total{kind}``
...), so the dashboards and alerts that read a ``transformers`` tap read this one too, and the
``model_name`` label is vLLM's served model name, so they join ``vllm:*`` series.

Files of engine processes that are gone are ignored. With several API server processes
(``--api-server-count`` > 1, Prometheus multiprocess mode) vLLM serves only its multiprocess registry and
these counters do not appear; scrape the sidecar's per-replica tap metrics instead.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

from prometheus_client import REGISTRY
from prometheus_client.registry import Collector
from vllm.v1.metrics.loggers import StatLoggerBase

from collectors.metrics import TapCollector
from collectors.vllm.private import private_folder
from collectors.vllm.settings import configured

log = logging.getLogger(__name__)
STATS_DIR_ENV = "LATENTWATCH_VLLM_STATS_DIR"
_registered = threading.Lock()
_collector: FileTapCollector | None = None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_snapshots(folder: Path) -> list[dict]:
    """The counters of every live tap that left a file in ``folder`` and of the taps in this process.

    Files are read only from a private folder (:func:`private_folder`) and only when this user owns
    them: counters another local user wrote are not exported as this server's.
    """
    from collectors.vllm import tap as tap_module  # the taps running in this process (in-process engine)

    snapshots = {id(t): t.snapshot() for t in list(tap_module._TAPS.values())}
    local = {s["pid"] for s in snapshots.values()}
    out = list(snapshots.values())
    if not private_folder(folder):
        return out
    for path in sorted(folder.glob("tap-*.json")):
        try:
            if path.stat().st_uid != os.getuid():
                continue
            data = json.loads(path.read_text(encoding="utf-8"))
            pid = int(data["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a file being replaced or not ours
        if pid in local or not _alive(pid):
            continue
        out.append(data)
    return out


class FileTapCollector(Collector):
    """Yields ``latentwatch_tap_*`` families from the taps' counter files at scrape time."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def collect(self) -> Iterator:
        taps = [SimpleNamespace(model_name=s["model_name"], stats=SimpleNamespace(**s["stats"]),
                                sink=SimpleNamespace(dropped=s.get("sink_dropped", 0)))
                for s in read_snapshots(self.folder)]
        yield from TapCollector(*taps).collect()


class LatentwatchStatLogger(StatLoggerBase):
    """Registers :class:`FileTapCollector` on the API server's registry; records nothing itself."""

    def __init__(self, vllm_config: object, engine_index: int = 0) -> None:
        global _collector
        folder = os.environ.get(STATS_DIR_ENV)
        if not configured() or not folder:
            return
        with _registered:
            if _collector is None:
                if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
                    log.warning("latentwatch: Prometheus multiprocess mode (api-server-count > 1): the tap's "
                                "counters are not added to vLLM's /metrics")
                _collector = FileTapCollector(Path(folder))
                REGISTRY.register(_collector)

    def record(self, scheduler_stats: object, iteration_stats: object, mm_cache_stats: object = None,
               engine_idx: int = 0) -> None:
        pass

    def log_engine_initialized(self) -> None:
        pass
