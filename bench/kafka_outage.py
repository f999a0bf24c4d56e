"""Forward latency of SmolLM2 with a Kafka-backed tap while the broker is up vs killed.

Rounds alternate: the broker (tansu, loopback) up, N forwards; the broker killed, N forwards; the
broker started again on the same address (topic created again: in-memory storage). The tap samples
every request (3 residual sites) into a :class:`~collectors.kafka_sink.KafkaSink` with a small
buffer, so during the outage its buffer fills and records are dropped and counted. The model runs on
one thread. Per phase: median wall time of a forward, median CPU time of the calling thread
(steadier on a shared machine), and the tap's hook time per forward (``TapStats.hook_seconds``).
Ratios are the median over rounds of (broker down / broker up) of the same round.

Usage: python bench/kafka_outage.py [--quick] [--rounds N] [--forwards N]
Last line of output: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from collectors import Tap
from collectors import models as zoo
from collectors.kafka_sink import KafkaConnection, KafkaSink
from monitor.probes import corpora
from tests.kafka_broker import Broker

SITES = ["layers.9.resid", "layers.19.resid", "layers.29.resid"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--forwards", type=int, default=None)
    args = ap.parse_args()
    rounds = args.rounds or (3 if args.quick else 8)
    forwards = args.forwards or (6 if args.quick else 12)
    torch.set_num_threads(1)
    lm = zoo.load("smollm2")
    texts = [t.text for t in corpora.sample(corpora.tweets(), 4, seed=0)]
    batch = lm.tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=48)
    broker = Broker().start()
    topic = broker.create_topic(partitions=1)
    sink = KafkaSink(KafkaConnection(bootstrap_servers=broker.bootstrap, topic=topic), buffer_bytes=256 << 10,
                     delivery_timeout_ms=5_000, flush_timeout_s=1)
    assert sink.connected.wait(30), sink.last_error
    tap = Tap(lm.model, SITES, sink=sink, sample_rate=1.0, queue_size=64).attach()

    def phase() -> tuple[float, float, float]:
        walls, cpus = [], []
        hooks0 = tap.stats.hook_seconds
        for _ in range(forwards):
            w, c = time.perf_counter(), time.thread_time()
            with torch.no_grad():
                lm.model(**batch)
            walls.append(time.perf_counter() - w)
            cpus.append(time.thread_time() - c)
        return statistics.median(walls), statistics.median(cpus), (tap.stats.hook_seconds - hooks0) / forwards

    for _ in range(2):  # warm-up
        with torch.no_grad():
            lm.model(**batch)
    up, down = [], []
    try:
        for _ in range(rounds):
            up.append(phase())
            tap.flush(30)
            broker.kill()
            down.append(phase())
            tap.flush(30)
            broker.start()
            broker.create_topic(topic, partitions=1)
        tap.flush(30)
        sink.flush()
    finally:
        tap.detach()
        sink.close()
        broker.kill()
    result = {
        "rounds": rounds, "forwards_per_phase": forwards, "batch": len(texts),
        "forward_ms_broker_up": round(1000 * statistics.median(u[0] for u in up), 2),
        "forward_ms_broker_down": round(1000 * statistics.median(d[0] for d in down), 2),
        "wall_ratio_down_over_up": round(statistics.median(d[0] / u[0] for u, d in zip(up, down, strict=True)), 4),
        "cpu_ratio_down_over_up": round(statistics.median(d[1] / u[1] for u, d in zip(up, down, strict=True)), 4),
        "hook_ms_per_forward_up": round(1000 * statistics.median(u[2] for u in up), 3),
        "hook_ms_per_forward_down": round(1000 * statistics.median(d[2] for d in down), 3),
        "records_emitted": tap.stats.records_emitted, "records_acked": sink.acked, "records_dropped": sink.dropped,
        "tap_queue_drops": tap.stats.dropped_queue_full,
    }
    print(f"forward {result['forward_ms_broker_up']} ms with the broker up, {result['forward_ms_broker_down']} ms "
          f"with it down (ratio {result['wall_ratio_down_over_up']}, CPU ratio {result['cpu_ratio_down_over_up']}); "
          f"{sink.dropped} of {tap.stats.records_emitted} records dropped and counted")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
