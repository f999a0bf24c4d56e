"""The latentwatch command, run as a user would run it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from collectors.sinks import read_file
from monitor.cli import app

runner = CliRunner()


def test_sites_lists_readable_names_for_an_encoder(minilm):
    result = runner.invoke(app, ["sites", "minilm"], terminal_width=200)
    assert result.exit_code == 0, result.output
    for name, module in (("layers.5.attn", "encoder.layer.5.attention.self"), ("layers.0.resid", "encoder.layer.0"),
                         ("embed", "embeddings")):
        line = next(line for line in result.output.splitlines() if f" {name} " in line)
        assert module in line


def test_sites_for_a_decoder_marks_defaults(smollm2):
    result = runner.invoke(app, ["sites", "smollm2", "--kind", "resid"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "model.layers.29 " in result.output
    default_lines = [line for line in result.output.splitlines() if line.rstrip(" │").endswith("yes")]
    assert len(default_lines) == 3
    assert "attn" not in result.output.split("┃")[-1]  # filtered by --kind


@pytest.mark.integration
@pytest.mark.slow
def test_demo_quick_runs_end_to_end_and_alarms_after_the_shift(demo_run):
    tmp_path, result = demo_run
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["live_records"] == 240 and summary["shift_at_record"] == 120
    assert summary["tap"]["hook_errors"] == summary["tap"]["worker_errors"] == 0
    assert summary["tap"]["records_emitted"] == 240
    # the budget is one false alarm per 1,000 records: 120 ordinary records should rarely alarm
    assert summary["false_alarms_before_shift"] <= 2
    assert summary["first_alarm_after_shift"] is not None and summary["first_alarm_after_shift"] <= 60
    rates = summary["concept_rates"]["prompt_injection"]
    assert rates["after_shift"] > rates["before_shift"] + 0.2
    # a detector on probe scores sees the shift (with thresholds at 2 % FPR on ordinary sources and grouped
    # calibration, the distribution test usually leads the rate test at this size)
    assert {"rate:scores", "ks:scores"} & set(summary["detection_delay_records"])
    records = list(read_file(tmp_path / "live.lwsr"))
    assert len(records) == 240
    from monitor.analysis.baseline import Baseline

    assert Baseline.load(tmp_path / "baseline.safetensors").fingerprint == records[0].fingerprint
    assert "correlational" in result.output

    inspected = runner.invoke(app, ["inspect", str(tmp_path / "live.lwsr"), "--limit", "1"])
    assert inspected.exit_code == 0
    assert "240 records, 0 corrupt" in inspected.output

    # the /metrics the demo served, as scraped at the end of the live traffic
    from prometheus_client.parser import text_string_to_metric_families

    fams = {f.name: f for f in text_string_to_metric_families((tmp_path / "metrics.txt").read_text())}
    assert fams["latentwatch_records_received"].samples[0].value == 240
    alarms = sum(s.value for s in fams["latentwatch_drift_alarms"].samples if s.name.endswith("_total"))
    assert alarms == sum(1 for _ in json.loads((tmp_path / "alarms.json").read_text()))
    check_report_renders(tmp_path / "report.html", tmp_path)

    args = ["report", str(tmp_path / "live.lwsr"), "--baseline", str(tmp_path / "baseline.safetensors"),
            "--probes", str(tmp_path / "probes"), "--shift-at", "120",
            "--out", str(tmp_path / "again.html")]
    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.output
    assert (tmp_path / "again.html").read_text().count('class="plot"') == 3

    # a ready sidecar configuration for the artifacts, readable by a sidecar running as another user
    from monitor.sidecar.settings import load_settings

    settings = load_settings(tmp_path / "sidecar.yaml")
    assert settings.baseline == (tmp_path / "baseline.safetensors").resolve()
    assert settings.source.path == (tmp_path / "live.lwsr").resolve()
    assert f"latentwatch serve -c {(tmp_path / 'sidecar.yaml').resolve()}" in " ".join(result.output.split())
    assert (tmp_path / "baseline.safetensors").stat().st_mode & 0o044 == 0o044


def check_report_renders(report, tmp_path):
    """Render the HTML report in headless Chromium: its plots are there and are not blank."""
    import os
    import shutil
    import subprocess

    import numpy as np

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        if os.environ.get("CI"):
            raise AssertionError("chromium is not installed (.ci/run installs it)")
        pytest.skip("chromium not installed: apt-get install chromium")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'chromium'}"]
    dom = subprocess.run([chromium, *flags, "--dump-dom", report.as_uri()], capture_output=True, text=True,
                         timeout=120).stdout
    assert dom.count('class="plot"') == 3  # statistics over time, concept hit share over time, score distributions
    assert dom.count("data:image/png;base64,") == 3
    shot = tmp_path / "report.png"
    subprocess.run([chromium, *flags, "--window-size=1280,1600", f"--screenshot={shot}", report.as_uri()],
                   capture_output=True, timeout=120)
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[0] == 1600 and float(np.std(pixels[..., :3])) > 0.05  # rendered plots, not a blank page


def test_inspect_fails_on_a_corrupt_file(tmp_path):
    path = tmp_path / "bad.lwsr"
    path.write_bytes(b"LWSR" + b"\x01" + b"\x00" * 40)
    result = runner.invoke(app, ["inspect", str(path)])
    assert result.exit_code == 1


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """``latentwatch ARGS`` as a user runs it (the console entry point, not typer's test runner)."""
    return subprocess.run([sys.executable, "-m", "monitor", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.integration  # runs the command in a subprocess
@pytest.mark.parametrize("args, message", [
    (["inspect", "no-such-file.lwsr"], "No such file or directory"),
    (["replay", "no-such-file.lwsr"], "no such signature file"),
    (["baseline", "show", "pyproject.toml"], "not a readable baseline file"),
    (["probes", "show", "docs"], "no *.probe.json files"),
])
def test_user_errors_are_one_line_on_stderr_with_exit_code_2(args, message):
    result = run_cli(*args)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr + result.stdout


@pytest.mark.integration
def test_replay_of_a_file_that_is_not_a_signature_file_fails(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("these are not signatures\n" * 20)
    result = run_cli("replay", str(text), "--url", "http://127.0.0.1:9/ingest")
    assert result.returncode == 2
    assert "not a signature file" in result.stderr and "sidecar" not in result.stderr


@pytest.mark.integration
def test_errors_print_markup_literally_and_debug_shows_the_traceback(tmp_path):
    bad = tmp_path / "[red]sidecar.yaml"
    bad.write_text("baseline: [unclosed\n")
    result = run_cli("serve", "-c", str(bad))
    assert result.returncode == 2
    assert "[red]sidecar.yaml" in result.stderr  # not swallowed as rich markup
    debug = run_cli("--debug", "inspect", "no-such-file.lwsr")
    assert debug.returncode != 0 and "Traceback" in debug.stderr
