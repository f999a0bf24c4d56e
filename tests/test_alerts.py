"""Alert rules: generated file in sync, valid for promtool, unit-tested for every alert, runbooks present."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from monitor.ops import rules

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "alerts" / "latentwatch.rules.yml"
TESTS = ROOT / "alerts" / "tests" / "latentwatch.test.yml"
CRD = ROOT / "deploy" / "kubernetes" / "prometheusrule.yaml"


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is missing: .ci/run installs Debian's prometheus package")
    return path


def test_committed_rules_are_what_the_generator_writes(tmp_path):
    rules.write(tmp_path / "r.yml", tmp_path / "crd.yaml")
    assert (tmp_path / "r.yml").read_text() == RULES.read_text(), "run `latentwatch alerts build`"
    assert (tmp_path / "crd.yaml").read_text() == CRD.read_text(), "run `latentwatch alerts build`"
    crd = yaml.safe_load(CRD.read_text())
    assert crd["kind"] == "PrometheusRule" and crd["spec"] == yaml.safe_load(RULES.read_text())


@pytest.mark.integration
def test_promtool_checks_and_unit_tests_pass():
    check = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    unit = subprocess.run([promtool(), "test", "rules", str(TESTS)], capture_output=True, text=True, cwd=TESTS.parent)
    assert unit.returncode == 0, unit.stdout + unit.stderr


def test_every_alert_is_tested_both_ways_and_has_a_runbook():
    alerts = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r]
    cases = [c for t in yaml.safe_load(TESTS.read_text())["tests"] for c in t.get("alert_rule_test", [])]
    for alert in alerts:
        name = alert["alert"]
        mine = [c for c in cases if c["alertname"] == name]
        assert any(c["exp_alerts"] for c in mine), f"{name}: no test where it fires"
        assert any(not c["exp_alerts"] for c in mine), f"{name}: no test where it stays quiet"
        assert name.startswith("Latentwatch") and alert["labels"]["severity"] in ("critical", "warning")
        assert {"summary", "description", "runbook_url"} <= set(alert["annotations"])
        assert alert["annotations"]["runbook_url"].endswith(f"/docs/runbooks/{name}.md")
        runbook = ROOT / "docs" / "runbooks" / f"{name}.md"
        assert runbook.exists(), f"missing {runbook}"
        text = runbook.read_text()
        assert "**Meaning.**" in text and "**Confirm.**" in text and "**Act.**" in text


@pytest.mark.integration
def test_a_broken_expectation_fails_the_unit_tests(tmp_path):
    """The unit tests compare annotations exactly: a wrong expectation is caught."""
    shutil.copy(RULES, tmp_path / "latentwatch.rules.yml")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "t.test.yml").write_text(TESTS.read_text().replace("prompt_injection (+0.42)",
                                                                             "prompt_injection (+0.99)"))
    unit = subprocess.run([promtool(), "test", "rules", "t.test.yml"], capture_output=True, text=True,
                          cwd=tmp_path / "tests")
    assert unit.returncode != 0 and "LatentwatchConceptDrift" in unit.stdout + unit.stderr
