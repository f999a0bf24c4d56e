"""Names a person knows for what a detector watches: principal directions described by the concepts they
carry, attention heads by number and statistic.

A principal direction ``v`` of a site (unit vector, baseline standard deviation ``s`` along it) is named
after the concept whose probe reads it most: moving the pooled activation by one baseline standard
deviation along ``v`` changes that probe's logit by ``s * (w · v)``, which is divided by the spread of
the probe's logit over the baseline. When that effect is at least :data:`ALIGNED` of the spread, the
direction is ``pc3 (prompt_injection up)`` (the logit rises along +v) or ``(... down)``; otherwise it
stays ``pc3``. The probe direction is read on the pooling the probe was trained on; for a probe on
``last`` or ``wmax`` pooling the alignment with a mean-pooled direction is an approximation. This is a
description of geometry, not evidence that the concept changed: the concept's own scores say that.

>>> import numpy as np
>>> v = np.eye(3)                                            # three principal directions
>>> describe(["pc1", "pc2", "pc3"], v, np.ones(3), {"injection": np.array([0.0, -2.0, 0.0])}, {"injection": 1.0})
['pc1', 'pc2 (injection down)', 'pc3']
"""

from __future__ import annotations

import numpy as np

ALIGNED = 0.3  # share of a concept's baseline logit spread one standard deviation along a direction must move


def describe(names: list[str], directions: np.ndarray, sd: np.ndarray, weights: dict[str, np.ndarray],
             logit_sd: dict[str, float]) -> list[str]:
    """``names`` (``pc<j>`` for row j of ``directions``) with the most aligned concept appended where one is."""
    if not weights:
        return list(names)
    concepts = [c for c in weights if logit_sd.get(c, 0.0) > 0]
    if not concepts:
        return list(names)
    w = np.stack([weights[c] for c in concepts]).astype(np.float64)  # [c, d]
    spread = np.array([logit_sd[c] for c in concepts])
    effect = (np.asarray(directions, dtype=np.float64) @ w.T) * np.asarray(sd, dtype=np.float64)[:, None]
    effect /= spread[None, :]  # [k, c]: logit change per sd along each direction, in baseline logit sds
    out = list(names)
    for j in range(min(len(names), effect.shape[0])):
        if not names[j].startswith("pc"):
            continue
        c = int(np.argmax(np.abs(effect[j])))
        if abs(effect[j, c]) >= ALIGNED:
            out[j] = f"{names[j]} ({concepts[c]} {'up' if effect[j, c] > 0 else 'down'})"
    return out


def logit_spread(scores: np.ndarray, concepts: list[str]) -> dict[str, float]:
    """Standard deviation of each concept's logit over baseline probe scores ``[n, c]`` (probabilities)."""
    p = np.clip(np.asarray(scores, dtype=np.float64), 1e-6, 1 - 1e-6)
    z = np.log(p) - np.log1p(-p)
    return {c: float(z[:, j].std()) for j, c in enumerate(concepts)}


def directions_of(detector: object) -> tuple[np.ndarray, np.ndarray] | None:
    """The principal directions a multivariate detector attributes along, with the baseline sd on each."""
    if hasattr(detector, "eigvec_"):  # meanshift_full: eigendirections of the shrinkage covariance
        return detector.eigvec_, np.sqrt(detector.eigval_)
    if hasattr(detector, "components_") and hasattr(detector, "sd_"):
        return detector.components_, detector.sd_
    return None


def direction_exemplars(slots: list, sig: dict[str, np.ndarray], keys: list[str], top: int = 3
                        ) -> dict[str, dict[str, dict[str, list[str]]]]:
    """Per detector and principal direction (each detector's own basis and sign), the hashed keys of the
    baseline records farthest along it each way: ``{"meanshift:layers.19.resid": {"pc3": {"up": [...],
    "down": [...]}}}``. Look them up where the requests are kept (the audit trail, the application's logs)
    to see what a direction means in text."""
    out: dict[str, dict[str, dict[str, list[str]]]] = {}
    for slot in slots:
        found = directions_of(slot.detector)
        if not slot.family.startswith("act:") or found is None or not slot.components[:1] \
                or not slot.components[0].startswith("pc"):
            continue
        v = np.asarray(found[0], dtype=np.float64)
        x = np.asarray(sig[slot.family], dtype=np.float64)
        z = (x - x.mean(axis=0)) @ v[: len(slot.components)].T
        site_out: dict[str, dict[str, list[str]]] = {}
        for j, name in enumerate(slot.components):
            if not name.startswith("pc") or j >= z.shape[1]:
                continue
            order = np.argsort(z[:, j], kind="stable")
            site_out[name.split(" ", 1)[0]] = {"up": [keys[i] for i in order[::-1][:top]],
                                               "down": [keys[i] for i in order[:top]]}
        out[slot.name] = site_out
    return out
