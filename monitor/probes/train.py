"""Train, calibrate and evaluate linear concept probes, and write their probe cards.

Procedure (all on activations captured by the tap, so training sees exactly what serving sees):

1. Gather up to ``max_per_source`` texts per source; positives and negatives as the spec says.
2. Hold out 25 % (stratified) for the card's figures; nothing below touches it until step 6.
3. For every candidate site (the spec's ``sites``; else the tap's default sites, or every third layer
   with ``search_layers``) and C in {0.01, 0.1, 1}: 5-fold cross-validated AUROC of
   standardise + logistic regression (class-balanced) on the remaining 75 %. The best (site, C) wins,
   unless the spec names one site.
4. Fit on the 75 %, then Platt-calibrate on its cross-validated logits.
5. Fold standardisation and calibration into one weight vector and bias.
6. Card: held-out AUROC, accuracy, expected calibration error and Brier score; the same pipeline
   trained on *shuffled* labels (a control that must sit near 0.5: a probe that beats its control
   only slightly has learned little); cross-source AUROC on every evaluation set of the spec.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, brier_score_loss, roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict, train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from collectors.models import LoadedModel
from collectors.sites import default_sites, find_blocks
from monitor.probes.activations import FeatureCache
from monitor.probes.concepts import ConceptSpec, gather
from monitor.probes.probe import CAVEAT, Probe, expected_calibration_error

C_GRID = (0.01, 0.1, 1.0)


def candidate_sites(n_layers: int) -> list[str]:
    """Every third block's residual stream, always including the last."""
    layers = sorted({*range(2, n_layers, 3), n_layers - 1})
    return [f"layers.{i}.resid" for i in layers]


def _pipeline(c: float, seed: int):
    return make_pipeline(StandardScaler(), LogisticRegression(C=c, class_weight="balanced", max_iter=3000,
                                                              random_state=seed))


def _fold(pipe, platt_a: float, platt_c: float) -> tuple[np.ndarray, float]:
    """Collapse scaler + logistic regression + Platt scaling into ``p = sigmoid(x · w + b)``."""
    scaler, lr = pipe[0], pipe[-1]
    w = lr.coef_[0] / scaler.scale_
    b = lr.intercept_[0] - float(np.dot(lr.coef_[0], scaler.mean_ / scaler.scale_))
    return (platt_a * w).astype(np.float32), float(platt_a * b + platt_c)


def _metrics(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    return {
        "n": len(y),
        "positives": int(y.sum()),
        "auroc": round(float(roc_auc_score(y, p)), 4),
        "accuracy": round(float(accuracy_score(y, p >= 0.5)), 4),
        "ece": round(expected_calibration_error(y, p), 4),
        "brier": round(float(brier_score_loss(y, p)), 4),
    }


def train_probe(
    spec: ConceptSpec,
    lm: LoadedModel,
    cache: FeatureCache,
    *,
    base: Path | None = None,
    max_per_source: int | None = None,
    site: str | None = None,
    search_layers: bool = False,
    progress: bool = True,
) -> Probe:
    """Train one probe for ``spec`` on ``lm``; the card records how it was measured."""
    t0 = time.perf_counter()
    limit = max_per_source or spec.max_per_source
    pos = gather(spec.positive, limit, spec.seed, base)
    neg = gather(spec.negative, limit, spec.seed + 100, base)
    overlap = {t.text for t in pos} & {t.text for t in neg}
    pos = [t for t in pos if t.text not in overlap]
    neg = [t for t in neg if t.text not in overlap]
    texts = [t.text for t in pos] + [t.text for t in neg]
    y = np.array([1] * len(pos) + [0] * len(neg))
    sources = np.array([t.source for t in pos] + [t.source for t in neg])
    if site:
        sites = [site]
    elif spec.sites:
        sites = spec.sites
    else:  # the sites the tap watches by default, so the probes need no extra capture
        sites = candidate_sites(len(find_blocks(lm.model)[1])) if search_layers else default_sites(lm.model)
    feats = cache.get(texts, sites, progress=progress, description=f"{spec.concept}: activations")

    idx_train, idx_test = train_test_split(np.arange(len(y)), test_size=0.25, stratify=y, random_state=spec.seed)
    cv = StratifiedKFold(5, shuffle=True, random_state=spec.seed)
    site_scores: dict[str, float] = {}
    best: tuple[float, str, float] | None = None
    for s in sites:
        x = feats[s][spec.pooling][idx_train]
        for c in C_GRID:
            logits = cross_val_predict(_pipeline(c, spec.seed), x, y[idx_train], cv=cv, method="decision_function")
            auc = float(roc_auc_score(y[idx_train], logits))
            site_scores[s] = max(site_scores.get(s, 0.0), round(auc, 4))
            if best is None or auc > best[0]:
                best = (auc, s, c)
    assert best is not None
    _, chosen, c = best
    x_all = feats[chosen][spec.pooling]
    x_tr, y_tr = x_all[idx_train], y[idx_train]
    pipe = _pipeline(c, spec.seed).fit(x_tr, y_tr)
    cv_logits = cross_val_predict(_pipeline(c, spec.seed), x_tr, y_tr, cv=cv, method="decision_function")
    platt = LogisticRegression(C=1e6, max_iter=1000).fit(cv_logits.reshape(-1, 1), y_tr)
    w, b = _fold(pipe, float(platt.coef_[0, 0]), float(platt.intercept_[0]))
    probe = Probe(concept=spec.concept, site=chosen, pooling=spec.pooling, weights=w, bias=b, model=lm.name,
                  fingerprint=cache.fingerprint)

    held_out = _metrics(y[idx_test], probe.score(x_all[idx_test]))
    rng = np.random.default_rng(spec.seed)
    control = _pipeline(c, spec.seed).fit(x_tr, rng.permutation(y_tr))
    control_auc = round(float(roc_auc_score(y[idx_test], control.decision_function(x_all[idx_test]))), 4)

    evaluations: dict[str, Any] = {}
    for name, ev in spec.evaluations.items():
        epos = gather(ev.positive, limit, spec.seed + 200, base)
        eneg = gather(ev.negative, limit, spec.seed + 300, base)
        etexts = [t.text for t in epos] + [t.text for t in eneg]
        ey = np.array([1] * len(epos) + [0] * len(eneg))
        ef = cache.get(etexts, [chosen], progress=progress, description=f"{spec.concept}: {name}")
        evaluations[name] = {
            "positive": [s.label() for s in ev.positive], "negative": [s.label() for s in ev.negative],
            **_metrics(ey, probe.score(ef[chosen][spec.pooling])),
        }

    probe.card = {
        "concept": spec.concept,
        "description": spec.description,
        "model": lm.name,
        "fingerprint": cache.fingerprint,
        "site": chosen,
        "pooling": spec.pooling,
        "max_tokens": cache.max_length,
        "training": {
            "positive_sources": [s.label() for s in spec.positive],
            "negative_sources": [s.label() for s in spec.negative],
            "texts_per_source": dict(Counter(sources.tolist())),
            "positives": int(y.sum()), "negatives": int(len(y) - y.sum()),
            "train_size": len(idx_train), "held_out_size": len(idx_test),
            "regularization_C": c,
        },
        "site_selection_cv_auroc": site_scores,
        "held_out": held_out,
        "shuffled_label_control_auroc": control_auc,
        "cross_source": evaluations,
        "calibration": "Platt scaling on 5-fold cross-validated logits of the training split",
        "threshold": probe.threshold,
        "caveat": CAVEAT,
        "trained_seconds": round(time.perf_counter() - t0, 1),
        "trained_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return probe


def evaluate(probe: Probe, lm: LoadedModel, cache: FeatureCache, texts: list[str], labels: np.ndarray,
             *, progress: bool = True) -> dict[str, Any]:
    """The probe's figures on new labelled data, compared with its card; ``warning`` set when quality dropped.

    A drop is flagged when the new AUROC is below the card's held-out AUROC by more than
    max(0.05, 2 standard errors) (Hanley & McNeil 1982 standard error of the new AUROC).
    """
    feats = cache.get(texts, [probe.site], progress=progress, description=f"{probe.concept}: eval")
    p = probe.score(feats[probe.site][probe.pooling])
    got = _metrics(labels, p)
    ref = float(probe.card.get("held_out", {}).get("auroc", float("nan")))
    se = _auroc_se(got["auroc"], int(labels.sum()), int(len(labels) - labels.sum()))
    margin = max(0.05, 2 * se)
    out: dict[str, Any] = {"concept": probe.concept, "site": probe.site, "card_held_out_auroc": ref, **got,
                           "auroc_standard_error": round(se, 4)}
    if got["auroc"] < ref - margin:
        out["warning"] = (f"AUROC {got['auroc']:.3f} on this data is below the card's held-out {ref:.3f} by more "
                          f"than {margin:.3f}: the probe does not transfer to this data; retrain or recalibrate")
    out["caveat"] = CAVEAT
    return out


def _auroc_se(a: float, n_pos: int, n_neg: int) -> float:
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    var = (a * (1 - a) + (n_pos - 1) * (q1 - a * a) + (n_neg - 1) * (q2 - a * a)) / max(1, n_pos * n_neg)
    return float(np.sqrt(max(var, 0.0)))


def pack_dir(fingerprint: str) -> Path:
    """Where the built-in concept pack for a model is cached."""
    from collectors.models import cache_dir

    return cache_dir() / "probes" / fingerprint.replace(":", "-")


def train_specs(specs: list[ConceptSpec], lm: LoadedModel, out: Path, *, max_per_source: int | None = None,
                site: str | None = None, search_layers: bool = False, base: Path | None = None,
                progress: bool = True, max_length: int = 128) -> list[Probe]:
    """Train a probe per spec and save each as ``OUT/<concept>.probe.json``."""
    cache = FeatureCache(lm, max_length=max_length)
    probes = []
    for spec in specs:
        probe = train_probe(spec, lm, cache, base=base, max_per_source=max_per_source, site=site,
                            search_layers=search_layers, progress=progress)
        probe.save(out / f"{spec.concept}.probe.json")
        probes.append(probe)
    return probes
