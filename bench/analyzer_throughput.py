"""Analyzer throughput and memory: records/s on one core, peak RSS after 1 and 10 million records.

Records carry 3 residual sites × 576 dims (SmolLM2's width) with mean/last/norm arrays; probes are the
built-in pack's shapes (5 concepts; the cached pack when it exists, random weights otherwise -- the
cost depends only on shapes). Detectors: the default set (KS on probe scores and norms, concept
rates, MMD, mean shift and PCA error per site). Records are generated once (a pool of 4,000 Gaussian
records) and fed repeatedly in batches of 256: what is timed is validation, signal extraction, probe
scoring, transforms, ring buffers and evaluations -- the analyzer, not record generation.

Usage: python bench/analyzer_throughput.py [--quick]   (quick: 0.1 and 1 million records)
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import numpy as np
from threadpoolctl import threadpool_limits

from collectors.record import Record
from monitor.analysis.analyzer import Analyzer
from monitor.analysis.baseline import AnalyzerConfig, Baseline
from monitor.probes.probe import Probe, ProbeSet

SITES = ["layers.9.resid", "layers.19.resid", "layers.29.resid"]
D = 576
FP = "sha256:bench"


def records(n: int, rng: np.random.Generator) -> list[Record]:
    return [Record(model="bench", fingerprint=FP, key=f"{i:032x}", n_tokens=32, sites={
        s: {"mean": rng.normal(size=D).astype(np.float32), "last": rng.normal(size=D).astype(np.float32),
            "norm": np.abs(rng.normal(20, 2, size=2)).astype(np.float32)} for s in SITES}) for i in range(n)]


def pack(rng: np.random.Generator) -> ProbeSet:
    names = ["prompt_injection", "insult", "negative_sentiment", "non_english", "health_topic"]
    return ProbeSet([Probe(n, SITES[i % 3], "mean", (rng.normal(size=D) * 0.05).astype(np.float32), -1.0, "bench",
                           FP) for i, n in enumerate(names)])


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    checkpoints = (100_000, 1_000_000) if args.quick else (1_000_000, 10_000_000)
    rng = np.random.default_rng(0)
    probes = pack(rng)
    with threadpool_limits(1):
        config = AnalyzerConfig(false_alarm_every=20_000, max_calibration_evaluations=5_000)
        base = Baseline.build(records(3000, rng), probes, config)
        pool = records(4000, rng)
        analyzer = Analyzer(base, probes)
        batch = 256
        fed = 0
        result: dict[str, float | int | str] = {"detectors": len(base.slots), "sites": len(SITES), "dim": D,
                                                "probes": len(probes.concepts), "batch": batch}
        rss_start = rss_mib()
        t0 = time.perf_counter()
        for target in checkpoints:
            while fed < target:
                start = fed % len(pool)
                chunk = pool[start : start + batch]
                analyzer.update(chunk)
                fed += len(chunk)
            elapsed = time.perf_counter() - t0
            label = f"{target // 1_000_000}m" if target >= 1_000_000 else f"{target // 1000}k"
            result[f"records_per_s_after_{label}"] = round(fed / elapsed)
            result[f"peak_rss_mib_after_{label}"] = round(rss_mib(), 1)
        result["records_per_s"] = round(fed / (time.perf_counter() - t0))
        result["rss_growth_mib"] = round(rss_mib() - rss_start, 1)
        result["evaluations"] = analyzer.stats.evaluations_total
    print(f"{result['records_per_s']:,} records/s; peak RSS {rss_start:.0f} -> {rss_mib():.0f} MiB "
          f"over {fed:,} records")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
