"""Honest counters: tap counters exported by the serving process itself; counters in records survive a
tap restart; stale replicas expire; a record from the future does not pin the lag."""

from __future__ import annotations

import time

import numpy as np
import torch
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from collectors import QueueSink, Tap
from collectors.metrics import TapCollector
from monitor.sidecar.service import Sidecar
from monitor.sidecar.settings import Settings
from tests.test_analyzer import make_records
from tests.test_sidecar import make_artifacts, wait_for


def scrape(registry: CollectorRegistry) -> dict[tuple[str, tuple], float]:
    out = {}
    for fam in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_the_serving_process_exports_the_taps_counters():
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    tap = Tap(net, ["1"], sink=QueueSink(), sample_rate=1.0, model_name="tiny", salt=b"salt-for-tests")
    registry = CollectorRegistry()
    registry.register(TapCollector(tap))
    with tap, torch.no_grad():
        with tap.request(keys=[f"r{i}" for i in range(5)]):
            net(torch.randn(5, 6, 4))
        tap.flush()
    m = scrape(registry)
    assert m[("latentwatch_tap_requests_sampled_total", (("model_name", "tiny"),))] == 5
    assert m[("latentwatch_tap_records_emitted_total", (("model_name", "tiny"),))] == 5
    assert m[("latentwatch_tap_process_dropped_total", (("model_name", "tiny"), ("stage", "queue")))] == 0


def test_record_counters_survive_tap_restarts_and_replicas_expire(tmp_path):
    art = make_artifacts(tmp_path)
    sc = Sidecar(Settings(baseline=art / "baseline.safetensors", probes=art / "probes",
                          source={"kind": "none"}, replica_ttl_seconds=1.0))
    recs = make_records(6, np.random.default_rng(0))
    now = time.time()
    for r, dropped in zip(recs, [5, 10, 2, 3, 3, 7], strict=True):  # the tap restarted after 10
        r.meta = {"replica": "pod-a", "tap_dropped": str(dropped), "tap_sampled": str(dropped * 10)}
        r.ts = now
    recs[-1].ts = now + 86400  # a skewed clock: a day in the future
    for r in recs:
        sc.ingest([r])
    m = scrape(sc.registry)
    dropped = m[("latentwatch_tap_dropped_total", (("model_name", "m"), ("replica", "pod-a"), ("stage", "queue")))]
    assert dropped == 10 + 3 + 4  # 5 -> 10, restart, 2 -> 3 -> 3 -> 7
    assert sc.last_record_ts <= time.time()
    assert m[("latentwatch_analyzer_lag_seconds", (("model_name", "m"),))] >= 0
    wait_for(lambda: not any(k[0] == "latentwatch_tap_dropped_total" and ("replica", "pod-a") in k[1]
                             for k in scrape(sc.registry)), timeout=10, what="pod-a expired")
