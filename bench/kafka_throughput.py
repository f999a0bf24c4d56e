"""End-to-end Kafka throughput: KafkaSink -> broker -> `latentwatch serve` replicas (analyzed), 3 sites x 576 dims.

Setup: a real Kafka-protocol broker (tansu, loopback), a topic with 4 partitions, one or two sidecar
processes (`latentwatch serve`, Kafka source, one consumer group) with a calibrated baseline and the
built-in pack's probe shapes (5 concepts), and records shaped like SmolLM2's (3 residual sites x 576
dims: mean, last, norm; float16 on the wire, ~7 KB each, lz4).

What is timed: records are written through the tap's :class:`~collectors.kafka_sink.KafkaSink` (the
same encode/produce path the tap's worker uses) as fast as it takes them, while the sidecars consume.
The model's forward pass is not in the loop: SmolLM2 on this CPU yields a few dozen records/s, far
below what the transport carries, so a tap in front would measure the model, not the transport.
Figures:

* ``produce_records_per_s``: records the sink hands to the broker per second (acked);
* ``records_per_s_N_replicas``: records analyzed by N sidecars together per second, from the first
  write until every record is accounted (``latentwatch_records_received_total`` summed);
* ``records_per_s_per_replica_N_replicas``: the same divided by N (goal: >= 5,000 on this machine).

Everything (broker, producer, N sidecars) shares this machine's 2 cores.

Usage: python bench/kafka_throughput.py [--quick] [--records N]
Last line of output: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np
from prometheus_client.parser import text_string_to_metric_families
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.analyzer_throughput import pack, records  # noqa: E402
from collectors.kafka_sink import KafkaConnection, KafkaSink  # noqa: E402
from monitor.baseline import AnalyzerConfig, Baseline  # noqa: E402
from tests.kafka_broker import Broker, free_port  # noqa: E402


def scrape(port: int) -> dict[str, float]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except OSError:
        return {}
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name in ("latentwatch_records_received_total", "latentwatch_kafka_assigned_partitions"):
                out[s.name] = out.get(s.name, 0.0) + s.value
    return out


def start_sidecars(n: int, folder: Path, broker: Broker, topic: str) -> list[tuple[subprocess.Popen, int]]:
    group = f"bench-{uuid.uuid4().hex[:8]}"
    procs = []
    for i in range(n):
        port = free_port()
        cfg = {"baseline": str(folder / "baseline.safetensors"), "probes": str(folder / "probes"), "port": port,
               "log_format": "text", "source": {"kind": "kafka", "kafka": {
                   "bootstrap_servers": broker.bootstrap, "topic": topic, "group_id": group,
                   "session_timeout_ms": 6000, "heartbeat_interval_ms": 2000}}}
        path = folder / f"sidecar-{n}-{i}.yaml"
        path.write_text(json.dumps(cfg))
        log = (folder / f"sidecar-{n}-{i}.log").open("w")
        procs.append((subprocess.Popen([sys.executable, "-m", "monitor", "serve", "-c", str(path)], stdout=log,
                                       stderr=subprocess.STDOUT), port))
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:  # wait until the group is stable: every member owns partitions
        owned = [scrape(port).get("latentwatch_kafka_assigned_partitions", 0) for _, port in procs]
        if sum(owned) == 4 and all(owned):
            return procs
        time.sleep(0.2)
    raise RuntimeError(f"consumer group did not settle; logs in {folder}")


def run(n_replicas: int, pool: list, total: int, folder: Path, broker: Broker) -> dict[str, float]:
    topic = broker.create_topic(partitions=4)
    procs = start_sidecars(n_replicas, folder, broker, topic)
    try:
        sink = KafkaSink(KafkaConnection(bootstrap_servers=broker.bootstrap, topic=topic), key_by="none",
                         buffer_bytes=256 << 20)
        assert sink.connected.wait(30), sink.last_error
        t0 = time.perf_counter()
        for i in range(total):
            rec = pool[i % len(pool)]
            rec.meta = {"replica": f"pod-{i % 4}"}
            sink.write(rec)
        sink.flush()
        produced = time.perf_counter() - t0
        assert sink.acked == total, sink.stats()
        while True:
            done = sum(scrape(port).get("latentwatch_records_received_total", 0) for _, port in procs)
            if done >= total:
                break
            if time.perf_counter() - t0 > 600:
                raise RuntimeError(f"only {done} of {total} records analyzed after 600 s")
            time.sleep(0.05)
        elapsed = time.perf_counter() - t0
        sink.close()
    finally:
        for proc, _ in procs:
            proc.terminate()
            proc.wait(30)
    rate = total / elapsed
    return {"produce_records_per_s": total / produced, f"records_per_s_{n_replicas}_replicas": rate,
            f"records_per_s_per_replica_{n_replicas}_replicas": rate / n_replicas}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--records", type=int, default=None)
    args = ap.parse_args()
    total = args.records or (20_000 if args.quick else 100_000)
    rng = np.random.default_rng(0)
    probes = pack(rng)
    result: dict[str, float | int] = {"records": total, "sites": 3, "dim": 576, "partitions": 4}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        with threadpool_limits(1):
            config = AnalyzerConfig(false_alarm_every=20_000, max_calibration_evaluations=2_000)
            Baseline.build(records(2000, rng), probes, config).save(folder / "baseline.safetensors")
        (folder / "probes").mkdir()
        for p in probes.probes:
            p.save(folder / "probes" / f"{p.concept}.probe.json")
        pool = records(2000, rng)
        broker = Broker().start()
        try:
            for n in (1, 2):
                figures = run(n, pool, total, folder, broker)
                result[f"produce_records_per_s_{n}_replicas"] = round(figures.pop("produce_records_per_s"))
                result.update({k: round(v) for k, v in figures.items()})
                print(f"{n} sidecar replica(s): {figures[f'records_per_s_{n}_replicas']:,.0f} records/s analyzed "
                      f"end to end ({figures[f'records_per_s_per_replica_{n}_replicas']:,.0f} per replica)")
        finally:
            broker.kill()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
