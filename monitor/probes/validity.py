"""Probe validity: how far live inputs at a probe's site are from the data the probe was carded on.

A probe's card states its false-positive rate on the texts it was measured on. On traffic unlike those
texts the rate can be several times higher, and a concept-rate alarm then reports the probe's failure as
a change in traffic. This module gives each probe a cheap **validity statistic** in the probe's own
feature space, calibrated at training time, so the monitor can say "scores of concept X are not
trustworthy on current traffic" instead of "concept X rose".

The statistic (fit by :func:`fit_reference`, stored without pickle in the probe artifact):

1. Standardise the site's pooled activation with the training negatives' mean and standard deviation.
2. The *directions that matter to the probe*: the probe's weight vector (in standardised space) and
   the top principal directions of the standardised training negatives weighted by ``|w|`` (the
   coordinates the probe reads most).
3. Whiten the projection on those ``k`` directions with the training negatives' covariance
   (Ledoit-Wolf shrinkage). A record's statistic is its mean squared whitened coordinate; a window's
   statistic is the mean over its records. On in-domain data it is about 1.
4. The threshold is a high quantile of window statistics on *held-out* negatives (texts the probe
   was not fitted on); the exported **validity ratio** is window statistic / threshold, so a ratio
   above 1 says "out of domain".

Cost per record: one ``[d] x [d, k]`` product and ``k`` squares (standardisation and whitening are
folded into the projection matrix).

This is a distance, not a measured error rate: a window far from the training data *may* have a
false-positive rate unlike the card's; bench/probe_validity.py measures how well the distance predicts
"FPR >= 3x card" on sources held out of training, next to a full-space Mahalanobis baseline. The probe
itself stays correlational evidence, valid or not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.covariance import LedoitWolf
from sklearn.decomposition import PCA

FORMAT = "latentwatch-validity-v1"


class ValidityError(ValueError):
    """A validity reference that is malformed or does not fit its probe."""


@dataclass
class ValidityReference:
    """Folded projection ``P [d, k]`` and centre ``c [k]``: record statistic ``||x @ P - c||^2 / k``."""

    projection: np.ndarray
    center: np.ndarray
    threshold: float
    window: int
    quantile: float
    calibration: dict[str, Any]
    logit_median: float = 0.0  # median probe logit of held-out negatives
    logit_threshold: float = 1.0  # calibrated quantile of held-out windows' median logit

    def logit_ratio(self, logits: np.ndarray) -> float:
        """Window ratio of the median probe logit's excess over held-out negatives (> 1: out of domain).

        ``(median(window) - logit_median) / (logit_threshold - logit_median)``. The median ignores up to
        half the window being true positives, so a concept surge of less than ~50 % of traffic does not
        look like invalidity (the mean would).
        """
        z = np.asarray(logits, dtype=np.float64)
        if not z.size:
            return float("nan")
        return float((np.median(z) - self.logit_median) / max(self.logit_threshold - self.logit_median, 1e-6))

    @property
    def k(self) -> int:
        return int(self.projection.shape[1])

    def record_stats(self, x: np.ndarray) -> np.ndarray:
        """Per-record statistic for pooled activations ``x`` ``[n, d]`` (about 1 in domain)."""
        z = np.asarray(x, dtype=np.float32) @ self.projection - self.center
        return np.einsum("ij,ij->i", z, z) / self.k

    def ratio(self, stats: np.ndarray) -> float:
        """Window validity ratio: mean record statistic / calibrated threshold (> 1: out of domain)."""
        s = np.asarray(stats, dtype=np.float64)
        return float(s.mean() / self.threshold) if s.size else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "k": self.k, "threshold": float(self.threshold), "window": int(self.window),
            "quantile": float(self.quantile), "calibration": self.calibration,
            "logit_median": float(self.logit_median), "logit_threshold": float(self.logit_threshold),
            "center": [float(v) for v in self.center.astype(np.float32)],
            "projection": [[float(v) for v in row] for row in self.projection.astype(np.float32)],
        }

    @classmethod
    def from_dict(cls, body: Any, dim: int, where: str = "probe") -> ValidityReference:
        if not isinstance(body, dict) or body.get("format") != FORMAT:
            raise ValidityError(f"{where}: validity reference is not {FORMAT}")
        try:
            proj = np.asarray(body["projection"], dtype=np.float32)
            center = np.asarray(body["center"], dtype=np.float32)
            ref = cls(projection=proj, center=center, threshold=float(body["threshold"]),
                      window=int(body["window"]), quantile=float(body["quantile"]),
                      calibration=dict(body.get("calibration", {})),
                      logit_median=float(body["logit_median"]), logit_threshold=float(body["logit_threshold"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValidityError(f"{where}: malformed validity reference: {exc}") from exc
        if proj.ndim != 2 or proj.shape[0] != dim or center.shape != (proj.shape[1],):
            raise ValidityError(f"{where}: validity projection must be [{dim}, k] with a k-vector centre")
        if not (np.isfinite(proj).all() and np.isfinite(center).all() and ref.threshold > 0):
            raise ValidityError(f"{where}: validity reference must be finite with a positive threshold")
        return ref


def probe_directions(z: np.ndarray, w_std: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """``[d, k]`` directions in standardised space: ``w`` itself plus top PCs of ``z * |w|`` mapped back."""
    aw = np.abs(w_std)
    dirs = [w_std / (np.linalg.norm(w_std) + 1e-12)]
    n_pc = max(0, min(k - 1, z.shape[0] - 1, z.shape[1] - 1))
    if n_pc:
        pcs = PCA(n_components=n_pc, random_state=seed).fit(z * aw).components_  # [n_pc, d] in weighted space
        dirs.extend(aw * u for u in pcs)  # (z * |w|) . u == z . (|w| * u)
    basis = np.stack(dirs, axis=1)
    q, _ = np.linalg.qr(basis)
    return q.astype(np.float64)


def fit_reference(
    x_fit: np.ndarray,
    x_held: np.ndarray,
    weights: np.ndarray,
    bias: float = 0.0,
    *,
    k: int = 8,
    window: int = 64,
    quantile: float = 0.99,
    n_windows: int = 500,
    seed: int = 0,
    held_logits: np.ndarray | None = None,
    held_groups: np.ndarray | None = None,
) -> ValidityReference:
    """Fit on negatives ``x_fit`` and calibrate the threshold on held-out negatives ``x_held``.

    ``weights`` is the probe's weight vector in raw activation space (as stored in the artifact). The
    threshold is the ``quantile`` of the mean statistic over ``n_windows`` random windows of ``window``
    held-out records drawn with replacement.

    The logit reference (what the monitor watches, :meth:`ValidityReference.logit_ratio`) comes from
    ``held_logits`` (default: the probe's logits on ``x_held``): probe logits of negatives from sources
    the scoring model never saw, e.g. leave-one-source-out logits. With ``held_groups`` (a source per
    held-out logit) every window is drawn within one source, the way traffic arrives, so the threshold
    covers the spread *between* ordinary sources, not only within their mix.
    """
    x_fit = np.asarray(x_fit, dtype=np.float64)
    x_held = np.asarray(x_held, dtype=np.float64)
    if x_fit.ndim != 2 or x_fit.shape[0] < 3 or x_held.shape[0] < 2:
        raise ValidityError(f"validity needs >= 3 fit and >= 2 held-out negatives, got {len(x_fit)} and {len(x_held)}")
    mean = x_fit.mean(axis=0)
    scale = x_fit.std(axis=0) + 1e-6
    z = (x_fit - mean) / scale
    w_std = np.asarray(weights, dtype=np.float64) * scale  # the probe's weights on standardised inputs
    basis = probe_directions(z, w_std, k, seed)  # [d, k]
    proj_fit = z @ basis
    cov = LedoitWolf().fit(proj_fit).covariance_
    evals, evecs = np.linalg.eigh(cov)
    whiten = evecs / np.sqrt(np.maximum(evals, 1e-12))  # [k, k]
    projection = (basis / scale[:, None]) @ whiten  # x -> standardise -> basis -> whiten, folded
    center = (mean @ projection) + proj_fit.mean(axis=0) @ whiten
    ref = ValidityReference(projection=projection.astype(np.float32), center=center.astype(np.float32),
                            threshold=1.0, window=window, quantile=quantile, calibration={})
    held = ref.record_stats(x_held)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(held), size=(n_windows, window))  # bootstrap windows of held-out records
    thr = float(np.quantile(held[draws].mean(axis=1), quantile))
    ref.threshold = max(thr, 1e-6)
    logits = (x_held @ np.asarray(weights, dtype=np.float64) + bias if held_logits is None
              else np.asarray(held_logits, dtype=np.float64))
    if held_groups is None:
        idx = rng.integers(0, len(logits), size=(n_windows, window))
    else:
        members = [np.flatnonzero(np.asarray(held_groups) == g) for g in np.unique(held_groups)]
        pick = rng.integers(0, len(members), size=n_windows)
        idx = np.stack([members[g][rng.integers(0, len(members[g]), size=window)] for g in pick])
    ref.logit_median = float(np.median(logits))
    ref.logit_threshold = float(np.quantile(np.median(logits[idx], axis=1), quantile))
    ref.calibration = {
        "fit_negatives": len(x_fit), "held_out_negatives": len(x_held),
        "held_out_record_stat_median": round(float(np.median(held)), 4),
        "method": f"{quantile} quantile of the mean statistic over {n_windows} windows of {window} "
                  "held-out negatives",
        "logit_method": f"{quantile} quantile of the median probe logit over {n_windows} windows of {window} "
                        + ("held-out negatives" if held_groups is None else
                           f"negatives of one held-out source each ({len(np.unique(held_groups))} sources)"),
    }
    return ref


def mahalanobis_baseline(x_fit: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Full-space baseline: ``(mean, precision)`` of the negatives (Ledoit-Wolf), for comparison only."""
    lw = LedoitWolf().fit(np.asarray(x_fit, dtype=np.float64))
    return lw.location_, lw.precision_


def mahalanobis_stats(x: np.ndarray, mean: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """Squared Mahalanobis distance per record to ``mean`` under ``precision``."""
    d = np.asarray(x, dtype=np.float64) - mean
    return np.einsum("ij,jk,ik->i", d, precision, d)
