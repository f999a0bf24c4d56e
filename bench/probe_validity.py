"""Does a probe validity signal flag the held-out sources where the probe's FPR exceeds its card by 3x?

For three concepts of the built-in pack (prompt_injection, insult at layers.9.resid; negative_sentiment
at layers.19.resid; mean pooling, SmolLM2-135M-Instruct, 128 tokens) and many *ordinary* sources (texts
without the concept), two kinds of split:

* ``pack``: the probe trains on the pack's negative sources; every other ordinary source is held out;
* ``loso``: leave one ordinary source out, train on all the others.

Each probe is standardise + class-balanced logistic regression; its decision threshold is set at a 5 %
false-positive rate on a held-out 25 % of its own training texts (the "card FPR"). On each held-out
source the probe's FPR is measured; the source is *invalid* when FPR >= 3x card FPR. Each held-out
source is cut into windows of ``--window`` texts and each signal gives one number per window:

* ``validity``: monitor.probes.validity (whitened distance on the directions the probe reads);
* ``mahalanobis``: full-space squared Mahalanobis distance to the training negatives (Ledoit-Wolf), the
  baseline issue 13 says fails;
* ``knn``: share of the window whose 5-NN distance (16-dim PCA of standardised negatives) exceeds the
  95th percentile of held-out training negatives;
* ``logit_mean``: the window's mean probe logit in units of held-out negatives' logit spread. This is
  not usable alone in production: real concept positives raise it too (reported for reference).

Figures: AUROC of each window signal for "source FPR >= 3x card" over the held-out-source windows, and
how often the calibrated flag (median window ratio > 1) agrees with that label per source; the
per-record cost of the validity statistic. Features come read-only from the feature cache; texts not
in it are skipped (counted in the output). Last line of output: one JSON object.

    python bench/probe_validity.py --quick      # < ~60 s
    python bench/probe_validity.py
"""

from __future__ import annotations

import argparse
import glob
import json
import time
from pathlib import Path

import numpy as np
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split
from sklearn.neighbors import NearestNeighbors
from sklearn.preprocessing import StandardScaler

from collectors.models import cache_dir
from monitor.probes import corpora as C
from monitor.probes.activations import text_key
from monitor.probes.validity import fit_reference, mahalanobis_baseline, mahalanobis_stats

CARD_FPR = 0.05


def ordinary_sources() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for lang in ("english", "spanish", "german", "italian", "portuguese", "french", "turkish", "indonesian"):
        out[f"dialog-{lang}"] = [t.text for t in C.dialog(lang)]
    tw = C.tweets()
    out["tweets-positive"] = [t.text for t in tw if t.labels.get("sentiment") == "positive"]
    out["tweets-neutral"] = [t.text for t in tw if t.labels.get("sentiment") == "neutral"]
    out["bastion-benign"] = [t.text for t in C.injections() if t.labels.get("label") == "benign"]
    out["critics-fresh"] = [t.text for t in C.critics() if t.labels.get("label") == "fresh"]
    out["drug-reviews"] = [t.text for t in C.drug_reviews()]
    out["insults-not-insult"] = [t.text for t in C.insults() if t.labels.get("label") == "not_insult"]
    out["harmbench"] = [t.text for t in C.harmbench()]
    return out


CONCEPTS = {
    # concept: (site, positive-source builder, pack negatives, sources that are not ordinary for it)
    "prompt_injection": ("layers.9.resid",
                         lambda: [t.text for t in C.injections() if t.labels.get("label") == "malicious"]
                         + [t.text for t in C.jailbreaks()],
                         ["dialog-english", "tweets-positive", "tweets-neutral", "bastion-benign"], []),
    "insult": ("layers.9.resid",
               lambda: [t.text for t in C.insults() if t.labels.get("label") == "insult"],
               ["insults-not-insult", "dialog-english"], ["drug-reviews"]),
    "negative_sentiment": ("layers.19.resid",
                           lambda: [t.text for t in C.critics() if t.labels.get("label") == "rotten"],
                           ["critics-fresh"], ["drug-reviews", "harmbench", "insults-not-insult"]),
}


class ReadOnlyFeatures:
    """Mean-pooled features from the on-disk feature cache, never running the model nor writing."""

    def __init__(self) -> None:
        self.store: dict[str, tuple[dict[str, int], np.ndarray]] = {}

    def _site(self, site: str) -> tuple[dict[str, int], np.ndarray]:
        if site not in self.store:
            paths = sorted(glob.glob(str(cache_dir() / "features" / "*" / "len128*" / f"{site}.npz")))
            if not paths:
                raise SystemExit(f"no cached features for {site}: run `latentwatch probes train --builtin` first")
            with np.load(paths[-1], allow_pickle=False) as z:
                keys, x = z["keys"], z["mean"]
            self.store[site] = ({k: i for i, k in enumerate(keys.tolist())}, x)
        return self.store[site]

    def get(self, texts: list[str], site: str, n: int, seed: int) -> np.ndarray:
        pos, x = self._site(site)
        rows = [pos[k] for k in dict.fromkeys(text_key(t) for t in texts) if k in pos]
        rng = np.random.default_rng(seed)
        rows = rng.permutation(rows)[:n]
        return x[rows].astype(np.float64)


def windows(x: np.ndarray, w: int) -> list[np.ndarray]:
    return [x[i:i + w] for i in range(0, len(x) - w + 1, w)]


def run_split(xpos: np.ndarray, train: dict[str, np.ndarray], held: dict[str, np.ndarray], win: int,
              seed: int, contaminate: float = 0.2) -> list[dict]:
    xneg = np.concatenate(list(train.values()))
    x = np.concatenate([xpos, xneg])
    y = np.r_[np.ones(len(xpos)), np.zeros(len(xneg))]
    itr, ite = train_test_split(np.arange(len(y)), test_size=0.25, stratify=y, random_state=seed)
    sc = StandardScaler().fit(x[itr])
    lr = LogisticRegression(C=0.1, class_weight="balanced", max_iter=2000).fit(sc.transform(x[itr]), y[itr])
    w = lr.coef_[0] / sc.scale_
    b = float(lr.intercept_[0] - sc.mean_ @ w)
    neg_tr, neg_te = x[itr][y[itr] == 0], x[ite][y[ite] == 0]
    logit_te = neg_te @ w + b
    thr = float(np.quantile(logit_te, 1 - CARD_FPR))
    card_fpr = float((logit_te >= thr).mean())

    ref = fit_reference(neg_tr, neg_te, w, b, window=win, seed=seed)
    pos_te = x[ite][y[ite] == 1]
    mu, prec = mahalanobis_baseline(neg_tr)
    maha_held = mahalanobis_stats(neg_te, mu, prec)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(neg_te), size=(500, win))
    maha_thr = float(np.quantile(maha_held[draws].mean(axis=1), 0.99))
    ns = StandardScaler().fit(neg_tr)
    pca = PCA(16, random_state=seed).fit(ns.transform(neg_tr))
    nn = NearestNeighbors(n_neighbors=5).fit(pca.transform(ns.transform(neg_tr)))

    def knn_d(a: np.ndarray) -> np.ndarray:
        return nn.kneighbors(pca.transform(ns.transform(a)))[0].mean(axis=1)

    knn_thr = float(np.quantile(knn_d(neg_te), 0.95))
    knn_held = (knn_d(neg_te) > knn_thr)[draws].mean(axis=1)
    knn_wthr = float(np.quantile(knn_held, 0.99)) or 1.0 / win
    lmu, lsd = float(logit_te.mean()), float(logit_te.std() + 1e-9)

    rows = []
    for name, xs in held.items():
        fpr = float((xs @ w + b >= thr).mean())
        for xw in windows(xs, win):
            # the same window with a concept surge: 20 % of its texts replaced by held-out positives
            xc = xw.copy()
            n_pos = round(contaminate * win)
            xc[:n_pos] = pos_te[rng.integers(0, len(pos_te), n_pos)]
            rows.append({
                "logit_median": ref.logit_ratio(xw @ w + b),
                "logit_median_surge": ref.logit_ratio(xc @ w + b),
                "logit_mean_surge": float(((xc @ w + b).mean() - lmu) / lsd),
                "validity_surge": ref.ratio(ref.record_stats(xc)),
                "source": name, "fpr": fpr, "card_fpr": card_fpr, "invalid": fpr >= 3 * max(card_fpr, 1e-9),
                "validity": ref.ratio(ref.record_stats(xw)),
                "mahalanobis": float(mahalanobis_stats(xw, mu, prec).mean() / maha_thr),
                "knn": float((knn_d(xw) > knn_thr).mean() / knn_wthr),
                "logit_mean": float(((xw @ w + b).mean() - lmu) / lsd),
            })
    return rows


SIGNALS = ("logit_median", "validity", "mahalanobis", "knn", "logit_mean", "logit_median_surge",
           "logit_mean_surge", "validity_surge")
FLAGGED = ("logit_median", "validity", "mahalanobis", "knn")


def summarize(rows: list[dict]) -> dict:
    y = np.array([r["invalid"] for r in rows])
    out: dict = {"windows": len(rows), "invalid_windows": int(y.sum())}
    if 0 < y.sum() < len(y):
        for s in SIGNALS:
            out[f"auroc_{s}"] = round(float(roc_auc_score(y, [r[s] for r in rows])), 3)
    by_src: dict[tuple, list[dict]] = {}
    for r in rows:
        by_src.setdefault((r["split"], r["concept"], r["source"]), []).append(r)
    agree = {s: 0 for s in FLAGGED}
    for group in by_src.values():
        for s in agree:
            agree[s] += int((np.median([r[s] for r in group]) > 1.0) == group[0]["invalid"])
    out["sources"] = len(by_src)
    out["invalid_sources"] = int(sum(g[0]["invalid"] for g in by_src.values()))
    for s, a in agree.items():
        out[f"flag_agreement_{s}"] = round(a / len(by_src), 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer texts per source (< ~60 s)")
    ap.add_argument("--per-source", type=int, default=None)
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--details", type=Path, default=None, help="write per-source rows as JSON here")
    a = ap.parse_args()
    n = a.per_source or (120 if a.quick else 300)
    t0 = time.perf_counter()
    feats = ReadOnlyFeatures()
    ordinary = ordinary_sources()
    rows: list[dict] = []
    skipped = 0
    for concept, (site, positives, pack_neg, exclude) in CONCEPTS.items():
        ptexts = positives()
        xpos = feats.get(ptexts, site, 2 * n, a.seed)
        srcs = {}
        for name, texts in ordinary.items():
            if name in exclude:
                continue
            xs = feats.get(texts, site, n, a.seed)
            skipped += min(n, len(set(texts))) - len(xs)
            if len(xs) >= a.window:
                srcs[name] = xs
        splits = [("pack", [s for s in pack_neg if s in srcs])]
        splits += [("loso", [s for s in srcs if s != h]) for h in srcs]
        for split, train_names in splits:
            held_names = [s for s in srcs if s not in train_names]
            got = run_split(xpos, {s: srcs[s] for s in train_names}, {s: srcs[s] for s in held_names},
                            a.window, a.seed)
            rows += [{**r, "split": split, "concept": concept} for r in got]
    summary = {"all": summarize(rows)}
    for split in ("pack", "loso"):
        summary[split] = summarize([r for r in rows if r["split"] == split])
    for concept in CONCEPTS:
        summary[concept] = summarize([r for r in rows if r["concept"] == concept])

    # per-record cost of the validity statistic (one probe, batch of 4096 records, one thread of numpy)
    site, positives, pack_neg, _ = CONCEPTS["prompt_injection"]
    xs = np.concatenate([feats.get(ordinary[s], site, n, a.seed) for s in pack_neg])
    wts = np.random.default_rng(0).normal(size=xs.shape[1]).astype(np.float32)
    ref = fit_reference(xs[: len(xs) // 2], xs[len(xs) // 2:], wts)
    batch = np.resize(xs, (4096, xs.shape[1])).astype(np.float32)
    logits = batch @ wts
    reps = 20
    t1 = time.perf_counter()
    for _ in range(reps):
        ref.ratio(ref.record_stats(batch))
    us = (time.perf_counter() - t1) / (reps * len(batch)) * 1e6
    t1 = time.perf_counter()
    for _ in range(reps):  # the logit itself is already computed by the scorer; this is the window median
        ref.logit_ratio(logits)
    us_logit = (time.perf_counter() - t1) / (reps * len(batch)) * 1e6

    if a.details:
        a.details.write_text(json.dumps(rows, indent=0))
    for key in ("all", "pack", "loso", *CONCEPTS):
        print(key, json.dumps(summary[key]))
    al = summary["all"]
    print(json.dumps({
        "auroc_logit_median_fpr3x": al.get("auroc_logit_median"),
        "auroc_logit_median_fpr3x_with_20pct_surge": al.get("auroc_logit_median_surge"),
        "auroc_logit_mean_fpr3x_with_20pct_surge": al.get("auroc_logit_mean_surge"),
        "flag_agreement_logit_median_share": al.get("flag_agreement_logit_median"),
        "auroc_validity_fpr3x": al.get("auroc_validity"), "auroc_mahalanobis_fpr3x": al.get("auroc_mahalanobis"),
        "auroc_knn_fpr3x": al.get("auroc_knn"), "auroc_logit_mean_fpr3x": al.get("auroc_logit_mean"),
        "flag_agreement_validity_share": al.get("flag_agreement_validity"),
        "flag_agreement_mahalanobis_share": al.get("flag_agreement_mahalanobis"),
        "held_out_windows": al["windows"], "invalid_windows": al["invalid_windows"],
        "held_out_sources": al["sources"], "invalid_sources": al["invalid_sources"],
        "texts_per_source": n, "window_texts": a.window, "texts_not_in_cache": skipped,
        "subspace_distance_cost_us_per_record": round(us, 3),
        "logit_median_cost_us_per_record": round(us_logit, 4), "seconds": round(time.perf_counter() - t0, 1),
    }))


if __name__ == "__main__":
    main()
