"""The release gate (``latentwatch gate``): suites, reports, the checks on synthetic data, and the whole
gate on real weights: it passes for the model it was built on and fails for that model's weights
perturbed on purpose."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from monitor.analysis.baseline import AnalyzerConfig, Baseline
from monitor.cli import app
from monitor.gate import run as gate
from monitor.gate.report import write_html
from monitor.gate.suite import ScoreBounds, SuiteError, load_suite
from tests.test_analyzer import make_records

runner = CliRunner()


# ------------------------------------------------------------------------------------------- suites
def test_builtin_suite_loads_the_demo_pack():
    loaded = load_suite("builtin:smollm2")
    assert sorted(s.concept for s in loaded.specs) == ["health_topic", "insult", "negative_sentiment",
                                                       "non_english", "prompt_injection"]
    assert loaded.suite.drift and loaded.suite.scores and loaded.suite.must_not_encode
    assert len(loaded.sha256) == 64 and load_suite("builtin:smollm2").sha256 == loaded.sha256


@pytest.mark.parametrize("body, message", [
    ({"name": "x"}, "no checks"),
    ({"name": "x", "drift": {}}, "add 'prompts'"),
    ({"name": "x", "probes": [{"spec": "builtin:nope", "require": {"min_loso_auroc": 0.9}}]}, "no built-in concept"),
    ({"name": "x", "probes": [{"spec": "builtin:insult", "require": {}}]}, "states no figure"),
    ({"name": "x", "probes": [{"spec": "builtin:insult", "require": {"min_lsoo_auroc": 0.9}}]}, "min_lsoo_auroc"),
    ({"name": "x", "must_not_encode": [{"name": "a", "positive": [{"source": "tweets"}],
                                        "negative": [{"source": "sotu"}], "max_auroc": 0.4}]}, "max_auroc"),
])
def test_invalid_suites_are_refused_naming_the_field(tmp_path, body, message):
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(body))
    with pytest.raises(SuiteError, match=message):
        load_suite(path)


def test_unknown_builtin_suite_and_bad_yaml(tmp_path):
    with pytest.raises(SuiteError, match="built-in suites: smollm2"):
        load_suite("builtin:nope")
    (tmp_path / "s.yaml").write_text("name: [unclosed")
    with pytest.raises(SuiteError, match="not YAML"):
        load_suite(tmp_path / "s.yaml")


# ------------------------------------------------------------------------------------------- reports
def _report(tmp_path: Path) -> Path:
    body = {"format": gate.FORMAT, "version": gate.REPORT_VERSION, "passed": True, "checks": [],
            "artifacts": {"baseline": "../../etc/passwd", "baseline_sha256": "0" * 64}}
    body["sha256"] = gate.checksum(body)
    path = tmp_path / "report.json"
    path.write_text(json.dumps(body))
    return path


def test_previous_report_is_verified(tmp_path):
    path = _report(tmp_path)
    assert gate.load_report(path)["passed"] is True
    body = json.loads(path.read_text())
    body["passed"] = False  # an edited verdict
    path.write_text(json.dumps(body))
    with pytest.raises(gate.GateError, match="checksum mismatch"):
        gate.load_report(path)
    path.write_text("{not json")
    with pytest.raises(gate.GateError, match="not a readable gate report"):
        gate.load_report(path)


def test_previous_baseline_must_sit_beside_the_report_and_match_its_hash(tmp_path):
    prev = gate.load_report(_report(tmp_path))
    with pytest.raises(gate.GateError, match="expected a file beside the report"):
        gate.previous_baseline(prev, tmp_path)
    base = Baseline.build(make_records(400, np.random.default_rng(0)), None,
                          AnalyzerConfig(window=50, stride=10, false_alarm_every=2000, pca_components=4))
    base.save(tmp_path / gate.BASELINE_FILE)
    prev["artifacts"] = {"baseline": gate.BASELINE_FILE, "baseline_sha256": "0" * 64}
    with pytest.raises(gate.GateError, match="does not match its report"):
        gate.previous_baseline(prev, tmp_path)
    prev["artifacts"]["baseline_sha256"] = gate._file_sha256(tmp_path / gate.BASELINE_FILE)
    assert gate.previous_baseline(prev, tmp_path).fingerprint == base.fingerprint


def test_cli_refuses_a_corrupt_previous_report_in_one_line_before_loading_a_model(tmp_path):
    (tmp_path / "report.json").write_text("{}")
    result = runner.invoke(app, ["gate", "--model", "smollm2", "--suite", "builtin:smollm2",
                                 "--previous", str(tmp_path / "report.json"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "not a latentwatch gate report" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "o").exists()


def test_html_report_escapes_what_it_shows(tmp_path):
    report = {"suite": {"name": "s", "source": "<script>x</script>", "sha256": "a" * 64},
              "model": {"name": "m", "source": "m", "fingerprint": "f"}, "previous": None, "passed": False,
              "prompts": None, "created_at": "t", "seconds": 1.0, "latentwatch": "0", "sha256": "b" * 64,
              "caveat": "c", "checks": [{"kind": "probe", "name": "<img src=x>", "status": "fail",
                                         "summary": "s", "figures": [vars(gate.figure("auroc", 0.5, 0.9, ">="))]}]}
    text = write_html(report, tmp_path / "r.html").read_text()
    assert "<script>" not in text and "<img" not in text and "FAILED" in text
    assert "&lt;script&gt;" in text


# ------------------------------------------------------------------------------------------- checks
def test_figures_fail_on_the_wrong_side_of_the_bound_or_when_missing():
    assert gate.figure("a", 0.95, 0.9, ">=").ok and not gate.figure("a", 0.85, 0.9, ">=").ok
    assert gate.figure("b", 0.01, 0.02, "<=").ok and not gate.figure("b", 0.03, 0.02, "<=").ok
    assert not gate.figure("c", None, 0.5, "<=").ok and not gate.figure("c", float("nan"), 0.5, "<=").ok
    assert gate.verdict("k", "n", []).status == "fail"  # a check that measured nothing does not pass


def test_score_changes_compare_rates_means_and_ranks():
    rng = np.random.default_rng(0)
    before = {"thresholds": {"c": 0.8}, "per_prompt": {"c": list(rng.uniform(0, 1, 300))}}
    same = gate.score_changes(before, before, ScoreBounds())
    assert same.status == "pass" and same.details["c"]["spearman"] == 1.0
    shuffled = {"thresholds": {"c": 0.8}, "per_prompt": {"c": list(rng.permutation(before["per_prompt"]["c"]))}}
    moved = gate.score_changes(shuffled, before, ScoreBounds())
    assert moved.status == "fail" and [f.name for f in moved.figures if not f.ok] == ["c: rank correlation"]
    raised = {"thresholds": {"c": 0.8}, "per_prompt": {"c": [min(1.0, v + 0.2) for v in before["per_prompt"]["c"]]}}
    failed = {f.name for f in gate.score_changes(raised, before, ScoreBounds()).figures if not f.ok}
    assert failed == {"c: rate change", "c: mean change"}
    other = {"thresholds": {"d": 0.5}, "per_prompt": {"d": [0.1] * 300}}
    assert gate.score_changes(other, before, ScoreBounds()).status == "fail"  # nothing in common


@pytest.fixture(scope="module")
def drift_baseline():
    config = AnalyzerConfig(window=50, stride=10, false_alarm_every=4000, pca_components=4, group_by="record")
    records = make_records(400, np.random.default_rng(1))
    return records, Baseline.build(records, None, config)


def test_drift_passes_for_the_same_records_and_fails_for_shifted_ones(drift_baseline):
    from monitor.gate.suite import DriftCheck

    records, base = drift_baseline
    same = gate.activation_drift(records, base, DriftCheck())
    assert same.status == "pass", same.summary
    assert max(f.value for f in same.figures[:-1]) < 1.0
    shifted = gate.activation_drift(make_records(400, np.random.default_rng(1), act_shift=0.5), base, DriftCheck())
    assert shifted.status == "fail"
    assert any(f.name.startswith("meanshift:layers.2.resid") and not f.ok for f in shifted.figures)
    assert shifted.details["detectors"]["meanshift:layers.2.resid"]["moved_most"]


def test_drift_fails_for_other_dimensions_and_for_implausible_activations(drift_baseline):
    from monitor.gate.suite import DriftCheck

    _, base = drift_baseline
    other = make_records(400, np.random.default_rng(2))
    for r in other:
        r.sites["layers.2.attn"]["heads"] = np.ones((5, 4), np.float32)
    result = gate.activation_drift(other, base, DriftCheck())
    assert result.status == "fail" and "differ from the previous release" in result.summary
    wild = make_records(400, np.random.default_rng(3))
    for r in wild[:100]:
        r.sites["layers.2.resid"]["mean"] *= 1e6
    result = gate.activation_drift(wild, base, DriftCheck())
    assert result.status == "fail"
    assert result.details["refused"].get("implausible") == 100


# ------------------------------------------------------------------------------------------- real models
SUITE = {
    "name": "test-gate", "max_length": 48,
    "prompts": {"max_per_source": 40, "sources": [{"source": "chatterbot", "args": {"lang": "english"}},
                                                   {"source": "tweets"},
                                                   {"source": "fortunes", "args": {"lang": "de"}}]},
    "probes": [{"spec": "builtin:non_english", "max_per_source": 20,
                "require": {"min_loso_auroc": 0.9, "max_ordinary_rate": 0.1}}],
    "must_not_encode": [{"name": "speaker_party", "positive": [{"source": "sotu", "where": {"party": "Democratic"}}],
                         "negative": [{"source": "sotu", "where": {"party": "Republican"}}],
                         "group_by": "president", "max_per_source": 60, "max_auroc": 0.8}],
    "scores": {}, "drift": {"window": 30, "stride": 10},
}


@pytest.fixture(scope="module")
def gate_runs(tmp_path_factory, smollm2):
    """The gate on SmolLM2 twice (the second against the first), then on SmolLM2's architecture with freshly
    initialised weights (a model that lacks the concepts), against the first."""

    root = tmp_path_factory.mktemp("gate")
    (root / "suite.yaml").write_text(yaml.safe_dump(SUITE))
    first = runner.invoke(app, ["gate", "--model", "smollm2", "--suite", str(root / "suite.yaml"),
                                "--out", str(root / "v1"), "--strict"], terminal_width=160)
    again = runner.invoke(app, ["gate", "--model", "smollm2", "--suite", str(root / "suite.yaml"),
                                "--out", str(root / "v2"), "--previous", str(root / "v1" / "report.json")],
                          terminal_width=160)
    perturbed = root / "perturbed"
    code = ("import sys, torch\nfrom transformers import AutoModelForCausalLM\nfrom collectors import models\n"
            "lm = models.load('smollm2')\ntorch.manual_seed(0)\n"
            "AutoModelForCausalLM.from_config(lm.model.config).save_pretrained(sys.argv[1])\n"
            "lm.tokenizer.save_pretrained(sys.argv[1])\n")
    subprocess.run([sys.executable, "-c", code, str(perturbed)], check=True, capture_output=True)
    bad = runner.invoke(app, ["gate", "--model", str(perturbed), "--suite", str(root / "suite.yaml"),
                              "--out", str(root / "v3"), "--previous", str(root / "v1" / "report.json")],
                        terminal_width=160)
    return root, first, again, bad


def test_gate_without_a_previous_release_skips_the_comparisons_and_strict_fails(gate_runs):
    root, first, _, _ = gate_runs
    report = json.loads((root / "v1" / "report.json").read_text())
    status = {c["kind"]: c["status"] for c in report["checks"]}
    assert status == {"probe": "pass", "must_not_encode": "pass", "drift": "skipped", "scores": "skipped"}
    assert first.exit_code == 1 and report["passed"] is False  # --strict: skipped counts
    assert (root / "v1" / gate.BASELINE_FILE).exists()
    assert (root / "v1" / "probes" / "non_english.probe.json").exists()


def test_gate_passes_for_the_model_it_was_built_on(gate_runs):
    root, _, again, _ = gate_runs
    assert again.exit_code == 0, again.output
    report = gate.load_report(root / "v2" / "report.json")
    assert report["passed"] and all(c["status"] == "pass" for c in report["checks"])
    scores = next(c for c in report["checks"] if c["kind"] == "scores")
    assert scores["details"]["non_english"]["spearman"] == 1.0  # same weights, same prompts, same scores
    drift = next(c for c in report["checks"] if c["kind"] == "drift")
    assert max(f["value"] for f in drift["figures"]) < 1.0
    assert "PASSED" in again.output and "PASSED" in (root / "v2" / "report.html").read_text()


def test_gate_fails_for_a_model_that_lacks_the_concept(gate_runs):
    root, _, _, bad = gate_runs
    assert bad.exit_code == 1, bad.output
    report = gate.load_report(root / "v3" / "report.json")
    status = {c["kind"]: c["status"] for c in report["checks"]}
    assert status["probe"] == "fail" and status["drift"] == "fail" and status["scores"] == "fail"
    probe = next(c for c in report["checks"] if c["kind"] == "probe")
    assert [f["name"] for f in probe["figures"] if not f["ok"]] == ["loso_auroc"]
    assert report["model"]["fingerprint"] != report["previous"]["model"]["fingerprint"]
    assert "FAIL drift: activation drift" in bad.output and "FAILED" in (root / "v3" / "report.html").read_text()


def test_must_not_encode_fails_for_an_attribute_the_model_plainly_encodes(smollm2, tmp_path):
    from monitor.gate.suite import MustNotEncode
    from monitor.probes.activations import FeatureCache

    check = MustNotEncode(name="writing_language", positive=[{"source": "fortunes", "args": {"lang": "de"}}],
                          negative=[{"source": "fortunes", "args": {"lang": "en"}}], group_by="topic",
                          max_per_source=60, max_auroc=0.7)
    result = gate.must_not_encode(check, smollm2, FeatureCache(smollm2, max_length=48), tmp_path, progress=False)
    assert result.status == "fail" and result.figures[0].value > 0.9


def test_ci_example_is_a_workflow_calling_the_gate_with_options_it_has():
    import re

    workflow = yaml.safe_load((Path(__file__).parents[1] / "docs" / "examples" / "gate-release.yml").read_text())
    runs = [s["run"] for s in workflow["jobs"]["gate"]["steps"] if "run" in s]
    call = next(r for r in runs if "latentwatch gate" in r)
    help_text = runner.invoke(app, ["gate", "--help"], terminal_width=200).output
    for option in re.findall(r"(--[a-z-]+)", call.split("latentwatch gate", 1)[1]):
        assert option in help_text, option


def test_cli_refuses_to_write_over_the_previous_release(tmp_path):
    body = {"format": gate.FORMAT, "version": gate.REPORT_VERSION, "passed": True, "checks": []}
    body["sha256"] = gate.checksum(body)
    (tmp_path / "report.json").write_text(json.dumps(body))
    result = runner.invoke(app, ["gate", "--model", "smollm2", "--suite", "builtin:smollm2",
                                 "--previous", str(tmp_path / "report.json"), "--out", str(tmp_path)])
    assert result.exit_code == 2 and "would overwrite the baseline" in result.output


def test_a_constant_concept_score_gives_a_report_without_nan():
    before = {"thresholds": {"c": 0.8}, "per_prompt": {"c": [0.1] * 50}}
    result = gate.score_changes(before, before, ScoreBounds())
    assert result.status == "fail" and result.details["c"]["spearman"] is None  # not measurable: fails, no NaN
    json.dumps(vars(result.figures[-1]), allow_nan=False)
