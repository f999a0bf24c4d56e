"""Physically implausible values: finite, but far outside anything the model produced in the baseline.

One finite but huge record (a bit flip in an exponent, a forged row, a tap bug) must not blind a detector
for a window or longer. The baseline learns, per signal family (``act:<site>``, ``norm:<site>``,
``attn:<site>``), the largest absolute value any reference or calibration record had; live rows with a
value above ``FACTOR`` times that are refused as ``implausible`` (counted, never analyzed). Real drift,
even a strong one, stays far below: activation norms of a shifted input distribution move by tens of
percent, not by an order of magnitude.
"""

from __future__ import annotations

import numpy as np

FACTOR = 10.0
FAMILIES = ("act:", "norm:", "attn:")
INFO_KEY = "plausible_max_abs"  # in Baseline.info: {family: largest |value| of the baseline's records}


def learn(*sigs: dict[str, np.ndarray]) -> dict[str, float]:
    """The largest absolute value per signal family over the given signal sets."""
    out: dict[str, float] = {}
    for sig in sigs:
        for family, arr in sig.items():
            if family.startswith(FAMILIES) and arr.size:
                out[family] = max(out.get(family, 0.0), float(np.abs(arr).max()))
    return out


def plausible_rows(sig: dict[str, np.ndarray], bounds: dict[str, float], factor: float = FACTOR) -> np.ndarray:
    """Boolean ``[n]``: rows whose every value is within ``factor`` times the baseline's largest."""
    ok: np.ndarray | None = None
    for family, bound in bounds.items():
        arr = sig.get(family)
        if arr is None:
            continue
        row_ok = np.abs(arr).max(axis=1) <= factor * max(bound, 1e-6)
        ok = row_ok if ok is None else ok & row_ok
    if ok is None:
        n = len(next(iter(sig.values()))) if sig else 0
        return np.ones(n, dtype=bool)
    return ok
