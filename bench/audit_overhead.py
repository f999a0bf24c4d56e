"""Audit trail cost: the sidecar's analysis throughput with the audit trail off and on.

The same in-process ``Sidecar.ingest`` path ``latentwatch serve`` uses (batches of 256), the records and
probe shapes of ``bench/analyzer_throughput.py`` (3 sites × 576 dims, 5 concepts), once without and once
with ``audit.enabled`` (checkpoints every second, on local disk). Printed: records/s both ways, their ratio
(goal >= 0.8), the audit's cost per record in µs (goal <= 50) and the trail's bytes per record, as one
JSON object on the last line.

Usage: python bench/audit_overhead.py [--quick]     (quick: 40,000 records each way; default: 400,000)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parent))
from analyzer_throughput import pack, records

from monitor.analysis.baseline import AnalyzerConfig, Baseline
from monitor.audit.trail import segments
from monitor.sidecar.service import Sidecar
from monitor.sidecar.settings import Settings


def run(settings: Settings, pool: list, n: int, batch: int = 256) -> float:
    sc = Sidecar(settings)
    fed = 0
    t0 = time.perf_counter()
    while fed < n:
        start = fed % len(pool)
        chunk = pool[start : start + batch]
        sc.ingest(chunk)
        fed += len(chunk)
    sc.close_audit()
    return fed / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    n = 40_000 if args.quick else 400_000
    rng = np.random.default_rng(0)
    probes = pack(rng)
    with tempfile.TemporaryDirectory() as tmp, threadpool_limits(1):
        folder = Path(tmp)
        (folder / "probes").mkdir()
        for p in probes.probes:
            p.save(folder / "probes" / f"{p.concept}.probe.json")
        config = AnalyzerConfig(false_alarm_every=20_000, max_calibration_evaluations=5_000)
        Baseline.build(records(3000, rng), probes, config).save(folder / "baseline.safetensors")
        pool = records(4000, rng)
        (folder / "key").write_bytes(b"bench-audit-key-0123456789abcdef")
        common = {"baseline": folder / "baseline.safetensors", "probes": folder / "probes",
                  "source": {"kind": "none"}}
        off = run(Settings(**common), pool, n)
        on = run(Settings(**common, audit={"enabled": True, "dir": folder / "audit",
                                           "key_file": folder / "key"}), pool, n)
        trail_bytes = sum(p.stat().st_size for p in segments(folder / "audit"))
    result = {"records": n, "records_per_s_audit_off": round(off), "records_per_s_audit_on": round(on),
              "throughput_ratio": round(on / off, 3), "audit_us_per_record": round((1 / on - 1 / off) * 1e6, 1),
              "audit_bytes_per_record": round(trail_bytes / n, 1)}
    print(f"{off:,.0f} records/s without the audit trail, {on:,.0f} with ({on / off:.0%})")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
