"""Probes trained on real text: better than a shuffled-label control, honest artifacts, exact scoring."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from collectors.fingerprint import fingerprint
from monitor.probes.activations import FeatureCache
from monitor.probes.concepts import ConceptSpec, load_spec
from monitor.probes.probe import Probe, ProbeError, ProbeSet
from monitor.probes.train import _fold, evaluate, fit_pipeline, train_probe


@pytest.fixture(scope="module")
def cache(smollm2, tmp_path_factory):
    return FeatureCache(smollm2, max_length=64, root=tmp_path_factory.mktemp("features"))


@pytest.fixture(scope="module")
def language_probe(smollm2, cache):
    spec = ConceptSpec(
        concept="non_english",
        positive=[{"source": "chatterbot", "args": {"lang": "french"}},
                  {"source": "chatterbot", "args": {"lang": "german"}}],
        negative=[{"source": "chatterbot", "args": {"lang": "english"}}, {"source": "tweets"},
                  {"source": "rotten-tomatoes"}],
        held_out_ordinary=[{"source": "python-docs"}],
        held_out_positive={"spanish": [{"source": "chatterbot", "args": {"lang": "spanish"}}]},
        topical={"english_food_quotes": [{"source": "fortunes", "args": {"lang": "en"}, "where": {"topic": "food"}}]},
        evaluations={"spanish_vs_tweets": {"positive": [{"source": "chatterbot", "args": {"lang": "spanish"}}],
                                           "negative": [{"source": "tweets"}]}},
        sites=["layers.5.resid", "layers.20.resid"],
        max_per_source=40,
    )
    return train_probe(spec, smollm2, cache, progress=False)


def test_probe_beats_its_shuffled_label_control(language_probe):
    card = language_probe.card
    assert card["held_out"]["n"] >= 150
    assert card["held_out"]["auroc"] >= 0.9
    assert card["shuffled_label_control_auroc"] <= 0.75
    assert card["cross_source"]["spanish_vs_tweets"]["auroc"] >= 0.7
    assert card["site"] in ("layers.5.resid", "layers.20.resid")
    assert set(card["site_selection_cv_auroc"]) == {"layers.5.resid", "layers.20.resid"}
    assert "correlational" in card["caveat"]


def test_card_answers_will_it_fire_on_my_traffic(language_probe):
    card = language_probe.card
    # the threshold is the leave-one-source-out one, not 0.5, and the artifact uses it
    assert card["threshold"] == pytest.approx(language_probe.threshold, abs=1e-6)
    assert 0.0 < language_probe.threshold < 1.0 and card["target_fpr"] == 0.01
    assert "leave-one-source-out" in card["threshold_rule"]
    assert card["training"]["folds"] == 3
    assert set(card["ordinary_sources"]) == {"chatterbot[lang=english]", "tweets", "rotten-tomatoes"}
    for entry in card["ordinary_sources"].values():
        assert entry["n"] >= 35
        assert entry["above_threshold_rate"] <= 0.01  # by construction of the rule (floor(0.01 * 40) = 0)
        low, high = entry["ci95"]
        assert low <= entry["above_threshold_rate"] <= high <= 0.15
        assert 0 <= entry["above_blind_threshold"]["above_threshold_rate"] <= 1
        assert entry["loso_auroc_vs_positives"] >= 0.9
    assert card["loso_auroc"] >= 0.95
    r = card["recall"]
    assert 0.5 <= r["at_threshold"]["above_threshold_rate"] <= 1
    assert r["at_0.1pct_fpr"] <= r["at_1pct_fpr"] + 1e-9
    assert set(r["per_positive_source"]) == {"chatterbot[lang=french]", "chatterbot[lang=german]"}
    assert card["held_out_positive"]["spanish"]["above_threshold_rate"] >= 0.5  # a language never trained on
    assert card["held_out_ordinary"]["python-docs"]["n"] == 40
    assert card["held_out_ordinary"]["python-docs"]["above_threshold_rate"] <= 0.2
    assert card["topical"]["english_food_quotes"]["n"] == 40
    assert 0 <= card["ece"] <= 0.2
    assert card["by_length"] and all("ordinary" in v and "recall" in v for v in card["by_length"].values())
    assert {e["pooling"] for e in card["selection"]} == {"mean", "last", "wmax"}
    assert card["pooling"] in ("mean", "last", "wmax") and card["pooling"] == language_probe.pooling
    assert "correlational" in card["caveat"]


def test_validity_reference_comes_from_unseen_ordinary_sources(language_probe, smollm2, cache):
    from monitor.probes import corpora

    ref, card = language_probe.validity, language_probe.card["validity"]
    assert ref is not None and ref.window == card["window"] == 64
    assert "one held-out source each (4 sources)" in card["logit_method"]  # 3 LOSO sources + python-docs
    assert ref.logit_threshold > ref.logit_median

    def ratio(texts: list[str]) -> float:
        x = cache.get(texts, [language_probe.site], progress=False)[language_probe.site][language_probe.pooling]
        return ref.logit_ratio(x.astype(np.float64) @ language_probe.weights + language_probe.bias)

    english = [t.text for t in corpora.sample(corpora.dialog("english"), 64, seed=11)]
    french = [t.text for t in corpora.sample(corpora.dialog("french"), 64, seed=11)]
    assert ratio(english) < 1.0  # ordinary traffic of a kind the probe was trained on: in its domain
    assert ratio(french) > 1.0   # all traffic moved along what the probe reads


def test_card_and_artifact_round_trip(language_probe, tmp_path):
    path = language_probe.save(tmp_path / "p.probe.json")
    back = Probe.load(path, fingerprint=language_probe.fingerprint, sites={language_probe.site: 576})
    assert back.card == language_probe.card
    np.testing.assert_array_equal(back.weights, language_probe.weights)
    assert back.bias == language_probe.bias
    assert b"pickle" not in path.read_bytes()


def test_tampered_and_mismatched_artifacts_are_refused(language_probe, tmp_path):
    path = language_probe.save(tmp_path / "p.probe.json")
    body = json.loads(path.read_text())
    body["weights"][0] += 1.0
    path.write_text(json.dumps(body))
    with pytest.raises(ProbeError, match="checksum mismatch"):
        Probe.load(path)
    path = language_probe.save(tmp_path / "p.probe.json")
    with pytest.raises(ProbeError, match=r"trained on model SmolLM2.*running model is sha256:other"):
        Probe.load(path, fingerprint="sha256:other")
    with pytest.raises(ProbeError, match="not monitored"):
        Probe.load(path, sites={"layers.1.resid": 576})
    with pytest.raises(ProbeError, match=r"expects 576 dims.*gives 384"):
        Probe.load(path, sites={language_probe.site: 384})
    (tmp_path / "junk.probe.json").write_bytes(b"\x80\x04not json")
    with pytest.raises(ProbeError, match="not a readable probe"):
        Probe.load(tmp_path / "junk.probe.json")


def test_scoring_matches_sklearn_predict_proba(smollm2, cache):
    rng = np.random.default_rng(0)
    from monitor.probes import corpora

    texts = [t.text for t in corpora.sample(corpora.insults(), 80, seed=5)]
    labels = np.array([i % 2 for i in range(80)])
    x = cache.get(texts, ["layers.8.resid"], progress=False)["layers.8.resid"]["mean"].astype(np.float64)
    pipe = fit_pipeline(0.1, 0, x, labels)
    logits = pipe.decision_function(x)
    platt = LogisticRegression(C=1e6).fit(logits.reshape(-1, 1), labels)
    w, b = _fold(pipe, float(platt.coef_[0, 0]), float(platt.intercept_[0]))
    fp = fingerprint(smollm2.model)
    probes = [Probe("a", "layers.8.resid", "mean", w, b, "m", fp),
              Probe("b", "layers.8.resid", "mean", rng.normal(size=576).astype(np.float32) * 0.01, 0.3, "m", fp)]
    got = ProbeSet(probes).score_features({("layers.8.resid", "mean"): x.astype(np.float32)})
    want = platt.predict_proba(pipe.decision_function(x).reshape(-1, 1))[:, 1]
    np.testing.assert_allclose(got[:, 0], want, atol=2e-4)
    np.testing.assert_allclose(got[:, 1], 1 / (1 + np.exp(-(x @ probes[1].weights + 0.3))), atol=1e-5)


def test_probe_set_refuses_mixed_models(language_probe):
    other = Probe("x", language_probe.site, "mean", language_probe.weights, 0.0, "m", "sha256:other")
    with pytest.raises(ProbeError, match="different models"):
        ProbeSet([language_probe, other])


def test_eval_warns_when_quality_drops(smollm2, cache, language_probe):
    from monitor.probes import corpora

    # labels unrelated to language: the probe cannot transfer
    texts = [t.text for t in corpora.sample(corpora.dialog("english"), 30, seed=9)]
    texts += [t.text for t in corpora.sample(corpora.dialog("english"), 30, seed=10)]
    labels = np.array([0] * 30 + [1] * 30)
    result = evaluate(language_probe, smollm2, cache, texts, labels, progress=False)
    assert "warning" in result
    good = [t.text for t in corpora.sample(corpora.dialog("french"), 30, seed=11)]
    result = evaluate(language_probe, smollm2, cache, good + texts[:30], 1 - labels, progress=False)
    assert "warning" not in result and result["auroc"] >= 0.9


def test_builtin_specs_are_valid():
    from monitor.probes.concepts import builtin_specs

    names = {s.concept for s in builtin_specs()}
    assert {"prompt_injection", "insult", "negative_sentiment", "non_english", "health_topic"} <= names
    assert all(s.evaluations for s in builtin_specs())  # every built-in concept has a cross-source check


def test_bad_spec_gives_a_clear_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("concept: Bad Name\npositive: [{source: nowhere}]\nnegative: []\n")
    with pytest.raises(ValueError) as err:
        load_spec(path)
    msg = str(err.value)
    assert "bad.yaml" in msg and "concept" in msg and "unknown source 'nowhere'" in msg


def test_probes_eval_command(language_probe, tmp_path):
    from typer.testing import CliRunner

    from monitor.cli import app
    from monitor.probes import corpora

    probe_path = language_probe.save(tmp_path / "non_english.probe.json")
    rows = [{"text": t.text, "lang": "fr"} for t in corpora.sample(corpora.dialog("french"), 20, seed=21)]
    rows += [{"text": t.text, "lang": "en"} for t in corpora.sample(corpora.dialog("english"), 20, seed=22)]
    good = tmp_path / "good.jsonl"
    good.write_text("\n".join(json.dumps(r) for r in rows))
    runner = CliRunner()
    result = runner.invoke(app, ["probes", "eval", str(probe_path), "--file", str(good), "--label-field", "lang",
                                 "--positive", "fr"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert '"auroc": 1.0' in result.output or '"auroc": 0.9' in result.output
    # labels that have nothing to do with language: the command warns and exits 1
    for i, r in enumerate(rows):
        r["lang"] = "fr" if i % 2 else "en"
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(json.dumps(r) for r in rows))
    result = runner.invoke(app, ["probes", "eval", str(probe_path), "--file", str(bad), "--label-field", "lang",
                                 "--positive", "fr"], terminal_width=200)
    assert result.exit_code == 1
    assert "does not transfer" in result.output


def _json_line(output: str) -> dict:
    lines = [ln for ln in output.splitlines() if ln.startswith("{")]
    assert len(lines) == 1, output  # --json prints one JSON object (progress and logs go elsewhere)
    return json.loads(lines[0])


def test_probes_eval_ordinary_reports_the_share_above_threshold(language_probe, tmp_path):
    from typer.testing import CliRunner

    from monitor.cli import app
    from monitor.probes import corpora

    probe_path = language_probe.save(tmp_path / "non_english.probe.json")
    english = tmp_path / "english.jsonl"
    english.write_text("\n".join(json.dumps({"text": t.text})
                                  for t in corpora.sample(corpora.fortunes("en"), 60, seed=31)))
    runner = CliRunner()
    result = runner.invoke(app, ["probes", "eval", str(probe_path), "--ordinary", str(english), "--json"])
    assert result.exit_code in (0, 1), result.output
    out = _json_line(result.stdout)
    assert out["n"] == 60 and 0 <= out["above_threshold_rate"] <= 0.2
    assert out["threshold"] == pytest.approx(language_probe.threshold)
    assert out["ci95"][0] <= out["above_threshold_rate"] <= out["ci95"][1]
    assert sum(v["n"] for v in out["by_length"].values()) == 60
    assert 0 < out["proposed_threshold"] <= 1 and out["target_fpr"] == 0.01
    assert "correlational" in out["caveat"]
    # French traffic passed off as ordinary: the probe fires on it, and the command says so
    french = tmp_path / "french.jsonl"
    french.write_text("\n".join(json.dumps({"text": t.text})
                                 for t in corpora.sample(corpora.dialog("french"), 40, seed=32)))
    result = runner.invoke(app, ["probes", "eval", str(probe_path), "--ordinary", str(french), "--json"])
    assert result.exit_code == 1
    out = _json_line(result.stdout)
    assert out["above_threshold_rate"] >= 0.5 and "would fire on this traffic" in out["warning"]
    result = runner.invoke(app, ["probes", "eval", str(probe_path)])
    assert result.exit_code == 2 and "either --file" in result.output
