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

* ``produce_records_per_s_N_replicas``: records one sink (one tap's worker thread) gets acked per
  second, sidecars paused;
* ``drain_records_per_s_per_replica_N_replicas``: a backlog of ``--records`` written while the N
  sidecars were paused (SIGSTOP; the group's session timeout outlasts it), then resumed: records
  analyzed per second per replica until all are accounted (``latentwatch_records_received_total``
  summed) -- the monitor's capacity (goal: >= 5,000 per replica on this machine);
* ``end_to_end_records_per_s_N_replicas``: then the same number written while the sidecars run:
  records per second from the first write until all are analyzed, producer and sidecars sharing
  the CPU.
* ``drain_sidecar_cpu_share_N`` / ``drain_broker_cpu_share_N``: cores used per sidecar and by the
  broker while draining (1.0 = one core busy), to see which part the 2 cores run out for.

Everything (broker, producer, N sidecars) shares this machine's 2 cores.

Usage: python bench/kafka_throughput.py [--quick] [--records N]
Last line of output: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
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
from bench.analyzer_throughput import pack, records
from collectors.kafka_sink import KafkaConnection, KafkaSink
from monitor.analysis.baseline import AnalyzerConfig, Baseline
from tests.kafka_broker import Broker, free_port


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
                   "session_timeout_ms": 20000, "heartbeat_interval_ms": 2000}}}
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


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def received(procs: list[tuple[subprocess.Popen, int]]) -> float:
    return sum(scrape(port).get("latentwatch_records_received_total", 0) for _, port in procs)


def wait_received(procs: list[tuple[subprocess.Popen, int]], target: float, t0: float) -> float:
    while (done := received(procs)) < target:
        if time.perf_counter() - t0 > 600:
            raise RuntimeError(f"only {done} of {target} records analyzed after 600 s")
        time.sleep(0.1)
    return time.perf_counter()


def write(sink: KafkaSink, pool: list, total: int) -> float:
    t0 = time.perf_counter()
    for i in range(total):
        rec = pool[i % len(pool)]
        rec.meta = {"replica": f"pod-{i % 4}"}
        sink.write(rec)
    sink.flush()
    return time.perf_counter() - t0


def run(n_replicas: int, pool: list, total: int, folder: Path, broker: Broker) -> dict[str, float]:
    """Two phases: drain a backlog (sidecars paused while it is written), then produce while consuming."""
    topic = broker.create_topic(partitions=4)
    procs = start_sidecars(n_replicas, folder, broker, topic)
    sink = KafkaSink(KafkaConnection(bootstrap_servers=broker.bootstrap, topic=topic), key_by="none",
                     buffer_bytes=256 << 20)
    try:
        assert sink.connected.wait(30), sink.last_error
        for proc, _ in procs:
            proc.send_signal(signal.SIGSTOP)  # the group stays settled: the session timeout is longer
        produced = write(sink, pool, total)
        assert sink.acked == total, sink.stats()
        t0 = time.perf_counter()
        cpu0 = [cpu_seconds(p.pid) for p, _ in procs] + [cpu_seconds(broker.proc.pid)]
        for proc, _ in procs:
            proc.send_signal(signal.SIGCONT)
        drained = wait_received(procs, total, t0) - t0
        cpu = [b - a for a, b in zip(cpu0, [cpu_seconds(p.pid) for p, _ in procs] + [cpu_seconds(broker.proc.pid)],
                                      strict=True)]
        t0 = time.perf_counter()
        write(sink, pool, total)
        both = wait_received(procs, 2 * total, t0) - t0
    finally:
        sink.close()
        for proc, _ in procs:
            proc.send_signal(signal.SIGCONT)
            proc.terminate()
            proc.wait(30)
    return {"produce_records_per_s": total / produced,
            f"drain_records_per_s_per_replica_{n_replicas}_replicas": total / drained / n_replicas,
            f"end_to_end_records_per_s_{n_replicas}_replicas": total / both,
            f"drain_sidecar_cpu_share_{n_replicas}_replicas": sum(cpu[:-1]) / drained / n_replicas,
            f"drain_broker_cpu_share_{n_replicas}_replicas": cpu[-1] / drained}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--records", type=int, default=None)
    args = ap.parse_args()
    total = args.records or (10_000 if args.quick else 100_000)
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
                result.update({k: round(v, 2) if "cpu_share" in k else round(v) for k, v in figures.items()})
                print(f"{n} sidecar replica(s): backlog drained at "
                      f"{figures[f'drain_records_per_s_per_replica_{n}_replicas']:,.0f} records/s per replica; "
                      f"{figures[f'end_to_end_records_per_s_{n}_replicas']:,.0f} records/s end to end while "
                      f"producing; sink alone {result[f'produce_records_per_s_{n}_replicas']:,} records/s")
        finally:
            broker.kill()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
