"""The probe validity statistic on a synthetic in/out split (issue 13, item 3)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from monitor.probes.probe import Probe, ProbeError
from monitor.probes.validity import (
    ValidityError,
    ValidityReference,
    fit_reference,
    mahalanobis_baseline,
    mahalanobis_stats,
)

D = 32


def _data(seed: int = 0):
    """Negatives in domain; an 'out' source shifted along the coordinates the probe reads (raising its
    false positives), and a 'nuisance' source shifted as far on coordinates the probe ignores."""
    rng = np.random.default_rng(seed)
    w = np.zeros(D, np.float32)
    w[:4] = 1.0
    neg = rng.normal(size=(600, D))
    out = rng.normal(size=(200, D))
    out[:, :4] += 1.5
    nuisance = rng.normal(size=(200, D))
    nuisance[:, 16:20] += 1.5
    return w, neg, out, nuisance


def test_validity_flags_shift_the_probe_reads_and_not_one_it_ignores():
    w, neg, out, nuisance = _data()
    ref = fit_reference(neg[:400], neg[400:], w, k=4, window=50)
    in_ratio = ref.ratio(ref.record_stats(neg[400:450]))
    out_ratio = ref.ratio(ref.record_stats(out[:50]))
    nuis_ratio = ref.ratio(ref.record_stats(nuisance[:50]))
    assert in_ratio < 1.0 < out_ratio
    assert nuis_ratio < 1.0
    # the probe's FPR really is higher on 'out' (the thing validity should predict) and not on 'nuisance'
    thr = np.quantile(neg[:400] @ w, 0.95)
    assert (out @ w >= thr).mean() > 3 * 0.05
    assert (nuisance @ w >= thr).mean() < 2 * 0.05
    # the full-space Mahalanobis baseline cannot tell the two shifts apart
    mu, prec = mahalanobis_baseline(neg[:400])
    m_out, m_nuis = mahalanobis_stats(out, mu, prec).mean(), mahalanobis_stats(nuisance, mu, prec).mean()
    assert abs(m_out - m_nuis) / m_out < 0.15


def test_threshold_is_calibrated_on_held_out_windows():
    w, neg, _, _ = _data(1)
    ref = fit_reference(neg[:400], neg[400:], w, k=4, window=50, quantile=0.9)
    rng = np.random.default_rng(5)
    fresh = rng.normal(size=(5000, D))
    ratios = np.array([ref.ratio(ref.record_stats(fresh[i:i + 50])) for i in range(0, 5000, 50)])
    assert 0.02 <= (ratios > 1).mean() <= 0.3  # about 1 - quantile of in-domain windows exceed it
    assert 0.7 < np.median(ref.record_stats(fresh)) < 1.3  # the statistic is ~1 in domain


def test_validity_round_trips_in_the_probe_artifact_and_old_files_load(tmp_path):
    w, neg, out, _ = _data()
    ref = fit_reference(neg[:400], neg[400:], w, k=4, window=50)
    base = dict(concept="c", site="layers.1.resid", pooling="mean", weights=w, bias=0.0, model="m",
                fingerprint="sha256-x")
    old = Probe(**base).save(tmp_path / "old.probe.json")
    assert "validity" not in json.loads(old.read_text())
    assert Probe.load(old).validity is None
    new = Probe(**base, validity=ref).save(tmp_path / "new.probe.json")
    back = Probe.load(new).validity
    assert back is not None and back.threshold == pytest.approx(ref.threshold)
    np.testing.assert_allclose(back.record_stats(out[:20]), ref.record_stats(out[:20]), rtol=1e-5)
    body = json.loads(new.read_text())
    body["validity"]["threshold"] = 123.0
    (tmp_path / "bad.probe.json").write_text(json.dumps(body))
    with pytest.raises(ProbeError, match="checksum"):
        Probe.load(tmp_path / "bad.probe.json")


def test_malformed_reference_is_refused_in_one_line():
    w, neg, _, _ = _data()
    body = fit_reference(neg[:400], neg[400:], w, k=4).to_dict()
    with pytest.raises(ValidityError, match=r"\[16, k\]"):
        ValidityReference.from_dict(body, dim=16)
    with pytest.raises(ValidityError, match="needs >= 3"):
        fit_reference(neg[:2], neg[400:], w)
