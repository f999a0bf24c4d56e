"""Concept rate: the share of a window's requests whose probe score crosses the probe's threshold.

Each record becomes 0/1 per concept (score ≥ threshold, :func:`monitor.probes.probe.hits`). Against
the baseline rate ``p0`` of a concept, a window with ``h`` hits out of ``W`` gets the binomial upper
tail ``P(X ≥ h)``, ``X ~ Binomial(W, p0)``; the per-concept statistic is ``−log10`` of it, and the
detector's statistic is the largest over concepts. A *surge* of jailbreak attempts or toxic prompts,
not a drop, is what pages someone.

Why the exact tail and not a z-score: concepts are rare (``p0`` of 1 % or less on ordinary traffic),
and at a window of a few hundred records a z-score of a rare count is far from normal: its extreme
quantiles sit much higher than for a common concept, so a threshold on the *maximum* z would be set
by the rarest concept and blind the others. ``−log10`` tail probabilities compare concepts on one
scale. The threshold itself is not a fixed number: calibration sets it on simulated no-drift
streams with the other detectors (``monitor.analysis.calibration``), with the baseline's groups, so
the between-group variation of concept rates (overdispersion) is in it too.

Traffic comes in groups (documents, conversations, tenants), and a concept's share differs between
them far more than a binomial allows: a health conversation scores "health" on most of its turns,
an injection never appears in ordinary dialog. Fitted with the baseline's ``groups``, each concept's
null is therefore a **beta-binomial** with the concept's intra-group correlation ``ρ`` (the ANOVA
estimator for binary data, Fleiss, "Statistical Methods for Rates and Proportions", ch. 15): a
concept that clusters by group has a wider null, one that does not keeps the binomial (``ρ = 0``).
Without it, the concept with the most clustered groups would set the one calibrated threshold of
this detector, and a surge of any other concept would have to beat that concept's ordinary topical
bursts (the demo's 42 % injection surge went unseen behind health conversations).

When ``concurrent_groups`` groups are served side by side (sessions, tenants), each record of a
window comes from one of ``C`` open groups at random, so two records of a window share a group with
probability about ``1 / C`` and the overdispersion of its count is ``1 + (W − 1) ρ / C`` instead of
``1 + (W − 1) ρ``: the beta-binomial uses ``ρ / C``.

Components (attribution and the per-concept surge metric) are the per-concept ``−log10`` tails.

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> det = ConceptRate(thresholds=[0.5]).fit(rng.uniform(size=(5000, 1)) * 0.52)   # ~4 % above 0.5
>>> same = det.statistic(det.transform(rng.uniform(size=(200, 1)) * 0.52)[None])[0]
>>> surge = det.statistic(det.transform(rng.uniform(size=(200, 1)) * 0.6)[None])[0]   # ~17 %
>>> bool(same < 2 < 8 < surge)
True

References: the binomial (p-chart) test of a proportion; Montgomery, "Introduction to Statistical
Quality Control", ch. 7.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.stats import betabinom, binom

from monitor.analysis.detectors.base import as_windows
from monitor.probes.probe import hits

MIN_ICC = 1e-4  # below this intra-group correlation a concept keeps the binomial null (the same to rounding)


class ConceptRate:
    name = "rate"

    def __init__(self, thresholds: Sequence[float] = (0.5,), min_rate: float = 0.002,
                 concurrent_groups: int = 1) -> None:
        self.thresholds = np.asarray(thresholds, dtype=np.float64)
        self.min_rate = min_rate
        self.concurrent_groups = concurrent_groups
        self._tables: dict[int, np.ndarray] = {}

    def transform(self, scores: np.ndarray, cache: dict | None = None) -> np.ndarray:
        return hits(np.asarray(scores, dtype=np.float64), self.thresholds).astype(np.float64)

    def fit(self, reference_scores: np.ndarray, groups: np.ndarray | None = None) -> ConceptRate:
        h = self.transform(reference_scores)
        rates = h.mean(axis=0)
        self.rate_ = np.clip(rates, self.min_rate, 1 - self.min_rate)  # never a zero-variance baseline
        self.baseline_rate_ = rates
        self.icc_ = intra_group_correlation(h, groups) if groups is not None else np.zeros(h.shape[1])
        self._tables = {}
        return self

    def _table(self, size: int) -> np.ndarray:
        """``[size + 1, concepts]``: −log10 P(X ≥ h) for h = 0..size."""
        table = self._tables.get(size)
        if table is None:
            h = np.arange(size + 1)[:, None]
            log_pmf = binom.logpmf(h, size, self.rate_[None, :])
            icc = self.icc_ / self.concurrent_groups  # two records of a window share a group w.p. ~1/C
            for c in np.flatnonzero(icc >= MIN_ICC):  # clustered concepts: the beta-binomial
                spread = (1 - icc[c]) / icc[c]
                a, b = self.rate_[c] * spread, (1 - self.rate_[c]) * spread
                log_pmf[:, c] = betabinom.logpmf(h[:, 0], size, a, b)
            # log P(X >= h) summed from the pmf: scipy's logsf is log(1 - cdf), which saturates near 1e-16
            # (and turns NaN for the beta-binomial once the cdf rounds above 1)
            table = -np.logaddexp.accumulate(log_pmf[::-1], axis=0)[::-1] / np.log(10)
            self._tables[size] = table = np.maximum(table, 0.0)
        return table

    def _tail(self, mean: np.ndarray, size: int) -> np.ndarray:
        count = np.clip(np.rint(mean * size).astype(np.int64), 0, size)
        return self._table(size)[count, np.arange(count.shape[1])]

    def statistic(self, windows: np.ndarray) -> np.ndarray:
        w = as_windows(windows)
        return self.statistic_from_mean(w.mean(axis=1), w.shape[1])

    def statistic_from_mean(self, mean: np.ndarray, size: int) -> np.ndarray:
        """The statistic from window means ``[n, c]`` (it depends on nothing else)."""
        return self._tail(np.asarray(mean), size).max(axis=1)

    def components(self, window: np.ndarray) -> np.ndarray:
        w = as_windows(window)
        return self._tail(w.mean(axis=1), w.shape[1])[0]

    def state(self) -> dict[str, Any]:
        return {"thresholds": self.thresholds, "rate": self.rate_, "baseline_rate": self.baseline_rate_,
                "min_rate": np.array([self.min_rate]), "icc": self.icc_,
                "concurrent_groups": np.array([self.concurrent_groups])}

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray]) -> ConceptRate:
        concurrent = int(state["concurrent_groups"][0]) if "concurrent_groups" in state else 1  # older files
        det = cls(thresholds=state["thresholds"], min_rate=float(state["min_rate"][0]), concurrent_groups=concurrent)
        det.rate_, det.baseline_rate_ = np.asarray(state["rate"]), np.asarray(state["baseline_rate"])
        det.icc_ = np.asarray(state["icc"]) if "icc" in state else np.zeros(len(det.rate_))  # older files
        return det


def intra_group_correlation(hits: np.ndarray, groups: np.ndarray, most: float = 0.95) -> np.ndarray:
    """Per column of 0/1 ``hits`` ``[n, c]``: the ANOVA estimate of the intra-group correlation, in ``[0, most]``.

    ``ρ = (MSB − MSW) / (MSB + (n0 − 1) MSW)`` with the between- and within-group mean squares and
    ``n0`` the effective group size; 0 with fewer than two groups or no hits.

    >>> g = np.repeat(np.arange(20), 10)
    >>> clustered = (g % 5 == 0)[:, None].astype(float)       # all of a group, or none of it
    >>> bool(intra_group_correlation(clustered, g)[0] > 0.9)
    True
    """
    hits = np.asarray(hits, dtype=np.float64)
    _, inv, sizes = np.unique(np.asarray(groups), return_inverse=True, return_counts=True)
    n, k = len(hits), len(sizes)
    if k < 2 or n <= k:
        return np.zeros(hits.shape[1])
    p = hits.mean(axis=0)
    pg = np.stack([np.bincount(inv, weights=hits[:, c], minlength=k) for c in range(hits.shape[1])], axis=1)
    pg /= sizes[:, None]
    msb = (sizes[:, None] * (pg - p) ** 2).sum(axis=0) / (k - 1)
    msw = (sizes[:, None] * pg * (1 - pg)).sum(axis=0) / (n - k)
    n0 = (n - (sizes**2).sum() / n) / (k - 1)
    denom = msb + (n0 - 1) * msw
    rho = np.divide(msb - msw, denom, out=np.zeros_like(p), where=denom > 0)
    return np.clip(rho, 0.0, most)
