"""False-alarm rate and detection delay on real text through the real model (SmolLM2 + the tap).

(a) No shift: a baseline from one half of a source (tweets), then many streams resampled from the
    *other* half. The measured records between false alarms (all detectors together) is compared
    with the budget the baseline was calibrated for.
(b) Real shifts: streams that switch from the baseline source to another after a warm-up -- tweets ->
    drug reviews, tweets -> in-the-wild jailbreak prompts, English dialog -> French dialog (a baseline
    of English dialog) -- and a gradual mix of 0 % -> 30 % drug reviews. For each detector: the
    median delay (records after the switch until it is in alarm) over repeated streams, or "-" if it
    was in alarm after the switch in fewer than half of them.

Records are computed once per text and cached under the latentwatch cache folder (the first run
spends a few minutes in the model). Probes: the cached built-in pack when its fingerprint matches.

Usage: python bench/detection.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from collectors import models as zoo
from collectors.fingerprint import fingerprint
from collectors.record import Record
from monitor.analysis.analyzer import Analyzer
from monitor.analysis.baseline import AnalyzerConfig, Baseline
from monitor.probes import corpora
from monitor.probes.activations import cached_records
from monitor.probes.probe import ProbeError, ProbeSet
from monitor.probes.train import pack_dir


def run_stream(base: Baseline, probes: ProbeSet | None, stream: list[Record], after: int | None = None):
    """Run a stream; with ``after``, also the first record index > ``after`` at which each detector is in alarm."""
    analyzer = Analyzer(base, probes, log_alarms=False)  # alarms are counted, not printed
    first: dict[str, int] = {}
    step = base.config.stride if after is not None else 500
    for i in range(0, len(stream), step):
        analyzer.update(stream[i : i + step])
        seen = min(len(stream), i + step)
        if after is not None and seen > after:
            for st in analyzer.states:
                if st.alarm:
                    first.setdefault(st.slot.name, seen)
    return analyzer, first


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    # calibration holds when the baseline is >= ~100 windows long (docs/analyzer.md); quick mode is smaller
    n_half, n_shift, max_length = (300, 120, 48) if args.quick else (5000, 500, 48)
    window, stride, ert = (20, 5, 200) if args.quick else (50, 10, 1000)
    noshift_records = 40_000 if args.quick else 200_000
    repeats = 5 if args.quick else 20
    t0 = time.perf_counter()
    lm = zoo.load("smollm2")
    fp = fingerprint(lm.model)
    sites = ["layers.9.resid", "layers.19.resid", "layers.29.resid", "layers.29.attn"]
    try:
        probes = ProbeSet.load_dir(pack_dir(fp), fingerprint=fp)  # the full-size built-in pack
        probe_kind = f"built-in pack ({len(probes.concepts)} concepts)"
    except ProbeError:
        probes, probe_kind = None, "none (train the built-in pack for concept detectors)"

    tweets = [t.text for t in corpora.sample(corpora.tweets(), 2 * n_half, seed=0)]
    english = [t.text for t in corpora.sample(corpora.dialog("english"), 2 * n_half, seed=0)]
    shifts = {
        "tweets->drug_reviews": ("tweets", [t.text for t in corpora.sample(corpora.drug_reviews(), n_shift, 1)]),
        "tweets->jailbreaks": ("tweets", [t.text for t in corpora.sample(corpora.jailbreaks(), n_shift, 1)]),
        "english->french_dialog": ("english", [t.text for t in corpora.sample(corpora.dialog("french"), n_shift, 1)]),
    }
    recs = {
        "tweets": cached_records(lm, tweets, sites, "tweets", max_length=max_length),
        "english": cached_records(lm, english, sites, "english-dialog", max_length=max_length),
    }
    for name, (_, texts) in shifts.items():
        recs[name] = cached_records(lm, texts, sites, name.split("->")[1], max_length=max_length)
    model_seconds = time.perf_counter() - t0

    config = AnalyzerConfig(window=window, stride=stride, false_alarm_every=ert)
    rng = np.random.default_rng(0)
    halves = {src: min(n_half, len(recs[src]) // 2) for src in ("tweets", "english")}  # 1,874 dialog lines
    result: dict = {"probes": probe_kind, "window": window, "stride": stride,
                    "target_records_between_false_alarms": ert}
    bases = {}
    for src, half in halves.items():
        bases[src] = Baseline.build(recs[src][:half], probes, config)

    # (a) no shift: resampled streams from the half the baseline never saw
    half_b = recs["tweets"][halves["tweets"] :]
    alarms = 0
    fed = 0
    while fed < noshift_records:
        stream = [half_b[i] for i in rng.integers(0, len(half_b), size=5000)]
        analyzer, _ = run_stream(bases["tweets"], probes, stream)
        alarms += sum(s.alarms_total for s in analyzer.states)
        fed += len(stream)
    measured = fed / max(1, alarms)
    result["noshift_records"] = fed
    result["noshift_false_alarms"] = alarms
    result["measured_records_between_false_alarms"] = round(measured, 1)
    result["false_alarm_ratio_measured_to_target"] = round(measured / ert, 3)

    # (b) shifts: warm up on the baseline source's unseen half, then switch at record `warm`
    warm = window
    delays: dict[str, dict[str, int | None]] = {}
    scenarios = {name: (src, recs[name]) for name, (src, _) in shifts.items()}
    scenarios["tweets->30%_drug_reviews_gradual"] = ("tweets", recs["tweets->drug_reviews"])
    for name, (src, new) in scenarios.items():
        pool = recs[src][halves[src] :]
        per_detector: dict[str, list[int]] = {}
        length = max(200, 4 * window)
        for _ in range(repeats):
            before = [pool[i] for i in rng.integers(0, len(pool), size=warm)]
            if "gradual" in name:
                mix = np.linspace(0, 0.3, length)
                after = [new[rng.integers(len(new))] if rng.random() < p else pool[rng.integers(len(pool))]
                         for p in mix]
            else:
                after = [new[i] for i in rng.integers(0, len(new), size=length)]
            _, first = run_stream(bases[src], probes, before + after, after=warm)
            for det, at in first.items():
                per_detector.setdefault(det, []).append(at - warm)
        delays[name] = {det: int(statistics.median(v)) for det, v in sorted(per_detector.items())
                        if len(v) >= repeats // 2}
    result["median_delay_records"] = delays
    result["seconds"] = round(time.perf_counter() - t0, 1)
    result["model_seconds"] = round(model_seconds, 1)

    print(f"(a) no shift: {alarms} false alarms in {fed:,} records -> one per {measured:,.0f} "
          f"(target {ert:,}; ratio {measured / ert:.2f})")
    print("(b) median records after the shift until in alarm (detectors in alarm in >= half the runs):")
    dets = sorted({d for v in delays.values() for d in v})
    print(f"{'detector':<28}" + "".join(f"{n[:22]:>24}" for n in delays))
    for d in dets:
        print(f"{d:<28}" + "".join(f"{delays[n].get(d, '-')!s:>24}" for n in delays))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
