"""From records to the signals the detectors watch, with validation.

Signal families (each ``[n_records, n_components]``):

* ``scores`` -- probe scores, one column per concept;
* ``attn:<site>`` -- per-head attention statistics, ``head<h>.<stat>`` columns;
* ``norm:<site>`` -- mean and last token L2 norm;
* ``act:<site>`` -- mean-pooled activation (input of the multivariate detectors).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from collectors.record import STAT_NAMES, Record
from monitor.probes.probe import ProbeSet


@dataclass(frozen=True)
class SiteShape:
    kind: str  # "resid" or "attn"
    dim: int  # d for resid, n_heads for attn


def shapes_of(record: Record) -> dict[str, SiteShape]:
    """What a record carries, per site."""
    out = {}
    for site, arrays in record.sites.items():
        if "heads" in arrays:
            out[site] = SiteShape("attn", int(arrays["heads"].shape[0]))
        elif "mean" in arrays:
            out[site] = SiteShape("resid", int(arrays["mean"].shape[0]))
    return out


def component_names(family: str, shape: SiteShape | None, probes: ProbeSet | None) -> list[str]:
    if family == "scores":
        return list(probes.concepts) if probes else []
    kind = family.split(":", 1)[0]
    if kind == "attn" and shape is not None:
        return [f"head {h} {s.replace('_', ' ')}" for h in range(shape.dim) for s in STAT_NAMES]
    if kind == "norm":
        return ["mean token norm", "last token norm"]
    return []


def invalid_reason(record: Record, fingerprint: str, shapes: dict[str, SiteShape],
                   probes: ProbeSet | None = None) -> str | None:
    """Why a record cannot be used (``fingerprint``, ``shape``, ``nonfinite``), or None.

    ``wmax`` is optional (records from taps older than it lack it) unless a probe reads it; when present
    it must have the site's dimension.
    """
    if record.fingerprint != fingerprint:
        return "fingerprint"
    for site, shape in shapes.items():
        arrays = record.sites.get(site)
        if arrays is None:
            return "shape"
        if shape.kind == "attn":
            heads = arrays.get("heads")
            if heads is None or heads.shape != (shape.dim, len(STAT_NAMES)):
                return "shape"
        else:
            for name, want in (("mean", (shape.dim,)), ("last", (shape.dim,)), ("norm", (2,))):
                a = arrays.get(name)
                if a is None or a.shape != want:
                    return "shape"
            w = arrays.get("wmax")
            if w is not None and w.shape != (shape.dim,):
                return "shape"
    if probes is not None:
        for site, poolings in probes.needs().items():
            arrays = record.sites.get(site)
            if arrays is None or any(arrays.get(p) is None or arrays[p].ndim != 1 for p in poolings):
                return "shape"
    if not record.is_finite():
        return "nonfinite"
    return None


def extract(records: Sequence[Record], shapes: dict[str, SiteShape], probes: ProbeSet | None) -> dict[str, np.ndarray]:
    """Signal families for ``records``; raises KeyError/ValueError if any record lacks a site or has other dims."""
    out: dict[str, np.ndarray] = {}
    n = len(records)
    for site, shape in shapes.items():
        if shape.kind == "attn":
            heads = np.stack([r.sites[site]["heads"] for r in records])
            if heads.shape[1:] != (shape.dim, len(STAT_NAMES)):
                raise ValueError(f"{site}: heads {heads.shape[1:]}")
            out[f"attn:{site}"] = heads.reshape(n, -1)
        else:
            out[f"act:{site}"] = np.stack([r.sites[site]["mean"] for r in records])
            out[f"norm:{site}"] = np.stack([r.sites[site]["norm"] for r in records])
            last = [r.sites[site]["last"] for r in records]  # checked: probes or later detectors may read it
            if out[f"act:{site}"].shape[1:] != (shape.dim,) or out[f"norm:{site}"].shape[1:] != (2,) or any(
                    a.shape != (shape.dim,) for a in last):
                raise ValueError(f"{site}: dims")
    if probes is not None:
        feats = {}
        for site, poolings in probes.needs().items():
            for pooling in poolings:
                act = out.get(f"act:{site}")
                feats[(site, pooling)] = (act if pooling == "mean" and act is not None else
                                          np.stack([r.sites[site][pooling] for r in records]))
        out["scores"] = probes.score_features(feats)
    return out


def finite_rows(sig: dict[str, np.ndarray]) -> np.ndarray:
    """Boolean ``[n]``: rows finite in every signal family."""
    ok = None
    for arr in sig.values():
        row_ok = np.isfinite(arr).all(axis=1)
        ok = row_ok if ok is None else ok & row_ok
    return ok


def select(sig: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
    return {k: v[rows] for k, v in sig.items()}
