"""Run a gate suite on a candidate model: each check's figures next to their bounds, and a verdict.

Checks (``monitor/gate/suite.py`` for their settings):

``probe``
    The concept probe is **retrained on the candidate** with the same spec and training code as
    ``latentwatch probes train`` (leave-one-source-out thresholds, see ``monitor/probes/train.py``); the
    stated figures of its card must be met. The trained probes are written beside the report, so a
    candidate that passes ships with probes made for its weights.
``must_not_encode``
    A probe for an attribute the model must not represent: out-of-fold AUROC of a logistic readout at every
    site and pooling (folds hold out whole ``group_by`` groups); the **largest** over sites and poolings must
    stay at or below ``max_auroc``. Taking the largest is conservative for this claim. Passing says no
    linear readout at these sites found the attribute on this data, not that the model cannot use it.
``scores`` (needs ``--previous``)
    Per concept, on the fixed prompt set: share above the probe's threshold, mean score and the Spearman
    correlation of the per-prompt scores, against the previous release's.
``drift`` (needs ``--previous``)
    The candidate's records on the prompt set (pooled activations, attention statistics: the tap's own
    signature) run, in a shuffled order, through the monitor's analyzer against a baseline built from the
    previous release's records on the same prompts, calibrated as the monitor calibrates (windows of
    other prompts from the same sources exceed a threshold once per ``false_alarm_every`` records).
    The figure is the largest statistic / threshold ratio of each detector over the stream; records the
    analyzer refuses as implausible (beyond anything the previous release produced) fail the check.
    Every run writes the baseline of its own records, the reference for the next release.

A gate is correlational evidence about the candidate's internals on the suite's data; it does not by
itself show the model is fit for purpose.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from monitor import version
from monitor.gate.report import show_value, write_html
from monitor.gate.suite import LoadedSuite, MustNotEncode
from monitor.probes.probe import CAVEAT
from monitor.probes.probe import checksum as content_checksum

FORMAT = "latentwatch-gate"
REPORT_VERSION = 1
BASELINE_FILE = "reference.baseline.safetensors"


class GateError(ValueError):
    """A previous report that is corrupt or of another format, or a candidate the suite cannot run on."""


@dataclass
class Figure:
    name: str
    value: float | None
    bound: float
    op: str  # ">=" or "<="
    ok: bool
    note: str = ""


@dataclass
class CheckResult:
    kind: str
    name: str
    status: str  # pass, fail, skipped
    summary: str
    figures: list[Figure] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)


def figure(name: str, value: float | None, bound: float, op: str, note: str = "") -> Figure:
    """A figure and its bound; a missing value (not measurable) fails."""
    finite = value is not None and bool(np.isfinite(value))
    ok = finite and (value >= bound if op == ">=" else value <= bound)
    return Figure(name, round(float(value), 4) if finite else None, bound, op, bool(ok), note)


def verdict(kind: str, name: str, figures: list[Figure], details: dict[str, Any] | None = None,
            summary: str = "") -> CheckResult:
    failed = [f for f in figures if not f.ok]
    status = "fail" if failed or not figures else "pass"
    if not summary:
        summary = ("; ".join(f"{f.name} {show_value(f.value)} (bound {f.op} {f.bound:g})" for f in failed) if failed
                   else f"{len(figures)} figure(s) within bounds")
    return CheckResult(kind, name, status, summary, figures, details or {})


# ---------------------------------------------------------------------------------------------- reports
def checksum(body: dict[str, Any]) -> str:
    """The report's content hash: :func:`monitor.probes.probe.checksum` of everything but ``sha256``."""
    return content_checksum({k: v for k, v in body.items() if k != "sha256"})


def load_report(path: Path) -> dict[str, Any]:
    """A previous gate report (``report.json``), its checksum verified."""
    try:
        body = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GateError(f"{path}: not a readable gate report: {exc}") from exc
    if not isinstance(body, dict) or body.get("format") != FORMAT:
        raise GateError(f"{path}: not a latentwatch gate report")
    if body.get("version") != REPORT_VERSION:
        raise GateError(f"{path}: gate report v{body.get('version')}, this build reads v{REPORT_VERSION}")
    if body.get("sha256") != checksum(body):
        raise GateError(f"{path}: checksum mismatch: the report was modified or is corrupt")
    return body


def previous_baseline(prev: dict[str, Any], folder: Path) -> Any:
    """The baseline a previous report names, from its folder, checked against the report's hash."""
    from monitor.analysis.baseline import Baseline

    name = str(prev["artifacts"]["baseline"])
    if Path(name).name != name or name in ("", ".", ".."):
        raise GateError(f"the previous report names its baseline {name!r}: expected a file beside the report")
    path = folder / name
    if not path.exists() or _file_sha256(path) != prev["artifacts"]["baseline_sha256"]:
        raise GateError(f"{path}: the previous release's baseline is missing or does not match its report "
                        "(keep report.json and the files beside it together)")
    return Baseline.load(path)


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- checks
def probe_figures(card: dict[str, Any], require: Any) -> list[Figure]:
    """The card figures a probe check compares (``Requirements`` names them)."""
    out = []
    r = require
    if r.min_loso_auroc is not None:
        out.append(figure("loso_auroc", card.get("loso_auroc"), r.min_loso_auroc, ">="))
    if r.max_ordinary_rate is not None:
        out.append(figure("max_ordinary_rate", card.get("max_ordinary_above_threshold_rate"), r.max_ordinary_rate,
                          "<=", "largest share above threshold over ordinary sources, each left out in turn"))
    if r.max_unseen_ordinary_rate is not None:
        rates = [v["above_threshold_rate"] for v in card.get("held_out_ordinary", {}).values()]
        out.append(figure("max_unseen_ordinary_rate", max(rates) if rates else None, r.max_unseen_ordinary_rate,
                          "<=", "ordinary sources never trained on"))
    if r.min_recall is not None:
        out.append(figure("recall", card.get("recall", {}).get("at_threshold", {}).get("above_threshold_rate"),
                          r.min_recall, ">=", "out-of-fold recall at the threshold"))
    if r.min_leave_one_kind_out_auroc is not None:
        out.append(figure("leave_one_kind_out_auroc", card.get("leave_one_kind_out_auroc"),
                          r.min_leave_one_kind_out_auroc, ">=", "positives against their own kind, kind held out"))
    if r.max_ece is not None:
        out.append(figure("ece", card.get("ece"), r.max_ece, "<="))
    return out


def must_not_encode(check: MustNotEncode, lm: Any, cache: Any, base: Path, progress: bool) -> CheckResult:
    """Out-of-fold AUROC of the best linear readout of the attribute (see the module doc)."""
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    from collectors.sites import default_sites
    from monitor.probes.concepts import gather
    from monitor.probes.train import _auroc_se, fit_pipeline

    pos = gather(check.positive, check.max_per_source, 0, base)
    neg = gather(check.negative, check.max_per_source, 1, base)
    both = {t.text for t in pos} & {t.text for t in neg}  # a text in both classes teaches nothing
    rows = [(t, 1) for t in pos if t.text not in both] + [(t, 0) for t in neg if t.text not in both]
    y = np.array([label for _, label in rows], dtype=np.int64)
    if min(y.sum(), len(y) - y.sum()) < 10:
        raise GateError(f"must_not_encode {check.name}: needs at least 10 texts in each class, got "
                        f"{int(y.sum())} positive and {int(len(y) - y.sum())} negative")
    texts = [t.text for t, _ in rows]
    if check.group_by:
        missing = [t for t, _ in rows if check.group_by not in t.labels]
        if missing:
            raise GateError(f"must_not_encode {check.name}: {len(missing)} texts have no label {check.group_by!r} "
                            f"(first from {missing[0].source})")
        groups = np.array([t.labels[check.group_by] for t, _ in rows], dtype=object)
        n_groups = min(len(set(groups[y == 1])), len(set(groups[y == 0])))
        if n_groups < 2:
            raise GateError(f"must_not_encode {check.name}: grouped by {check.group_by!r}, each class needs at "
                            "least 2 groups so that a fold can hold one out")
        splitter = StratifiedGroupKFold(n_splits=min(check.folds, n_groups), shuffle=True, random_state=0)
        splits = list(splitter.split(texts, y, groups))
    else:
        splits = list(StratifiedKFold(n_splits=check.folds, shuffle=True, random_state=0).split(texts, y))
    sites = check.sites or default_sites(lm.model)
    feats = cache.get(texts, sites, progress=progress, description=f"must not encode {check.name}: activations")
    # AUROC within each test fold, averaged by fold size: pooling out-of-fold scores across folds mixes the
    # folds' offsets (with whole groups held out, class shares differ by fold) and drags the AUROC below 0.5
    scored = [(train, test) for train, test in splits if 0 < y[test].sum() < len(test)]
    if not scored:
        raise GateError(f"must_not_encode {check.name}: no fold holds both classes; use fewer folds or a finer "
                        "group_by")
    weights = np.array([len(test) for _, test in scored], dtype=np.float64)
    candidates = []
    for site in sites:
        for pooling, x in feats[site].items():
            per_fold = []
            for train, test in scored:
                z = fit_pipeline(0.1, 0, x[train], y[train]).decision_function(x[test])
                per_fold.append(roc_auc_score(y[test], z))
            candidates.append({"site": site, "pooling": pooling,
                               "auroc": round(float(np.average(per_fold, weights=weights)), 4),
                               "per_fold": [round(float(a), 4) for a in per_fold]})
    best = max(candidates, key=lambda c: c["auroc"])
    se = _auroc_se(best["auroc"], int(y.sum()), int(len(y) - y.sum()))
    fig = figure("max_auroc", best["auroc"], check.max_auroc, "<=",
                 f"largest held-out AUROC (within folds, averaged) over {len(candidates)} site x pooling readouts "
                 f"({best['site']}/{best['pooling']}), standard error {se:.3f}")
    details = {"n": len(y), "positives": int(y.sum()), "folds": len(splits), "folds_with_both_classes": len(scored),
               "group_by": check.group_by,
               "best": best, "candidates": candidates, "description": check.description,
               "note": "below the bound: no linear readout at these sites found the attribute on this data; "
                       "this does not show the model cannot use it"}
    return verdict("must_not_encode", check.name, [fig], details)


def score_changes(now: dict[str, Any], before: dict[str, Any], bounds: Any) -> CheckResult:
    """Per concept: rate above threshold, mean score and rank agreement against the previous release."""
    from scipy.stats import spearmanr

    figures: list[Figure] = []
    per: dict[str, Any] = {}
    for concept, scores in now["per_prompt"].items():
        if concept not in before["per_prompt"]:
            per[concept] = {"note": "the previous release has no scores for this concept: not compared"}
            continue
        a = np.asarray(scores, dtype=np.float64)
        b = np.asarray(before["per_prompt"][concept], dtype=np.float64)
        rate_a = float((a >= now["thresholds"][concept]).mean())
        rate_b = float((b >= before["thresholds"][concept]).mean())
        rho = float(spearmanr(a, b).statistic) if np.ptp(a) > 0 and np.ptp(b) > 0 else float("nan")
        per[concept] = {"rate": round(rate_a, 4), "previous_rate": round(rate_b, 4), "mean": round(a.mean(), 4),
                        "previous_mean": round(b.mean(), 4), "spearman": round(rho, 4) if np.isfinite(rho) else None}
        if bounds.max_rate_change is not None:
            figures.append(figure(f"{concept}: rate change", abs(rate_a - rate_b), bounds.max_rate_change, "<=",
                                  f"share above threshold {rate_b:.3f} -> {rate_a:.3f}"))
        if bounds.max_mean_change is not None:
            figures.append(figure(f"{concept}: mean change", abs(a.mean() - b.mean()), bounds.max_mean_change,
                                  "<=", f"mean score {b.mean():.3f} -> {a.mean():.3f}"))
        if bounds.min_rank_correlation is not None:
            figures.append(figure(f"{concept}: rank correlation", rho if np.isfinite(rho) else None,
                                  bounds.min_rank_correlation, ">=", "Spearman, per prompt"))
    if not figures:
        return CheckResult("scores", "concept scores", "fail",
                           "no concept is scored in both this and the previous release", [], per)
    return verdict("scores", "concept scores", figures, per)


def activation_drift(records: list, previous: Any, check: Any, seed: int = 0) -> CheckResult:
    """The candidate's records through the monitor's analyzer against the previous release's baseline."""
    from monitor.analysis import signals
    from monitor.analysis.analyzer import Analyzer

    shapes = signals.shapes_of(records[0])
    if shapes != previous.shapes:
        def show(s: dict) -> str:
            return ", ".join(f"{site} {v.kind}[{v.dim}]" for site, v in sorted(s.items()))

        return CheckResult("drift", "activation drift", "fail",
                           f"the candidate's sites or dimensions differ from the previous release's (candidate: "
                           f"{show(shapes)}; previous: {show(previous.shapes)}): activations cannot be compared")
    analyzer = Analyzer(previous, None, log_alarms=False)
    order = np.random.default_rng(seed).permutation(len(records))
    sig = signals.extract([records[i] for i in order], previous.shapes, None)
    n = len(records)
    peak: dict[str, dict[str, Any]] = {}
    for start in range(0, n, analyzer.stride):
        analyzer.update_signals({k: v[start:start + analyzer.stride] for k, v in sig.items()})
        for st in analyzer.states:
            if not np.isfinite(st.value) or st.slot.threshold <= 0:
                continue
            ratio = st.value / st.slot.threshold
            if st.slot.name not in peak or ratio > peak[st.slot.name]["ratio"]:
                peak[st.slot.name] = {"ratio": round(float(ratio), 4), "statistic": round(float(st.value), 6),
                                      "threshold": round(float(st.slot.threshold), 6),
                                      "moved_most": [[c, round(v, 4)] for c, v in analyzer.attribution(st, top=3)]}
    if not peak:
        return CheckResult("drift", "activation drift", "fail",
                           f"{n} prompts fill no window of {previous.config.window}: add prompts", [], {})
    figures = [figure(name, p["ratio"], check.max_ratio, "<=",
                      "largest statistic / calibrated threshold over the stream; moved most: "
                      + ", ".join(c for c, _ in p["moved_most"])) for name, p in peak.items()]
    refused = dict(analyzer.stats.invalid_total)
    figures.append(figure("records refused", sum(refused.values()), 0, "<=",
                          "implausible (beyond anything the previous release produced) or non-finite"))
    details = {"detectors": peak, "refused": refused, "prompts": n, "window": previous.config.window,
               "stride": previous.config.stride, "false_alarm_every": previous.config.false_alarm_every,
               "evaluations": analyzer.stats.evaluations_total}
    return verdict("drift", "activation drift", figures, details)


# ---------------------------------------------------------------------------------------------- the run
def run_gate(loaded: LoadedSuite, model: str, out: Path, *, previous: Path | None = None,
             strict: bool = False, progress: bool = True, console: Any = None) -> dict[str, Any]:
    """Run every check of ``loaded`` on ``model``; write ``report.json``, ``report.html``, the retrained
    probes and the reference baseline to ``out``; return the report."""
    from collectors import models as model_zoo
    from collectors.fingerprint import fingerprint
    from collectors.sites import default_sites
    from monitor.analysis.baseline import AnalyzerConfig, Baseline
    from monitor.probes.activations import FeatureCache, cached_records, text_key
    from monitor.probes.concepts import gather_groups
    from monitor.probes.train import train_probe

    t0 = time.perf_counter()
    suite = loaded.suite
    prev = load_report(previous) if previous else None
    prev_dir = previous.parent if previous else None
    out.mkdir(parents=True, exist_ok=True)
    say = console.print if console is not None else (lambda *a, **k: None)

    say(f"loading {model} ...")
    lm = model_zoo.load(model)
    fp = fingerprint(lm.model)
    cache = FeatureCache(lm, max_length=suite.max_length)
    checks: list[CheckResult] = []

    probes = []
    for check, spec, base in zip(suite.probes, loaded.specs, loaded.spec_bases, strict=True):
        say(f"retraining probe {spec.concept} on the candidate ...")
        probe = train_probe(spec, lm, cache, base=base, max_per_source=check.max_per_source, progress=progress)
        probe.save(out / "probes" / f"{spec.concept}.probe.json")
        probes.append(probe)
        result = verdict("probe", spec.concept, probe_figures(probe.card, check.require),
                         {"site": probe.site, "pooling": probe.pooling, "threshold": probe.threshold,
                          "card": f"probes/{spec.concept}.probe.json"})
        checks.append(result)

    for check in suite.must_not_encode:
        say(f"must not encode: {check.name} ...")
        checks.append(must_not_encode(check, lm, cache, loaded.base, progress))

    prompts: dict[str, Any] | None = None
    scores: dict[str, Any] | None = None
    artifacts: dict[str, Any] = {}
    if suite.prompts is not None:
        groups = gather_groups(suite.prompts.sources, suite.prompts.max_per_source, suite.prompts.seed, loaded.base)
        texts = [t.text for g in groups.values() for t in g]
        keys = [text_key(t) for t in texts]
        # what the comparisons depend on: the texts, their truncation and the drift settings
        prompts = {"n": len(texts), "per_source": {k: len(v) for k, v in groups.items()},
                   "sha256": hashlib.sha256("\n".join(keys).encode()).hexdigest(), "max_length": suite.max_length,
                   "drift": suite.drift.model_dump(mode="json") if suite.drift else None}
        if probes:
            feats = cache.get(texts, sorted({p.site for p in probes}), progress=progress,
                              description="prompt set: concept scores")
            scores = {"thresholds": {p.concept: p.threshold for p in probes},
                      "per_prompt": {p.concept: [round(float(v), 6) for v in p.score(feats[p.site][p.pooling])]
                                     for p in probes}}
        if suite.drift is not None:
            d = suite.drift
            sites = d.sites or default_sites(lm.model)
            if not d.sites:  # as the demo records them: the residual sites plus the last block's attention
                sites = [*sites, sites[-1].replace(".resid", ".attn")]
            say(f"recording the prompt set through the tap ({len(texts)} prompts, {len(sites)} sites) ...")
            records = cached_records(lm, texts, sites, "gate-prompts", max_length=suite.max_length,
                                     progress=progress)
            config = AnalyzerConfig(window=d.window, stride=d.stride, univariate=d.univariate,
                                    multivariate=d.multivariate, concept_rates=False, group_by="record",
                                    false_alarm_every=d.false_alarm_every or 100.0 * len(texts))
            if len(texts) < 2 * d.window:
                raise GateError(f"the prompt set has {len(texts)} prompts; drift with window {d.window} needs at "
                                f"least {2 * d.window}: raise prompts.max_per_source or add sources")
            say("building the reference baseline for the next release ...")
            Baseline.build(records, None, config).save(out / BASELINE_FILE)
            artifacts["baseline"] = BASELINE_FILE
            artifacts["baseline_sha256"] = _file_sha256(out / BASELINE_FILE)
            if prev is None:
                checks.append(_skipped("drift", "activation drift"))
            elif (why := _incomparable(prev, prompts, "baseline")) is not None:
                checks.append(CheckResult("drift", "activation drift", "fail", why))
            else:
                checks.append(activation_drift(records, previous_baseline(prev, prev_dir), d))
        if suite.scores is not None:
            if prev is None:
                checks.append(_skipped("scores", "concept scores"))
            elif (why := _incomparable(prev, prompts, "scores")) is not None:
                checks.append(CheckResult("scores", "concept scores", "fail", why))
            else:
                checks.append(score_changes(scores, prev["scores"], suite.scores))

    bad = [c for c in checks if c.status == "fail" or (strict and c.status == "skipped")]
    report: dict[str, Any] = {
        "format": FORMAT, "version": REPORT_VERSION, "latentwatch": version(),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(time.perf_counter() - t0, 1),
        "suite": {"name": suite.name, "source": loaded.source, "sha256": loaded.sha256,
                  "description": suite.description},
        "model": {"name": lm.name, "source": model, "fingerprint": fp},
        "previous": None if prev is None else {"model": prev["model"], "report_sha256": prev["sha256"],
                                               "created_at": prev["created_at"], "passed": prev["passed"],
                                               "same_suite": prev["suite"]["sha256"] == loaded.sha256},
        "passed": not bad, "strict": strict,
        "checks": [asdict(c) for c in checks],
        "prompts": prompts, "scores": scores, "artifacts": artifacts,
        "caveat": "Probe figures are correlational evidence about what the activations encode on the suite's "
                  "data; passing the gate does not by itself show the model is fit for purpose. " + CAVEAT,
    }
    report["sha256"] = checksum(report)
    (out / "report.json").write_text(json.dumps(report, indent=1, allow_nan=False) + "\n", encoding="utf-8")
    write_html(report, out / "report.html")
    return report


def _skipped(kind: str, name: str) -> CheckResult:
    return CheckResult(kind, name, "skipped", "no --previous report to compare with; this run's report is the "
                       "reference for the next release")


def _incomparable(prev: dict[str, Any], prompts: dict[str, Any], what: str) -> str | None:
    if not prev.get("prompts") or prev["prompts"]["sha256"] != prompts["sha256"]:
        return ("the prompt set differs from the previous release's: comparisons need the same prompts "
                "(keep 'prompts' fixed across releases)")
    if prev["prompts"].get("max_length") != prompts["max_length"]:
        return (f"the previous release was gated at max_length {prev['prompts'].get('max_length')}, this run at "
                f"{prompts['max_length']}: activations are not comparable")
    if what == "baseline" and prev["prompts"].get("drift") != prompts["drift"]:
        return "the drift settings differ from the previous release's: its baseline was built for other ones"
    if what == "baseline" and "baseline" not in prev.get("artifacts", {}):
        return "the previous report has no activation baseline (its suite had no drift check)"
    if what == "scores" and not prev.get("scores"):
        return "the previous report has no concept scores (its suite had no probes)"
    return None
