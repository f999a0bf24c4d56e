"""Signatures scored per second on one core by the built-in concept pack.

Uses the cached built-in pack of SmolLM2 when it exists (``latentwatch probes train --builtin``);
otherwise probes with the same sites, dimensions and count but random weights (scoring cost depends
only on shapes) -- the JSON says which. Two paths are timed:

* ``records_per_s``: from decoded :class:`~collectors.record.Record` objects (what the sidecar does:
  gather each site's vectors, then one matrix product per site);
* ``matrix_records_per_s``: from ready ``[n, d]`` arrays (the matrix products alone).

Usage: python bench/probe_scoring.py [--quick] [--n 20000]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
from threadpoolctl import threadpool_limits

from collectors.record import Record
from monitor.probes.probe import Probe, ProbeError, ProbeSet


def builtin_or_random(d: int = 576) -> tuple[ProbeSet, str]:
    from collectors.models import cache_dir

    root = cache_dir() / "probes"
    for folder in sorted(root.glob("sha256-*")) if root.exists() else []:
        try:
            return ProbeSet.load_dir(folder), "builtin"
        except ProbeError:
            continue
    rng = np.random.default_rng(0)
    sites = ["layers.9.resid", "layers.19.resid", "layers.29.resid", "layers.9.resid", "layers.19.resid"]
    names = ["prompt_injection", "insult", "negative_sentiment", "non_english", "health_topic"]
    probes = [Probe(n, s, "mean", rng.normal(size=d).astype(np.float32), 0.0, "m", "sha256:x")
              for n, s in zip(names, sites, strict=True)]
    return ProbeSet(probes), "random-weights-builtin-shapes"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--n", type=int, default=50_000, help="records per timed batch")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    if args.quick:
        args.n, args.repeats = 20_000, 5
    probe_set, kind = builtin_or_random()
    d = probe_set.probes[0].dim
    rng = np.random.default_rng(1)
    sites = sorted(probe_set.needs())
    records = [
        Record(model="m", fingerprint="f", key=f"{i:032x}", n_tokens=10,
               sites={s: {"mean": rng.normal(size=d).astype(np.float32), "last": rng.normal(size=d).astype(np.float32)}
                      for s in sites})
        for i in range(args.n)
    ]
    feats = {(s, p): np.stack([r.sites[s][p] for r in records])
             for s, pools in probe_set.needs().items() for p in pools}
    with threadpool_limits(1):
        probe_set.score(records[:100])
        rec_times, mat_times = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            probe_set.score(records)
            rec_times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            probe_set.score_features(feats)
            mat_times.append(time.perf_counter() - t0)
    result = {
        "probes": kind,
        "n_probes": len(probe_set.probes),
        "n_sites": len(sites),
        "dim": d,
        "records_per_s": round(args.n / min(rec_times)),
        "matrix_records_per_s": round(args.n / min(mat_times)),
        "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE", ""),
    }
    print(f"{result['records_per_s']:,} records/s from Record objects, "
          f"{result['matrix_records_per_s']:,} from arrays ({len(probe_set.probes)} probes, {kind})")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
