"""False-alarm rate on held-out *documents* and detection delay on real shifts, through SmolLM2 and the tap.

Real traffic comes in groups (documents, sessions, tenants, hours). This bench builds each baseline
from some groups of a source and streams *other groups of the same source* (no drift at all), groups
one after another, and reports the observed false alarms against the budget (ratio 1 = as stated;
above 1 = more false pages than promised). Sources with document structure (``../shared/DATA.md``):

* ``sotu`` -- State of the Union addresses, one group per address (all 233, up to 20 chunks of ~400 characters
  each; quick: 24 of them);
* ``tweets`` -- tweets in blocks of 40 consecutive rows (60 blocks) of the corpus, which concatenates its
  sub-corpora (airlines, driverless cars, Apple, ...), so a block is one topic;
* ``dialog`` -- English chatterbot dialog, one group per topic file.

For each source the groups are split in halves (baseline / live) three times; each split is
calibrated with ``group_by: meta:doc`` and, for comparison, with ``group_by: record`` (the old
design), for the demo configuration (window 30, stride 5, 1 per 5,000) and the CLI defaults (window
200, stride 50, 1 per 20,000). Then real shifts (a baseline of tweets -> drug reviews, jailbreaks, a
gradual 0 -> 30 % mix of drug reviews; English -> French dialog) give the median delay per detector,
and synthetic streams the out-of-subspace and mixture cases and the analyzer's per-record cost.

Records are computed once per text and cached under the latentwatch cache folder (the first run
spends ~15 minutes in the model). Probes: the cached built-in pack when it exists for this model.

The no-shift streams are whole live groups in random order, evaluated every ``stride`` records by the
final detectors at their thresholds; by default vectorised (``calibration.simulate``, 60,000
evaluations per split), with ``--replay`` record by record through the Analyzer (the same streams, ~10x
slower). Probe-score detectors take part only when the built-in pack is cached (``probes`` in the output).

Usage: python bench/detection.py [--quick] [--sources sotu,tweets] [--configs demo] [--splits 3]
       [--group-by meta:doc,record] [--no-shifts] [--replay]
       (quick: one source, one split, the demo config only, calibration resting on 40 simulated alarms
       instead of 150)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from collectors import models as zoo
from collectors.fingerprint import fingerprint
from collectors.record import Record
from monitor.analysis import calibration, signals
from monitor.analysis.analyzer import Analyzer
from monitor.analysis.arrays import ArrayMonitor
from monitor.analysis.baseline import AnalyzerConfig, Baseline
from monitor.probes import corpora
from monitor.probes.activations import cached_records
from monitor.probes.corpora import Text
from monitor.probes.probe import ProbeError, ProbeSet
from monitor.probes.train import pack_dir

SITES = ["layers.9.resid", "layers.19.resid", "layers.29.resid", "layers.29.attn"]
MAX_TOKENS = 48
CONFIGS = {"demo": (30, 5, 5000), "cli_defaults": (200, 50, 20_000)}


def documents(quick: bool) -> dict[str, list[tuple[str, list[str]]]]:
    """Per source: ``[(group name, texts in order)]``."""
    rng = np.random.default_rng(0)
    out: dict[str, list[tuple[str, list[str]]]] = {}
    by_address: dict[str, list[str]] = {}
    for t in corpora.sotu():
        by_address.setdefault(f"{t.labels['year']} {t.labels['president']}", []).append(t.text)
    names = sorted(by_address)
    n_docs, per_doc = (24, 25) if quick else (len(names), 20)
    pick = rng.choice(len(names), size=n_docs, replace=False)
    out["sotu"] = [(names[i], by_address[names[i]][:per_doc]) for i in sorted(pick)]
    if not quick:
        tweets = [t.text for t in corpora.tweets()]
        blocks = [tweets[i : i + 40] for i in range(0, len(tweets) - 40, 40)]
        pick = rng.choice(len(blocks), size=60, replace=False)
        out["tweets"] = [(f"block{i}", blocks[i]) for i in sorted(pick)]
        topics: dict[str, list[str]] = {}
        for t in corpora.dialog("english"):
            topics.setdefault(t.labels["topic"], []).append(t.text)
        out["dialog"] = sorted(topics.items())
    return out


def as_group(recs: list[Record], group: str) -> list[Record]:
    # copies: cached_records returns one shared object for a text that occurs in several groups
    return [dataclasses.replace(r, meta={**r.meta, "doc": group}) for r in recs]


def grouped_records(lm, name: str, docs: list[tuple[str, list[str]]]) -> list[list[Record]]:
    texts = [t for _, ts in docs for t in ts]
    recs = cached_records(lm, texts, SITES, f"bench-{name}", max_length=MAX_TOKENS)
    out, i = [], 0
    for group, ts in docs:
        out.append(as_group(recs[i : i + len(ts)], group))
        i += len(ts)
    return out


def false_alarm_ratio(base: Baseline, probes: ProbeSet | None, live: list[list[Record]], ert: float,
                      rng: np.random.Generator, records: int) -> tuple[float, int, int]:
    """Observed / budgeted false alarms on streams of the live groups in random order (whole groups)."""
    alarms = fed = 0
    while fed < records:
        analyzer = Analyzer(base, probes, log_alarms=False)
        for g in rng.permutation(len(live)):
            for i in range(0, len(live[g]), 64):
                alarms += len(analyzer.update(live[g][i : i + 64]))
            fed += len(live[g])
    return alarms / (fed / ert), alarms, fed


def simulated_false_alarm_ratio(base: Baseline, probes: ProbeSet | None, live: list[list[Record]], ert: float,
                                seed: int, evaluations: int = 60_000) -> tuple[float, int, int, dict[str, int], int]:
    """The same measurement as :func:`false_alarm_ratio`, vectorised: the final detectors at their thresholds
    along streams of whole live groups in random order (``calibration.simulate``), alarms = upward crossings
    (summed over detectors, what the budget counts). Also: per live group, the alarms raised while it held
    most of the window; and the monitor-level episodes (some detector starts firing while none was)."""
    recs = [r for g in live for r in g]
    groups = np.concatenate([np.full(len(g), i) for i, g in enumerate(live)])
    sig = signals.extract(recs, base.shapes, probes)
    pools = [slot.detector.transform(sig[slot.family]) for slot in base.slots]
    sim = calibration.simulate([slot.detector for slot in base.slots], pools, window=base.config.window,
                               stride=base.config.stride, evaluations=evaluations, seed=seed, groups=groups)
    exceed = sim.stats > np.array([slot.threshold for slot in base.slots])
    starts = calibration.alarm_starts(exceed)
    alarms = int(starts.sum())
    episodes = int(calibration.alarm_starts(exceed.any(axis=2, keepdims=True)).sum())
    by_group: dict[str, int] = {}
    for s, e, _ in zip(*np.nonzero(starts), strict=True):
        window_groups = groups[sim.rows[s, e * sim.stride : e * sim.stride + sim.window]]
        name = live[int(np.bincount(window_groups).argmax())][0].meta["doc"]
        by_group[name] = by_group.get(name, 0) + 1
    fed = sim.stats.shape[0] * sim.stats.shape[1] * base.config.stride  # records between evaluations
    return alarms / (fed / ert), alarms, fed, by_group, episodes


def delays(base: Baseline, probes: ProbeSet | None, pool: list[Record], new: list[Record], rng: np.random.Generator,
           repeats: int, gradual: bool = False) -> dict[str, int]:
    window, stride = base.config.window, base.config.stride
    per: dict[str, list[int]] = {}
    length = max(200, 4 * window)
    for _ in range(repeats):
        before = [pool[i] for i in rng.integers(0, len(pool), size=window)]
        if gradual:
            mix = np.linspace(0, 0.3, length)
            after = [new[rng.integers(len(new))] if rng.random() < p else pool[rng.integers(len(pool))] for p in mix]
        else:
            after = [new[i] for i in rng.integers(0, len(new), size=length)]
        analyzer = Analyzer(base, probes, log_alarms=False)
        stream, first = before + after, {}
        for i in range(0, len(stream), stride):
            analyzer.update(stream[i : i + stride])
            if i + stride > window:
                for st in analyzer.states:
                    if st.alarm:
                        first.setdefault(st.slot.name, i + stride - window)
        for det, at in first.items():
            per.setdefault(det, []).append(at)
    return {d: int(statistics.median(v)) for d, v in sorted(per.items()) if len(v) >= repeats // 2}


def synthetic(quick: bool) -> dict:
    """Out-of-subspace mean shift, 10 % mixture, and the per-record cost of the analyzer on plain arrays."""
    rng = np.random.default_rng(1)
    d = 64
    scales = np.concatenate([np.linspace(6, 3, 16), np.full(d - 16, 0.5)])
    groups = np.repeat(np.arange(40), 50)
    ref = rng.normal(size=(2000, d)) * scales
    mon = ArrayMonitor(window=20, stride=5, false_alarm_every=1000, pca_components=16).fit(ref, groups)
    out: dict = {}
    shift = np.zeros(d)
    shift[16:] = 0.25  # 99.9 % of its Mahalanobis mass outside the top 16 principal directions
    far = rng.normal(size=d)
    far *= 10 / np.linalg.norm(far)
    cases = {"out_of_subspace_mean_shift": lambda n: rng.normal(size=(n, d)) * scales + shift,
             "mixture_10pct": lambda n: rng.normal(size=(n, d)) * scales
             + np.where(rng.random((n, 1)) < 0.1, rng.choice([-1.0, 1.0], size=(n, 1)) * far * scales, 0.0)}
    for name, make in cases.items():
        firsts: dict[str, list[int]] = {}
        for _ in range(5 if quick else 20):
            mon.analyzer_ = Analyzer(mon.baseline_, None, log_alarms=False)
            mon.update(rng.normal(size=(20, d)) * scales)
            x = make(200)
            for i in range(0, 200, 5):
                for ev in mon.update(x[i : i + 5]):
                    firsts.setdefault(ev.detector, []).append(i + 5)
        out[name] = {det: int(statistics.median(v)) for det, v in sorted(firsts.items()) if len(v) >= 3}
    x = rng.normal(size=(8192, d)) * scales
    for batch in (1, 5, 256):
        mon.analyzer_ = Analyzer(mon.baseline_, None, log_alarms=False)
        n = 2000 if batch == 1 else 8192
        t0 = time.perf_counter()
        for i in range(0, n, batch):
            mon.update(x[i : i + batch])
        out[f"us_per_record_window20_batch{batch}"] = round((time.perf_counter() - t0) / n * 1e6, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--splits", type=int, default=None, help="baseline/live splits of the groups (default 3; quick 1)")
    ap.add_argument("--sources", default="sotu,tweets,dialog", help="comma-separated no-shift sources")
    ap.add_argument("--configs", default="demo,cli_defaults", help="comma-separated configurations")
    ap.add_argument("--group-by", default="meta:doc,record",
                    help="calibration designs to compare (record: every record its own group, the old design)")
    ap.add_argument("--replay", action="store_true",
                    help="stream the live groups through the Analyzer record by record (slow) instead of the "
                         "vectorised simulation of the same streams")
    ap.add_argument("--no-shifts", action="store_true", help="skip the shift delays and synthetic streams")
    args = ap.parse_args()
    t0 = time.perf_counter()
    torch.set_num_threads(1)
    lm = zoo.load("smollm2")
    fp = fingerprint(lm.model)
    try:
        probes = ProbeSet.load_dir(pack_dir(fp), fingerprint=fp)
        probe_kind = f"built-in pack ({len(probes.concepts)} concepts)"
    except (ProbeError, TypeError):
        probes, probe_kind = None, "none (train the built-in pack for concept detectors)"
    wanted = set(args.sources.split(","))
    sources = {name: grouped_records(lm, name, docs) for name, docs in documents(args.quick).items()
               if name in wanted or (not args.quick and not args.no_shifts and name in ("tweets", "dialog"))}
    shifts = not (args.quick or args.no_shifts)
    shift_texts: dict[str, list[Text]] = {} if not shifts else {
        "drug_reviews": corpora.sample(corpora.drug_reviews(), 300, 1),
        "jailbreaks": corpora.sample(corpora.jailbreaks(), 300, 1),
        "french_dialog": corpora.sample(corpora.dialog("french"), 300, 1)}
    shifted = {k: cached_records(lm, [t.text for t in v], SITES, f"bench-{k}", max_length=MAX_TOKENS)
               for k, v in shift_texts.items()}
    model_seconds = time.perf_counter() - t0
    result: dict = {"probes": probe_kind, "max_tokens": MAX_TOKENS, "noshift": {}, "median_delay_records": {}}
    splits = args.splits or (1 if args.quick else 3)
    configs = {"demo": CONFIGS["demo"]} if args.quick else {c: CONFIGS[c] for c in args.configs.split(",")}
    result["measurement"] = "replay through the Analyzer" if args.replay else "vectorised simulation of the streams"
    with threadpool_limits(1):
        for name, groups in sources.items():
            if name not in wanted:
                continue
            for cname, (window, stride, ert) in configs.items():
                row: dict = {"groups": len(groups), "records": sum(map(len, groups)), "window": window,
                             "stride": stride, "target_records_between_false_alarms": ert}
                for group_by in args.group_by.split(","):
                    ratios, alarms, fed, top, episodes = [], 0, 0, [], 0
                    for split in range(splits):
                        rng = np.random.default_rng(100 + split)
                        order = rng.permutation(len(groups))
                        half = len(groups) // 2
                        base_recs = [r for i in order[:half] for r in groups[i]]
                        live = [groups[i] for i in order[half:]]
                        config = AnalyzerConfig(window=window, stride=stride, false_alarm_every=ert,
                                                group_by=group_by, seed=split,
                                                calibration_alarms=40 if args.quick else 150)
                        base = Baseline.build(base_recs, probes, config)
                        if args.replay:
                            ratio, a, f = false_alarm_ratio(base, probes, live, ert, rng,
                                                            records=(10 if args.quick else 20) * ert)
                        else:
                            ratio, a, f, by_group, ep = simulated_false_alarm_ratio(
                                base, probes, live, ert, seed=split, evaluations=20_000 if args.quick else 60_000)
                            episodes += ep
                            # how concentrated the false alarms are: the live groups that raised most of them
                            worst = sorted(by_group.items(), key=lambda kv: -kv[1])[:3]
                            top.append([[g, round(n / a, 2)] for g, n in worst] if a else [])
                        ratios.append(round(ratio, 2))
                        alarms += a
                        fed += f
                    row[group_by] = {"observed_to_budget_ratio": round(alarms / (fed / ert), 2),
                                     "median_over_splits": round(float(np.median(ratios)), 2),
                                     "per_split": ratios, "false_alarms": alarms, "records": fed}
                    if top:
                        row[group_by]["alarm_share_of_top_live_groups"] = top
                        row[group_by]["monitor_episodes_to_budget_ratio"] = round(episodes / (fed / ert), 2)
                result["noshift"][f"{name}/{cname}"] = row
                print(f"{name}/{cname}: {json.dumps(row)} ({time.perf_counter() - t0:.0f} s)", flush=True)
        if shifts:
            tweets = [r for g in sources["tweets"] for r in g]
            dialog = [r for g in sources["dialog"] for r in g]
            rng = np.random.default_rng(7)
            for cname, (window, stride, ert) in CONFIGS.items():
                cfg = AnalyzerConfig(window=window, stride=stride, false_alarm_every=ert, group_by="meta:doc")
                tb = Baseline.build(tweets[: len(tweets) // 2], probes, cfg)
                db = Baseline.build(dialog, probes, cfg)
                pool_t = tweets[len(tweets) // 2 :]
                result["median_delay_records"][cname] = {
                    "tweets->drug_reviews": delays(tb, probes, pool_t, shifted["drug_reviews"], rng, 10),
                    "tweets->jailbreaks": delays(tb, probes, pool_t, shifted["jailbreaks"], rng, 10),
                    "tweets->30%_drug_reviews_gradual": delays(tb, probes, pool_t, shifted["drug_reviews"], rng, 10,
                                                              gradual=True),
                    "english_dialog->french_dialog": delays(db, probes, dialog, shifted["french_dialog"], rng, 10)}
        if shifts or args.quick:
            result["synthetic"] = synthetic(args.quick)
    result["model_seconds"] = round(model_seconds, 1)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    for key, row in result["noshift"].items():
        for design in args.group_by.split(","):
            g = row[design]
            print(f"{key:<24} budget 1/{row['target_records_between_false_alarms']:,}, group_by {design}: "
                  f"observed/budget {g['observed_to_budget_ratio']:.2f} (median {g['median_over_splits']:.2f}, "
                  f"splits {g['per_split']})")
    for cname, scen in result["median_delay_records"].items():
        for s, per in scen.items():
            print(f"delay {cname} {s}: {per}")
    if "synthetic" in result:
        print(f"synthetic: {result['synthetic']}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
