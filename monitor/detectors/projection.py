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


def project(x: np.ndarray, mean: np.ndarray, components: np.ndarray, sd: np.ndarray) -> np.ndarray:
    """Whitened coordinates ``[n, k]``: unit variance along each principal direction on the baseline."""
    return ((np.asarray(x, dtype=np.float64) - mean) @ components.T) / sd
