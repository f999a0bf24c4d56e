"""A whitened PCA projection learned on baseline activations (shared by the multivariate detectors)."""

from __future__ import annotations

import numpy as np


def fit_pca(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return ``(mean [d], components [k, d], sd [k])``: the top-k principal directions of ``x`` ``[n, d]``."""
    x = np.asarray(x, dtype=np.float64)
    mean = x.mean(axis=0)
    _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
    k = min(k, vt.shape[0])
    sd = s[:k] / np.sqrt(max(1, x.shape[0] - 1))
    return mean, vt[:k], np.maximum(sd, 1e-12)


def project(x: np.ndarray, mean: np.ndarray, components: np.ndarray, sd: np.ndarray,
            cache: dict | None = None) -> np.ndarray:
    """Whitened coordinates ``[n, k]``: unit variance along each principal direction on the baseline.

    Detectors of one site share one projection: with a ``cache`` dict (one per batch) it is computed once.
    """
    key = (id(x), id(components))
    if cache is not None and key in cache:
        return cache[key][1]
    x = np.asarray(x)
    raw = (x - mean.astype(x.dtype, copy=False)) @ components.T.astype(x.dtype, copy=False)
    z = raw / sd
    if cache is not None:
        cache[key] = (raw, z)
    return z


def projected_energy(x: np.ndarray, mean: np.ndarray, components: np.ndarray, sd: np.ndarray,
                     cache: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(||x − mean||², ||projection||²)`` per row, reusing a cached projection."""
    project(x, mean, components, sd, cache if cache is not None else (cache := {}))
    raw = cache[(id(x), id(components))][0]
    c = np.asarray(x) - mean.astype(np.asarray(x).dtype, copy=False)
    return np.einsum("ij,ij->i", c, c, dtype=np.float64), np.einsum("ij,ij->i", raw, raw, dtype=np.float64)
