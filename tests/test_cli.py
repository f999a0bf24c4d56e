"""The latentwatch command, run as a user would run it."""

from __future__ import annotations

import json

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


def test_demo_quick_runs_end_to_end_and_alarms_after_the_shift(tmp_path, smollm2):
    result = runner.invoke(app, ["demo", "--quick", "--out", str(tmp_path)], terminal_width=200)
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
    assert "rate:scores" in summary["detection_delay_records"]
    records = list(read_file(tmp_path / "live.lwsr"))
    assert len(records) == 240
    from monitor.baseline import Baseline

    assert Baseline.load(tmp_path / "baseline.safetensors").fingerprint == records[0].fingerprint
    assert "correlational" in result.output

    inspected = runner.invoke(app, ["inspect", str(tmp_path / "live.lwsr"), "--limit", "1"])
    assert inspected.exit_code == 0
    assert "240 records, 0 corrupt" in inspected.output


def test_inspect_fails_on_a_corrupt_file(tmp_path):
    path = tmp_path / "bad.lwsr"
    path.write_bytes(b"LWSR" + b"\x01" + b"\x00" * 40)
    result = runner.invoke(app, ["inspect", str(path)])
    assert result.exit_code == 1
