"""``latentwatch demo``: the embedded end-to-end run, no servers to start.

1. Load SmolLM2-135M-Instruct (packaged GGUF, cached as safetensors after the first run).
2. Load the built-in concept pack for this model, or train it on first use (reduced sizes, cached).
3. Record a baseline of ordinary traffic -- English dialog and tweets -- through the tap, and
   calibrate every detector to a stated false-alarm budget.
4. Serve live traffic through the model with the tap attached: ordinary traffic the baseline never
   saw, then, from the shift point on, prompt-injection and jailbreak attempts. The analyzer reads
   the tap's records as they come; a live table shows each drift statistic against its threshold.
   The sidecar runs in-process and serves ``/metrics`` meanwhile.
5. Report when each alarm fired relative to the true shift point, the false alarms before it, what
   moved (attribution) and the concept rates before and after; write everything to ``--out``,
   including ``report.html`` (plots), the last ``/metrics`` scrape (``metrics.txt``), the live records
   (``live.lwsr``, for ``latentwatch replay``), ``baseline.safetensors`` and ``probes/``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from prometheus_client import generate_latest
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from collectors import QueueSink, Tap
from collectors import models as model_zoo
from collectors.fingerprint import fingerprint
from collectors.sinks import FileSink, read_file
from collectors.sites import default_sites
from monitor.analysis.analyzer import Analyzer
from monitor.analysis.baseline import AnalyzerConfig, Baseline
from monitor.ops.report import write_report
from monitor.probes import corpora
from monitor.probes.activations import cached_records
from monitor.probes.concepts import builtin_specs
from monitor.probes.probe import CAVEAT, ProbeError, ProbeSet
from monitor.probes.train import pack_dir, train_specs
from monitor.progress import step
from monitor.sidecar.service import Sidecar, start_http
from monitor.sidecar.settings import Settings, SourceConfig, load_settings

MAX_TOKENS = 48


def load_or_train_pack(lm: model_zoo.LoadedModel, console: Console, max_per_source: int) -> ProbeSet:
    """The cached built-in pack for this model, trained first if it is missing or incomplete.

    The cache folder is keyed by the pack's specs, the model fingerprint, the training code and the size,
    so a changed pack or other code never reuses probes trained before (see :func:`pack_dir`).
    """
    fp = fingerprint(lm.model)
    specs = builtin_specs()
    folder = pack_dir(fp, specs, max_per_source=max_per_source)  # keyed: specs, model, code, size
    try:
        pack = ProbeSet.load_dir(folder, fingerprint=fp)
        if set(pack.concepts) >= {s.concept for s in specs}:
            return pack
    except ProbeError:
        pass
    console.print(f"training the built-in concept pack ({len(specs)} concepts, up to {max_per_source} texts per "
                  f"source); cached in {folder} for next time")
    have = {p.stem.removesuffix(".probe") for p in folder.glob("*.probe.json")} if folder.exists() else set()
    todo = [s for s in specs if s.concept not in have]
    train_specs(todo, lm, folder, max_per_source=max_per_source)
    return ProbeSet.load_dir(folder, fingerprint=fp)


def _table(analyzer: Analyzer, served: int, shift_at: int) -> Table:
    phase = "ordinary traffic" if served < shift_at else f"SHIFTED (+{served - shift_at}): injection attempts"
    table = Table(title=f"latentwatch demo -- {served} live requests, {phase}")
    for col in ("detector", "statistic", "threshold", "ratio", "state", "alarms"):
        table.add_column(col, justify="right" if col not in ("detector", "state") else "left")
    for st in analyzer.states:
        ratio = st.value / st.slot.threshold if st.slot.threshold > 0 and np.isfinite(st.value) else float("nan")
        table.add_row(st.slot.name, f"{st.value:.4g}", f"{st.slot.threshold:.4g}", f"{ratio:.2f}",
                      "[red]ALARM[/red]" if st.alarm else "ok", str(st.alarms_total))
    return table


def run_demo(model: str, out: Path, sample_rate: float, quick: bool, console: Console,
             port: int = 9464) -> dict[str, Any]:
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    console.print(f"loading {model} ...")
    lm = model_zoo.load(model)
    probes = load_or_train_pack(lm, console, max_per_source=40 if quick else 100)
    sites = sorted(set(default_sites(lm.model)) | set(probes.needs()), key=lambda s: int(s.split(".")[1]))
    sites.append(sites[-1].replace(".resid", ".attn"))

    # baseline: ordinary traffic, recorded through the same tap (cached per text after the first run)
    n_base = 600 if quick else 1500
    window, stride, budget = (20, 5, 1000) if quick else (30, 5, 5000)
    dialog = corpora.dialog("english")
    tweets = corpora.tweets()
    # groups, as real traffic has them: a dialog topic file, or a block of 80 consecutive tweets (the corpus
    # concatenates its sub-corpora, so a block is one topic); calibration sees the variation between them
    block = {t.text: f"tweets/{i // 80}" for i, t in enumerate(tweets)}
    chosen = corpora.sample(dialog, n_base // 2, seed=1) + corpora.sample(tweets, n_base // 2, 1)
    base_texts = [t.text for t in chosen]
    reference = cached_records(lm, base_texts, sites, "demo-baseline", max_length=MAX_TOKENS)
    for rec, t in zip(reference, chosen, strict=True):
        rec.meta = {**rec.meta, "doc": f"dialog/{t.labels['topic']}" if t.source.startswith("chatterbot")
                    else block[t.text]}
    config = AnalyzerConfig(window=window, stride=stride, false_alarm_every=budget, group_by="meta:doc")
    with step(console, "calibrating detectors to the false-alarm budget"):
        baseline = Baseline.build(reference, probes, config)
    baseline.save(out / "baseline.safetensors")
    (out / "probes").mkdir(exist_ok=True)  # the artifacts a sidecar needs, side by side (deploy/compose uses them)
    for probe in probes.probes:
        probe.save(out / "probes" / f"{probe.concept}.probe.json")
    for warning in baseline.info["warnings"]:
        console.print(f"[yellow]note:[/yellow] {warning}")

    # live traffic: unseen ordinary requests, then injection / jailbreak attempts
    n_live = 120 if quick else 300
    seen = set(base_texts)
    ordinary = [t for t in corpora.sample(dialog, 3 * n_live, seed=7) + corpora.sample(tweets, 3 * n_live, 7)
                if t.text not in seen]
    ordinary = corpora.sample(ordinary, n_live, seed=8)
    attacks = [t for t in corpora.injections() if t.labels["label"] == "malicious"] + corpora.jailbreaks()
    attacks = corpora.sample(attacks, n_live, seed=9)
    live = [(t.text, "ordinary") for t in ordinary] + [(t.text, "attack") for t in attacks]
    shift_at = len(ordinary)

    # the sidecar runs in this process: records go to its analyzer, /metrics is served while traffic flows
    sidecar = Sidecar(Settings(baseline=out / "baseline.safetensors", probes=out / "probes",
                               source=SourceConfig(kind="none"), port=port))
    sidecar.analyzer.log_alarms = False  # alarms show in the live table
    analyzer = sidecar.analyzer
    try:
        server = start_http(sidecar)
    except OSError:  # the port is taken (another demo, a real sidecar): any free port will do
        sidecar.settings.port = 0
        server = start_http(sidecar)
    console.print(f"Prometheus metrics: http://127.0.0.1:{server.server_address[1]}/metrics")
    queue_sink = QueueSink()
    (out / "live.lwsr").unlink(missing_ok=True)  # the file sink appends; this run's records only
    file_sink = FileSink(out / "live.lwsr", max_bytes=None)  # one file for replay and the report
    served = 0
    alarms: list[dict[str, Any]] = []
    analyzed_texts: list[str] = []  # the text of each analyzed record, in order: the alarmed window's requests
    window_file: Path | None = None
    lm.tokenizer.padding_side = "left"
    tap = Tap(lm.model, sites, sink=queue_sink, sample_rate=sample_rate, model_name=lm.name,
              metadata={"replica": "demo-0"}, salt=b"latentwatch-demo").attach()  # reproducible demo sampling
    try:
        with Live(_table(analyzer, 0, shift_at), console=console, refresh_per_second=4) as view:
            for start in range(0, len(live), 8):
                batch = live[start : start + 8]
                enc = lm.tokenizer([t for t, _ in batch], return_tensors="pt", padding=True, truncation=True,
                                   max_length=MAX_TOKENS)
                keys = [f"live-{start + i}" for i in range(len(batch))]
                with tap.request(keys=keys, metadata={"route": "/chat"}), torch.no_grad():
                    lm.model(**enc)  # serving: the tap samples, reduces off the forward path
                tap.flush()
                served += len(batch)
                recs = queue_sink.drain()
                text_of = {tap.sampler.hashed_key(k): t for k, (t, _) in zip(keys, batch, strict=True)}
                for rec in recs:
                    file_sink.write(rec)
                events = sidecar.ingest(recs)  # one analyzer batch: last_outcomes covers every record of it
                analyzed_texts += [text_of.get(rec.key, "") for rec, outcome in
                                   zip(recs, analyzer.last_outcomes, strict=True) if outcome is None]
                for event in events:
                    alarms.append({"detector": event.detector, "at_record": event.at_record,
                                   "after_shift": event.at_record - shift_at, "statistic": event.statistic,
                                   "threshold": event.threshold, "attribution": event.attribution,
                                   "farthest_records": event.exemplars})
                    if window_file is None and event.at_record > shift_at:  # for `latentwatch explain`
                        window_file = _write_window(out, analyzed_texts[:event.at_record][-window:], event.detector)
                view.update(_table(analyzer, served, shift_at))
                if not console.is_terminal and (served % 60 < len(batch) or served == len(live)):
                    in_alarm = [st.slot.name for st in analyzer.states if st.alarm]
                    console.print(f"served {served}/{len(live)} requests (shift at {shift_at}); "
                                  f"{len(alarms)} alarms so far; in alarm now: {', '.join(in_alarm) or 'none'}",
                                  markup=False, highlight=False)
        metrics_text = generate_latest(sidecar.registry).decode()
    finally:
        tap.detach()
        file_sink.close()
        server.shutdown()
        server.server_close()
    (out / "metrics.txt").write_text(metrics_text)

    before = [a for a in alarms if a["after_shift"] <= 0]
    after = [a for a in alarms if a["after_shift"] > 0]
    first_after: dict[str, int] = {}
    for a in after:
        first_after.setdefault(a["detector"], a["after_shift"])
    live_records = list(read_file(out / "live.lwsr"))
    scores = probes.score(live_records)
    write_report(out / "report.html", live_records, baseline, probes, shift_at=shift_at)
    n_before = shift_at
    hit = probes.above(scores)
    rates = {c: {"baseline": round(baseline.info["concept_base_rates"][c], 3),
                 "before_shift": round(float(hit[:n_before, j].mean()), 3),
                 "after_shift": round(float(hit[n_before:, j].mean()), 3)}
             for j, c in enumerate(probes.concepts)}
    _report(console, first_after, before, rates, analyzer, shift_at)
    summary = {
        "model": lm.name,
        "fingerprint": baseline.fingerprint,
        "baseline_records": len(reference),
        "false_alarm_budget_records": budget,
        "live_records": served,
        "shift_at_record": shift_at,
        "false_alarms_before_shift": len(before),
        "first_alarm_after_shift": min(first_after.values()) if first_after else None,
        "detection_delay_records": first_after,
        "concept_rates": rates,
        "tap": {k: v for k, v in vars(tap.stats).items() if k != "worker_busy_seconds"},
        "invalid_records": dict(analyzer.stats.invalid_total),
        "seconds": round(time.perf_counter() - t0, 1),
        "caveat": CAVEAT,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "alarms.json").write_text(json.dumps(alarms, indent=1))
    config_path = write_sidecar_config(out)
    console.print(f"serve these artifacts with: latentwatch serve -c {config_path}")
    if window_file is not None:
        first = alarms_after_first(alarms, shift_at)
        console.print(f"explain the first alarm after the shift (ablates attention heads and MLPs, a few minutes): "
                      f"latentwatch explain {window_file} --baseline {out / 'baseline.safetensors'} "
                      f"--probes {out / 'probes'} --max-length {MAX_TOKENS} --detector {first}",
                      markup=False, highlight=False, soft_wrap=True)
    return summary


def _write_window(out: Path, texts: list[str], detector: str) -> Path:
    """The requests of an alarmed window, one JSON line each (the demo's own texts: it has them)."""
    path = out / "alarm-window.jsonl"
    path.write_text("".join(json.dumps({"text": t, "detector": detector}) + "\n" for t in texts), encoding="utf-8")
    return path


def alarms_after_first(alarms: list[dict[str, Any]], shift_at: int) -> str:
    return next(a["detector"] for a in alarms if a["at_record"] > shift_at)


def write_sidecar_config(out: Path) -> Path:
    """A ready ``sidecar.yaml`` beside the demo's artifacts (absolute paths), checked by loading it."""
    out = out.resolve()
    path = out / "sidecar.yaml"
    path.write_text(
        "# Written by `latentwatch demo`: run `latentwatch serve -c THIS_FILE` to analyze the recorded live\n"
        "# stream with the demo's baseline and probes (docs/sidecar.md has every field).\n"
        + yaml.safe_dump({"baseline": str(out / "baseline.safetensors"), "probes": str(out / "probes"),
                          "source": {"kind": "file", "path": str(out / "live.lwsr"), "from_start": True},
                          "host": "127.0.0.1", "port": 9464, "log_format": "text"}, sort_keys=False))
    load_settings(path)  # the file the demo hands out must be one the sidecar accepts
    return path


def _report(console: Console, first_after: dict[str, int], before: list, rates: dict, analyzer: Analyzer,
            shift_at: int) -> None:
    t = Table(title=f"alarms relative to the shift at live record {shift_at}")
    t.add_column("detector")
    t.add_column("first alarm, records after shift", justify="right")
    for det, delay in sorted(first_after.items(), key=lambda kv: kv[1]):
        t.add_row(det, str(delay))
    r = Table(title="concept rates (share of requests at or above each probe's threshold)")
    for col in ("concept", "baseline", "before shift", "after shift"):
        r.add_column(col, justify="left" if col == "concept" else "right")
    for c, v in rates.items():
        r.add_row(c, f"{v['baseline']:.3f}", f"{v['before_shift']:.3f}", f"{v['after_shift']:.3f}")
    a = Table(title="what moved most (detectors in alarm at the end, ranked by statistic / threshold)")
    for col in ("detector", "component", "contribution"):
        a.add_column(col)
    for det, comp, val in analyzer.ranking(top=8):
        a.add_row(det, comp, f"{val:+.3g}")
    console.print(Group(t, f"false alarms before the shift: {len(before)}", r, a))
    console.print(f"[dim]{CAVEAT}[/dim]")
