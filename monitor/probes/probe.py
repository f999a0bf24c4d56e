"""Probe artifacts (JSON, no pickle, checksummed) and vectorized scoring.

A probe is a calibrated linear readout of one concept at one site: ``p = sigmoid(x · w + b)`` on the
site's pooled activation ``x``. Standardisation and Platt calibration are folded into ``w`` and
``b`` at training time, so scoring every probe of a site is one matrix product.

A probe is **correlational evidence** about what the model's activations encode, measured on the
texts it was trained on. It is not proof that the model "uses" the concept, and its quality can
fall on text unlike its training sources; the probe card says how it was measured.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from collectors.record import Record
from monitor.probes.validity import ValidityError, ValidityReference

FORMAT = "latentwatch-probe"
POOLINGS = ("mean", "last", "wmax")  # the tap's pooled arrays a probe can read (collectors/signature.py)
VERSION = 1
CAVEAT = (
    "A probe score is correlational evidence that the model's activations at this site separate the "
    "training texts' labels; it is not proof of mechanism, and quality can drop on text unlike the "
    "training sources (see cross-source figures)."
)


class ProbeError(ValueError):
    """A probe artifact that is corrupt, tampered with, or made for another model or site."""


@dataclass
class Probe:
    concept: str
    site: str
    pooling: str
    weights: np.ndarray
    bias: float
    model: str
    fingerprint: str
    threshold: float = 0.5
    card: dict[str, Any] = field(default_factory=dict)
    validity: ValidityReference | None = None  # optional (issue 13): files without it stay loadable

    @property
    def dim(self) -> int:
        return int(self.weights.shape[0])

    def score(self, x: np.ndarray) -> np.ndarray:
        """Calibrated probability of the concept for pooled activations ``x`` (``[n, d]`` or ``[d]``)."""
        return _sigmoid(np.asarray(x, dtype=np.float32) @ self.weights + self.bias)

    # ------------------------------------------------------------ artifact
    def to_dict(self) -> dict[str, Any]:
        body = {
            "format": FORMAT, "version": VERSION, "concept": self.concept, "site": self.site,
            "pooling": self.pooling, "dim": self.dim, "model": self.model, "fingerprint": self.fingerprint,
            "threshold": float(self.threshold), "bias": float(self.bias),
            "weights": [float(v) for v in self.weights.astype(np.float32)], "card": self.card,
        }
        if self.validity is not None:  # only when present, so older artifacts keep their checksum
            body["validity"] = self.validity.to_dict()
        body["sha256"] = checksum(body)
        return body

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1, allow_nan=False))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path, *, fingerprint: str | None = None,
             sites: dict[str, int] | None = None) -> Probe:
        """Load and verify a probe; with ``fingerprint``/``sites`` (site -> dim) also check it fits the model."""
        path = Path(path)
        try:
            body = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ProbeError(f"{path}: not a readable probe file: {exc}") from exc
        probe = cls.from_dict(body, where=str(path))
        probe.check(fingerprint=fingerprint, sites=sites, where=str(path))
        return probe

    @classmethod
    def from_dict(cls, body: Any, where: str = "probe") -> Probe:
        if not isinstance(body, dict) or body.get("format") != FORMAT:
            raise ProbeError(f"{where}: not a latentwatch probe")
        if body.get("version") != VERSION:
            raise ProbeError(f"{where}: probe format version {body.get('version')!r}, this build reads {VERSION}")
        if body.get("sha256") != checksum({k: v for k, v in body.items() if k != "sha256"}):
            raise ProbeError(f"{where}: checksum mismatch: the probe file was modified or is corrupt")
        try:
            weights = np.asarray(body["weights"], dtype=np.float32)
            probe = cls(
                concept=str(body["concept"]), site=str(body["site"]), pooling=str(body["pooling"]),
                weights=weights, bias=float(body["bias"]), model=str(body["model"]),
                fingerprint=str(body["fingerprint"]), threshold=float(body["threshold"]), card=dict(body["card"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ProbeError(f"{where}: malformed probe: {exc}") from exc
        if weights.ndim != 1 or weights.shape[0] != body.get("dim") or not np.isfinite(weights).all():
            raise ProbeError(f"{where}: weights must be {body.get('dim')} finite numbers")
        if probe.pooling not in POOLINGS:
            raise ProbeError(f"{where}: unknown pooling {probe.pooling!r}")
        if body.get("validity") is not None:
            try:
                probe.validity = ValidityReference.from_dict(body["validity"], probe.dim, where)
            except ValidityError as exc:
                raise ProbeError(str(exc)) from exc
        return probe

    def check(self, *, fingerprint: str | None = None, sites: dict[str, int] | None = None,
              where: str = "probe") -> None:
        """Refuse a probe made for another model, or whose site or dimension the model does not have."""
        if fingerprint is not None and fingerprint != self.fingerprint:
            raise ProbeError(
                f"{where}: probe {self.concept!r} was trained on model {self.model} ({self.fingerprint}), "
                f"but the running model is {fingerprint}; retrain it with `latentwatch probes train`"
            )
        if sites is not None:
            if self.site not in sites:
                raise ProbeError(f"{where}: probe {self.concept!r} reads site {self.site!r}, which is not "
                                 f"monitored (monitored: {', '.join(sites)})")
            if sites[self.site] != self.dim:
                raise ProbeError(f"{where}: probe {self.concept!r} expects {self.dim} dims at {self.site}, "
                                 f"the model gives {sites[self.site]}")



def hits(scores: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """The one definition of a concept *hit*: a score at or above its probe's decision threshold.

    Concept rates everywhere (the baseline's base rates, the rate detector, the sidecar's window rates,
    the report and the demo) are shares of hits.
    """
    return np.asarray(scores) >= np.asarray(thresholds)

class ProbeSet:
    """All probes of one model, scored together: one matrix product per (site, pooling)."""

    def __init__(self, probes: Sequence[Probe]) -> None:
        if not probes:
            raise ProbeError("a probe set needs at least one probe")
        names = [p.concept for p in probes]
        if len(set(names)) != len(names):
            raise ProbeError(f"duplicate concepts in probe set: {names}")
        fps = {p.fingerprint for p in probes}
        if len(fps) != 1:
            raise ProbeError(f"probes were trained on different models: {sorted(fps)}")
        self.probes = list(probes)
        self.fingerprint = fps.pop()
        self.concepts = names
        self.thresholds = np.array([p.threshold for p in probes], dtype=np.float32)
        self.groups: list[tuple[str, str, np.ndarray, np.ndarray, np.ndarray]] = []
        by_key: dict[tuple[str, str], list[int]] = {}
        for i, p in enumerate(probes):
            by_key.setdefault((p.site, p.pooling), []).append(i)
        for (site, pooling), idx in by_key.items():
            w = np.stack([probes[i].weights for i in idx], axis=1).astype(np.float32)  # [d, k]
            b = np.array([probes[i].bias for i in idx], dtype=np.float32)
            self.groups.append((site, pooling, w, b, np.array(idx)))

    @classmethod
    def load_dir(cls, folder: str | Path, *, fingerprint: str | None = None,
                 sites: dict[str, int] | None = None) -> ProbeSet:
        paths = sorted(Path(folder).glob("*.probe.json"))
        if not paths:
            raise ProbeError(f"no *.probe.json files in {folder}")
        return cls([Probe.load(p, fingerprint=fingerprint, sites=sites) for p in paths])

    def above(self, scores: np.ndarray) -> np.ndarray:
        """Boolean ``[n, n_concepts]``: which scores count as a hit of their concept (see :func:`hits`)."""
        return hits(scores, self.thresholds)

    def needs(self) -> dict[str, set[str]]:
        """``{site: {pooling}}`` the probes read."""
        out: dict[str, set[str]] = {}
        for site, pooling, *_ in self.groups:
            out.setdefault(site, set()).add(pooling)
        return out

    def score_features(self, features: dict[tuple[str, str], np.ndarray]) -> np.ndarray:
        """Scores ``[n, n_concepts]`` from ``{(site, pooling): X [n, d]}``."""
        n = next(iter(features.values())).shape[0]
        out = np.empty((n, len(self.probes)), dtype=np.float32)
        for site, pooling, w, b, idx in self.groups:
            out[:, idx] = _sigmoid(features[(site, pooling)] @ w + b)
        return out

    def score(self, records: Sequence[Record]) -> np.ndarray:
        """Scores ``[len(records), n_concepts]`` (columns in :attr:`concepts` order)."""
        feats = {(site, pooling): np.stack([r.sites[site][pooling] for r in records]).astype(np.float32)
                 for site, pooling, *_ in self.groups}
        return self.score_features(feats)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return (0.5 * (1.0 + np.tanh(0.5 * z))).astype(np.float32)


def checksum(body: dict[str, Any]) -> str:
    """SHA-256 of ``body`` as canonical JSON (sorted keys, no spaces, no NaN): probe and gate report files."""
    canon = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(canon.encode()).hexdigest()


def expected_calibration_error(y: np.ndarray, p: np.ndarray, bins: int = 10) -> float:
    """Mean |accuracy − confidence| over equal-width probability bins, weighted by bin size."""
    y, p = np.asarray(y, float), np.asarray(p, float)
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(p, edges[1:-1]), 0, bins - 1)
    err = 0.0
    for b in range(bins):
        m = which == b
        if m.any():
            err += m.mean() * abs(y[m].mean() - p[m].mean())
    return float(err) if math.isfinite(err) else float("nan")
